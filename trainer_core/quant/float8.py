"""float8 e4m3 weights with one scale per output row.

``W ≈ diag(s) · Q`` with ``s_i = max_j |W_ij| / 448`` (448 = largest e4m3 value) and ``Q = e4m3(W / s)``. On GPUs
with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell) the matmul runs in fp8 through
``torch._scaled_mm`` with the activations quantized per row on the fly (rowwise scales on both sides); elsewhere the
weight is dequantized into the activations' dtype for each matmul. Backward always uses the dequantized weight (bf16
input gradients for the LoRA layers upstream).
"""

from __future__ import annotations

import torch
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


class Float8Linear(FrozenQuantLinear):
    """Frozen Linear with float8 e4m3 weights (``qweight``) and per-row float32 scales (``weight_scale``).

    ``fp8_matmul``: compute in fp8 with ``torch._scaled_mm`` (only honoured when the layer's dims are multiples of 16,
    which the kernel needs); otherwise the weight is dequantized into the input's dtype for every matmul.
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, fp8_matmul: bool = False):
        super().__init__(linear, compute_dtype)
        q, scale = quantize_float8_rowwise(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("weight_scale", scale)
        self.fp8_matmul = fp8_matmul and self.in_features % 16 == 0 and self.out_features % 16 == 0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_float8_rowwise(self.qweight, self.weight_scale, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # After a stray model.to(dtype) the storage is no longer fp8: still correct through the dequantize path.
        if self.fp8_matmul and self.qweight.dtype == FP8_DTYPE:
            return _fp8_rowwise_matmul(x, self.qweight, self.weight_scale, self.bias)
        return super().matmul(x)
