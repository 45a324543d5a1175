"""What a resume may change, checked from a state's metadata before any model loads, and applied after loading.

Users resume to extend a run (``train.steps``), after a NaN (a lower ``optimizer.lr``, clipping) or on another card
(memory, quantization, placement, workers): those settings take effect from the resumed step, and the log says so.
Settings that the saved state depends on cannot change: the LoRA's shape, which experts train and how they
alternate (the saved per-expert step counts and data position assume them), the optimizer kind (AdamW and 8-bit
AdamW keep different moment tensors), the batch layout (the data position counts batches) and the seed (data order
and noise are drawn from it). Those are refused by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..config import JobConfig, OptimizerConfig, inert_settings
from ..errors import ConfigError

#: Settings (or whole sections) a resume must keep, with why.
FIXED_ON_RESUME: dict[str, str] = {
    "lora": "the saved LoRA has that shape",
    "multistage": "the saved per-expert progress assumes it",
    "optimizer.name": "adamw and adamw8bit keep different optimizer states",
    "train.batch_size": "the saved data position counts batches",
    "train.gradient_accumulation": "the saved data position counts batches",
    "train.seed": "data order and noise are drawn from it",
}


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _fixed_key(path: str) -> str | None:
    for key in FIXED_ON_RESUME:
        if path == key or path.startswith(key + "."):
            return key
    return None


def resume_changes(saved: dict[str, Any], cfg: JobConfig) -> tuple[list[str], list[str]]:
    """(refused, applied): one line per setting that differs between a state's saved job and ``cfg``."""
    current = _flat(cfg.model_dump(mode="json"))
    before = _flat(saved)
    refused: dict[str, str] = {}
    applied = []
    inert = inert_settings(cfg)
    for path in sorted(set(current) | set(before)):
        if path in ("resume", "name", "lora.init_high", "lora.init_low") or path.startswith("datasets"):
            continue  # the dataset has its own check (a changed one only reorders the data); the state's weights
            # replace any starting pair
        if any(path == p or path.startswith(p + ".") for p in inert):
            continue  # switched off in this job: its value changes nothing from here on
        old, new = before.get(path), current.get(path)
        if old == new:
            continue
        fixed = _fixed_key(path)
        if fixed is not None:
            refused.setdefault(fixed, f"{path} was {old!r} in the state, now {new!r} ({FIXED_ON_RESUME[fixed]})")
        else:
            applied.append(f"{path}: {old!r} -> {new!r}")
    return list(refused.values()), applied


def check_resume_compatible(saved: dict[str, Any], step: int, cfg: JobConfig, where: str) -> list[str]:
    """Refuse a state (saved with job ``saved`` at ``step``, read from ``where``) that this job cannot continue;
    return the settings that change from the resumed step on."""
    refused, applied = resume_changes(saved, cfg)
    if refused:
        raise ConfigError(
            f"resume: {where} cannot continue with these settings: " + "; ".join(refused)
            + " - set them back, or start a new run without resume"
        )
    if step > cfg.train.steps:
        raise ConfigError(
            f"resume: {where} is at step {step}, past train.steps {cfg.train.steps} - raise train.steps above "
            f"{step} to train on, or use the LoRA pair saved beside it"
        )
    return applied


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, cfg: OptimizerConfig,
                          steps_done: int) -> None:
    """After loading a saved optimizer state (which brings back the saved lr, betas, ...): put this job's
    hyperparameters in, and move the freshly built LR schedule (this job's lr, warm-up, kind and length) to
    ``steps_done``. With unchanged settings this is exactly the saved learning rate (the same closed form)."""
    if not isinstance(scheduler, LambdaLR):
        raise TypeError(f"expected diffusers' LambdaLR schedule, got {type(scheduler).__name__}")
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    scheduler.last_epoch = steps_done
    lrs = [base * fn(steps_done) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (torch keeps it in this attribute)
