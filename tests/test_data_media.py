"""Probing and decoding media with PyAV / Pillow: frame counts, timestamps, orientation, resize + centre crop."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from trainer_core.data import media
from trainer_core.data.media import MIN_SEEK_SKIP, black_bars, probe, read_frames, seek_runs, write_video
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


# --- seeking, black bars, zero-length and unsupported files -----------------------------------------------------


def gop_clip(path, n: int = 60, keyint: int = 8, size=(64, 48)):
    """A clip of textured, moving frames with a keyframe every ``keyint`` frames (and B-frames for H.264)."""
    rng = np.random.default_rng(0)
    w, h = size
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    frames = np.stack([np.roll(base, 3 * i, axis=1) for i in range(n)])
    if path.suffix == ".webm":
        codec, options = "libvpx-vp9", {"crf": "30", "b": "0", "g": str(keyint)}
    else:
        params = f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=2:b-adapt=0"
        codec, options = "libx264", {"crf": "14", "x264-params": params}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=16, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for arr in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def test_seek_runs_hand_computed():
    keys = [0, 8, 16, 24, 32, 40]
    assert seek_runs([3, 5, 20, 21, 30], keys, min_skip=1) == [[3, 5], [20, 21], [30]]
    assert seek_runs([7, 9], keys, min_skip=1) == [[7, 9]]  # keyframe 8 is the frame right after 7: no gain
    assert seek_runs([7, 10], keys, min_skip=1) == [[7, 10]]
    assert seek_runs([6, 10], keys, min_skip=1) == [[6], [10]]  # seeking to 8 skips decoding frame 7
    assert seek_runs([2, 40], [], min_skip=1) == [[2, 40]]
    # by default a seek must skip at least MIN_SEEK_SKIP frames
    assert MIN_SEEK_SKIP == 16
    assert seek_runs([3, 20, 21, 37, 41], keys) == [[3, 20, 21, 37, 41]]  # at most 15 frames skipped
    assert seek_runs([7, 25], keys) == [[7], [25]]  # seeking to keyframe 24 skips frames 8..23: 16 frames
    assert seek_runs([8, 25], keys) == [[8, 25]]  # 15 frames
    assert seek_runs([3, 30, 31, 45], keys) == [[3], [30, 31, 45]]  # keyframe 40 is only 8 past 31
@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".mov", ".webm"])
def test_seeking_decode_returns_the_decode_from_start_frames(tmp_path, ext, monkeypatch):
    info = probe(gop_clip(tmp_path / f"gop{ext}"))
    assert info.num_frames == 60 and info.keyframes == tuple(range(0, 60, 8)) and len(info.pts) == 60
    rng = np.random.default_rng(1)
    sets = [[0], [59], [17, 18, 19], [5, 40], [2, 30, 58], list(range(0, 60, 9)), [58, 3, 3, 30]]
    sets += [rng.choice(60, rng.integers(1, 10), replace=False).tolist() for _ in range(8)]
    expected = [read_frames(info, idx, (32, 32), seek=False) for idx in sets]

    def no_fallback(*args):
        raise AssertionError("the seeking path fell back to decoding from the start")

    monkeypatch.setattr(media, "_decode_from_start", no_fallback)
    for idx, ref in zip(sets, expected):
        assert np.array_equal(read_frames(info, idx, (32, 32)), ref), idx


def test_gif_is_not_seeked(tmp_path):
    info = probe(write_video(tmp_path / "a.gif", np.zeros((4, 16, 16, 3), np.uint8), 10))
    assert info.pts == () and info.keyframes == ()


def boxed_frames(n: int, size=(64, 48), top=0, bottom=0, left=0, right=0, black_first=False) -> np.ndarray:
    w, h = size
    rng = np.random.default_rng(2)
    frames = rng.integers(90, 230, (n, h, w, 3), dtype=np.uint8)
    frames[:, :top] = 0
    frames[:, h - bottom :] = 0
    frames[:, :, :left] = 0
    frames[:, :, w - right :] = 0
    if black_first:
        frames[:4] = 0  # a fade from black: says nothing about bars
    return frames


def test_black_bars_letterbox_clip_and_pillarbox_image(tmp_path):
    path = tmp_path / "letterbox.mp4"
    frames = boxed_frames(40, top=6, bottom=6, black_first=True)
    with av.open(str(path), "w") as container:  # keyframes every 10 frames, so the looks see several
        stream = container.add_stream("libx264", rate=16, options={"crf": "12", "g": "10"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for arr in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        container.mux(stream.encode(None))
    top, bottom, left, right = black_bars(probe(path))
    assert top == pytest.approx(6 / 48, abs=0.03) and bottom == pytest.approx(6 / 48, abs=0.03)
    assert left == right == 0

    img = tmp_path / "pillar.png"
    Image.fromarray(boxed_frames(1, left=8, right=12)[0]).save(img)
    top, bottom, left, right = black_bars(probe(img))
    assert (top, bottom) == (0, 0)
    assert left == pytest.approx(8 / 64, abs=0.02) and right == pytest.approx(12 / 64, abs=0.02)


def test_black_bars_none_on_full_frames_and_dark_scenes(tmp_path):
    assert black_bars(probe(write_video(tmp_path / "full.mp4", boxed_frames(8), 16))) == (0, 0, 0, 0)
    folder = make_synthetic_dataset(tmp_path / "syn", n_clips=2, num_frames=9, size=(64, 48), seed=0)
    for clip in folder.glob("*.mp4"):  # dark grey background (30 of 255) with a square: not letterboxed
        assert black_bars(probe(clip)) == (0, 0, 0, 0)
    black = write_video(tmp_path / "black.mp4", np.zeros((8, 32, 32, 3), np.uint8), 16)
    assert black_bars(probe(black)) == (0, 0, 0, 0)  # all black: nothing to tell bars from


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".mkv"])
def test_zero_length_clip_is_named(tmp_path, ext):
    path = tmp_path / f"zero{ext}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9" if ext == ".webm" else "libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
        container.mux(stream.encode(None))
    with pytest.raises(DatasetError, match=rf"zero{ext}: zero-length clip.*re-export"):
        probe(path)


def test_zero_byte_and_unsupported_files_are_named(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty\.mp4: the file is empty \(0 bytes\)"):
        probe(empty)
    avi = tmp_path / "old.avi"
    avi.write_bytes(b"RIFF")
    with pytest.raises(DatasetError, match=r"old\.avi: unsupported file type '\.avi'.*ffmpeg -i in\.avi out\.mp4"):
        probe(avi)
