"""What every quantized Linear shares: a frozen low-rank accuracy recovery adapter (ARA) beside the base weight, and
a matmul (one custom op for every storage format) whose backward gives input gradients without keeping a
dequantized weight alive.

The quantized layers subclass ``nn.Linear`` so that peft wraps them with its ordinary LoRA layer (its dispatch tests
``isinstance(base, nn.Linear)``); the LoRA then adds ``B_lora A_lora x`` on top of ``W_q x + B_ara A_ara x``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class FrozenFormat:
    """How a storage format computes with its frozen weight, given only the layer's stored tensors (``state``).

    ``dequantize(state, dtype)`` rebuilds the [out, in] weight. Formats with fast kernels (fp8) also give
    ``fast_matmul(x, prepared, state, bias)``: ``x @ W^T + bias`` from ``prepared``, the input as the kernel takes it
    (made by the layer's :meth:`FrozenQuantLinear.prepare_input`), and ``fast_input_grad(grad, state)``:
    ``grad @ W``. All return the input's dtype.
    """

    dequantize: Callable[[list[torch.Tensor], torch.dtype], torch.Tensor]
    fast_matmul: Callable[..., torch.Tensor] | None = None
    fast_input_grad: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor] | None = None


FORMATS: dict[str, FrozenFormat] = {}


# The forward matmul is a torch.library custom op, not an autograd.Function: torch.compile treats it as one opaque
# node, which a compiled checkpoint recomputes like any other op. Traced into a compiled checkpoint, the
# autograd.Function had its outputs saved instead (torch 2.11, the GPU machine's version: tests/test_blocks.py's
# tiny compiled full-checkpoint blocks kept 8.0 MB with float8 or uint4 weights against 1.0 MB with plain ones;
# H100: 8 float8 blocks at 1024x1024x81 ran out of 79 GiB compiled). Everything else stays traceable, so that the
# compiler fuses it as before: the input's preparation (fp8: per-row scaling and cast) and the backward.
@torch.library.custom_op("wan22_lora_trainer::frozen_linear", mutates_args=())
def frozen_linear(
    x: torch.Tensor,
    prepared: list[torch.Tensor],
    state: list[torch.Tensor],
    bias: torch.Tensor | None,
    fmt: str,
    out_features: int,
    fast_backward: bool,
) -> torch.Tensor:
    """``x @ W^T + bias`` for the frozen weight stored as ``state`` in format ``fmt``: with the format's fast kernel
    from ``prepared`` when given, else through the dequantized weight. Backward gives only ``dL/dx`` (with the fast
    kernel if ``fast_backward``), rebuilding the weight there instead of keeping it."""
    spec = FORMATS[fmt]
    if prepared:
        return spec.fast_matmul(x, prepared, state, bias)
    return F.linear(x, spec.dequantize(state, x.dtype), None if bias is None else bias.to(x.dtype))


@frozen_linear.register_fake
def _frozen_linear_fake(x, prepared, state, bias, fmt, out_features, fast_backward):
    return x.new_empty(*x.shape[:-1], out_features)


def _setup_context(ctx, inputs, output) -> None:
    _x, prepared, state, _bias, fmt, _out, fast_backward = inputs
    ctx.save_for_backward(*state)
    ctx.fmt, ctx.fast_backward, ctx.n_prepared = fmt, fast_backward, len(prepared)


def _backward(ctx, grad: torch.Tensor):
    state = list(ctx.saved_tensors)
    spec = FORMATS[ctx.fmt]
    if ctx.fast_backward:
        grad_x = spec.fast_input_grad(grad, state)
    else:
        grad_x = grad @ spec.dequantize(state, grad.dtype)
    return grad_x, [None] * ctx.n_prepared, [None] * len(state), None, None, None, None


frozen_linear.register_autograd(_backward, setup_context=_setup_context)


class FrozenQuantLinear(ARAMixin, nn.Linear):
    """A frozen ``nn.Linear`` whose weight lives in quantized buffers (``qweight`` and its scales).

    ``weight`` is registered as ``None``: code that would read a float weight (e.g. transformers' T5 casting its
    FFN input to ``wo.weight.dtype``) skips it, and peft finds the device in ``qweight`` (its GPTQ convention) and
    the LoRA dtype in ``compute_dtype``. Subclasses name their entry of :data:`FORMATS` (``format``) and list the
    buffers it computes from (:meth:`frozen_state`); formats with fast kernels switch them on through
    :meth:`prepare_input` and :meth:`fast_backward`.
    """

    format: str

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
    def frozen_state(self) -> list[torch.Tensor]:
        """The stored tensors the format's functions compute with, in their order."""

    def prepare_input(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input as the format's fast matmul takes it (computed without gradient), or ``[]`` for the
        dequantizing matmul (the default)."""
        return []

    def fast_backward(self) -> bool:
        """Whether the input gradient uses the format's fast kernel; default: no."""
        return False

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, [out, in], in ``dtype``."""
        return FORMATS[self.format].dequantize(self.frozen_state(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # The cast autocast would make for a linear, made here: the op returns its input's dtype, eager and
            # compiled alike (inside the op eager autocast would see it, a compiled graph would not).
            x = x.to(torch.get_autocast_dtype(device))
        y = frozen_linear(x, self.prepare_input(x), self.frozen_state(), self.bias, self.format, self.out_features,
                          self.fast_backward())
        return self.add_ara(x, y)

    def extra_repr(self) -> str:
        rank = 0 if self.ara_down is None else self.ara_down.shape[0]
        return f"in_features={self.in_features}, out_features={self.out_features}, ara_rank={rank}"
