"""Text embeddings of captions: encoded once, kept on disk, so the text encoder can be freed before training.

One safetensors file per caption, named by a hash of the caption text, the caller's text-encoder identity string
(include the weights and dtype in it) and ``max_length``; a changed caption therefore re-encodes only that caption,
and another encoder never reuses an embedding. The encoder zeroes every position past a caption's real token
length, so a file stores the embedding with its trailing all-zero positions cut off: padding it back with zeros
restores the encoder's output exactly, and a short caption takes a few KiB instead of ``max_length`` rows.

Text-encoder modes (``JobConfig.text_encoder.mode``), all served by :func:`prepare_text_conditioning`:

* ``cache``: every distinct caption a sample can carry (``""`` included when caption dropout is on) is encoded
  once into the cache; the encoder can then be freed.
* ``unload``: trigger-word-only training. Every sample's caption is the trigger word alone (build the dataset with
  ``caption_override=unload_caption(...)``), so one embedding (plus ``""`` for dropout) is encoded, then the
  encoder is freed. It needs a trigger word: without one every sample would train on the empty caption, which
  teaches the model to produce the dataset unprompted; use ``cache`` with captions for that instead.
* ``live``: the encoder stays loaded and each batch's captions are encoded at every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import ConfigError
from ..fileio import save_safetensors_atomic
from .dataset import VideoDataset

log = logging.getLogger(__name__)

TextEncoderMode = Literal["cache", "unload", "live"]
EncodeFn = Callable[[list[str]], torch.Tensor]
#: Wan's text length (``trainer_core.models.text.MAX_TEXT_TOKENS``, not imported: it would pull in transformers).
DEFAULT_MAX_LENGTH = 512
#: Bump when the stored format changes, so old files are not reused.
FORMAT_VERSION = 1


class TextEmbeddingCache:
    """Embeddings ``[max_length, dim]`` of captions, kept in ``folder`` for the encoder named ``te_id``.

    ``encoded`` counts the captions :meth:`ensure` passed to its ``encode_fn``.
    """

    def __init__(self, folder: str | os.PathLike, te_id: str, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.folder = Path(folder)
        self.te_id = te_id
        self.max_length = max_length
        self.encoded = 0
        self._trimmed: dict[str, torch.Tensor] = {}

    def path_for(self, caption: str) -> Path:
        """Cache file of ``caption``."""
        material = json.dumps(
            {"format": FORMAT_VERSION, "caption": caption, "te": self.te_id, "max_length": self.max_length},
            sort_keys=True,
        )
        return self.folder / f"{hashlib.sha256(material.encode()).hexdigest()}.safetensors"

    def _read(self, caption: str) -> torch.Tensor | None:
        if caption in self._trimmed:
            return self._trimmed[caption]
        path = self.path_for(caption)
        if not path.is_file():
            return None
        try:
            emb = load_file(str(path))["embedding"]
        except (SafetensorError, OSError, KeyError) as exc:
            log.warning("text-embedding cache file %s is unreadable (%s); encoding the caption again", path, exc)
            return None
        self._trimmed[caption] = emb
        return emb

    def ensure(self, captions: Iterable[str], encode_fn: EncodeFn, chunk_size: int = 8) -> None:
        """Encode the captions not cached yet, ``chunk_size`` at a time, with ``encode_fn(list[str]) -> [B,
        max_length, dim]`` (zero past each caption's real length, as ``trainer_core.models.encode_prompts``
        returns), and store them."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        missing = sorted(c for c in set(captions) if self._read(c) is None)
        for i in range(0, len(missing), chunk_size):
            chunk = missing[i : i + chunk_size]
            with torch.no_grad():
                emb = encode_fn(chunk)
            expected = (len(chunk), self.max_length)
            if not isinstance(emb, torch.Tensor) or emb.dim() != 3 or tuple(emb.shape[:2]) != expected:
                got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                raise ValueError(
                    f"encode_fn must return a tensor [{len(chunk)}, {self.max_length}, dim] for {len(chunk)} "
                    f"caption(s), got {got}"
                )
            self.encoded += len(chunk)
            emb = emb.detach().to("cpu")
            real = emb.ne(0).any(dim=-1)  # [B, L]: positions holding anything but zeros
            for caption, row, used in zip(chunk, emb, real):
                length = int(used.nonzero().max()) + 1 if used.any() else 0
                trimmed = row[:length].clone()
                meta = {"caption": caption, "te": self.te_id, "max_length": str(self.max_length)}
                save_safetensors_atomic({"embedding": trimmed}, self.path_for(caption), metadata=meta)
                self._trimmed[caption] = trimmed

    def get(self, caption: str) -> torch.Tensor:
        """The embedding ``[max_length, dim]`` of a cached caption (zero-padded, on CPU, in the encoder's dtype)."""
        emb = self._read(caption)
        if emb is None:
            raise KeyError(f"caption {caption!r} is not in the text-embedding cache {self.folder}; call ensure() first")
        out = emb.new_zeros((self.max_length, emb.shape[-1]))
        out[: emb.shape[0]] = emb
        return out

    def stack(self, captions: Sequence[str]) -> torch.Tensor:
        """Embeddings ``[B, max_length, dim]`` of cached captions, in order."""
        return torch.stack([self.get(c) for c in captions])


def unload_caption(mode: TextEncoderMode, trigger_word: str | None) -> str | None:
    """The fixed caption of every sample in ``unload`` mode (the trigger word), ``None`` in the other modes; pass it
    to ``build_dataset(..., caption_override=...)``. Raises :class:`ConfigError` in ``unload`` mode without a
    trigger word."""
    if mode != "unload":
        return None
    trigger = (trigger_word or "").strip()
    if not trigger:
        raise ConfigError(
            "text_encoder.mode is 'unload' (every sample trains on the trigger word alone) but trigger_word is not "
            "set - set trigger_word, or use text_encoder.mode 'cache' to train on the captions"
        )
    return trigger


def prepare_text_conditioning(
    mode: TextEncoderMode,
    dataset: VideoDataset,
    encode_fn: EncodeFn,
    cache: TextEmbeddingCache | None,
) -> Callable[[Sequence[str]], torch.Tensor]:
    """Set up text conditioning for ``mode`` and return ``captions -> embeddings [B, max_length, dim]``.

    ``cache``/``unload``: encodes every caption ``dataset`` can produce that ``cache`` lacks, then serves them from
    the cache (CPU tensors): ``encode_fn`` is not called again, so the text encoder may be freed. ``live``: the
    returned function calls ``encode_fn`` on each batch's captions (``cache`` is not used). In ``unload`` mode the
    dataset must have been built with ``caption_override=unload_caption(...)``.
    """
    if mode == "live":

        def live(captions: Sequence[str]) -> torch.Tensor:
            with torch.no_grad():
                return encode_fn(list(captions))

        return live
    if mode not in ("cache", "unload"):
        raise ConfigError(f"text_encoder.mode must be 'cache', 'unload' or 'live', got {mode!r}")
    if cache is None:
        raise ValueError(f"text_encoder.mode {mode!r} needs a TextEmbeddingCache")
    captions = dataset.captions()
    if mode == "unload":
        fixed = captions - {""}
        if len(fixed) != 1 or dataset.caption_override is None:
            raise ConfigError(
                f"text_encoder.mode is 'unload' but the dataset has {len(fixed)} distinct captions - build it with "
                "build_dataset(..., caption_override=unload_caption(mode, trigger_word))"
            )
    cache.ensure(captions, encode_fn)
    return cache.stack
