"""Probing and decoding media with PyAV / Pillow: frame counts, timestamps, orientation, resize + centre crop."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from trainer_core.data.media import probe, read_frames, write_video
from trainer_core.data.synthetic import COLOURS, make_synthetic_dataset
from trainer_core.errors import DatasetError

A, B, C, D = (200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)


def bands(width: int, height: int, colours) -> np.ndarray:
    """Vertical bands of equal width, one per colour."""
    arr = np.zeros((height, width, 3), np.uint8)
    step = width // len(colours)
    for i, c in enumerate(colours):
        arr[:, i * step : (i + 1) * step] = c
    return arr


@pytest.mark.parametrize(("ext", "fps"), [(".mp4", 24), (".webm", 30), (".gif", 10), (".mkv", 16), (".mov", 25)])
def test_probe_video_counts_and_timestamps(tmp_path, ext, fps):
    frames = np.stack([np.full((48, 64, 3), 8 * i, np.uint8) for i in range(12)])
    info = probe(write_video(tmp_path / f"clip{ext}", frames, fps))
    assert info.kind == "video"
    assert (info.width, info.height) == (64, 48)
    assert info.num_frames == 12
    assert info.frame_times[0] == 0
    assert all(b > a for a, b in zip(info.frame_times, info.frame_times[1:]))
    # containers round timestamps (ms for WebM/MKV, 1/100 s for GIF)
    assert float(info.frame_times[-1]) == pytest.approx(11 / fps, abs=0.011)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp"])
def test_probe_image(tmp_path, ext):
    path = tmp_path / f"img{ext}"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(path)
    info = probe(path)
    assert (info.kind, info.width, info.height, info.num_frames) == ("image", 64, 48, 1)


def test_resize_centre_crop_image_exact(tmp_path):
    # 128x64 into a 32x32 bucket: halve to 64x32, keep columns 16..48 = the middle two bands
    path = tmp_path / "bands.png"
    Image.fromarray(bands(128, 64, [A, B, C, D])).save(path)
    out = read_frames(probe(path), [0], (32, 32))
    assert out.shape == (1, 32, 32, 3) and out.dtype == np.uint8
    # bicubic blends +-2 output pixels around each band edge (crop columns 0 and 16)
    assert (out[0, :, 3:13] == B).all()
    assert (out[0, :, 19:29] == C).all()
    for colour in (A, D):
        assert not (out[0] == colour).all(axis=-1).any()


def test_resize_centre_crop_video(tmp_path):
    frames = np.stack([bands(128, 64, [A, B, C, D])] * 3)
    info = probe(write_video(tmp_path / "bands.mp4", frames, 16))
    out = read_frames(info, [0, 2, 2], (32, 32)).astype(int)
    assert out.shape == (3, 32, 32, 3)
    assert np.abs(out[:, 4:28, 2:10] - np.array(B)).max() <= 12  # lossy H.264 + chroma subsampling
    assert np.abs(out[:, 4:28, 22:30] - np.array(C)).max() <= 12


def test_read_frames_picks_the_requested_frames(tmp_path):
    levels = [10 + 12 * i for i in range(16)]
    frames = np.stack([np.full((32, 32, 3), v, np.uint8) for v in levels])
    info = probe(write_video(tmp_path / "levels.mp4", frames, 16))
    want = [15, 0, 7, 7, 3]
    out = read_frames(info, want, (32, 32))
    assert np.allclose(out.reshape(len(want), -1).mean(1), [levels[i] for i in want], atol=2)


def test_video_rotation_metadata_is_applied(tmp_path):
    # stored 64x48 with a white top-left quadrant, tagged "rotate 90 degrees counter-clockwise for display"
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:24, :32] = 255
    path = tmp_path / "rot.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16, options={"crf": "12"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode(None))
    info = probe(path)
    assert (info.width, info.height) == (48, 64)
    out = read_frames(info, [0], (48, 64))[0].astype(int)
    expected = np.rot90(stored, k=1)  # counter-clockwise: the white corner moves to the bottom-left
    assert out.shape == expected.shape
    assert np.abs(out - expected).mean() < 6


def test_exif_orientation_is_applied(tmp_path):
    stored = bands(32, 16, [A, B])  # A on the left
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # EXIF "rotate 90 CW to display"
    path = tmp_path / "photo.png"
    img.save(path, exif=exif)
    info = probe(path)
    assert (info.width, info.height) == (16, 32)
    out = read_frames(info, [0], (16, 32))[0]
    assert (out == np.rot90(stored, k=-1)).all()  # A ends on top


def test_unreadable_and_empty_files_are_named(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    with pytest.raises(DatasetError, match="broken.mp4"):
        probe(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty.png"):
        probe(empty)


def test_write_video_checks_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8), 16)
    with pytest.raises(ValueError, match="use one of"):
        write_video(tmp_path / "x.avi", np.zeros((2, 16, 16, 3), np.uint8), 16)


def test_synthetic_dataset_square_moves_as_captioned(tmp_path):
    folder = make_synthetic_dataset(tmp_path, n_clips=6, num_frames=9, size=(64, 48), seed=3)
    clips = sorted(folder.glob("*.mp4"))
    assert len(clips) == 6 and len(list(folder.glob("*.txt"))) == 6
    again = make_synthetic_dataset(tmp_path / "again", n_clips=6, num_frames=9, size=(64, 48), seed=3)
    for clip in clips:
        caption = clip.with_suffix(".txt").read_text().strip()
        assert caption == (again / clip.with_suffix(".txt").name).read_text().strip()
        _, colour, _, _, direction = caption.split()
        info = probe(clip)
        assert info.num_frames == 9 and float(info.fps) == pytest.approx(16)
        frames = read_frames(info, list(range(9)), (64, 48)).astype(int)
        # centroid of the pixels close to the caption's colour, first vs last frame
        mask = np.abs(frames - np.array(COLOURS[colour])).sum(-1) < 60
        ys, xs = [], []
        for f in (0, 8):
            y, x = np.nonzero(mask[f])
            ys.append(y.mean())
            xs.append(x.mean())
        dx, dy = xs[1] - xs[0], ys[1] - ys[0]
        expected = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}[direction]
        assert np.sign(round(dx / 10)) == expected[0] and np.sign(round(dy / 10)) == expected[1]


def test_frame_times_are_exact_fractions(tmp_path):
    info = probe(write_video(tmp_path / "a.mp4", np.zeros((5, 16, 16, 3), np.uint8), 16))
    assert all(isinstance(t, Fraction) for t in info.frame_times)
    assert info.frame_times == tuple(Fraction(i, 16) for i in range(5))
