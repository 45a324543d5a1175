"""One expert's flow-matching loss on one micro-batch: the unit the loop, DOP and the benchmarks share."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers import WanTransformer3DModel
from peft.helpers import disable_input_dtype_casting

from ..schedule import loss_weights
from .losses import flow_matching_loss, noisy_latents, velocity_target


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


def micro_batch_loss(
    model: WanTransformer3DModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    text: torch.Tensor,
    timestep_type: str,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Flow-matching MSE of ``model`` on clean latents ``x0`` noised with ``noise`` at ``sigmas`` (weighted if
    asked)."""
    pred = predict_velocity(model, noisy_latents(x0, noise, sigmas), sigmas, text, autocast_dtype)
    return flow_matching_loss(pred, velocity_target(x0, noise), loss_weights(sigmas, timestep_type))
