"""Apply Wan22 LoRA Pair: patch ComfyUI's own Wan 2.2 models with a pair trained in this graph or loaded."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import host
from .bundle import CATEGORY, LORA, TIMES_LOAD_STRENGTH

if TYPE_CHECKING:
    from trainer_core.api import LoraPair


class ApplyWan22LoraPair:
    """Both experts' LoRAs onto two ComfyUI MODELs (from UNETLoader) through ComfyUI's LoRA patching."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_high": ("MODEL", {"tooltip": "High-noise expert (UNETLoader with the high_noise file)"}),
                "model_low": ("MODEL", {"tooltip": "Low-noise expert (UNETLoader with the low_noise file)"}),
                "lora": (LORA, {"tooltip": (
                    "A pair from Train LoRA (used from memory, no file needed) or Load Wan22 LoRA Pair")}),
                "strength_high": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05, "tooltip": (
                    "Strength on the high-noise expert: 1 as trained, lower to tame motion or layout"
                    + TIMES_LOAD_STRENGTH)}),
                "strength_low": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05, "tooltip": (
                    "Strength on the low-noise expert: 1 as trained, lower to tame identity or texture"
                    + TIMES_LOAD_STRENGTH)}),
            }
        }

    RETURN_TYPES = ("MODEL", "MODEL")
    RETURN_NAMES = ("model_high", "model_low")
    OUTPUT_TOOLTIPS = ("High-noise expert with its LoRA.", "Low-noise expert with its LoRA.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = "Like two LoraLoaderModelOnly nodes, for a pair still in memory; an untrained expert is unchanged."

    def apply(self, model_high: Any, model_low: Any, lora: LoraPair, strength_high: float, strength_low: float):
        """Patched clones of the two models (the inputs stay unpatched); a LoRA that does not fit its model is
        refused naming the file, where ComfyUI's loader would only log it and leave the model as it was."""
        out = []
        for expert, model, strength in (("high", model_high, strength_high), ("low", model_low, strength_low)):
            tensors = lora.tensors.get(expert)
            if tensors is None or strength == 0:
                out.append(model)
                continue
            where = f"Apply Wan22 LoRA Pair: {lora.where(expert)}"
            out.append(host.apply_lora(model, tensors, strength, where, f"model_{expert}"))
        return tuple(out)
