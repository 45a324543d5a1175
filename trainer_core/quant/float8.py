"""float8 e4m3 weights with one scale per output row.

``W ≈ diag(s) · Q`` with ``s_i = max_j |W_ij| / 448`` (448 = largest e4m3 value) and ``Q = e4m3(W / s)``. On GPUs
with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell) the matmul runs in fp8 through
``torch._scaled_mm`` with the activations quantized per row on the fly (rowwise scales on both sides); elsewhere the
weight is dequantized into the activations' dtype for each matmul.

Backward needs only the input gradient ``g @ W`` (the weight is frozen). With ``fp8_backward`` it runs in fp8 too:
``g @ diag(s) Q = (g·s) @ Q``, so the weight's row scales fold into the gradient's columns, the scaled gradient is
quantized per row like the forward's activations, and ``Q`` (transposed on the fly: ``_scaled_mm`` wants its second
operand column-major) is used as stored - no second copy of the weight is kept. Otherwise the weight is dequantized
into the gradient's dtype. Everything is a plain autograd function of tensors, so ``torch.compile`` traces it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import FrozenQuantLinear

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# A row of zeros gets this scale instead of 0 (any positive value dequantizes zeros exactly).
_MIN_SCALE = 1e-12


def quantize_float8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [out, in] float8_e4m3fn, scale [out, 1] float32)`` with ``weight ≈ q.float() * scale``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_float8_rowwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype``. Computed in ``dtype`` to avoid a float32 copy of the weight: e4m3 values are exact
    in bf16, and rounding the scale and the product to bf16 adds at most about 2^-8 relative error, far below
    e4m3's own 2^-4 steps."""
    return q.to(dtype) * scale.to(dtype)


def supports_fp8_matmul(device: torch.device | str) -> bool:
    """True on CUDA devices with fp8 tensor cores (compute capability 8.9 or newer)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_rowwise_matmul(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None):
    """``x @ (q * w_scale)^T + bias`` in fp8: each row of ``x`` is scaled into the e4m3 range, ``_scaled_mm``
    undoes both scales in its epilogue. Three passes over ``x`` (row max, scale, cast), no float32 copy of it."""
    x2 = x.reshape(-1, x.shape[-1])
    amax = torch.linalg.vector_norm(x2, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    # The multiplier is rounded to x's dtype and scale_a is its exact inverse, so no per-row bias creeps in; the
    # scaled values stay below 464 (448 + half an e4m3 step), which the cast rounds to 448 rather than NaN.
    inv = (FP8_MAX / amax.clamp(min=_MIN_SCALE)).to(x2.dtype)
    xq = (x2 * inv).to(FP8_DTYPE)
    # mat2 must be column-major: q.t() of a row-major [out, in] tensor is exactly that, without a copy.
    out = torch._scaled_mm(
        xq,
        q.t(),
        scale_a=1.0 / inv.float(),
        scale_b=w_scale.float().view(1, -1),
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
    )
    return out.reshape(*x.shape[:-1], q.shape[0]).to(x.dtype)


def _fp8_input_gradient(grad: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``grad @ (q * w_scale)`` in fp8 (bf16 result): the weight's row scales fold into the gradient's columns."""
    g2 = grad.reshape(-1, grad.shape[-1])
    gs = g2 * w_scale.view(1, -1).to(g2.dtype)
    amax = torch.linalg.vector_norm(gs, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    inv = (FP8_MAX / amax.clamp(min=_MIN_SCALE)).to(gs.dtype)
    gq = (gs * inv).to(FP8_DTYPE)
    out = torch._scaled_mm(
        gq,
        q.t().contiguous().t(),  # [out, in] column-major
        scale_a=1.0 / inv.float(),
        scale_b=torch.ones(1, q.shape[1], device=q.device, dtype=torch.float32),
        out_dtype=torch.bfloat16,
    )
    return out.reshape(*grad.shape[:-1], q.shape[1])


class _Float8Matmul(torch.autograd.Function):
    """``x @ W^T + b`` with ``W = q * scale`` frozen; backward returns only ``dL/dx``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, q, scale, bias, fp8_forward: bool, fp8_backward: bool):
        ctx.save_for_backward(q, scale)
        ctx.fp8_backward = fp8_backward
        ctx.x_dtype = x.dtype
        if fp8_forward:
            return _fp8_rowwise_matmul(x, q, scale, bias)
        return F.linear(x, dequantize_float8_rowwise(q, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        if ctx.fp8_backward:
            grad_x = _fp8_input_gradient(grad, q, scale)
        else:
            grad_x = grad @ dequantize_float8_rowwise(q, scale, grad.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None


class Float8Linear(FrozenQuantLinear):
    """Frozen Linear with float8 e4m3 weights (``qweight``) and per-row float32 scales (``weight_scale``).

    ``fp8_matmul``: compute in fp8 with ``torch._scaled_mm`` (only honoured when the layer's dims are multiples of 16,
    which the kernel needs); otherwise the weight is dequantized into the input's dtype for every matmul.
    ``fp8_backward``: with ``fp8_matmul``, the input gradient is computed in fp8 as well.
    """

    def __init__(
        self, linear: nn.Linear, compute_dtype: torch.dtype, fp8_matmul: bool = False, fp8_backward: bool = True
    ):
        super().__init__(linear, compute_dtype)
        q, scale = quantize_float8_rowwise(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("weight_scale", scale)
        self.fp8_matmul = fp8_matmul and self.in_features % 16 == 0 and self.out_features % 16 == 0
        self.fp8_backward = fp8_backward

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_float8_rowwise(self.qweight, self.weight_scale, dtype)

    def _fp8_kernels(self) -> bool:
        # After a stray model.to(dtype) the storage is no longer fp8: still correct through the dequantize path.
        return self.fp8_matmul and self.qweight.dtype == FP8_DTYPE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp8 = self._fp8_kernels()
        y = _Float8Matmul.apply(x, self.qweight, self.weight_scale, self.bias, fp8, fp8 and self.fp8_backward)
        return self.add_ara(x, y)
