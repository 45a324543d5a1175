"""The objects that travel along the pack's custom links: the experts bundle and the trained LoRA pair.

ComfyUI keeps a node's outputs cached while its inputs are unchanged, so one :class:`ExpertsBundle` is handed to
every Train LoRA and Preview Sample node of the graph, across queue runs. The bundle loads components on first use
and keeps them on the CPU; a node that borrows them gives them back clean (no adapter, eval mode, on the CPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from trainer_core.config import LoraConfig, ModelConfig
from trainer_core.lora import attach_lora, load_lora_state
from trainer_core.models import WanComponents, load_components

#: Custom ComfyUI link types of this pack.
EXPERTS = "WAN22_EXPERTS"
DATASET = "WAN22_DATASET"
MULTISTAGE = "WAN22_MULTISTAGE"
SAVE = "WAN22_SAVE"
LORA = "WAN22_LORA"
CATEGORY = "Wan22 LoRA Trainer"

_PARTS = ("high", "low", "vae", "text_encoder")


@dataclass
class ExpertsBundle:
    """A :class:`ModelConfig` plus the components loaded from it so far (CPU, frozen, eval mode)."""

    model: ModelConfig
    loaded: WanComponents | None = None

    def components(
        self, *, high: bool = True, low: bool = True, vae: bool = True, text_encoder: bool = True
    ) -> WanComponents:
        """The requested components, loading only those not loaded yet.

        Returns a new :class:`WanComponents` sharing the cached modules, so a caller that drops a component from
        it (training frees the text encoder) does not empty the cache. Loading runs outside inference mode:
        ComfyUI runs nodes under ``torch.inference_mode()``, and weights created there could never be trained.
        """
        cached = self.loaded or WanComponents(None, None, None, None, None, base_model="")
        wanted = dict(zip(_PARTS, (high, low, vae, text_encoder)))
        missing = {p: on and getattr(cached, p) is None for p, on in wanted.items()}
        if any(missing.values()):
            with torch.inference_mode(False):
                new = load_components(self.model, **missing)
            for part in _PARTS:
                if missing[part]:
                    setattr(cached, part, getattr(new, part))
            if missing["text_encoder"]:
                cached.tokenizer = new.tokenizer
            cached.base_model = new.base_model
        self.loaded = cached
        return replace(cached)

    def forget(self, *parts: str) -> None:
        """Drop cached components (e.g. ones a failed run left in an unknown state); they reload on next use."""
        if self.loaded is not None:
            for part in parts:
                setattr(self.loaded, part, None)
                if part == "text_encoder":
                    self.loaded.tokenizer = None


@dataclass
class LoraPair:
    """A trained LoRA pair: per-expert tensors in ComfyUI naming (CPU) and the files they were saved to.

    ``tensors["high"]`` maps ``diffusion_model.blocks.N.<module>.lora_down.weight`` / ``lora_up.weight`` /
    ``alpha`` to tensors - the dict ComfyUI's ``comfy.sd.load_lora_for_models`` takes. An expert that was not
    trained has no entry.
    """

    lora: LoraConfig
    tensors: dict[str, dict[str, torch.Tensor]]
    files: dict[str, Path] = field(default_factory=dict)
    step: int = 0
    trigger_word: str | None = None


def release_expert(model: nn.Module | None) -> None:
    """Return a borrowed expert to the bundle's state: adapters removed, no checkpointing, eval mode, CPU."""
    if model is None:
        return
    if getattr(model, "peft_config", None):
        model.unload_lora()
    if model.is_gradient_checkpointing:
        model.disable_gradient_checkpointing()
    model.eval()
    model.to("cpu")


@contextlib.contextmanager
def lora_attached(model: nn.Module, pair: LoraPair | None, expert: str) -> Iterator[None]:
    """Attach ``pair``'s adapter for ``expert`` to ``model`` for the duration (nothing when the pair lacks it)."""
    tensors = pair.tensors.get(expert) if pair is not None else None
    if tensors is None:
        yield
        return
    try:
        with torch.inference_mode(False):
            attach_lora(model, pair.lora)
            load_lora_state(model, tensors, pair.lora)
        yield
    finally:
        if getattr(model, "peft_config", None):
            model.unload_lora()


@contextlib.contextmanager
def placed(device: torch.device, *modules: nn.Module | None) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the duration, then back to the CPU (where the bundle keeps them)."""
    present = [m for m in modules if m is not None]
    try:
        for m in present:
            m.to(device)
        yield
    finally:
        for m in present:
            m.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
