"""What every quantized Linear shares: a frozen low-rank accuracy recovery adapter (ARA) beside the base weight, and
a matmul whose backward gives input gradients without keeping a dequantized weight alive.

The quantized layers subclass ``nn.Linear`` so that peft wraps them with its ordinary LoRA layer (its dispatch tests
``isinstance(base, nn.Linear)``); the LoRA then adds ``B_lora A_lora x`` on top of ``W_q x + B_ara A_ara x``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn


class ARAMixin(ABC):
    """Adds ``y += ara_up @ (ara_down @ x)`` (frozen buffers; ``None`` = no adapter)."""

    ara_down: torch.Tensor | None
    ara_up: torch.Tensor | None

    def set_ara(self, down: torch.Tensor | None, up: torch.Tensor | None, dtype: torch.dtype) -> None:
        """Install (or, with ``None``, remove) the adapter: ``down`` is [rank, in], ``up`` is [out, rank].

        Buffers, not parameters: they can never reach an optimizer, and ``model.to(device)`` moves them.
        """
        if (down is None) != (up is None):
            raise ValueError("set both ara down and up, or neither")
        if down is not None:
            if down.shape[1] != self.in_features or up.shape[0] != self.out_features or down.shape[0] != up.shape[1]:
                raise ValueError(
                    f"adapter shapes down {tuple(down.shape)}, up {tuple(up.shape)} do not fit a "
                    f"{self.in_features}->{self.out_features} layer"
                )
            device = self.ara_device()
            down, up = down.detach().to(device, dtype).contiguous(), up.detach().to(device, dtype).contiguous()
        self.register_buffer("ara_down", down)
        self.register_buffer("ara_up", up)

    @abstractmethod
    def ara_device(self) -> torch.device:
        """Device of the layer's stored weight (where the adapter must live)."""

    def add_ara(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + B A x`` (``y`` unchanged when no adapter is installed)."""
        if self.ara_down is None:
            return y
        h = F.linear(x.to(self.ara_down.dtype), self.ara_down).to(y.dtype)
        # addmm adds in the GEMM epilogue: one pass over y instead of a separate delta tensor and add.
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.ara_up.to(y.dtype).t())
        return out.reshape(y.shape)


class _FrozenWeightLinear(torch.autograd.Function):
    """``x @ W^T + b`` for a frozen quantized ``W`` (and frozen ``b``): backward returns only ``dL/dx = g @ W``.

    Only the layer (its packed storage) is kept for backward; the dequantized weight is rebuilt there instead of
    being saved, so activations memory stays what it is with bf16 weights minus the weight copies.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, layer: "FrozenQuantLinear") -> torch.Tensor:
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        return layer.matmul(x)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.layer.dequantize(grad.dtype)
        return (grad @ weight).to(ctx.x_dtype), None


class FrozenQuantLinear(ARAMixin, nn.Linear):
    """A frozen ``nn.Linear`` whose weight lives in a quantized buffer ``qweight``.

    ``weight`` is registered as ``None``: code that would read a float weight (e.g. transformers' T5 casting its
    FFN input to ``wo.weight.dtype``) skips it, and peft finds the device in ``qweight`` (its GPTQ convention) and
    the LoRA dtype in ``compute_dtype``. Subclasses implement :meth:`dequantize` (and may speed up :meth:`matmul`).
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.compute_dtype = compute_dtype
        self.register_parameter("weight", None)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.set_ara(None, None, compute_dtype)

    def ara_device(self) -> torch.device:
        return self.qweight.device

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, [out, in], in ``dtype``."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + bias``; default: dequantize on the fly into the input's dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_ara(x, _FrozenWeightLinear.apply(x, self))

    def extra_repr(self) -> str:
        rank = 0 if self.ara_down is None else self.ara_down.shape[0]
        return f"in_features={self.in_features}, out_features={self.out_features}, ara_rank={rank}"
