"""LoRA dropout whose masks do not depend on how a global batch is split over ranks.

peft's LoRA dropout draws one mask over the rows a process holds. Every rank seeds its masks alike (from the
micro-batch's generator, so that a resume repeats them), so with N ranks each one applied the masks of the global
batch's *first* rows to its own rows: N ranks did not compute what one process computes, and a state did not resume
exactly in another world size. Here each call draws the mask of the whole global batch and keeps this rank's rows
(:func:`global_batch_rows` says which), so every placement applies exactly the masks one process applies.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: ``(global batch size, this rank's rows)`` while a training micro-batch runs, else ``None``.
_ROWS: list[tuple[int, tuple[int, ...]] | None] = [None]


@contextmanager
def global_batch_rows(global_size: int, rows: Sequence[int]) -> Iterator[None]:
    """Within the block, a model input of ``len(rows)`` rows is rows ``rows`` of a batch of ``global_size``."""
    previous, _ROWS[0] = _ROWS[0], (global_size, tuple(rows))
    try:
        yield
    finally:
        _ROWS[0] = previous


class GlobalBatchDropout(nn.Module):
    """Dropout that draws its mask for the whole global batch and keeps this rank's rows (see the module doc).

    Inputs that are not one training micro-batch's rows (another row count, e.g. regularizer passes stacking rows)
    get an ordinary mask."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        rows = _ROWS[0]
        if rows is None or x.shape[0] != len(rows[1]):
            return F.dropout(x, self.p, True)
        global_size, mine = rows
        keep = torch.rand((global_size, *x.shape[1:]), device=x.device)[list(mine)] >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_global_batch_dropout(transformer: nn.Module, adapter_name: str = "default") -> int:
    """Replace peft's dropout of ``adapter_name`` in every LoRA layer by :class:`GlobalBatchDropout`; returns how
    many were replaced (0 when the dropout is off: peft then holds an identity)."""
    replaced = 0
    for module in transformer.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict) or adapter_name not in dropouts:
            continue
        if isinstance(dropouts[adapter_name], nn.Dropout):
            dropouts[adapter_name] = GlobalBatchDropout(dropouts[adapter_name].p)
            replaced += 1
    return replaced
