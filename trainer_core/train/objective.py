"""What one micro-batch optimizes: plain flow matching, optionally with DOP and/or differential guidance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import WanTransformer3DModel

from ..config import JobConfig
from ..errors import ConfigError
from ..regularizers import (
    dop_step_loss,
    guided_micro_batch_loss,
    guided_target,
    preservation_caption,
    prior_prediction,
)
from ..schedule import loss_weights
from .conditioning import Conditioner
from .losses import flow_matching_loss, noisy_latents, velocity_target
from .step import micro_batch_loss, predict_velocity


@dataclass
class Objective:
    """Computes a micro-batch's loss and backpropagates it (scaled for gradient accumulation).

    DOP runs its passes 1 and 3 as one batched forward (fastest) unless ``memory.low_vram`` asks for the
    lean variant, which backpropagates pass 1 before pass 3 so only one graph is alive at a time.
    """

    cfg: JobConfig
    autocast_dtype: torch.dtype | None
    #: Every rank must run every backward (sharded weights are gathered there): a non-finite loss is backpropagated
    #: too; the loop stops before the optimizer step either way.
    collective: bool = False

    def __post_init__(self) -> None:
        if self.cfg.advanced.dop and any(d.is_regularization for d in self.cfg.datasets):
            raise ConfigError(
                "advanced.dop is on and a dataset has is_regularization: both hold the LoRA to the base model's "
                "predictions - use DOP, or regularization datasets, not both"
            )

    def extra_captions(self, captions: set[str]) -> set[str]:
        """Captions that must be encoded besides the dataset's own: DOP's preservation prompts."""
        adv = self.cfg.advanced
        if not adv.dop:
            return set()
        pres = (preservation_caption(c, self.cfg.trigger_word, adv.dop_class) for c in captions)
        return {p for p in pres if p is not None}

    def __call__(
        self,
        model: WanTransformer3DModel,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigmas: torch.Tensor,
        captions: Sequence[str],
        condition: Conditioner,
        weight: float = 1.0,
        regularization: Sequence[bool] = (),
    ) -> tuple[torch.Tensor, float]:
        """Backpropagate this micro-batch; return (the loss that was backpropagated, the plain MSE to log).

        ``weight`` is this micro-batch's share of the global batch (data-parallel ranks); the gradient is scaled by
        ``weight / gradient_accumulation``. Samples flagged in ``regularization`` (datasets with
        ``is_regularization``) are prior data: their target is the base model's prediction (LoRA off, no grad) on
        the same noisy input, so they pull the LoRA back towards the base model instead of towards the clip.
        """
        cfg, adv = self.cfg, self.cfg.advanced
        scale = weight / cfg.train.gradient_accumulation
        device = x0.device
        text = condition(captions).to(device)
        gs = adv.diff_guidance_scale if adv.diff_guidance else None
        if adv.dop:
            pres = [preservation_caption(c, cfg.trigger_word, adv.dop_class) for c in captions]
            keep = [i for i, p in enumerate(pres) if p is not None]
            text_pres = condition([pres[i] for i in keep]).to(device) if keep else None
            batched = not cfg.memory.low_vram
            loss, parts = dop_step_loss(
                model, x0, noise, sigmas, text, text_pres, cfg.train.timestep_type, self.autocast_dtype,
                adv.dop_multiplier, batched=batched, preserve=keep, guidance_scale=gs,
                backward_scale=None if batched else scale,
            )  # fmt: skip
            if batched:
                self._backward(loss, scale, self.collective)
            return loss.detach(), float(parts["normal_mse"])
        reg = [i for i, r in enumerate(regularization) if r]
        if reg:
            loss = self._prior_regularized_loss(model, x0, noise, sigmas, text, reg, gs)
            self._backward(loss, scale, self.collective)
            return loss.detach(), float(loss.detach()) / (gs or 1.0) ** 2
        if gs is not None:
            loss = guided_micro_batch_loss(
                model, x0, noise, sigmas, text, cfg.train.timestep_type, self.autocast_dtype, gs
            )
            self._backward(loss, scale, self.collective)
            return loss.detach(), float(loss.detach()) / gs**2
        loss = micro_batch_loss(model, x0, noise, sigmas, text, cfg.train.timestep_type, self.autocast_dtype)
        self._backward(loss, scale, self.collective)
        return loss.detach(), float(loss.detach())

    def _prior_regularized_loss(
        self,
        model: WanTransformer3DModel,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigmas: torch.Tensor,
        text: torch.Tensor,
        reg: list[int],
        gs: float | None,
    ) -> torch.Tensor:
        x_t = noisy_latents(x0, noise, sigmas)
        target = velocity_target(x0, noise).clone()
        prior = prior_prediction(model, x_t[reg], sigmas[reg], text[reg], autocast_dtype=self.autocast_dtype)
        target[reg] = prior.float()
        pred = predict_velocity(model, x_t, sigmas, text, self.autocast_dtype)
        if gs is not None:
            target = guided_target(pred, target, gs)
        return flow_matching_loss(pred, target, loss_weights(sigmas, self.cfg.train.timestep_type))

    @staticmethod
    def _backward(loss: torch.Tensor, scale: float, always: bool) -> None:
        # A non-finite loss is not backpropagated (unless ranks must take part); the loop stops before any step.
        if always or torch.isfinite(loss):
            (loss * scale).backward()
