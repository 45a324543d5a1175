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
_NODE = "Load Wan22 LoRA Pair"
#: The strength is folded into the pair's weights, so the strength of the node it feeds multiplies it.
_TIMES = (". Multiplies with the strength of the node the pair feeds (Apply Wan22 LoRA Pair, Preview Sample): 0.5 "
          "here and 0.5 there apply 0.25")


def _loras() -> list[str]:
    return [NONE, *host.model_files("loras")]


def _strength(tooltip: str) -> tuple[str, dict]:
    return ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05, _T: tooltip})


#: The tensors a strength scales: the LoRAs' up weights and the full-weight differences (ComfyUI's trainer's).
_SCALED = (".lora_up.weight", ".diff", ".diff_b")


def _scaled(tensors: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """``tensors`` with ``strength`` folded into the up weights and differences (what LoraLoaderModelOnly's strength
    does to the patch: W + strength · (alpha / rank) · up @ down, W + strength · diff), so every node the pair feeds
    applies it - times its own strength."""
    if strength == 1.0:
        return tensors
    return {k: (v.float() * strength if k.endswith(_SCALED) else v) for k, v in tensors.items()}


class LoadWan22LoraPair:
    """Two LoRA files (high-noise and low-noise expert), each read as ComfyUI reads it, as one LoRA pair."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_high": (_loras(), {_T: (
                    "High-noise expert's LoRA from models/loras (ComfyUI, ai-toolkit, musubi/kohya or diffusers "
                    "format); 'none' leaves that expert as the base model")}),
                "strength_high": _strength("Strength on the high-noise expert: 1 as saved, 0 = base model" + _TIMES),
                "lora_low": (_loras(), {_T: (
                    "Low-noise expert's LoRA from models/loras; 'none' leaves that expert as the base model")}),
                "strength_low": _strength("Strength on the low-noise expert: 1 as saved, 0 = base model" + _TIMES),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (LORA,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The pair for Preview Sample, Apply Wan22 LoRA Pair or Train LoRA's init_lora.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Load a Wan 2.2 LoRA pair made by any common trainer, to render it (Preview Sample) or to continue "
                   "training from it (Train LoRA's init_lora).")

    def load(
        self, lora_high: str, strength_high: float, lora_low: str, strength_low: float, unique_id: str | None = None
    ) -> tuple[LoraPair]:
        """Read both files (each checked from its header first) into a :class:`LoraPair` in ComfyUI naming; what
        the files' names or ComfyUI's own loader would make of them differently is shown under the node."""
        from trainer_core.api import LoraPair  # peft and the models' libraries: on first use, not at ComfyUI's start
        from trainer_core.lora import adapter_config, pair_warnings, read_lora_file, split_patches

        picked = {e: (name, s) for e, name, s in (("high", lora_high, strength_high), ("low", lora_low, strength_low))
                  if name != NONE}
        if not picked:
            raise ConfigError(f"{_NODE}: lora_high and lora_low are both 'none' - pick at least one LoRA file (or "
                              "leave Preview Sample's lora input unconnected to render the base model)")
        tensors, files, notes = {}, {}, []
        inputs = {e: f"{_NODE} lora_{e}" for e in picked}
        for expert, (name, strength) in picked.items():
            files[expert] = Path(host.model_file_path("loras", name))
            read = read_lora_file(files[expert], inputs[expert], expert=expert, on_warning=notes.append)
            tensors[expert] = _scaled(read, strength)
        notes += [f"{_NODE}: {w}" for w in pair_warnings(files, {"high": "lora_high", "low": "lora_low"})]
        for note in notes:
            host.log.warning("warning: %s", note)
        if notes:  # one text: a node shows the last one it was sent
            host.show_text("\n".join(f"warning: {note}" for note in notes), unique_id)
        adapters = [a for a, _ in map(split_patches, tensors.values()) if a]
        lora = adapter_config(*adapters) if adapters else None  # a pair of differences alone needs no adapter
        strengths = {e: s for e, (_, s) in picked.items()}
        return (LoraPair(lora, tensors, files, strength=strengths, inputs=inputs),)
