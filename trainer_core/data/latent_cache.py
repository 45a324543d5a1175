"""On-disk cache of VAE latents, one safetensors file per distinct encoded sample.

A latent is stored under a hash of everything that decides it: the source file's content (not its name or date),
the bucket size, the concrete frame indices, the flips, the caller's VAE identity string (include the weights and
dtype in it) and :data:`PREPROCESS_VERSION`. A changed file or setting therefore changes the key of exactly the
samples it affects; only those are encoded again. Stale files are left in the folder (delete it to reclaim space).

Random choices: the key holds the *concrete* choice (which window, which flip), so a cached latent is always the
latent of the sample being asked for. With random window starts or flips each distinct choice is encoded once and
the cache hits only when that choice comes again; :func:`~trainer_core.data.dataset.build_dataset` warns about it.
With ``window_start=start`` (or uniform sampling) and no flips every epoch asks for the same latent per item.

Prefetching. :meth:`LatentCache.load` (read cached latents, decode the rest; safe in worker processes) and
:meth:`LatentCache.finish` (encode and store the rest; in the training process, which owns the VAE) split
:meth:`LatentCache.get_or_encode` in two, so :meth:`LatentCache.prefetch` can run the first half ahead in workers.
Only the training process writes cache files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..fileio import save_safetensors_atomic
from .dataset import SamplePlan, VideoDataset, frames_to_pixels
from .loader import BatchRef, ordered_prefetch

log = logging.getLogger(__name__)

#: Bump when decoding, resizing or cropping changes, so old latents are not reused.
PREPROCESS_VERSION = 3  # 2: images of every mode decoded correctly (16-bit grey, alpha composited onto black)
# 3: mirrored display matrices, MP4 edit lists, ffmpeg's stream choice, WebM alpha, animated WebP/PNG as clips
_CHUNK = 1 << 20


@dataclass
class LoadedBatch:
    """One batch half-way: cached latents read, the others' frames decoded (see :meth:`LatentCache.load`).

    ``latents[j]`` is the cached latent of sample ``j`` or ``None``; ``frames`` stacks, in order, the uint8
    ``[F, H, W, 3]`` frames of the samples whose latent is ``None`` (``None`` when there are none).
    """

    sample_ids: tuple[int, ...]
    epoch: int
    plans: list[SamplePlan]
    latents: list[torch.Tensor | None]
    frames: np.ndarray | None

    @property
    def captions(self) -> list[str]:
        """The samples' captions (after dropout), in batch order."""
        return [p.caption for p in self.plans]


class LatentCache:
    """Latents of samples of datasets with ``cache_latents`` on, kept in ``folder``.

    ``vae_id`` names the encoder (e.g. its file and dtype); latents of a different ``vae_id`` are never reused.
    ``hits``/``misses`` count cached-dataset samples found on disk / encoded.
    """

    def __init__(self, folder: str | os.PathLike, vae_id: str) -> None:
        self.folder = Path(folder)
        self.vae_id = vae_id
        self.hits = 0
        self.misses = 0
        self._hashes: dict[tuple[str, int, int, int], str] = {}

    def content_hash(self, path: Path) -> str:
        """SHA-256 of a file's bytes, computed once per file version in this process."""
        st = path.stat()
        memo = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if memo not in self._hashes:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
            self._hashes[memo] = digest.hexdigest()
        return self._hashes[memo]

    def key_material(self, plan: SamplePlan) -> dict:
        """Everything the latent of ``plan`` depends on."""
        return {
            "preprocess": PREPROCESS_VERSION,
            "content": self.content_hash(plan.source),
            "vae": self.vae_id,
            "size": list(plan.bucket),
            "frames": list(plan.frame_indices),
            "flip_x": plan.flip_x,
            "flip_y": plan.flip_y,
        }

    def path_for(self, plan: SamplePlan) -> Path:
        """Cache file of ``plan``."""
        material = json.dumps(self.key_material(plan), sort_keys=True)
        return self.folder / f"{hashlib.sha256(material.encode()).hexdigest()}.safetensors"

    def _read(self, path: Path) -> torch.Tensor | None:
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["latent"]
        except (SafetensorError, OSError, KeyError) as exc:
            log.warning("latent cache file %s is unreadable (%s); encoding the sample again", path, exc)
            return None

    def load(self, dataset: VideoDataset, sample_ids: Sequence[int], epoch: int) -> LoadedBatch:
        """Read the cached latents of one batch and decode the frames of every other sample (of a dataset without
        ``cache_latents``, or not cached yet). Writes nothing, so it may run in a worker process."""
        plans = [dataset.plan(i, epoch) for i in sample_ids]
        latents = [self._read(self.path_for(p)) if p.cache_latents else None for p in plans]
        todo = [dataset.frames(p) for p, lat in zip(plans, latents) if lat is None]
        return LoadedBatch(tuple(sample_ids), epoch, plans, latents, np.stack(todo) if todo else None)

    def finish(self, loaded: LoadedBatch, encode_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Latents ``[B, ...]`` (on CPU) of a loaded batch: its missing latents go together to one
        ``encode_fn(pixels [M, 3, F, H, W] float32 CPU in [-1, 1])`` call, which must return ``M`` latents; those
        of ``cache_latents`` datasets are then stored atomically. Counts ``hits``/``misses``."""
        plans, latents = loaded.plans, list(loaded.latents)
        todo = [j for j, lat in enumerate(latents) if lat is None]  # row r of loaded.frames is sample todo[r]
        for j in todo:  # stored since the batch was loaded ahead (an earlier batch held the same sample)
            if plans[j].cache_latents:
                latents[j] = self._read(self.path_for(plans[j]))
        rows = [r for r, j in enumerate(todo) if latents[j] is None]
        missed = sum(plans[todo[r]].cache_latents for r in rows)
        self.hits += sum(p.cache_latents for p in plans) - missed
        self.misses += missed
        if rows:
            with torch.no_grad():
                encoded = encode_fn(frames_to_pixels(loaded.frames[rows]))
            if not isinstance(encoded, torch.Tensor) or encoded.shape[0] != len(rows):
                got = tuple(encoded.shape) if isinstance(encoded, torch.Tensor) else type(encoded).__name__
                raise ValueError(f"encode_fn must return a tensor with {len(rows)} latents along dim 0, got {got}")
            encoded = encoded.detach().to("cpu")
            for k, r in enumerate(rows):
                j = todo[r]
                latents[j] = encoded[k].clone()
                if plans[j].cache_latents:
                    meta = {"source": str(plans[j].source), "key": json.dumps(self.key_material(plans[j]))}
                    save_safetensors_atomic({"latent": latents[j]}, self.path_for(plans[j]), metadata=meta)
        return torch.stack(latents)

    def get_or_encode(
        self,
        dataset: VideoDataset,
        sample_ids: Sequence[int],
        epoch: int,
        encode_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Latents ``[B, ...]`` (on CPU) of one batch of sample ids from ``dataset.batches(epoch, ...)``:
        :meth:`load` then :meth:`finish` in this process."""
        return self.finish(self.load(dataset, sample_ids, epoch), encode_fn)

    def _load_ref(self, dataset: VideoDataset, ref: BatchRef) -> tuple[BatchRef, LoadedBatch]:
        return ref, self.load(dataset, ref.sample_ids, ref.epoch)

    def prefetch(
        self, dataset: VideoDataset, refs: Iterable[BatchRef], num_workers: int
    ) -> Iterator[tuple[BatchRef, LoadedBatch]]:
        """``(ref, self.load(...))`` for each batch of ``refs`` (e.g. :func:`~.loader.batch_refs`), in order, loaded
        ``num_workers`` processes ahead; pass each to :meth:`finish` in this process."""
        if num_workers:  # hash the cached sources once here, so the workers inherit the hashes
            for item in dataset.items:
                if dataset.configs[item.dataset].cache_latents:
                    self.content_hash(item.media.path)
        return ordered_prefetch(functools.partial(self._load_ref, dataset), refs, num_workers)
