"""Attach a saved LoRA file (this trainer's ComfyUI format) to an expert for sampling.

The adapter's rank, alpha and targets are read from the file itself; :func:`trainer_core.lora.load_lora_state` then
checks every tensor against the model (a LoRA for another model or size is refused before any weight changes).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import DEFAULT_LORA_TARGETS, LoraConfig
from ..errors import ConfigError, LoraFileError
from ..lora import attach_lora, load_lora_state
from ..lora.io import EXPERT_SUFFIX, PREFIX

_KEY = re.compile(re.escape(PREFIX) + r"blocks\.\d+\.(?P<target>.+)\.(?:lora_down\.weight|lora_up\.weight|alpha)")
_FORMAT = f"{PREFIX}blocks.N.<module>.lora_down.weight / lora_up.weight / alpha"


def _lora_config_of(path: Path, setting: str, expert: str | None) -> LoraConfig:
    """Rank, alpha and targets of the file, read from its header and alpha scalars only."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            made_for = (fh.metadata() or {}).get("expert", "").removesuffix("_noise")
            keys = list(fh.keys())
            ranks = {fh.get_slice(k).get_shape()[0] for k in keys if k.endswith(".lora_down.weight")}
            alphas = {float(fh.get_tensor(k).float().reshape(-1)[0]) for k in keys if k.endswith(".alpha")}
    except (SafetensorError, OSError) as exc:
        raise LoraFileError(f"{setting}: {path} is not a readable .safetensors file: {exc}") from None
    if expert and made_for in EXPERT_SUFFIX and made_for != expert:
        raise LoraFileError(
            f"{setting}: {path} was trained for the {made_for}-noise expert, not the {expert}-noise one - "
            "swap the high and low LoRA files"
        )
    found = {m["target"] for k in keys if (m := _KEY.fullmatch(k))}
    targets = [t for t in DEFAULT_LORA_TARGETS if t in found]
    if not targets:
        raise LoraFileError(
            f"{setting}: {path} holds no Wan 2.2 LoRA in this trainer's format ({_FORMAT}); its first keys are "
            f"{keys[:3]} - pick a LoRA trained for Wan 2.2 T2V A14B by this trainer"
        )
    if len(ranks) != 1 or len(alphas) > 1:
        raise LoraFileError(
            f"{setting}: {path} has lora_down ranks {sorted(ranks)} and alphas {sorted(alphas)}; this trainer's "
            "files have exactly one rank and at most one alpha"
        )
    try:
        return LoraConfig(rank=ranks.pop(), alpha=alphas.pop() if alphas else None, target_modules=targets)
    except ValidationError as exc:
        raise LoraFileError(f"{setting}: {path} has an unusable rank or alpha: {exc.errors()[0]['msg']}") from None


def attach_lora_file(
    transformer: nn.Module,
    path: str | os.PathLike,
    *,
    expert: str | None = None,
    setting: str = "LoRA file",
    adapter_name: str = "default",
) -> LoraConfig:
    """Attach a LoRA saved by :func:`trainer_core.lora.save_lora` to ``transformer`` as ``adapter_name``.

    ``expert`` (``"high"`` / ``"low"``, optional) refuses a file whose ``expert`` metadata names the other expert.
    ``setting`` names the input in error messages (e.g. the node widget ``lora_high``). A file that does not fit the
    model raises :class:`LoraFileError` and leaves the transformer without the adapter. Returns the file's config.
    """
    if expert not in (None, *EXPERT_SUFFIX):
        raise ValueError(f"expert must be 'high', 'low' or None, got {expert!r}")
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{setting}: LoRA file {path} does not exist - check the path")
    if adapter_name in (getattr(transformer, "peft_config", None) or {}):
        raise ConfigError(f"{setting}: the expert already has a LoRA adapter named {adapter_name!r}; use another name")
    cfg = _lora_config_of(path, setting, expert)
    attach_lora(transformer, cfg, adapter_name)
    try:
        load_lora_state(transformer, path, cfg, adapter_name)
    except LoraFileError as exc:
        transformer.delete_adapters(adapter_name)
        raise LoraFileError(f"{setting}: {exc}") from None
    return cfg
