"""An exponential moving average (EMA) of one expert's LoRA weights.

``shadow ← decay·shadow + (1 − decay)·param`` after each optimizer step of that expert (torch's own
``get_ema_multi_avg_fn``), kept in float32 beside the live weights. The EMA weights are saved as their own LoRA files
(``<name>_<step>_ema_high_noise.safetensors``) and can be swapped into the model for saving and previews.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..config import LoraConfig
from ..errors import LoraFileError
from ..lora import lora_file_name, lora_parameters, lora_state_dict_comfy, save_lora
from ..names import EXPERT_SUFFIX


def ema_lora_file_name(name: str, step: int, expert: str) -> str:
    """``<name>_<step:06d>_ema_high_noise.safetensors`` / ``..._ema_low_noise...``: :func:`lora_file_name` with
    ``ema_`` before the expert suffix."""
    live = lora_file_name(name, step, expert)
    tail = f"_{EXPERT_SUFFIX[expert]}.safetensors"
    return f"{live[: -len(tail)]}_ema{tail}"


class LoraEMA:
    """Float32 EMA copies of the LoRA weights of ``model`` (its ``adapter_name`` adapter), one per parameter.

    The shadows start as copies of the current weights and live on each weight's device. Make one per trained
    expert, after :func:`trainer_core.lora.attach_lora`.
    """

    def __init__(self, model: nn.Module, decay: float, adapter_name: str = "default") -> None:
        if not (math.isfinite(decay) and 0.0 < decay < 1.0):
            raise ValueError(f"EMA decay must lie strictly between 0 and 1 (typical 0.99-0.999), got {decay}")
        self.decay, self.model, self.adapter_name = decay, model, adapter_name
        trainable = {id(p) for p in lora_parameters(model, adapter_name)}
        self._named = [(n, p) for n, p in model.named_parameters() if id(p) in trainable]
        self._shadow = [p.detach().to(torch.float32, copy=True) for _, p in self._named]
        self._update = get_ema_multi_avg_fn(decay)

    @property
    def params(self) -> list[nn.Parameter]:
        """The live LoRA weights this EMA follows, in a fixed order."""
        return [p for _, p in self._named]

    def update(self) -> None:
        """``shadow = decay·shadow + (1 − decay)·param``: call after each optimizer step of this expert."""
        current = [p.detach().to(s.device, torch.float32) for (_, p), s in zip(self._named, self._shadow)]
        self._update(self._shadow, current, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter name -> EMA tensor (the live shadows, not copies: save them before the next :meth:`update`)."""
        return {n: s for (n, _), s in zip(self._named, self._shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (resume); validates names, shapes and values before copying."""
        names = [n for n, _ in self._named]
        missing = [n for n in names if n not in state]
        unknown = [k for k in state if k not in set(names)]
        wrong = [
            f"{n}: saved {tuple(state[n].shape)} vs model {tuple(s.shape)}"
            for n, s in zip(names, self._shadow)
            if n in state and tuple(state[n].shape) != tuple(s.shape)
        ]
        if missing or unknown or wrong:
            raise LoraFileError(
                f"the saved EMA state does not fit this run's LoRA ({len(missing)} missing, {len(unknown)} unknown, "
                f"{len(wrong)} of another shape; e.g. {(missing + unknown + wrong)[:3]}) - resume with the original "
                "lora settings, or turn advanced.ema off"
            )
        bad = [n for n in names if not torch.isfinite(state[n]).all()]
        if bad:
            raise LoraFileError(f"the saved EMA state holds NaN/Inf values in {bad[:3]} - resume from an earlier state")
        with torch.no_grad():
            for n, s in zip(names, self._shadow):
                s.copy_(state[n].to(s.device, torch.float32))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Put the EMA weights into the model for the block; the live weights come back bit-exactly afterwards."""
        live = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, s in zip(self.params, self._shadow):
                    p.copy_(s.to(p.device, p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, live):
                    p.copy_(saved)


def ema_lora_state_dict(ema: LoraEMA, cfg: LoraConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The EMA weights as ComfyUI-native LoRA tensors (:func:`trainer_core.lora.lora_state_dict_comfy` layout)."""
    with ema.swapped_in():
        tensors = lora_state_dict_comfy(ema.model, cfg, dtype, ema.adapter_name)
        # Cloned: for fp32 the converter returns the parameters' own storage, which the swap-back overwrites.
        return {k: v.clone() for k, v in tensors.items()}


def save_ema_lora(
    path: str | os.PathLike, ema: LoraEMA, cfg: LoraConfig, dtype: torch.dtype, metadata: dict[str, str]
) -> Path:
    """Write the EMA weights as a LoRA file, exactly like :func:`trainer_core.lora.save_lora` writes the live ones
    (plus an ``ema_decay`` metadata entry)."""
    with ema.swapped_in():
        return save_lora(path, ema.model, cfg, dtype, {**metadata, "ema_decay": f"{ema.decay:g}"}, ema.adapter_name)
