"""Prefetching in DataLoader workers yields exactly the serial path's batches, in the same order, across epochs."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_core.config import DatasetConfig
from trainer_core.data import (
    LatentCache,
    batch_refs,
    build_dataset,
    collate,
    frames_to_pixels,
    ordered_prefetch,
    prefetching_batches,
)
from trainer_core.data.media import write_video


def clip(path: Path, n: int, value: int, size=(32, 32)) -> Path:
    w, h = size
    frames = np.stack([np.full((h, w, 3), value + 7 * i, np.uint8) for i in range(n)])
    frames[:, : h // 2, : w // 4] = 250  # asymmetric, so flips change the pixels
    return write_video(path, frames, 32)


@pytest.fixture
def dataset(tmp_path):
    for i in range(5):
        clip(tmp_path / f"c{i}.mp4", 20, 20 + 15 * i, size=(32, 32) if i % 2 else (64, 16))
        (tmp_path / f"c{i}.txt").write_text(f"clip {i}")
    config = DatasetConfig(
        folder=str(tmp_path),
        resolutions=[32],
        num_frames=5,
        frame_sampling="fps",
        caption_dropout=0.3,
        flip_x=True,
        repeats=2,
    )
    return build_dataset([config], None, 3)


def test_prefetching_batches_match_the_serial_path(dataset):
    batches = dataset.batches(2, 2)
    assert len(batches) >= 4 and len({dataset.items[b[0] % len(dataset)].bucket_key for b in batches}) == 2
    serial = [collate([dataset.load(s, 2) for s in ids]) for ids in batches[1:]]
    for workers in (0, 2):
        got = list(prefetching_batches(dataset, batches[1:], 2, workers))
        assert len(got) == len(serial)
        for a, b in zip(got, serial):
            assert torch.equal(a.pixels, b.pixels) and a.pixels.dtype == torch.float32
            assert a.captions == b.captions and a.sources == b.sources
            assert torch.equal(a.is_regularization, b.is_regularization)


def test_batch_refs_walk_epochs_and_resume(dataset):
    refs = list(itertools.islice(batch_refs(dataset, 3), 12))
    expected = [(e, p, tuple(b)) for e in range(4) for p, b in enumerate(dataset.batches(e, 3))][:12]
    assert [(r.epoch, r.position, r.sample_ids) for r in refs] == expected
    # resuming at any saved position continues the same sequence; a position at the end starts the next epoch
    for k in (1, 4, 7):
        tail = list(itertools.islice(batch_refs(dataset, 3, refs[k].epoch, refs[k].position), 12 - k))
        assert tail == refs[k:]
    n0 = len(dataset.batches(0, 3))
    assert next(batch_refs(dataset, 3, 0, n0)) == refs[n0]


def fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    return pixels[:, :, ::4, ::8, ::8] * 2


def test_latent_prefetch_matches_get_or_encode_and_stops_its_workers(tmp_path, dataset):
    # half the datasets cache latents: batches mix cached reads and decoded pixels
    other = tmp_path / "other"
    other.mkdir()
    for i in range(2):
        clip(other / f"o{i}.mp4", 12, 100 + 20 * i)
    configs = [
        dataset.configs[0].model_copy(update={"cache_latents": True, "flip_x": False, "window_start": "start"}),
        DatasetConfig(folder=str(other), resolutions=[32], num_frames=5, default_caption="other"),
    ]
    ds = build_dataset(configs, None, 1)
    refs = list(itertools.islice(batch_refs(ds, 2), 14))  # about three epochs
    serial_cache = LatentCache(tmp_path / "serial", "v")
    serial = [serial_cache.get_or_encode(ds, r.sample_ids, r.epoch, fake_encode) for r in refs]

    cache = LatentCache(tmp_path / "prefetched", "v")
    stream = cache.prefetch(ds, batch_refs(ds, 2), num_workers=2)  # endless refs: workers live across epochs
    for ref, expected in zip(refs, serial):
        got_ref, loaded = next(stream)
        assert got_ref == ref and loaded.sample_ids == ref.sample_ids
        assert loaded.captions == [ds.plan(s, ref.epoch).caption for s in ref.sample_ids]
        assert torch.equal(cache.finish(loaded, fake_encode), expected)
    # a latent stored while later batches were already loaded is read again instead of encoded twice
    assert (cache.hits, cache.misses) == (serial_cache.hits, serial_cache.misses) and cache.misses > 0 < cache.hits
    assert multiprocessing.active_children()
    stream.close()
    assert not multiprocessing.active_children()


def test_ordered_prefetch_keeps_order_and_checks_workers():
    keys = list(range(25))
    assert list(ordered_prefetch(abs, (-k for k in keys), 3)) == keys
    with pytest.raises(ValueError, match="num_workers"):
        next(ordered_prefetch(abs, keys, -1))


def _worker_pid(key: int) -> int:
    return os.getpid()


def test_prefetch_workers_survive_stop_signals_meant_for_the_training_process():
    # A Ctrl-C or torchrun's SIGTERM reaches the workers too; the training process decides when to stop.
    stream = ordered_prefetch(_worker_pid, range(8), 1)
    pid = next(stream)
    assert pid != os.getpid()
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    time.sleep(0.3)
    assert list(stream) == [pid] * 7  # the same worker delivered the rest
    stream.close()
    assert not multiprocessing.active_children()


def test_frames_to_pixels_matches_float64_reference():
    frames = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 5, 3), dtype=np.uint8)  # [B, F, H, W, C]
    ref = torch.from_numpy(frames.astype(np.float64) / 127.5 - 1.0).permute(0, 4, 1, 2, 3)
    got = frames_to_pixels(frames)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 3, 4, 5)
    assert torch.allclose(got.double(), ref, atol=1e-7, rtol=0)
    assert torch.equal(frames_to_pixels(frames[1]), got[1])  # unbatched [F, H, W, C] -> [C, F, H, W]
    edges = frames_to_pixels(np.array([0, 255], np.uint8).reshape(1, 1, 2, 1).repeat(3, -1))
    assert edges.flatten().tolist() == [-1.0, 1.0] * 3
