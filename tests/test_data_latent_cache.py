"""Latent cache: hits, misses and invalidation, counted through a cheap deterministic fake encoder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_core.config import DatasetConfig
from trainer_core.data import LatentCache, build_dataset
from trainer_core.data.media import write_video


class FakeEncoder:
    """Deterministic stand-in for the VAE: 4x temporal / 8x spatial subsampling of the pixels, doubled."""

    def __init__(self) -> None:
        self.calls = 0
        self.samples = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dim() == 5 and pixels.shape[1] == 3 and pixels.dtype == torch.float32
        self.calls += 1
        self.samples += pixels.shape[0]
        return pixels[:, :, ::4, ::8, ::8] * 2


def clip(path: Path, n: int = 8, value: int = 60, size=(32, 32)) -> Path:
    w, h = size
    frames = np.stack([np.full((h, w, 3), value + 10 * i, np.uint8) for i in range(n)])
    frames[:, : h // 2, : w // 4] = 250  # asymmetric, so flips change the pixels
    return write_video(path, frames, 16)


def cfg(folder, **kw) -> DatasetConfig:
    base = dict(
        folder=str(folder),
        resolutions=[32],
        num_frames=5,
        caption_dropout=0.0,
        cache_latents=True,
        default_caption="a clip",
        frame_sampling="fps",
        window_start="start",
    )
    return DatasetConfig(**(base | kw))


def run_epoch(cache: LatentCache, ds, enc: FakeEncoder, epoch: int = 0, batch_size: int = 2) -> dict[int, torch.Tensor]:
    """Latents of every sample of one epoch, keyed by item, checked against a fresh encode of its pixels."""
    out = {}
    for ids in ds.batches(epoch, batch_size):
        latents = cache.get_or_encode(ds, ids, epoch, enc)
        assert latents.shape[0] == len(ids)
        for sid, lat in zip(ids, latents):
            expected = FakeEncoder()(ds.pixels(ds.plan(sid, epoch)).unsqueeze(0))[0]
            assert torch.equal(lat, expected)  # a cached latent is the latent of exactly this sample
            out[sid % len(ds)] = lat
    return out


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        clip(data / f"c{i}.mp4", value=40 + 20 * i)
    return data


def test_hit_miss_and_invalidation(tmp_path, folder):
    store = tmp_path / "cache"
    ds, enc = build_dataset([cfg(folder)], None, 0), FakeEncoder()
    cache = LatentCache(store, "vae-a")
    first = run_epoch(cache, ds, enc)
    assert enc.samples == 3 and (cache.hits, cache.misses) == (0, 3)
    assert len(list(store.glob("*.safetensors"))) == 3

    run_epoch(cache, ds, enc, epoch=1)  # deterministic choices: later epochs hit
    assert enc.samples == 3 and cache.hits == 3

    # a new run (new process state) reuses the files
    ds, enc = build_dataset([cfg(folder)], None, 0), FakeEncoder()
    cache = LatentCache(store, "vae-a")
    again = run_epoch(cache, ds, enc)
    assert enc.calls == 0 and (cache.hits, cache.misses) == (3, 0)
    assert all(torch.equal(first[i], again[i]) for i in first)

    # a changed file re-encodes only that file; a renamed but identical file is still a hit
    clip(folder / "c1.mp4", value=150)
    (folder / "c2.mp4").rename(folder / "renamed.mp4")
    ds, enc = build_dataset([cfg(folder)], None, 0), FakeEncoder()
    run_epoch(LatentCache(store, "vae-a"), ds, enc)
    assert enc.samples == 1

    # every setting that changes the latent re-encodes everything it touches
    for config, vae in [
        (cfg(folder), "vae-b"),
        (cfg(folder, resolutions=[16]), "vae-a"),
        (cfg(folder, num_frames=9), "vae-a"),
        (cfg(folder, frame_sampling="uniform"), "vae-a"),
    ]:
        ds, enc = build_dataset([config], None, 0), FakeEncoder()
        run_epoch(LatentCache(store, vae), ds, enc)
        assert enc.samples == 3, (config, vae)


def test_settings_that_keep_the_latent_keep_the_cache(tmp_path, folder):
    store = tmp_path / "cache"
    run_epoch(LatentCache(store, "v"), build_dataset([cfg(folder)], None, 0), FakeEncoder())
    enc = FakeEncoder()
    ds = build_dataset([cfg(folder, caption_dropout=0.5, default_caption="new", repeats=2, weight=3.0)], "t", 9)
    run_epoch(LatentCache(store, "v"), ds, enc)
    assert enc.samples == 0


def test_uncached_dataset_encodes_every_time_and_writes_nothing(tmp_path, folder):
    store = tmp_path / "cache"
    ds, enc = build_dataset([cfg(folder, cache_latents=False)], None, 0), FakeEncoder()
    cache = LatentCache(store, "v")
    run_epoch(cache, ds, enc)
    run_epoch(cache, ds, enc, epoch=1)
    assert enc.samples == 6 and (cache.hits, cache.misses) == (0, 0)
    assert not store.exists() or not any(store.iterdir())


def test_mixed_batch_encodes_misses_in_one_call(tmp_path, folder):
    other = tmp_path / "other"
    other.mkdir()
    clip(other / "o.mp4", value=90)
    ds = build_dataset([cfg(folder), cfg(other, cache_latents=False)], None, 0)
    cache, enc = LatentCache(tmp_path / "cache", "v"), FakeEncoder()
    ids = [s for b in ds.batches(0, 4) for s in b]
    assert len(ds.batches(0, 4)) == 1  # all four share the 32x32x5 bucket
    cache.get_or_encode(ds, ids, 0, enc)
    assert (enc.calls, enc.samples) == (1, 4)
    cache.get_or_encode(ds, ids, 0, enc)
    assert (enc.calls, enc.samples) == (2, 5)  # only the uncached dataset's sample again


def test_random_choices_are_keyed_by_the_concrete_choice(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    clip(data / "a.mp4", n=12)
    ds = build_dataset([cfg(data, window_start="random", flip_x=True)], None, 0)
    cache, enc = LatentCache(tmp_path / "cache", "v"), FakeEncoder()
    choices = set()
    for epoch in range(40):
        plan = ds.plan(0, epoch)
        choices.add((plan.frame_indices, plan.flip_x))
        run_epoch(cache, ds, enc, epoch=epoch)  # asserts every returned latent matches its own sample
    assert len(choices) > 2
    assert enc.samples == len(choices) == len(list((tmp_path / "cache").glob("*.safetensors")))


def test_corrupt_cache_file_is_re_encoded(tmp_path, folder, caplog):
    store = tmp_path / "cache"
    ds = build_dataset([cfg(folder)], None, 0)
    run_epoch(LatentCache(store, "v"), ds, FakeEncoder())
    victim = sorted(store.glob("*.safetensors"))[0]
    victim.write_bytes(b"truncated")
    enc = FakeEncoder()
    with caplog.at_level(logging.WARNING):
        run_epoch(LatentCache(store, "v"), ds, enc)
    assert enc.samples == 1 and victim.name in caplog.text


def test_encoder_returning_the_wrong_batch_is_refused(tmp_path, folder):
    ds = build_dataset([cfg(folder)], None, 0)
    with pytest.raises(ValueError, match="encode_fn must return a tensor with 2 latents"):
        LatentCache(tmp_path / "c", "v").get_or_encode(ds, [0, 1], 0, lambda px: px[:1])
