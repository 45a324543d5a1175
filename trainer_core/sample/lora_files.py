"""Attach a saved LoRA file (any format :mod:`trainer_core.lora.formats` reads) to an expert for sampling.

The adapter's rank, alpha and targets come from the file itself (:func:`trainer_core.lora.adapter_config`); the file
is checked against the expert from its header before any tensor is read (a LoRA for another model or size is
refused by name), and applied as ComfyUI's LoraLoaderModelOnly applies it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError, LoraFileError
from ..lora import adapter_config, attach_lora, load_lora_tensors, read_lora_file, split_patches
from ..lora.patches import describe_patches
from ..names import EXPERT_SUFFIX


def attach_lora_file(
    transformer: nn.Module,
    path: str | os.PathLike,
    *,
    expert: str | None = None,
    setting: str = "LoRA file",
    adapter_name: str = "default",
) -> LoraConfig:
    """Attach the LoRA file at ``path`` to ``transformer`` as ``adapter_name``; returns the adapter's config.

    ``expert`` (``"high"`` / ``"low"``, optional) refuses a file whose ``expert`` metadata names the other expert.
    ``setting`` names the input in error messages (e.g. the node widget ``lora_high``). A file that does not fit the
    model raises :class:`LoraFileError` and leaves the transformer without the adapter.
    """
    if expert not in (None, *EXPERT_SUFFIX):
        raise ValueError(f"expert must be 'high', 'low' or None, got {expert!r}")
    if adapter_name in (getattr(transformer, "peft_config", None) or {}):
        raise ConfigError(f"{setting}: the expert already has a LoRA adapter named {adapter_name!r}; use another name")
    tensors, patches = split_patches(read_lora_file(path, setting, arch=dict(transformer.config), expert=expert))
    if patches:
        raise LoraFileError(f"{setting}: {path} holds {describe_patches(patches)}, which no adapter holds - render it "
                            "with trainer_core.lora.merged_patches beside the adapter (as Preview Sample does)")
    return attach_lora_tensors(transformer, tensors, f"{setting}: {path}", adapter_name)


def attach_lora_tensors(
    transformer: nn.Module, tensors: dict[str, torch.Tensor], source: str, adapter_name: str = "default"
) -> LoraConfig:
    """Attach a LoRA already read by :func:`trainer_core.lora.read_lora_file` (for this transformer's shapes) as
    ``adapter_name``; returns the adapter's config. ``source`` names the file in error messages."""
    cfg = adapter_config(tensors)
    attach_lora(transformer, cfg, adapter_name)
    try:
        load_lora_tensors(transformer, tensors, cfg, adapter_name, source=source)
    except LoraFileError:
        transformer.delete_adapters(adapter_name)
        raise
    return cfg
