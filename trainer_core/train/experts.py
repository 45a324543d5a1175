"""Per-expert training objects: the transformer with its own LoRA, optimizer and LR schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from ..config import JobConfig
from ..lora import attach_lora, lora_parameters
from .optim import build_lr_scheduler, build_optimizer

EXPERT_SUFFIX = {"high": "high_noise", "low": "low_noise"}


@dataclass
class Expert:
    """One trained expert: its transformer (base frozen, LoRA trainable), optimizer and LR schedule."""

    name: str
    model: WanTransformer3DModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_done: int = 0

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule and step count (the LoRA weights are saved separately, in ComfyUI naming)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = int(state["steps_done"])


def prepare_expert(
    name: str, model: WanTransformer3DModel, cfg: JobConfig, expert_steps: int, device: torch.device
) -> Expert:
    """Freeze the base, attach a LoRA, move to ``device`` and build this expert's optimizer and schedule."""
    model.requires_grad_(False)
    attach_lora(model, cfg.lora)
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device)
    model.train()
    optimizer = build_optimizer(lora_parameters(model), cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.optimizer, expert_steps)
    return Expert(name=name, model=model, optimizer=optimizer, scheduler=scheduler)
