r"""Differential guidance: regress towards a target pushed past the data, ``pred + s·(target − pred)``.

What it does, exactly. With the MSE loss over ``N`` elements and the guided target computed without gradient,

    t' = p̄ + s·(t − p̄),    p̄ = stop_gradient(p),    L' = mean((p − t')²),

the residual at the current point is ``p − t' = s·(p − t)``, so

    L' = s² · mean((p − t)²)    and    ∂L'/∂p = (2/N)·(p − t') = s · (2/N)·(p − t) = s · ∂L/∂p

at every step, exactly: the gradient keeps its direction and is multiplied by ``s``. Differential guidance is
therefore the same as multiplying the loss by ``s`` (the reported loss value grows by ``s²``). What that changes
depends on the optimizer:

* plain SGD: it multiplies the learning rate by ``s``;
* Adam / AdamW / AdamW8bit (the usual choice): Adam divides the first moment by the root of the second, so a constant
  gradient factor cancels. The only traces left are that ``eps`` acts as ``eps / s`` (a slightly larger step
  where gradients are tiny), and that gradient clipping at ``max_grad_norm`` now engages where the unscaled
  gradient norm exceeds ``max_grad_norm / s``. AdamW's decoupled weight decay does not see the gradient and is
  unchanged. In practice it is close to a no-op with Adam unless clipping is active;
* combined with other loss terms (e.g. DOP), it raises the normal loss's weight by ``s`` relative to them.

It works on its own: enabling it is enough (no other guidance loss is needed).
"""

from __future__ import annotations

import math

import torch


def guided_target(pred: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """``pred + scale·(target − pred)`` in float32 (float64 for float64 inputs), with no gradient through it."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"differential guidance scale must be a positive finite number, got {scale}")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    with torch.no_grad():
        p = pred.detach().to(dtype)
        return p + scale * (target.to(dtype) - p)
