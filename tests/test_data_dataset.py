"""Dataset building, epochs, batches, sampling choices and decoding, on tiny media written here."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from scipy import stats
from torch.utils.data import DataLoader

from trainer_core.config import DatasetConfig
from trainer_core.data import build_dataset, collate, epoch_counts
from trainer_core.data.media import write_video
from trainer_core.errors import ConfigError, DatasetError


def level_clip(path: Path, n: int, fps: int = 16, size: tuple[int, int] = (32, 32)) -> Path:
    """Frame i is a flat grey of level 10 + 12 i, so decoded pixels tell which frame they came from."""
    w, h = size
    return write_video(path, np.stack([np.full((h, w, 3), 10 + 12 * i, np.uint8) for i in range(n)]), fps)


def frame_ids(pixels: torch.Tensor) -> list[int]:
    levels = ((pixels + 1) * 127.5).mean(dim=(0, 2, 3))
    return [round((float(v) - 10) / 12) for v in levels]


def image(path: Path, size=(32, 32), value=128) -> Path:
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def cfg(folder, **kw) -> DatasetConfig:
    base = dict(folder=str(folder), resolutions=[32], num_frames=5, caption_dropout=0.0, default_caption="a clip")
    return DatasetConfig(**(base | kw))


# --- bad inputs ---------------------------------------------------------------------------------------------


def test_missing_and_wrong_folders(tmp_path):
    with pytest.raises(DatasetError, match=r"datasets\[0\]\.folder: .*nope does not exist"):
        build_dataset([cfg(tmp_path / "nope")], None, 0)
    (tmp_path / "afile.mp4").write_bytes(b"x")
    with pytest.raises(DatasetError, match="is a file"):
        build_dataset([cfg(tmp_path / "afile.mp4")], None, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("caption without media")
    with pytest.raises(DatasetError, match="holds no videos or images"):
        build_dataset([cfg(empty)], None, 0)
    with pytest.raises(ConfigError, match="no dataset configured"):
        build_dataset([], None, 0)


def test_unreadable_media_skipped_and_named_or_strict(tmp_path):
    level_clip(tmp_path / "good.mp4", 8)
    (tmp_path / "bad.mp4").write_bytes(b"\x00garbage" * 50)
    (tmp_path / "bad2.jpg").write_bytes(b"nope")
    ds = build_dataset([cfg(tmp_path)], None, 0)
    assert [it.media.path.name for it in ds.items] == ["good.mp4"]
    assert len(ds.skipped) == 2
    assert "bad.mp4" in ds.skipped[0] and "bad2.jpg" in ds.skipped[1]
    assert all("re-encode it" in m for m in ds.skipped)
    assert "skipped (2)" in ds.report()
    with pytest.raises(DatasetError, match=r"bad\.mp4.*re-encode.*strict is on"):
        build_dataset([cfg(tmp_path, strict=True)], None, 0)
    (tmp_path / "good.mp4").unlink()
    with pytest.raises(DatasetError, match=r"no usable clip or image(.|\n)*bad\.mp4(.|\n)*bad2\.jpg"):
        build_dataset([cfg(tmp_path)], None, 0)


def test_trigger_errors_name_the_source(tmp_path):
    level_clip(tmp_path / "a.mp4", 8)
    (tmp_path / "a.txt").write_text("[trigger] walking")
    with pytest.raises(DatasetError, match=r"a\.txt uses \[trigger\] but no trigger word"):
        build_dataset([cfg(tmp_path)], None, 0)
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.prepend_trigger"):
        build_dataset([cfg(tmp_path, prepend_trigger=True)], None, 0)
    (tmp_path / "a.txt").unlink()
    with pytest.raises(DatasetError, match=r"datasets\[0\]\.default_caption uses \[trigger\]"):
        build_dataset([cfg(tmp_path, default_caption="[trigger] clip")], "  ", 0)


def test_caption_not_utf8(tmp_path):
    level_clip(tmp_path / "a.mp4", 8)
    level_clip(tmp_path / "b.mp4", 8)
    (tmp_path / "a.txt").write_bytes("caf\u00e9".encode("latin-1"))
    ds = build_dataset([cfg(tmp_path)], None, 0)
    assert [it.media.path.name for it in ds.items] == ["b.mp4"]
    assert len(ds.skipped) == 1 and "a.txt is not UTF-8 text - re-save it as UTF-8" in ds.skipped[0]
    with pytest.raises(DatasetError, match=r"a\.txt is not UTF-8.*strict"):
        build_dataset([cfg(tmp_path, strict=True)], None, 0)


def test_num_frames_must_be_4n_plus_1_with_nearest_values():
    with pytest.raises(ValidationError, match="use 29 or 33"):
        DatasetConfig(folder="x", num_frames=32)
    with pytest.raises(ValidationError, match="use 77 or 81"):
        DatasetConfig(folder="x", num_frames=80)
    assert DatasetConfig(folder="x", caption_ext=".caption").caption_ext == "caption"
    with pytest.raises(ValidationError, match="caption_ext"):
        DatasetConfig(folder="x", caption_ext="mp4")


# --- scanning, captions, buckets ------------------------------------------------------------------------------


def test_scan_captions_subfolders_and_hidden_files(tmp_path):
    level_clip(tmp_path / "a.mp4", 8)
    (tmp_path / "a.txt").write_text("  a clip of\n[trigger]  ")
    (tmp_path / "sub").mkdir()
    level_clip(tmp_path / "sub" / "b.webm", 8)
    image(tmp_path / "sub" / "c.png")
    (tmp_path / "sub" / "c.cap").write_text("an image")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.mp4").write_bytes(b"junk")  # would be unreadable if scanned
    (tmp_path / "._a.mp4").write_bytes(b"junk")
    (tmp_path / "orphan.txt").write_text("no media")
    ds = build_dataset([cfg(tmp_path, default_caption="default [trigger]")], "sks", 0)
    captions = {Path(it.media.path).name: it.caption for it in ds.items}
    assert captions == {"a.mp4": "a clip of sks", "b.webm": "default sks", "c.png": "default sks"}
    ds = build_dataset([cfg(tmp_path, caption_ext="cap", prepend_trigger=True, default_caption="")], "sks", 0)
    captions = {Path(it.media.path).name: it.caption for it in ds.items}
    assert captions == {"a.mp4": "sks", "b.webm": "sks", "c.png": "sks, an image"}
    report = ds.report()
    assert "2 video(s), 1 image(s)" in report
    assert "1 caption file(s) without media" not in report  # a.txt is not a caption file when the ext is .cap
    ds = build_dataset([cfg(tmp_path)], "sks", 0)
    assert "ignored 1 caption file(s) without media: orphan.txt" in ds.report()
    assert "images train as 1-frame samples" in ds.report()


def test_buckets_and_resolutions(tmp_path):
    level_clip(tmp_path / "wide.mp4", 8, size=(64, 32))
    level_clip(tmp_path / "tall.mp4", 8, size=(32, 64))
    image(tmp_path / "square.png", size=(40, 40))
    ds = build_dataset([cfg(tmp_path, resolutions=[32, 48])], None, 0)
    keys = sorted((Path(it.media.path).name, it.resolution, it.bucket_key) for it in ds.items)
    assert keys == [
        ("square.png", 32, (32, 32, 1)),
        ("square.png", 48, (48, 48, 1)),
        ("tall.mp4", 32, (32, 32, 5)),  # 1:2 is as far from 1:4 (16x64) as from 1:1: the tie goes to square
        ("tall.mp4", 48, (32, 64, 5)),
        ("wide.mp4", 32, (32, 32, 5)),
        ("wide.mp4", 48, (64, 32, 5)),
    ]
    for sid in range(len(ds)):
        sample = ds.load(sid, 0)
        w, h, f = ds.items[sid].bucket_key
        assert sample.pixels.shape == (3, f, h, w) and sample.pixels.dtype == torch.float32
        assert -1.0 <= float(sample.pixels.min()) and float(sample.pixels.max()) <= 1.0
    assert "upscaled" in ds.report()  # 40x40 -> 48x48
    assert "48x48x1: 1" in ds.report()


# --- frame sampling -------------------------------------------------------------------------------------------


def test_uniform_sampling_decodes_the_right_frames(tmp_path):
    level_clip(tmp_path / "a.mp4", 20)
    ds = build_dataset([cfg(tmp_path, frame_sampling="uniform", num_frames=5)], None, 0)
    assert ds.plan(0, 0).frame_indices == (0, 5, 10, 14, 19)
    assert frame_ids(ds.load(0, 3).pixels) == [0, 5, 10, 14, 19]


def test_fps_sampling_fixed_start(tmp_path):
    level_clip(tmp_path / "a.mp4", 20, fps=32)
    ds = build_dataset([cfg(tmp_path, frame_sampling="fps", num_frames=5, window_start="start")], None, 0)
    for epoch in range(3):
        assert ds.plan(0, epoch).frame_indices == (0, 2, 4, 6, 8)  # 32 fps source at 16 fps: every other frame
    assert frame_ids(ds.load(0, 0).pixels) == [0, 2, 4, 6, 8]


def test_fps_sampling_random_start_is_uniform_over_valid_starts(tmp_path):
    level_clip(tmp_path / "a.mp4", 20, fps=32)
    ds = build_dataset([cfg(tmp_path, frame_sampling="fps", num_frames=5)], None, 0)
    # last valid start s: s/32 + 0.25 <= 19/32 + 1/64  ->  s <= 11.5
    starts = Counter()
    for epoch in range(1200):
        idx = ds.plan(0, epoch).frame_indices
        assert idx == tuple(range(idx[0], idx[0] + 9, 2))
        starts[idx[0]] += 1
    assert set(starts) == set(range(12))
    assert stats.chisquare([starts[s] for s in range(12)]).pvalue > 1e-3
    s = ds.plan(0, 7).frame_indices
    assert frame_ids(ds.load(0, 7).pixels) == list(s)


@pytest.mark.parametrize("sampling", ["fps", "uniform"])
def test_short_clip_pad_or_skip(tmp_path, sampling):
    level_clip(tmp_path / "short.mp4", 6)
    level_clip(tmp_path / "long.mp4", 12)
    ds = build_dataset([cfg(tmp_path, num_frames=9, frame_sampling=sampling, window_start="start")], None, 0)
    short = next(i for i, it in enumerate(ds.items) if it.media.path.name == "short.mp4")
    assert ds.plan(short, 0).frame_indices == (0, 1, 2, 3, 4, 5, 5, 5, 5)
    assert frame_ids(ds.load(short, 0).pixels) == [0, 1, 2, 3, 4, 5, 5, 5, 5]
    assert "padded by repeating their last frame" in ds.report() and "short.mp4" in ds.report()

    ds = build_dataset([cfg(tmp_path, num_frames=9, frame_sampling=sampling, short_clip="skip")], None, 0)
    assert [it.media.path.name for it in ds.items] == ["long.mp4"]
    assert "skipped (1)" in ds.report() and "short.mp4" in ds.report() and "short_clip=skip" in ds.report()

    with pytest.raises(DatasetError, match="no usable clip"):
        build_dataset([cfg(tmp_path, num_frames=17, frame_sampling=sampling, short_clip="skip")], None, 0)


@pytest.mark.parametrize("sampling", ["fps", "uniform"])
def test_num_frames_one_on_videos_and_images(tmp_path, sampling):
    level_clip(tmp_path / "a.mp4", 9)
    image(tmp_path / "b.jpg", value=200)
    ds = build_dataset([cfg(tmp_path, num_frames=1, frame_sampling=sampling, window_start="start")], None, 0)
    assert {it.bucket_key for it in ds.items} == {(32, 32, 1)}
    batches = ds.batches(0, 2)
    assert len(batches) == 1 and sorted(batches[0]) == [0, 1]  # video and image share one bucket
    by_name = {it.media.path.name: i for i, it in enumerate(ds.items)}
    video, still = ds.load(by_name["a.mp4"], 0), ds.load(by_name["b.jpg"], 0)
    assert video.pixels.shape == still.pixels.shape == (3, 1, 32, 32)
    assert frame_ids(video.pixels) == ([4] if sampling == "uniform" else [0])  # middle frame / window start
    assert abs(float((still.pixels + 1).mul(127.5).mean()) - 200) < 3


def test_images_are_one_frame_buckets_beside_videos(tmp_path):
    level_clip(tmp_path / "a.mp4", 9)
    image(tmp_path / "b.png")
    ds = build_dataset([cfg(tmp_path, num_frames=5)], None, 0)
    assert sorted(it.bucket_key for it in ds.items) == [(32, 32, 1), (32, 32, 5)]
    assert all(len(b) == 1 for b in ds.batches(0, 4))  # different frame counts never share a batch


# --- epochs, weights, repeats, determinism --------------------------------------------------------------------


def test_epoch_counts_hand_computed():
    assert epoch_counts([4, 4], [1, 1], [3.0, 1.0]) == [6, 2]
    assert epoch_counts([2, 4], [3, 1], [1.0, 1.0]) == [6, 4]
    # L = 2*2 + 3 = 7; shares 4:6 -> 2.8, 4.2 -> floors 2, 4, the leftover sample goes to the larger remainder
    assert epoch_counts([2, 3], [2, 1], [1.0, 2.0]) == [3, 4]
    assert epoch_counts([5], [3], [0.1]) == [15]


def test_epoch_counts_with_shares_hand_computed():
    # L = 10 + 200 = 210; share 1/2 -> 105 reg samples whatever the sizes, the other 105 for the dataset without one
    assert epoch_counts([10, 200], [1, 1], [1.0, 1.0], [None, 0.5]) == [105, 105]
    # a share ignores its dataset's weight (5 here): 213 x 0.25 = 53.25 -> 53 each, whatever the sizes 200 and 3
    assert epoch_counts([10, 200, 3], [1, 1, 1], [1.0, 5.0, 1.0], [None, 0.25, 0.25])[1:] == [53, 53]
    # L = 213: 106.5 fixed, 106.5 split 10:9 -> 56.05, 50.45; the leftover sample to the largest remainder (0.5)
    assert epoch_counts([10, 3, 200], [1, 1, 1], [1.0, 3.0, 1.0], [None, None, 0.5]) == [56, 50, 107]
    # every dataset with a share: shares that add up to 1 within rounding are made exact
    assert epoch_counts([10, 200], [1, 1], [1.0, 1.0], [0.3333333, 0.6666667]) == [70, 140]
    assert epoch_counts([2, 3], [2, 1], [1.0, 2.0], [None, None]) == epoch_counts([2, 3], [2, 1], [1.0, 2.0])


def test_a_share_fixes_a_datasets_part_of_every_epoch(tmp_path):
    # 2 clips x 2 repeats and 3 images of weight 2: by weight the images get 4 of 7 samples (4.2); with share 0.5,
    # 3.5 each, and the tie goes to the earlier dataset
    ds = build_dataset(make_two_datasets(tmp_path, share=0.5), None, 5)
    assert ds.counts == [4, 3] and ds.samples_per_epoch == 7
    ds = build_dataset(make_two_datasets(tmp_path / "s", share=0.2), None, 5)
    assert ds.counts == [6, 1]  # 7 x 0.2 = 1.4 -> 1; the images' weight 2 no longer counts
    assert "share 0.2: 1 sample(s) per epoch (14.3%)" in ds.report()


@pytest.mark.parametrize("shares, needle", [
    ((0.7, 0.6), "datasets[0].share, datasets[1].share add up to 1.3"),
    ((0.5, 0.4), "every dataset has a share"),
    ((None, 1.0), "datasets[1].share is 1, which leaves no sample for datasets[0]"),
])
def test_shares_that_do_not_fit_one_epoch_are_refused_before_scanning(tmp_path, shares, needle):
    configs = [cfg(tmp_path / f"missing{d}", share=s) for d, s in enumerate(shares)]  # folders need not exist
    with pytest.raises(ConfigError) as exc:
        build_dataset(configs, None, 0)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def make_two_datasets(tmp_path, **kw_b):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    for i in range(2):
        level_clip(a / f"a{i}.mp4", 8)
    for i in range(3):
        image(b / f"b{i}.png", value=50 + i)
    return [cfg(a, repeats=2), cfg(b, **({"weight": 2.0} | kw_b))]


def test_weights_and_repeats_in_batches(tmp_path):
    ds = build_dataset(make_two_datasets(tmp_path), None, 5)
    assert ds.counts == [3, 4] and ds.samples_per_epoch == 7
    for epoch in range(6):
        sids = [s for b in ds.batches(epoch, 1) for s in b]
        per_item = Counter(s % len(ds) for s in sids)
        per_dataset = Counter(ds.items[i].dataset for i in per_item.elements())
        assert per_dataset == {0: 3, 1: 4}
        assert sorted(per_item[i] for i in range(2)) == [1, 2]  # spread as evenly as possible
        assert sorted(per_item[i] for i in range(2, 5)) == [1, 1, 2]
        assert len(set(sids)) == len(sids)  # repeats of an item are distinct samples
    assert "3 sample(s) per epoch (42.9%)" in ds.report()
    # equal weights: every item exactly `repeats` times
    ds = build_dataset(make_two_datasets(tmp_path / "eq", weight=1.0), None, 5)
    per_item = Counter(s % len(ds) for b in ds.batches(0, 3) for s in b)
    assert [per_item[i] for i in range(len(ds))] == [2, 2, 1, 1, 1]


def test_batches_are_within_a_bucket_and_cover_the_epoch(tmp_path):
    for i in range(5):
        level_clip(tmp_path / f"w{i}.mp4", 8, size=(64, 32))
    for i in range(3):
        level_clip(tmp_path / f"s{i}.mp4", 8)
    ds = build_dataset([cfg(tmp_path, repeats=3)], None, 1)
    batches = ds.batches(0, 2)
    assert sorted(s for b in batches for s in b) == list(range(3 * len(ds)))
    for batch in batches:
        assert 1 <= len(batch) <= 2
        assert len({ds.items[s % len(ds)].bucket_key for s in batch}) == 1
    assert sum(len(b) == 1 for b in batches) <= 2  # at most one short batch per bucket


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    for i in range(8):
        level_clip(tmp_path / f"c{i}.mp4", 8)
    configs = [cfg(tmp_path, frame_sampling="fps", caption_dropout=0.5, flip_x=True, default_caption="x")]
    a, b, other = (build_dataset(configs, None, s) for s in (7, 7, 8))
    assert a.batches(3, 2) == b.batches(3, 2)
    assert a.batches(3, 2) != a.batches(4, 2)
    assert a.batches(3, 2) != other.batches(3, 2)
    # every random choice is a pure function of (seed, epoch, sample id): a resumed run sees the same samples
    assert [a.plan(s, 3) for s in range(8)] == [b.plan(s, 3) for s in range(8)]
    assert [a.plan(s, 3) for s in range(8)] != [other.plan(s, 3) for s in range(8)]
    assert torch.equal(a.load(5, 3).pixels, b.load(5, 3).pixels)
    assert a.fingerprint() == b.fingerprint() != other.fingerprint()


def test_repeats_draw_independent_choices(tmp_path):
    level_clip(tmp_path / "a.mp4", 20, fps=32)
    ds = build_dataset([cfg(tmp_path, frame_sampling="fps", repeats=2)], None, 0)
    pairs = [tuple(ds.plan(s, e).frame_indices[0] for s in (0, 1)) for e in range(30)]
    assert any(x != y for x, y in pairs)


def test_caption_dropout_rate(tmp_path):
    level_clip(tmp_path / "a.mp4", 8)
    (tmp_path / "a.txt").write_text("a caption")
    ds = build_dataset([cfg(tmp_path, caption_dropout=0.3)], None, 0)
    n = 3000
    dropped = sum(ds.plan(0, e).caption == "" for e in range(n))
    assert stats.binomtest(dropped, n, 0.3).pvalue > 1e-3
    assert ds.captions() == {"a caption", ""}
    ds = build_dataset([cfg(tmp_path, caption_dropout=0.0)], None, 0)
    assert all(ds.plan(0, e).caption == "a caption" for e in range(200))
    assert ds.captions() == {"a caption"}


@pytest.mark.parametrize(("flag", "dim"), [("flip_x", -1), ("flip_y", -2)])
def test_flips_mirror_pixels_half_the_time(tmp_path, flag, dim):
    pattern = np.zeros((8, 32, 32, 3), np.uint8)
    pattern[:, :8, :16] = 250  # bright top-left block: not symmetric in either direction
    write_video(tmp_path / "a.mp4", pattern, 16)
    plain = build_dataset([cfg(tmp_path)], None, 0)
    flipped = build_dataset([cfg(tmp_path, **{flag: True})], None, 0)
    n = 400
    flips = [getattr(flipped.plan(0, e), flag) for e in range(n)]
    assert stats.binomtest(sum(flips), n, 0.5).pvalue > 1e-3
    on, off = flips.index(True), flips.index(False)
    ref = plain.load(0, on).pixels
    assert torch.equal(flipped.load(0, on).pixels, torch.flip(ref, dims=[dim]))
    assert torch.equal(flipped.load(0, off).pixels, plain.load(0, off).pixels)
    assert not torch.equal(ref, torch.flip(ref, dims=[dim]))
    assert flag in flipped.report() and "captions stay the same" in flipped.report()
    assert not getattr(plain.plan(0, on), flag)


def test_regularization_flag_and_collate(tmp_path):
    configs = make_two_datasets(tmp_path)
    configs[1] = configs[1].model_copy(update={"is_regularization": True})
    ds = build_dataset(configs, None, 0)
    for batch_ids in ds.batches(0, 3):
        batch = collate([ds.load(s, 0) for s in batch_ids])
        kinds = [ds.items[s % len(ds)].dataset == 1 for s in batch_ids]
        assert batch.is_regularization.tolist() == kinds
        b, f = len(batch_ids), ds.items[batch_ids[0] % len(ds)].frames
        assert batch.pixels.shape == (b, 3, f, 32, 32) and len(batch.captions) == b == len(batch.sources)
    with pytest.raises(DatasetError, match="mixes sample shapes"):
        collate([ds.load(0, 0), ds.load(2, 0)])  # a 5-frame clip and a 1-frame image
    assert "regularization" in ds.report()


def test_dataloader_epoch_view_matches_direct_loading(tmp_path):
    for i in range(4):
        level_clip(tmp_path / f"c{i}.mp4", 8)
    ds = build_dataset([cfg(tmp_path, frame_sampling="fps", caption_dropout=0.5, default_caption="x")], None, 2)
    batches = ds.batches(1, 2)
    loader = DataLoader(ds.epoch_view(1), batch_sampler=batches[1:], collate_fn=collate, num_workers=0)
    for ids, batch in zip(batches[1:], loader):
        direct = collate([ds.load(s, 1) for s in ids])
        assert torch.equal(batch.pixels, direct.pixels) and batch.captions == direct.captions


def test_report_and_warnings(tmp_path):
    level_clip(tmp_path / "a.mp4", 8)
    ds = build_dataset([cfg(tmp_path, cache_latents=True, frame_sampling="fps", flip_y=True)], None, 0)
    report = ds.report()
    assert "1 dataset(s), 1 item(s), 1 sample(s) per epoch" in report
    assert "32x32x5: 1" in report
    assert any("cache_latents" in w for w in ds.warnings)
    ds = build_dataset(
        [cfg(tmp_path, default_caption="x", window_start="start", frame_sampling="fps", cache_latents=True)], None, 0
    )
    assert ds.warnings == ()


# --- bad files, strict mode and the full report ---------------------------------------------------------------


def zero_length(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
        container.mux(stream.encode(None))
    return path


def test_every_bad_file_is_skipped_with_its_remedy(tmp_path):
    level_clip(tmp_path / "a_good.mp4", 8)
    (tmp_path / "a_good.txt").write_text("fine")
    level_clip(tmp_path / "b_nocap.mp4", 8)
    level_clip(tmp_path / "c_emptycap.mp4", 8)
    (tmp_path / "c_emptycap.txt").write_text("  \n")
    zero_length(tmp_path / "d_zero.mp4")
    (tmp_path / "e_old.avi").write_bytes(b"RIFF....AVI ")
    (tmp_path / "f_photo.bmp").write_bytes(b"BM")
    (tmp_path / "README.md").write_text("not data")
    ds = build_dataset([cfg(tmp_path, default_caption="")], None, 0)
    assert [it.media.path.name for it in ds.items] == ["a_good.mp4"]
    skipped = dict(zip(["b", "c", "d", "e", "f"], ds.skipped))
    assert len(ds.skipped) == 5
    assert "b_nocap.mp4: no caption - there is no b_nocap.txt and datasets[0].default_caption is empty" in skipped["b"]
    assert "c_emptycap.txt is empty - write a caption" in skipped["c"]
    assert "d_zero.mp4: zero-length clip" in skipped["d"]
    assert "e_old.avi: unsupported file type '.avi' - convert videos" in skipped["e"]
    assert "f_photo.bmp: unsupported file type '.bmp'" in skipped["f"]
    report = ds.report()
    assert "skipped (5):" in report and "README.md" in report and "neither media nor .txt captions" in report

    # strict: the first bad file in path order fails the build; non-media files are not bad files
    with pytest.raises(DatasetError, match=r"b_nocap\.mp4: no caption.*datasets\[0\]\.strict is on"):
        build_dataset([cfg(tmp_path, default_caption="", strict=True)], None, 0)
    for name in ("b_nocap.mp4", "c_emptycap.mp4", "c_emptycap.txt", "d_zero.mp4", "e_old.avi", "f_photo.bmp"):
        (tmp_path / name).unlink()
    assert len(build_dataset([cfg(tmp_path, strict=True)], None, 0)) == 1


def test_uncaptioned_files_with_default_caption_or_trigger(tmp_path):
    level_clip(tmp_path / "a.mp4", 8)
    level_clip(tmp_path / "b.mp4", 8)
    (tmp_path / "a.txt").write_text("captioned")
    ds = build_dataset([cfg(tmp_path, default_caption="")], None, 0)
    assert len(ds) == 1 and "b.mp4: no caption" in ds.skipped[0]
    ds = build_dataset([cfg(tmp_path, default_caption="", prepend_trigger=True)], "sks", 0)
    assert {it.caption for it in ds.items} == {"sks, captioned", "sks"} and ds.skipped == ()
    assert [p.name for p in ds.uncaptioned] == ["b.mp4"]
    ds = build_dataset([cfg(tmp_path, default_caption="a clip")], None, 0)
    assert [p.name for p in ds.uncaptioned] == ["b.mp4"]
    assert "captions: 1 of 2 usable file(s) have no .txt file and use default_caption 'a clip': b.mp4" in ds.report()
    with pytest.raises(DatasetError, match=r"no usable clip or image(.|\n)*a\.mp4: no caption(.|\n)*b\.mp4"):
        (tmp_path / "a.txt").unlink()
        build_dataset([cfg(tmp_path, default_caption="")], None, 0)


def test_report_lists_files_durations_frames_used_buckets_and_letterboxing(tmp_path):
    level_clip(tmp_path / "long.mp4", 20, fps=10, size=(64, 32))  # 19/10 = 1.9 s
    level_clip(tmp_path / "short.mp4", 6, fps=16)
    image(tmp_path / "still.png")
    bars = np.full((8, 48, 64, 3), 160, np.uint8)
    bars[:, :8] = 0
    bars[:, 40:] = 0
    write_video(tmp_path / "wide.mp4", bars, 16)
    ds = build_dataset([cfg(tmp_path, num_frames=9, resolutions=[32, 48])], None, 0)
    report = ds.report()
    assert "3 video(s), 1 image(s) -> 8 item(s) at resolution(s) 32, 48" in report
    assert "clips: 3, 0.31-1.90 s (median 0.44 s), 10-16 fps" in report
    assert "files (4 usable):" in report
    # 1.9 s of motion shown as 9 frames at 16 fps (0.5 s): 3.8 times faster
    assert "long.mp4: 64x32, 20 frames, 1.90 s, 10 fps -> 32x32 (32), 64x32 (48); 9 of 20 frames spread over " \
        "1.90 s: 3.8x real speed" in report
    assert "short.mp4: 32x32, 6 frames, 0.31 s, 16 fps -> 32x32 (32), 48x48 (48); all 6 frames, then the last one " \
        "repeated 3x (short, padded)" in report
    assert "still.png: 32x32 -> 32x32 (32), 48x48 (48); image: 1 frame" in report
    assert "uniform sampling plays 1 clip(s) far from real speed (3.8x-3.8x)" in report
    assert "letterboxed (1):\n  " in report
    assert re.search(r"wide\.mp4: black bars top/bottom 1[5-7]%/1[5-7]% of the height - crop them", report)  # 8/48
    # 2:1 ties between 1:1 and 4:1 at 32 (square wins), 4:3 is nearest to 1:1
    buckets = "  32x32x1: 1\n  32x32x9: 3\n  48x48x1: 1\n  48x48x9: 2\n  64x32x9: 1\n"
    assert "buckets (width x height x frames: items):\n" + buckets in report
    ds = build_dataset([cfg(tmp_path, num_frames=9, frame_sampling="fps", window_start="start")], None, 0)
    assert "long.mp4: 64x32, 20 frames, 1.90 s, 10 fps -> 32x32 (32); 9 frames at 16 fps = 0.50 s of 1.90 s, " \
        "from the start" in ds.report()
    assert "short.mp4: 32x32, 6 frames, 0.31 s, 16 fps -> 32x32 (32); 0.31 s is shorter than the 0.50 s window" \
        in ds.report()


def test_report_of_a_one_frame_clip(tmp_path):
    level_clip(tmp_path / "one.mp4", 1)
    report = build_dataset([cfg(tmp_path, num_frames=1)], None, 0).report()
    assert "clips: 1, 0.00-0.00 s (median 0.00 s)\n" in report
    assert "one.mp4: 32x32 -> 32x32 (32); the middle frame of 1" in report


@pytest.mark.parametrize("settings,noted", [
    ({}, True),  # uniform sampling: the same frames every epoch
    ({"frame_sampling": "fps", "window_start": "start"}, True),
    ({"frame_sampling": "fps"}, False),  # a random window each epoch: nothing to reuse
    ({"flip_x": True}, False),
    ({"cache_latents": True}, False),
])
def test_the_report_suggests_caching_latents_when_every_epoch_trains_the_same_frames(tmp_path, settings, noted):
    level_clip(tmp_path / "a.mp4", 20)
    report = build_dataset([cfg(tmp_path, **settings)], "sks", 0).report()
    assert ("cache_latents: true would VAE-encode each clip once" in report) == noted


def test_short_clip_stretch_spreads_frames_as_ai_toolkit(tmp_path):
    level_clip(tmp_path / "short.mp4", 4)
    for sampling in ("uniform", "aitoolkit_uniform", "stride", "fps"):
        ds = build_dataset([cfg(tmp_path, num_frames=9, frame_sampling=sampling, short_clip="stretch")], None, 0)
        assert ds.plan(0, 0).frame_indices == (0, 0, 1, 1, 2, 2, 2, 3, 3), sampling
    assert "stretched" in ds.report()


def test_stride_sampling_takes_every_kth_frame(tmp_path):
    level_clip(tmp_path / "a.mp4", 20, fps=32)  # 32 / 16 = stride 2; starts 0..3
    ds = build_dataset([cfg(tmp_path, num_frames=5, frame_sampling="stride", fps=16.0)], None, 0)
    starts = set()
    for epoch in range(400):
        idx = ds.plan(0, epoch).frame_indices
        assert [b - a for a, b in zip(idx, idx[1:])] == [2, 2, 2, 2]
        starts.add(idx[0])
    assert starts == set(range(20 - 8))  # max_start = 19 - 4 * 2 = 11


def test_latent_cache_key_changes_with_the_frames_chosen(tmp_path):
    from trainer_core.data import LatentCache

    level_clip(tmp_path / "short.mp4", 4)
    cache = LatentCache(tmp_path / "cache", "vae")
    paths = {
        mode: cache.path_for(build_dataset([cfg(tmp_path, num_frames=9, short_clip=mode)], None, 0).plan(0, 0))
        for mode in ("pad", "stretch")
    }
    assert paths["pad"] != paths["stretch"]
