"""bitsandbytes NF4 (QLoRA's 4-bit NormalFloat, blocks of 64, double-quantized absmax) with an optional ARA."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from .base import ARAMixin

BLOCK_SIZE = 64


class NF4Linear(ARAMixin, bnb.nn.Linear4bit):
    """``bnb.nn.Linear4bit`` (NF4) plus a frozen accuracy recovery adapter.

    Being a ``Linear4bit``, peft wraps it with its own 4-bit LoRA layer when the model carries
    ``is_loaded_in_4bit = True`` (set by :func:`trainer_core.quant.quantize_expert`).
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        super().__init__(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        packed, state = bnb.functional.quantize_4bit(
            linear.weight.detach(), blocksize=BLOCK_SIZE, compress_statistics=True, quant_type="nf4"
        )
        self.weight = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=state,
            blocksize=BLOCK_SIZE,
            compress_statistics=True,
            quant_type="nf4",
            bnb_quantized=True,
            module=self,
        )
        self.quant_state = state
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        # bnb repacks the weight in place on CPUs with AVX512-BF16 during no-grad eval forwards; a layout that
        # changes behind our back would break dequantize() and peft's merge, so keep the one layout everywhere.
        self.support_avx512bf16_for_cpu = False
        self.set_ara(None, None, compute_dtype)

    def ara_device(self) -> torch.device:
        return self.weight.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The NF4 weight the layer computes with, [out, in], in ``dtype``."""
        return bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_ara(x, super().forward(x))
