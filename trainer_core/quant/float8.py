"""float8 e4m3 weights with one scale per output row.

``W ≈ diag(s) · Q`` with ``s_i = max_j |W_ij| / 448`` (448 = largest e4m3 value) and ``Q = e4m3(W / s)``. On GPUs
with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell) the matmul runs in fp8 through
``torch._scaled_mm`` with the activations quantized per row on the fly (rowwise scales on both sides); elsewhere the
weight is dequantized into the activations' dtype for each matmul.

Backward needs only the input gradient ``g @ W`` (the weight is frozen). With ``fp8_backward`` it runs in fp8 too:
``g @ diag(s) Q = (g·s) @ Q``, so the weight's row scales fold into the gradient's columns, the scaled gradient is
quantized per row like the forward's activations, and ``Q`` (transposed on the fly: ``_scaled_mm`` wants its second
operand column-major) is used as stored - no second copy of the weight is kept. Otherwise the weight is dequantized
into the gradient's dtype. Only the forward matmul is opaque to ``torch.compile`` (the layers' shared custom op,
:func:`.base.frozen_linear`); the activations' row scaling and the backward are plain ops the compiler fuses.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import FORMATS, FrozenFormat, FrozenQuantLinear

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# A row of zeros gets this scale instead of 0 (any positive value dequantizes zeros exactly).
_MIN_SCALE = 1e-12


#: The attribute a model loader sets on a Linear whose weight it read from a float8 file: the scale (one value, or
#: one per output row) the file's float8 values were multiplied by. See :func:`quantize_float8_rowwise`.
FILE_FP8_SCALE = "file_fp8_scale"


def quantize_float8_rowwise(
    weight: torch.Tensor, file_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [out, in] float8_e4m3fn, scale [out, 1] float32)`` with ``weight ≈ q.float() * scale``.

    ``file_scale``: the scale of the float8 file the weight was read from. When ``weight`` is exactly that file's
    e4m3 values times it, those values and that scale are kept: re-quantizing them with each row's own maximum
    would round every weight a second time (2.9% mean relative error on a UMT5-XXL fp8_scaled file), and the
    trained model would differ from the file other tools load."""
    w = weight.detach().float()
    if file_scale is not None:
        scale = file_scale.to(w.device, torch.float32).reshape(-1, 1).expand(w.shape[0], 1).contiguous()
        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        if torch.equal((q.float() * scale).to(weight.dtype), weight.detach()):
            return q, scale
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


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq [rows, in] e4m3, scale [rows, 1] float32)`` with ``x ≈ xq * scale`` per row of ``x`` (flattened to 2-D):
    each row scaled into the e4m3 range. Three passes over ``x`` (row max, scale, cast), no float32 copy of it."""
    x2 = x.reshape(-1, x.shape[-1])
    amax = torch.linalg.vector_norm(x2, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    # The multiplier is rounded to x's dtype and the scale is its exact inverse, so no per-row bias creeps in; the
    # scaled values stay below 464 (448 + half an e4m3 step), which the cast rounds to 448 rather than NaN.
    inv = (FP8_MAX / amax.clamp(min=_MIN_SCALE)).to(x2.dtype)
    return (x2 * inv).to(FP8_DTYPE), 1.0 / inv.float()


def _fp8_rowwise_matmul(x: torch.Tensor, prepared: list[torch.Tensor], q: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (q * w_scale)^T + bias`` in fp8 from ``prepared = quantize_rows(x)``: ``_scaled_mm`` undoes both scales
    in its epilogue."""
    xq, x_scale = prepared
    # mat2 must be column-major: q.t() of a row-major [out, in] tensor is exactly that, without a copy.
    out = torch._scaled_mm(
        xq,
        q.t(),
        scale_a=x_scale,
        scale_b=w_scale.float().view(1, -1),
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
    )
    return out.reshape(*x.shape[:-1], q.shape[0]).to(x.dtype)


def _fp8_input_gradient(grad: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``grad @ (q * w_scale)`` in fp8 (bf16 result): the weight's row scales fold into the gradient's columns."""
    g2 = grad.reshape(-1, grad.shape[-1])
    gq, g_scale = quantize_rows(g2 * w_scale.view(1, -1).to(g2.dtype))
    out = torch._scaled_mm(
        gq,
        q.t().contiguous().t(),  # [out, in] column-major
        scale_a=g_scale,
        scale_b=torch.ones(1, q.shape[1], device=q.device, dtype=torch.float32),
        out_dtype=torch.bfloat16,
    )
    return out.reshape(*grad.shape[:-1], q.shape[1]).to(grad.dtype)


FORMATS["float8"] = FrozenFormat(
    dequantize=lambda state, dtype: dequantize_float8_rowwise(*state, dtype),
    fast_matmul=lambda x, prepared, state, bias: _fp8_rowwise_matmul(x, prepared, *state, bias),
    fast_input_grad=lambda grad, state: _fp8_input_gradient(grad, *state),
)


class Float8Linear(FrozenQuantLinear):
    """Frozen Linear with float8 e4m3 weights (``qweight``) and per-row float32 scales (``weight_scale``).

    ``fp8_matmul``: compute in fp8 with ``torch._scaled_mm`` (only honoured when the layer's dims are multiples of 16,
    which the kernel needs); otherwise the weight is dequantized into the input's dtype for every matmul.
    ``fp8_backward``: with ``fp8_matmul``, the input gradient is computed in fp8 as well.
    """

    format = "float8"

    def __init__(
        self, linear: nn.Linear, compute_dtype: torch.dtype, fp8_matmul: bool = False, fp8_backward: bool = True
    ):
        super().__init__(linear, compute_dtype)
        q, scale = quantize_float8_rowwise(linear.weight, getattr(linear, FILE_FP8_SCALE, None))
        self.register_buffer("qweight", q)
        self.register_buffer("weight_scale", scale)
        self.fp8_matmul = fp8_matmul and self.in_features % 16 == 0 and self.out_features % 16 == 0
        self.fp8_backward = fp8_backward

    def frozen_state(self) -> list[torch.Tensor]:
        return [self.qweight, self.weight_scale]

    def _fp8(self) -> bool:
        # After a stray model.to(dtype) the storage is no longer fp8: still correct through the dequantize path.
        return self.fp8_matmul and self.qweight.dtype == FP8_DTYPE

    def prepare_input(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(quantize_rows(x.detach())) if self._fp8() else []

    def fast_backward(self) -> bool:
        return self._fp8() and self.fp8_backward
