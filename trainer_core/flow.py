"""Flow-matching math as Wan is trained: x_t = (1-sigma)*x0 + sigma*eps, velocity target eps - x0, MSE; and the
expert's velocity prediction. Below both :mod:`trainer_core.train` and :mod:`trainer_core.regularizers`, which build
their losses from these pieces."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers import WanTransformer3DModel
from peft.helpers import disable_input_dtype_casting


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] tensor so it broadcasts over the remaining dims of ``like``."""
    return sigma.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Interpolate clean latents towards noise: ``(1 - sigma) * x0 + sigma * noise`` per sample."""
    s = _per_sample(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``noise - x0`` (what the Wan transformer predicts)."""
    return noise - x0


def flow_matching_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE per sample (mean over all non-batch dims), then a weighted mean over the batch.

    ``weights`` are per-sample loss weights (``timestep_type: weighted``); ``None`` means all ones.
    Computed in float32 whatever the prediction dtype, so bf16 outputs do not lose the loss's low bits.
    """
    err = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is None:
        return err.mean()
    w = weights.to(err.device, torch.float32)
    return (err * w).sum() / w.numel()


def predict_velocity(
    model: WanTransformer3DModel,
    x_t: torch.Tensor,
    sigmas: torch.Tensor,
    text: torch.Tensor,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    """The expert's velocity prediction for noisy latents ``x_t`` at noise levels ``sigmas`` (t = 1000·σ).

    The timestep stays float32: bf16 would round t near the boundary by up to 4 and blur the expert split. Under
    autocast peft's cast of each LoRA input to the fp32 LoRA weight is switched off: autocast runs the LoRA matmul in
    the compute dtype anyway, and the cast would cost a copy of every LoRA input, kept for backward.
    """
    dtype = model.dtype
    autocast = autocast_dtype is not None
    with (
        torch.autocast(x_t.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast),
        _lora_inputs_uncast(model, active=autocast),
    ):
        return model(
            hidden_states=x_t.to(dtype),
            timestep=sigmas.float() * 1000.0,
            encoder_hidden_states=text.to(dtype),
            return_dict=False,
        )[0]


@contextmanager
def _lora_inputs_uncast(model: WanTransformer3DModel, active: bool) -> Iterator[None]:
    """peft's ``disable_input_dtype_casting`` over the LoRA layers :func:`trainer_core.lora.attach_lora` recorded
    (peft's own walks every module on entry and exit: about 15 ms per forward on the A14B)."""
    layers = getattr(model, "lora_layers", None)
    if not active or layers is None:
        with disable_input_dtype_casting(model, active=active):
            yield
        return
    before = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, value in zip(layers, before):
            m.cast_input_dtype_enabled = value
