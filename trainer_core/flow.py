"""Flow-matching math as Wan is trained: x_t = (1-sigma)*x0 + sigma*eps, velocity target eps - x0, MSE."""

from __future__ import annotations

import torch


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
