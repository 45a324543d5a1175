"""Load Wan22 LoRA Pair: any Wan 2.2 LoRA pair from ComfyUI's loras folder, for Preview Sample and Train LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer_core.errors import ConfigError

from . import host
from .bundle import CATEGORY, LORA

if TYPE_CHECKING:
    from trainer_core.api import LoraPair

NONE = "none"
_T = "tooltip"


def _loras() -> list[str]:
    return [NONE, *host.model_files("loras")]


def _strength(tooltip: str) -> tuple[str, dict]:
    return ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05, _T: tooltip})


def _scaled(tensors: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """``tensors`` with ``strength`` folded into the up weights (what LoraLoaderModelOnly's strength does to the
    patch: W + strength · (alpha / rank) · up @ down), so every node the pair feeds applies it."""
    if strength == 1.0:
        return tensors
    return {k: (v.float() * strength if k.endswith(".lora_up.weight") else v) for k, v in tensors.items()}


class LoadWan22LoraPair:
    """Two LoRA files (high-noise and low-noise expert), each read as ComfyUI reads it, as one LoRA pair."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_high": (_loras(), {_T: (
                    "High-noise expert's LoRA from models/loras (ComfyUI, ai-toolkit, musubi/kohya or diffusers "
                    "format); 'none' leaves that expert as the base model")}),
                "strength_high": _strength("Strength on the high-noise expert: 1 as saved, 0 = base model"),
                "lora_low": (_loras(), {_T: (
                    "Low-noise expert's LoRA from models/loras; 'none' leaves that expert as the base model")}),
                "strength_low": _strength("Strength on the low-noise expert: 1 as saved, 0 = base model"),
            }
        }

    RETURN_TYPES = (LORA,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The pair for Preview Sample, Apply Wan22 LoRA Pair or Train LoRA's init_lora.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Load a Wan 2.2 LoRA pair made by any common trainer, to render it (Preview Sample) or to continue "
                   "training from it (Train LoRA's init_lora).")

    def load(self, lora_high: str, strength_high: float, lora_low: str, strength_low: float) -> tuple[LoraPair]:
        """Read both files (each checked from its header first) into a :class:`LoraPair` in ComfyUI naming."""
        from trainer_core.api import LoraPair  # peft and the models' libraries: on first use, not at ComfyUI's start
        from trainer_core.lora import adapter_config, read_lora_file

        picked = {e: (name, s) for e, name, s in (("high", lora_high, strength_high), ("low", lora_low, strength_low))
                  if name != NONE}
        if not picked:
            raise ConfigError("Load Wan22 LoRA Pair: lora_high and lora_low are both 'none' - pick at least one "
                              "LoRA file (or leave Preview Sample's lora input unconnected to render the base model)")
        tensors, files = {}, {}
        for expert, (name, strength) in picked.items():
            files[expert] = Path(host.model_file_path("loras", name))
            read = read_lora_file(files[expert], f"Load Wan22 LoRA Pair lora_{expert}", expert=expert)
            tensors[expert] = _scaled(read, strength)
        strengths = {e: s for e, (_, s) in picked.items()}
        return (LoraPair(adapter_config(*tensors.values()), tensors, files, strength=strengths),)
