"""Block offloading: a Wan expert whose frozen weights live in host memory and reach the GPU one block at a time.

The expert's frozen tensors form groups (:mod:`.residency`): ``head`` (everything outside ``model.blocks``) and one
group per transformer block. Resident blocks stay loaded while the expert is active; *streamed* blocks are loaded
just in time, ``prefetch`` streamed blocks ahead of the computation, on a side CUDA stream:

* forward: before block ``i`` runs, wait for it and start loading the next ``prefetch`` streamed blocks after
  ``i``; after it ran, release it - except the last ``prefetch + 1`` streamed blocks, which backward needs first;
* backward: an identity autograd function on each block's output runs before any other backward node of that
  block: it waits for the block and starts loading the next ``prefetch`` streamed blocks below it. A second
  identity on the block's input runs once the block's input gradient exists, i.e. when the block's backward is
  over: it releases the block - except the first ``prefetch + 1`` streamed blocks, which the next forward needs
  first.

With diffusers' gradient checkpointing the block's forward is re-run inside backward, right after the output
identity loaded the block; the forward hooks see that they are in backward and leave residency alone. Without
checkpointing the saved activations keep views of the weights' storages, which are released and later refilled in
place (see :class:`~.residency.TensorGroup`), so they are valid again when backward reaches the block.

Only frozen tensors move. LoRA weights (peft ``lora_A`` / ``lora_B`` inside the block Linears) require grad and stay
on the GPU with their gradients and optimizer state, so training them is unaffected. At most ``prefetch + 1``
streamed blocks hold device memory at any time. Streamed blocks are spread evenly over the depth (not the last N):
each copy then has the compute of the resident blocks between two streamed ones to hide behind.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .residency import CopyEngine, GroupState, TensorGroup, build_groups

HEAD = "head"
_FORWARD, _BACKWARD = "forward", "backward"


def streamed_blocks(num_blocks: int, offload_blocks: int) -> list[int]:
    """Indices of the ``offload_blocks`` blocks to stream, spread evenly over ``num_blocks`` (last block included)."""
    if not 0 <= offload_blocks <= num_blocks:
        raise ValueError(f"offload_blocks must lie in 0..{num_blocks} (the model has {num_blocks} blocks)")
    return sorted({(k + 1) * num_blocks // offload_blocks - 1 for k in range(offload_blocks)})


class _OnBackward(torch.autograd.Function):
    """Identity whose backward first calls ``callback(index)``.

    On a block's output its backward is the block's first backward node (reload the block); on a block's input it
    runs once the block's input gradient is complete (release the block).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, callback, index: int) -> torch.Tensor:
        ctx.callback, ctx.index = callback, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.callback(ctx.index)
        return grad, None, None


class OffloadedExpert:
    """Manages where one expert's frozen weights are; installs forward hooks on the model and its blocks.

    ``model`` is a ``WanTransformer3DModel`` (LoRA attached, quantized or not) on the CPU or already on
    ``engine.device``; afterwards its trainable parameters and any tensors shared between groups are on the device
    and every frozen tensor is managed here, starting released. ``on_inactive_forward(self)`` is called when the
    model runs while :attr:`active` is False (the low-VRAM switcher activates it there). Do not move or cast the
    model (``.to``) while it is managed: call :meth:`close` first.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        engine: CopyEngine,
        *,
        offload_blocks: int,
        prefetch: int,
        on_inactive_forward: Callable[["OffloadedExpert"], None] | None = None,
    ):
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.name = name
        self.model = model
        self.engine = engine
        self.prefetch = prefetch
        self.active = False
        self._on_inactive_forward = on_inactive_forward
        self._phase = _FORWARD
        blocks = list(model.blocks)
        self.streamed = streamed_blocks(len(blocks), offload_blocks)
        self._streamed_set = set(self.streamed)
        # Blocks kept loaded at the end of each pass for the pass that follows.
        self._keep_after_forward = set(self.streamed[-(prefetch + 1) :])
        self._keep_after_backward = set(self.streamed[: prefetch + 1])
        block_ids = {id(m) for b in blocks for m in b.modules()}
        members: dict[str, list[nn.Module]] = {HEAD: [m for m in model.modules() if id(m) not in block_ids]}
        members.update({str(i): list(b.modules()) for i, b in enumerate(blocks)})
        groups = build_groups(members, engine)
        self.head = groups[HEAD]
        self.blocks = [groups[str(i)] for i in range(len(blocks))]
        model.to(engine.device)  # the rest: LoRA weights, shared tensors (managed ones are already there)
        self._handles = [model.register_forward_pre_hook(self._model_pre_hook)]
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._block_pre_hook(i), with_kwargs=True))
            if self.streamed:
                self._handles.append(block.register_forward_hook(self._block_post_hook(i)))

    # --- residency as a whole (used by the expert switcher) ---

    @property
    def groups(self) -> list[TensorGroup]:
        """All groups in forward order (head first)."""
        return [self.head, *self.blocks]

    @property
    def total_bytes(self) -> int:
        """Bytes of all managed frozen tensors (what a full load copies)."""
        return sum(g.nbytes for g in self.groups)

    def resident_bytes(self) -> int:
        """Device bytes the managed tensors hold now (loading included)."""
        return sum(g.nbytes for g in self.groups if g.state is not GroupState.RELEASED)

    def load_working_set(self) -> int:
        """Start loading, in forward order, what a forward pass needs first: the head, every resident block and the
        first ``prefetch + 1`` streamed blocks. Returns the bytes enqueued."""
        before = self.resident_bytes()
        first_streamed = self._keep_after_backward
        for i, group in enumerate(self.blocks):
            if i == 0:
                self.head.load()
            if i not in self._streamed_set or i in first_streamed:
                group.load()
        return self.resident_bytes() - before

    def release_streamed(self) -> None:
        """Free every streamed block (the expert stops training for a while)."""
        for i in self.streamed:
            self.blocks[i].release()

    def release_all(self) -> None:
        """Free every managed tensor's device memory."""
        for group in self.groups:
            group.release()

    def misses(self) -> int:
        """Loads that found nothing prefetched (each one stalls the computation for a whole copy)."""
        return sum(g.misses for g in self.groups)

    def close(self) -> None:
        """Remove the hooks and leave every weight resident on the device, as an ordinary model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for group in self.groups:
            group.restore()

    # --- hooks ---

    def _model_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if not self.active:
            if self._on_inactive_forward is None:
                raise RuntimeError(f"the {self.name} expert ran while its weights are offloaded; activate it first")
            self._on_inactive_forward(self)
        self._phase = _FORWARD
        for i in self.streamed:  # left over from a pass that did not end the usual way (no-grad, interrupted)
            if i not in self._keep_after_backward:
                self.blocks[i].release()
        self.load_working_set()
        self.head.wait()

    def _block_pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            self.blocks[index].wait()
            if self._phase is _BACKWARD:  # gradient-checkpointing recompute: the block was loaded for it
                return None
            self._prefetch([i for i in self.streamed if i > index])
            if index in self._streamed_set and torch.is_grad_enabled():
                if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                    return (_OnBackward.apply(args[0], self._leave_backward, index), *args[1:]), kwargs
                x = kwargs.get("hidden_states")
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    return args, {**kwargs, "hidden_states": _OnBackward.apply(x, self._leave_backward, index)}
            return None

        return hook

    def _block_post_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any):
            if self._phase is _BACKWARD:
                return None
            if index in self._streamed_set and index not in self._keep_after_forward:
                self.blocks[index].release()
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                return _OnBackward.apply(output, self._enter_backward, index)
            return None

        return hook

    def _prefetch(self, ahead: list[int]) -> None:
        for i in ahead[: self.prefetch]:
            self.blocks[i].load()

    def _enter_backward(self, index: int) -> None:
        self._phase = _BACKWARD
        self.blocks[index].wait()
        self._prefetch([i for i in reversed(self.streamed) if i < index])

    def _leave_backward(self, index: int) -> None:
        if index not in self._keep_after_backward:
            self.blocks[index].release()
