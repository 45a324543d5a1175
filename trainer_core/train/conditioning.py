"""Text conditioning for training: every caption encoded once (cached on disk) or live, per text_encoder.mode."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import JobConfig
from ..data import VideoDataset
from ..data.text_cache import TextEmbeddingCache, prepare_text_conditioning
from ..errors import ConfigError
from ..models import WanComponents, encode_prompts

Conditioner = Callable[[Sequence[str]], torch.Tensor]


def setup_conditioning(
    cfg: JobConfig,
    components: WanComponents,
    dataset: VideoDataset,
    extra_captions: set[str],
    device: torch.device,
) -> Conditioner:
    """Return ``captions -> embeddings [B, 512, dim]``.

    ``cache`` / ``unload``: the dataset's captions and ``extra_captions`` (e.g. DOP's preservation prompts) are
    encoded once into the on-disk cache, then the text encoder is dropped from ``components`` and memory.
    ``live``: the encoder stays on ``device`` and encodes each batch.
    """
    te, tok = components.text_encoder, components.tokenizer
    if te is None or tok is None:
        raise ConfigError("the text encoder and tokenizer are needed to encode captions but were not loaded")
    te.to(device)

    def encode(captions: list[str]) -> torch.Tensor:
        return encode_prompts(te, tok, captions, device=device)

    mode = cfg.text_encoder.mode
    cache = None
    if mode != "live":
        folder = Path(cfg.text_encoder.cache_dir or Path(cfg.save.output_dir) / "text_cache")
        cache = TextEmbeddingCache(folder, f"{components.base_model}|{te.dtype}|{cfg.quant.text_encoder}")
    condition = prepare_text_conditioning(mode, dataset, encode, cache)
    if cache is not None:
        cache.ensure(extra_captions, encode)
        components.text_encoder = None
        te.to("cpu")
        del te
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return condition
