"""Block-by-block calibration of a Wan transformer (GPTQ-style), so the unquantized expert never has to fit on the GPU.

1. :func:`capture_block_inputs` runs only the part before the blocks (patch embedding, RoPE, condition embedder) for
   each calibration batch and records the arguments the first block receives.
2. For each block in turn, :func:`run_block` feeds those arguments through the (still unquantized) block while a
   :class:`CovarianceRecorder` accumulates ``X^T X`` of every watched Linear's input; the block's outputs become the
   next block's inputs, exactly as in a full forward pass of the unquantized model.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Iterable

import torch
from torch import nn

#: Rows (tokens) per calibration sample and layer that enter a covariance; tokens of one clip are highly
#: correlated, so a strided subset estimates ``X^T X`` nearly as well at a fraction of the cost.
MAX_ROWS_PER_SAMPLE = 4096

BlockInputs = list[tuple[tuple[Any, ...], dict[str, Any]]]


class _ReachedFirstBlock(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def move_except_blocks(model: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` except those of ``model.blocks`` to ``device``."""
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for param in model.parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buf in list(model.named_buffers(recurse=False)):
        setattr(model, name, buf.to(device))


def capture_block_inputs(model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device) -> BlockInputs:
    """The ``(args, kwargs)`` that ``model.blocks[0]`` receives for each batch of forward keyword arguments.

    Only the modules before the blocks run (they must already be on ``device``); call under ``torch.no_grad()``.
    """
    captured: BlockInputs = []

    def hook(_module, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _ReachedFirstBlock

    handle = model.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**{k: _to_device(v, device) for k, v in batch.items()})
            except _ReachedFirstBlock:
                continue
            raise RuntimeError("the model's forward pass never reached its first block")
    finally:
        handle.remove()
    return captured


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` in float32. bf16/fp16 CUDA inputs use tensor cores with float32 output (exact products)."""
    if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(rows.T, rows, out_dtype=torch.float32)
    r = rows.float()
    return r.T @ r


class CovarianceRecorder:
    """Forward pre-hooks accumulating ``sum_samples X^T X`` of each watched module's input.

    Modules that receive the very same input tensor within one block call as an earlier watched module (the q/k/v
    projections of self-attention, k/v of cross-attention) share that module's covariance instead of recomputing it.
    """

    def __init__(self, modules: dict[str, nn.Module], max_rows: int = MAX_ROWS_PER_SAMPLE):
        self.max_rows = max_rows
        self.sums: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}
        self._handles = [m.register_forward_pre_hook(partial(self._hook, name)) for name, m in modules.items()]

    def _hook(self, name: str, _module: nn.Module, args: tuple) -> None:
        x = args[0]
        seen = self._seen.get(id(x))
        if seen is not None and seen[1] is x:
            if self.alias.setdefault(name, seen[0]) != seen[0] or name in self.sums:
                raise RuntimeError(f"{name} shares its input inconsistently across calibration samples")
            return
        if name in self.alias:
            raise RuntimeError(f"{name} shares its input inconsistently across calibration samples")
        self._seen[id(x)] = (name, x)  # the reference keeps id(x) from being reused within this block call
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > self.max_rows:
            rows = rows[:: math.ceil(rows.shape[0] / self.max_rows)]
        g = gram(rows)
        self.sums[name] = g if name not in self.sums else self.sums[name].add_(g)

    def end_sample(self) -> None:
        """Call after each block call (drops the references to that call's inputs)."""
        self._seen.clear()

    def covariance(self, name: str) -> torch.Tensor:
        """``X^T X`` (float32, [in, in]) accumulated for ``name``'s input."""
        return self.sums[self.alias.get(name, name)]

    def close(self) -> None:
        """Remove the hooks and free the sums."""
        for handle in self._handles:
            handle.remove()
        self.sums.clear()
        self._seen.clear()


def run_block(block: nn.Module, inputs: BlockInputs, recorder: CovarianceRecorder) -> BlockInputs:
    """Run ``block`` on every captured input (recording covariances); returns the next block's inputs."""
    outputs: BlockInputs = []
    for args, kwargs in inputs:
        out = block(*args, **kwargs)
        recorder.end_sample()
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(f"expected a transformer block to return a tensor, got {type(out).__name__}")
        outputs.append(((out, *args[1:]), kwargs))
    return outputs
