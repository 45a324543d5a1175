"""Optimizers (torch AdamW, bitsandbytes AdamW8bit) and learning-rate schedules (diffusers' own)."""

from __future__ import annotations

from typing import Iterable

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

from ..config import OptimizerConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW or bitsandbytes' 8-bit AdamW over the given (LoRA) parameters."""
    params = list(params)
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    # fused: one kernel for all LoRA tensors instead of a few per tensor (about 800 of them per expert)
    fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, **kwargs, fused=fused or None)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, expert_steps: int
) -> LRScheduler:
    """The LR schedule over this expert's own optimizer steps (each expert steps only while it is active)."""
    name = cfg.lr_scheduler
    if name == "constant" and cfg.warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(
        name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max(expert_steps, 1)
    )
