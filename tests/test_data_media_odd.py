"""Odd but real inputs: mirrored display matrices, MP4 edit lists (lossless cuts), several video streams, video
alpha, animated WebP/APNG, unreadable files, HDR and interlaced sources.

Each test builds its media in ``tmp_path`` and compares the pack against an outside reference: ffmpeg's autorotate
rule, what PyAV/ffmpeg decode, Pillow's frames, or the expected RGB.
"""

from __future__ import annotations

import math
import os
import struct
from fractions import Fraction
from types import SimpleNamespace

import av
import numpy as np
import pytest
from PIL import Image, ImageSequence

from trainer_core.data import media
from trainer_core.data.media import display_orientation, pick_stream, probe, read_frames, shown
from trainer_core.errors import DatasetError


def quadrants(h: int, w: int) -> np.ndarray:
    """Top-left red, top-right green, bottom-left blue, bottom-right white."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2 :] = (0, 255, 0)
    a[h // 2 :, : w // 2] = (0, 0, 255)
    a[h // 2 :, w // 2 :] = 255
    return a


def ffmpeg_autorotate(a: np.ndarray, m) -> np.ndarray:
    """ffmpeg's rule (fftools/ffmpeg_filter.c, ffplay.c) applied to a stored frame under display matrix ``m``: the
    transpose/hflip/vflip filters it inserts, written as array operations (the audit's port)."""
    sx, sy = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    theta = -round(-math.degrees(math.atan2(m[1] / sy, m[0] / sx)))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    t = np.swapaxes(a, 0, 1)
    if abs(theta - 90) < 1:
        return t if m[3] > 0 else t[:, ::-1]  # cclock_flip | clock
    if abs(theta - 180) < 1:
        a = a[:, ::-1] if m[0] < 0 else a
        return a[::-1] if m[4] < 0 else a
    if abs(theta - 270) < 1:
        return t[::-1, ::-1] if m[3] < 0 else t[::-1]  # clock_flip | cclock
    return a[::-1] if m[4] < 0 else a


ONE = 0x10000  # 1.0 in the matrix's 16.16 fixed point
W_ONE = 0x40000000  # 1.0 in 2.30 (the last element)
MATRICES = {
    "identity": (ONE, 0, 0, 0, ONE, 0, 0, 0, W_ONE),
    "rot90": (0, ONE, 0, -ONE, 0, 0, 0, 0, W_ONE),  # an iPhone portrait clip
    "rot180": (-ONE, 0, 0, 0, -ONE, 0, 0, 0, W_ONE),
    "rot270": (0, -ONE, 0, ONE, 0, 0, 0, 0, W_ONE),
    "hflip": (-ONE, 0, 0, 0, ONE, 0, 0, 0, W_ONE),
    "vflip": (ONE, 0, 0, 0, -ONE, 0, 0, 0, W_ONE),
    "transpose_a": (0, ONE, 0, ONE, 0, 0, 0, 0, W_ONE),
    "transpose_b": (0, -ONE, 0, -ONE, 0, 0, 0, 0, W_ONE),
}


def first_frame(path) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """The first frame as stored (rgb24) and its display matrix, straight from PyAV."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        matrix = [bytes(d) for d in frame.side_data if d.type == av.sidedata.sidedata.Type.DISPLAYMATRIX]
        return frame.to_ndarray(format="rgb24"), struct.unpack("=9i", matrix[0]) if matrix else None


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_display_matrix_rotation_and_mirroring_as_ffmpeg(tmp_path, name):
    path = tmp_path / f"{name}.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = 32, 64, "yuv444p"
        stream.set_display_matrix(MATRICES[name])
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(quadrants(64, 32), format="rgb24")))
        container.mux(stream.encode(None))
    stored, matrix = first_frame(path)
    if name != "identity":  # the file really carries the matrix
        assert matrix == MATRICES[name]
    expected = ffmpeg_autorotate(stored, matrix or MATRICES["identity"])
    info = probe(path)
    assert (info.width, info.height) == (expected.shape[1], expected.shape[0])
    for seek in (True, False):
        out = read_frames(info, [0, 2], (expected.shape[1], expected.shape[0]), seek=seek)
        assert np.abs(out.astype(int) - expected.astype(int)).max() <= 8, (name, seek)


def test_display_orientation_hand_computed():
    """(transpose, flip upside down, mirror) for each matrix, worked out from ffmpeg's filter choice."""
    assert display_orientation(None) == (False, False, False)
    assert display_orientation(MATRICES["identity"]) == (False, False, False)
    assert display_orientation(MATRICES["rot90"]) == (True, False, True)  # transpose=clock
    assert display_orientation(MATRICES["rot270"]) == (True, True, False)  # transpose=cclock
    assert display_orientation(MATRICES["rot180"]) == (False, True, True)
    assert display_orientation(MATRICES["hflip"]) == (False, False, True)
    assert display_orientation(MATRICES["vflip"]) == (False, True, False)
    assert display_orientation(MATRICES["transpose_a"]) == (True, False, False)  # transpose=cclock_flip
    assert display_orientation(MATRICES["transpose_b"]) == (True, True, True)  # transpose=clock_flip
    half = round(ONE * math.sqrt(0.5))
    with pytest.raises(ValueError, match="45 degrees"):
        display_orientation((half, half, 0, -half, half, 0, 0, 0, W_ONE))


def test_rotated_file_with_odd_angle_is_refused_in_one_line(tmp_path, monkeypatch):
    path = media.write_video(tmp_path / "tilted.mp4", np.zeros((2, 32, 32, 3), np.uint8), 16)
    half = round(ONE * math.sqrt(0.5))
    monkeypatch.setattr(media, "_display_matrix", lambda frame: (half, half, 0, -half, half, 0, 0, 0, W_ONE))
    with pytest.raises(DatasetError, match=r"tilted\.mp4: the display matrix rotates the picture by 45 degrees"):
        probe(path)


# --- MP4 edit lists ---------------------------------------------------------------------------------------------


def lossless_cut(tmp_path, bframes: int, hidden: int = 12, n: int = 48):
    """An mp4 like ``ffmpeg -ss 0.5 -i src.mp4 -c copy cut.mp4`` (or LosslessCut) writes: the whole first GOP is
    kept, and an edit list hides its first ``hidden`` frames (their packets are flagged discard)."""
    src, cut = tmp_path / f"src{bframes}.mp4", tmp_path / f"cut{bframes}.mp4"
    params = f"keyint=24:min-keyint=24:scenecut=0:bframes={bframes}"
    with av.open(str(src), "w") as container:
        stream = container.add_stream("libx264", rate=24, options={"crf": "0", "x264-params": params})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(n):
            frame = np.full((32, 32, 3), 10 + 5 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    with av.open(str(src)) as ic, av.open(str(cut), "w") as oc:
        ist = ic.streams.video[0]
        ost = oc.add_stream_from_template(ist)
        shift = round(Fraction(hidden, 24) / ist.time_base)
        for packet in ic.demux(ist):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = ost
            oc.mux(packet)
    return cut


def level(frames: np.ndarray) -> list[int]:
    """Which source frame (by its grey level) each decoded frame shows."""
    return [round((float(f.mean()) - 10) / 5) for f in frames]


@pytest.mark.parametrize("bframes", [0, 2])
def test_edit_list_frames_match_what_ffmpeg_outputs(tmp_path, bframes):
    path = lossless_cut(tmp_path, bframes)
    with av.open(str(path)) as container:
        assert sum(p.is_discard for p in container.demux(video=0) if p.size) == 12  # the file really is cut
    with av.open(str(path)) as container:
        ref = list(container.decode(video=0))
    ref_levels = level(np.stack([f.to_ndarray(format="rgb24") for f in ref]))
    assert ref_levels[0] == 12 and len(ref) == 36
    info = probe(path)
    assert info.num_frames == len(ref)
    assert info.frame_times == tuple(Fraction(f.pts - ref[0].pts) * f.time_base for f in ref)
    rng = np.random.default_rng(0)
    sets = [[0], [35], [24, 25], [30, 33], [0, 35], list(range(0, 36, 5))]
    sets += [sorted(rng.choice(36, 4, replace=False).tolist()) for _ in range(4)]
    for idx in sets:
        for seek in (True, False):
            assert level(read_frames(info, idx, (32, 32), seek=seek)) == [ref_levels[i] for i in idx], (idx, seek)


# --- several video streams --------------------------------------------------------------------------------------


def test_the_stream_ffmpeg_picks_is_read_and_named(tmp_path):
    path = tmp_path / "thumb_first.mkv"
    with av.open(str(path), "w") as container:
        thumb = container.add_stream("libx264", rate=16, options={"crf": "12"})
        thumb.width, thumb.height, thumb.pix_fmt = 32, 32, "yuv420p"
        main = container.add_stream("libx264", rate=16, options={"crf": "12"})
        main.width, main.height, main.pix_fmt = 128, 64, "yuv420p"
        container.mux(thumb.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")))
        for i in range(8):
            arr = np.full((64, 128, 3), 20 * i, np.uint8)
            container.mux(main.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        container.mux(thumb.encode(None))
        container.mux(main.encode(None))
    with av.open(str(path)) as container:
        best = container.streams.best("video")  # libavformat's av_find_best_stream
        best_index, best_size = best.index, (best.width, best.height)
    info = probe(path)
    assert info.stream == best_index == 1
    assert (info.width, info.height, info.num_frames) == (*best_size, 8)
    assert level(read_frames(info, [7], (128, 64))) == [round((140 - 10) / 5)]
    assert any("2 video streams; reading stream #1 (128x64)" in note for note in info.notes)


def fake_stream(index: int, width: int, height: int, attached: bool = False, default: bool = False):
    flags = av.stream.Disposition(0)
    flags |= av.stream.Disposition.attached_pic if attached else 0
    flags |= av.stream.Disposition.default if default else 0
    return SimpleNamespace(index=index, disposition=flags, codec_context=SimpleNamespace(width=width, height=height))


def test_pick_stream_skips_attached_pictures_then_takes_the_largest():
    cover = fake_stream(0, 3000, 3000, attached=True)
    small, large, same = fake_stream(1, 320, 240), fake_stream(2, 640, 480), fake_stream(3, 640, 480)
    assert pick_stream([cover, small, large, same]) is large  # the first of equal sizes
    assert pick_stream([cover]) is None and pick_stream([]) is None
    marked = fake_stream(4, 320, 240, default=True)  # the default flag weighs 5,000,000 pixels (fftools)
    assert pick_stream([large, marked]) is marked
    assert pick_stream([fake_stream(5, 4000, 2000), marked]).index == 5


# --- video alpha ------------------------------------------------------------------------------------------------


def test_vp9_alpha_is_composited_onto_black(tmp_path):
    rgba = np.zeros((32, 64, 4), np.uint8)
    rgba[:, :32] = (250, 20, 20, 255)  # opaque red
    rgba[:, 32:] = (255, 255, 255, 0)  # fully transparent, stored white
    path = tmp_path / "alpha.webm"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=16, options={"crf": "4", "b": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuva420p"
        for _ in range(4):
            frame = av.VideoFrame.from_ndarray(rgba, format="rgba").reformat(format="yuva420p")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        assert container.streams.video[0].metadata.get("alpha_mode") == "1"
    info = probe(path)
    assert info.transparent
    for seek in (True, False):
        out = read_frames(info, [0, 3], (64, 32), seek=seek).astype(int)
        assert np.abs(out[:, 4:28, 4:26] - (250, 20, 20)).max() <= 12  # rgb * alpha / 255, alpha 255
        assert out[:, 4:28, 38:60].max() <= 12  # alpha 0: black, not the stored white
    assert media.black_bars(info)[3] > 0.3  # the thumbnails see the composited picture too


# --- animated WebP / APNG ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".webp", ".png"])
def test_animated_image_is_a_clip_with_its_timing(tmp_path, ext):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    frames = [Image.fromarray(np.full((24, 32, 3), c, np.uint8)) for c in colours]
    path = tmp_path / f"anim{ext}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[100, 50, 200, 100], lossless=True)
    with Image.open(path) as img:  # Pillow's frames and durations are the reference
        ref = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(img)]
    info = probe(path)
    assert (info.kind, info.num_frames, info.width, info.height) == ("video", 4, 32, 24)
    assert info.frame_times == (0, Fraction(1, 10), Fraction(15, 100), Fraction(35, 100))
    out = read_frames(info, [3, 0, 1, 2], (32, 24))
    assert np.array_equal(out, np.stack([ref[3], ref[0], ref[1], ref[2]]))
    assert media.black_bars(info) == (0, 0, 0, 0)


def test_still_webp_and_png_stay_images(tmp_path):
    for ext in (".webp", ".png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"still{ext}")
        assert probe(tmp_path / f"still{ext}").kind == "image"


# --- unreadable files, HDR, interlacing, names ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip.mp4", "photo.png"])
def test_permission_denied_says_check_permissions(tmp_path, monkeypatch, name):
    path = tmp_path / name
    path.write_bytes(b"x" * 100)

    def denied(*args, **kwargs):  # what opening a chmod-000 file raises for a non-root user
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(media.av, "open", denied)
    monkeypatch.setattr(media.Image, "open", denied)
    with pytest.raises(DatasetError, match="permission denied - check its permissions") as caught:
        probe(path)
    assert "re-encode" not in str(caught.value) and name in str(caught.value)


def test_hdr_and_interlaced_sources_are_noted(tmp_path):
    plain = media.write_video(tmp_path / "plain.mp4", np.zeros((2, 32, 32, 3), np.uint8), 16)
    assert probe(plain).notes == ()
    cases = {"hlg.mp4": ("transfer=arib-std-b67", "HDR video (HLG)"), "tff.mp4": ("tff=1", "interlaced video")}
    for name, (params, note) in cases.items():
        path = tmp_path / name
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=16, options={"x264-params": params})
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for _ in range(2):
                arr = np.zeros((32, 32, 3), np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
            container.mux(stream.encode(None))
        with av.open(str(path)) as container:  # what ffmpeg reads from the file
            frame = next(container.decode(video=0))
            assert frame.color_trc == 18 if name == "hlg.mp4" else frame.interlaced_frame
        notes = probe(path).notes
        assert len(notes) == 1 and notes[0].startswith(f"{path}: {note}")


def test_shown_quotes_names_that_would_split_a_line():
    assert shown("/data/clip one.mp4") == "/data/clip one.mp4"
    assert shown("/data/new\nline.mp4") == repr("/data/new\nline.mp4")
    assert "\n" not in shown("a\nb") and "\t" not in shown("a\tb")


# --- scanning: folders, reports ---------------------------------------------------------------------------------


def clip(path, size=(32, 32), n: int = 6):
    return media.write_video(path, np.full((n, size[1], size[0], 3), 120, np.uint8), 16)


def dataset_cfg(folder, **kw):
    from trainer_core.config import DatasetConfig

    base = dict(folder=str(folder), resolutions=[32], num_frames=5, caption_dropout=0.0, default_caption="a clip")
    return DatasetConfig(**(base | kw))


def build(folder, **kw):
    from trainer_core.data import build_dataset

    return build_dataset([dataset_cfg(folder, **kw)], None, 0)


def test_symlinked_folders_are_followed_and_loops_reported_once(tmp_path):
    outside = tmp_path / "outside"
    clip(outside / "linked.mp4")
    data = tmp_path / "data"
    clip(data / "own" / "own.mp4")
    (data / "link").symlink_to(outside, target_is_directory=True)
    (data / "own" / "up").symlink_to(data, target_is_directory=True)  # a loop
    (data / "again").symlink_to(data / "own", target_is_directory=True)  # the same folder twice
    ds = build(data)
    assert sorted(p.name for p in {it.media.path for it in ds.items}) == ["linked.mp4", "own.mp4"]
    report = ds.report()
    assert report.count("a folder above it - not followed (it loops)") == 1
    assert "is " in report and "again - its files are used once" in report


def test_a_folder_of_only_a_symlinked_folder_is_not_empty(tmp_path):
    clip(tmp_path / "real" / "a.mp4")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clips").symlink_to(tmp_path / "real", target_is_directory=True)
    assert len(build(tmp_path / "data").items) == 1


def test_unreadable_folder_is_listed(tmp_path, monkeypatch):
    clip(tmp_path / "ok.mp4")
    locked = tmp_path / "locked"
    clip(locked / "hidden_from_us.mp4")
    real_scandir = os.scandir

    def scandir(path="."):  # what a chmod-000 folder gives a non-root user
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr("os.scandir", scandir)
    ds = build(tmp_path)
    assert [it.media.path.name for it in ds.items] == ["ok.mp4"]
    assert f"cannot read folder {locked} - check its permissions" in ds.skipped


def test_extreme_aspect_ratio_warns_with_the_kept_share(tmp_path):
    clip(tmp_path / "strip.mp4", size=(16, 512))  # 1:32 into the 1:4 bucket (16x64 at 32): keeps 4/32
    clip(tmp_path / "normal.mp4", size=(32, 64))
    [warning] = [w for w in build(tmp_path).warnings if "of their picture after the bucket crop" in w]
    assert "1 file(s) keep less than 50%" in warning and "strip.mp4: keeps 12.5%" in warning
    assert "normal.mp4" not in warning


def test_report_names_upscaled_files_hidden_files_and_case_mismatched_captions(tmp_path):
    clip(tmp_path / "small.mp4", size=(16, 16))
    clip(tmp_path / "big.mp4", size=(64, 64))
    clip(tmp_path / "shout.mp4")
    (tmp_path / "shout.TXT").write_text("a caption")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    (tmp_path / "._big.mp4").write_bytes(b"x")
    clip(tmp_path / "new\nline.mp4")
    for stem in ("small", "big", "new\nline"):
        (tmp_path / f"{stem}.txt").write_text("a caption")
    ds = build(tmp_path, default_caption="")
    [upscaled] = [w for w in ds.warnings if "upscaled" in w]
    assert upscaled.endswith("are upscaled: small.mp4")
    assert any("ignored 2 hidden file(s)/folder(s)" in n for n in ds.notes)
    [nocap] = [s for s in ds.skipped if "shout.mp4" in s]
    assert "there is shout.TXT: rename it to shout.txt" in nocap
    assert all("\n" not in s for s in ds.skipped)
    report = ds.report()
    assert f"    {repr('new' + chr(10) + 'line.mp4')}: 32x32" in report
    assert not any(line.startswith("line.mp4") for line in report.splitlines())


def test_alpha_video_and_stream_choice_reach_the_report(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 128
    with av.open(str(tmp_path / "alpha.webm"), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=16, options={"crf": "10", "b": "0"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuva420p"
        for _ in range(6):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgba, format="rgba").reformat(format="yuva420p")))
        container.mux(stream.encode(None))
    ds = build(tmp_path)
    [warning] = [w for w in ds.warnings if "alpha" in w]
    assert "1 video(s) have an alpha channel" in warning and "composited onto black" in warning
    assert "alpha.webm" in warning


def test_latents_cached_before_these_decoding_fixes_are_not_reused(tmp_path, monkeypatch):
    """A mirrored clip now decodes to other pixels, so a latent cached from its old decoding must not be found."""
    from trainer_core.data import latent_cache
    from trainer_core.data.dataset import SamplePlan

    path = tmp_path / "hflip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.set_display_matrix(MATRICES["hflip"])
        container.mux(stream.encode(av.VideoFrame.from_ndarray(quadrants(32, 32), format="rgb24")))
        container.mux(stream.encode(None))
    cache = latent_cache.LatentCache(tmp_path / "cache", "vae")
    plan = SamplePlan(0, path, (32, 32), (0,), False, False, "a clip", False, True)
    now = cache.path_for(plan)
    monkeypatch.setattr(latent_cache, "PREPROCESS_VERSION", 2)  # the decoding that ignored the mirroring
    assert cache.path_for(plan) != now


def test_multi_picture_jpeg_stays_a_photo(tmp_path):
    """Pillow opens a camera's MPO JPEG (photo + preview) as 'animated'; it is one photo, its first picture."""
    photo, preview = Image.new("RGB", (32, 24), (200, 30, 30)), Image.new("RGB", (32, 24), (30, 30, 200))
    path = tmp_path / "camera.jpg"
    photo.save(path, format="MPO", save_all=True, append_images=[preview])
    with Image.open(path) as img:
        assert img.format == "MPO" and img.is_animated
    info = probe(path)
    assert (info.kind, info.num_frames) == ("image", 1)
    assert np.abs(read_frames(info, [0], (32, 24))[0].astype(int) - (200, 30, 30)).max() <= 8
