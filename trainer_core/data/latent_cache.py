"""On-disk cache of VAE latents, one safetensors file per distinct encoded sample.

A latent is stored under a hash of everything that decides it: the source file's content (not its name or date),
the bucket size, the concrete frame indices, the flips, the caller's VAE identity string (include the weights and
dtype in it) and :data:`PREPROCESS_VERSION`. A changed file or setting therefore changes the key of exactly the
samples it affects; only those are encoded again. Stale files are left in the folder (delete it to reclaim space).

Random choices: the key holds the *concrete* choice (which window, which flip), so a cached latent is always the
latent of the sample being asked for. With random window starts or flips each distinct choice is encoded once and
the cache hits only when that choice comes again; :func:`~trainer_core.data.dataset.build_dataset` warns about it.
With ``window_start=start`` (or uniform sampling) and no flips every epoch asks for the same latent per item.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..fileio import save_safetensors_atomic
from .dataset import SamplePlan, VideoDataset

log = logging.getLogger(__name__)

#: Bump when decoding, resizing or cropping changes, so old latents are not reused.
PREPROCESS_VERSION = 1
_CHUNK = 1 << 20


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

    def get_or_encode(
        self,
        dataset: VideoDataset,
        sample_ids: Sequence[int],
        epoch: int,
        encode_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Latents ``[B, ...]`` (on CPU) of one batch of sample ids from ``dataset.batches(epoch, ...)``.

        Samples of datasets with ``cache_latents`` on are read from the cache when present; all others are decoded
        and passed together to one ``encode_fn(pixels [M, 3, F, H, W] float32 CPU in [-1, 1])`` call, which must
        return ``M`` latents; the cached datasets' ones are then stored atomically.
        """
        plans = [dataset.plan(i, epoch) for i in sample_ids]
        paths = [self.path_for(p) if p.cache_latents else None for p in plans]
        latents: list[torch.Tensor | None] = [self._read(path) if path else None for path in paths]
        todo = [j for j, lat in enumerate(latents) if lat is None]
        cached = sum(path is not None for path in paths)
        missed = sum(paths[j] is not None for j in todo)
        self.hits += cached - missed
        self.misses += missed
        if todo:
            pixels = torch.stack([dataset.pixels(plans[j]) for j in todo])
            with torch.no_grad():
                encoded = encode_fn(pixels)
            if not isinstance(encoded, torch.Tensor) or encoded.shape[0] != len(todo):
                got = tuple(encoded.shape) if isinstance(encoded, torch.Tensor) else type(encoded).__name__
                raise ValueError(f"encode_fn must return a tensor with {len(todo)} latents along dim 0, got {got}")
            encoded = encoded.detach().to("cpu")
            for row, j in enumerate(todo):
                latents[j] = encoded[row].clone()
                if paths[j] is not None:
                    meta = {"source": str(plans[j].source), "key": json.dumps(self.key_material(plans[j]))}
                    save_safetensors_atomic({"latent": latents[j]}, paths[j], metadata=meta)
        return torch.stack(latents)
