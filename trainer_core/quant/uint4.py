"""uint4 asymmetric weight quantization in groups of 64 along in_features: torchao 0.10's scheme.

This is the quantizer ai-toolkit's published accuracy recovery adapters (``*_torchao_uint4.safetensors``) were
trained against: ``UIntXWeightOnlyConfig(torch.uint4)`` of torchao 0.10, i.e. ``choose_qparams_affine`` with
``MappingType.ASYMMETRIC``, ``block_size=(1, 64)``, ``preserve_zero=True``, integer zero points, ``eps`` = float32
machine epsilon, and every step computed in the weight's own dtype (bfloat16 for the real model). Per group ``g``:

    lo = min(min(w_g), 0),  hi = max(max(w_g), 0)
    scale = max((hi - lo) / 15, eps)                     (in the weight dtype)
    zero  = clamp(0 - round(lo / scale), 0, 15)          (integer)
    q     = clamp(round(w * (1 / scale)) + zero, 0, 15)
    w_hat = (q - zero) * scale                           (in the weight dtype)

``round`` is round-half-to-even (``torch.round``), as in torchao. The module keeps the codes packed two per byte.
torchao itself is not a dependency: its uintx workflow was removed after 0.10 and importing it changes what other
libraries print; the arithmetic above is small and pinned here, and the tests compare it with torchao's primitives
when torchao is installed.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import FORMATS, FrozenFormat, FrozenQuantLinear

GROUP_SIZE = 64
_QMAX = 15
_EPS = torch.finfo(torch.float32).eps


def quantize_uint4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes [out, in] uint8 in 0..15, scale [out, in/64] weight dtype, zero_point [out, in/64] uint8)``."""
    out_f, in_f = weight.shape
    if in_f % GROUP_SIZE:
        raise ValueError(f"uint4 quantization needs in_features divisible by {GROUP_SIZE}, got {in_f}")
    w = weight.detach().reshape(out_f, in_f // GROUP_SIZE, GROUP_SIZE)
    lo = torch.clamp(w.amin(dim=2), max=0)
    hi = torch.clamp(w.amax(dim=2), min=0)
    scale = torch.clamp((hi - lo) / float(_QMAX), min=_EPS)
    zero = torch.clamp(-torch.round(lo / scale), 0, _QMAX).to(torch.int32)
    q = torch.clamp(torch.round(w * (1.0 / scale.unsqueeze(2))) + zero.unsqueeze(2), 0, _QMAX)
    return q.reshape(out_f, in_f).to(torch.uint8), scale, zero.to(torch.uint8)


def dequantize_uint4(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(codes - zero_point) * scale`` per group, in ``scale``'s dtype.

    torchao subtracts in int32 and then casts; subtracting after the cast is bit-identical (codes and zero points
    are integers 0..15, exact in bf16, and so is their difference) and avoids two int32 copies of the weight.
    """
    out_f, in_f = codes.shape
    w = codes.reshape(out_f, in_f // GROUP_SIZE, GROUP_SIZE).to(scale.dtype)
    w.sub_(zero_point.to(scale.dtype).unsqueeze(2)).mul_(scale.unsqueeze(2))
    return w.reshape(out_f, in_f)


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dim: element ``2k`` in the low nibble, ``2k + 1`` in the high nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_uint4`."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


class UInt4Linear(FrozenQuantLinear):
    """Frozen Linear stored as packed uint4 codes (``qweight`` [out, in/2]) + per-group ``scale`` and ``zero_point``.

    The weight is dequantized (in the original weight dtype, as torchao did) for each matmul.
    """

    format = "uint4"

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        super().__init__(linear, compute_dtype)
        codes, scale, zero = quantize_uint4(linear.weight)
        self.register_buffer("qweight", pack_uint4(codes))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero)

    def frozen_state(self) -> list[torch.Tensor]:
        return [self.qweight, self.scale, self.zero_point]


FORMATS["uint4"] = FrozenFormat(
    dequantize=lambda state, dtype: dequantize_uint4(unpack_uint4(state[0]), state[1], state[2]).to(dtype)
)
