"""How each transformer block runs in a training forward: activation checkpointing policy and ``torch.compile``.

Three policies per block, from fastest (most memory) to slowest (least memory):

* ``off``: autograd keeps every activation of the block for backward;
* ``selective``: the block keeps its input and the output of its self-attention kernel; backward re-runs the
  block's forward to rebuild the rest, but takes the self-attention result from memory instead of recomputing it.
  Self-attention is the costly part of the recompute (quadratic in tokens), its output a small part of what ``off``
  keeps. Cross-attention (512 text tokens) is cheap to recompute, so its output is not kept;
* ``full``: the block keeps only its input and recomputes everything in backward.

A model with ``n_off``, ``n_selective`` and ``n_full`` blocks runs the first ``n_off`` blocks without checkpointing,
the next ``n_selective`` selectively and the rest fully (the VRAM planner picks the counts for ``auto``).

With ``compile`` the block (and its checkpoint, so that the compiler sees the selective policy) runs as one
``torch.compile``d function shared by every block: the 40 identical blocks compile once per input shape. The
compiled graph fuses the block's fp32 LayerNorm/modulation/RoPE arithmetic and the LoRA's elementwise work.
Numerically the policies are identical (same kernels, same order); compiling changes float rounding only.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

BlockPolicy = Literal["off", "selective", "full"]
log = logging.getLogger(__name__)

_aten = torch.ops.aten
#: Attention kernels whose self-attention outputs ``selective`` keeps (every SDPA backend PyTorch may pick, CPU too).
ATTENTION_OPS = frozenset(
    op
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    if hasattr(_aten, name)
    for op in [getattr(_aten, name).default]
)


@dataclass(frozen=True)
class BlockPlan:
    """How many blocks run with each policy (in this order from the first block) and whether they are compiled."""

    off: int = 0
    selective: int = 0
    full: int = 0
    compile: bool = False
    #: On a torch.compile failure (no working compiler, an unsupported construct) run the blocks eagerly instead
    #: of failing the run (``train.compile: auto``); ``False`` lets the error through (``on``).
    fallback: bool = True
    #: Compile the ``full`` blocks too. Off for NF4 weights: bitsandbytes' matmul is an autograd.Function, whose
    #: outputs a compiled checkpoint keeps (torch 2.11; the float8 and uint4 layers' custom op is recomputed).
    compile_full: bool = True
    #: ``None``: torch's automatic dynamic shapes (a second clip shape compiles one graph with symbolic sizes that
    #: serves every later one); ``False``: one graph per shape (each bucket's first step compiles). Equally fast:
    #: 1.098 / 1.107 s/step with two buckets (benchmarks/results/e2e_fullscale_h200.json, perf).
    compile_dynamic: bool | None = None

    def policy(self, index: int) -> BlockPolicy:
        """The policy of block ``index``."""
        if index < self.off:
            return "off"
        if index < self.off + self.selective:
            return "selective"
        return "full"

    @classmethod
    def uniform(cls, policy: BlockPolicy, num_blocks: int, compile: bool = False) -> "BlockPlan":
        """Every block with ``policy``."""
        return cls(**{policy: num_blocks}, compile=compile)

    def describe(self) -> str:
        """E.g. ``'12 off / 28 selective / 0 full checkpointing, compiled'``."""
        compiled = ""
        if self.compile:
            eager_checkpoint = self.full and not self.compile_full
            compiled = ", compiled (full blocks eager)" if eager_checkpoint else ", compiled"
        return f"{self.off} off / {self.selective} selective / {self.full} full checkpointing{compiled}"


def choose_block_plan(num_blocks: int, fits: Callable[[int, int, int], bool]) -> tuple[int, int, int]:
    """The fastest ``(off, selective, full)`` split of ``num_blocks`` for which ``fits(off, selective, full)``.

    Greedy by time saved per byte: first move blocks from ``full`` to ``selective`` (each saves an attention forward
    for one attention output of memory), then from ``selective`` to ``off`` (each saves the rest of the recompute for
    all the block's activations). All ``full`` is returned when nothing better fits, even if it does not fit itself
    (the planner reports that).
    """
    off, selective, full = 0, 0, num_blocks
    while full and fits(off, selective + 1, full - 1):
        selective, full = selective + 1, full - 1
    while selective and fits(off + 1, selective - 1, full):
        off, selective = off + 1, selective - 1
    return off, selective, full


def _save_self_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # SDPA ops take (query, key, value, ...) as [batch, heads, length, head_dim]: self-attention when the lengths match
    if op in ATTENTION_OPS and args[0].shape[-2] == args[1].shape[-2]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_save_self_attention)


def _forward(block: torch.nn.Module, *args: torch.Tensor) -> torch.Tensor:
    # The block's own computation without its module hooks: run_block runs those (block offloading's loads) around
    # it, eagerly, so that no compiled graph or checkpoint recompute contains them.
    return type(block).forward(block, *args)


def _run(block: torch.nn.Module, *args: torch.Tensor) -> torch.Tensor:
    return _forward(block, *args)


def _run_full(block: torch.nn.Module, *args: torch.Tensor) -> torch.Tensor:
    return checkpoint(_forward, block, *args, use_reentrant=False)


def _run_selective(block: torch.nn.Module, *args: torch.Tensor) -> torch.Tensor:
    return checkpoint(_forward, block, *args, use_reentrant=False, context_fn=_selective_contexts)


_RUNNERS: dict[BlockPolicy, Callable[..., torch.Tensor]] = {"off": _run, "selective": _run_selective, "full": _run_full}


@functools.cache
def _compiled(policy: BlockPolicy, dynamic: bool | None = None) -> Callable[..., torch.Tensor]:
    # Identical blocks share one compiled graph per policy and shape: the modules are graph inputs, not constants.
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
    return torch.compile(_RUNNERS[policy], dynamic=dynamic)


def _compiled_runner(policy: BlockPolicy, plan: "BlockPlan") -> Callable[..., torch.Tensor]:
    """The runner of a ``policy`` block in a compiled plan: with ``compile_full`` off a full block runs eagerly
    (not as the compiled plain block inside an eager checkpoint: with float8 weights on an H200 that failed its
    recompute check, the recompute saving other tensors than the forward)."""
    if policy == "full" and not plan.compile_full:
        return _RUNNERS["full"]
    return _compiled(policy, plan.compile_dynamic)


def _call_hooked(block: torch.nn.Module, runner: Callable[..., torch.Tensor], args: tuple) -> torch.Tensor:
    """``runner(block, *args)`` with the block's forward hooks run around it, as calling the block would."""
    if not (block._forward_pre_hooks or block._forward_hooks):
        return runner(block, *args)
    block.forward = functools.partial(runner, block)  # Module.__call__ runs the hooks, then this
    try:
        return block(*args)
    finally:
        del block.forward


def install_block_plan(model: torch.nn.Module, plan: BlockPlan) -> None:
    """Make ``model`` (a diffusers ``WanTransformer3DModel``) run its blocks as ``plan`` says whenever gradients are
    enabled (training); forward passes without gradients (previews, DOP's prior) run the plain blocks."""
    model.block_plan = plan
    if plan.off == len(model.blocks) and not plan.compile:
        model.disable_gradient_checkpointing()
        return
    index = {id(block): i for i, block in enumerate(model.blocks)}
    compiled = [plan.compile]

    def run_block(block: torch.nn.Module, *args: torch.Tensor) -> torch.Tensor:
        policy = plan.policy(index[id(block)])
        if compiled[0]:
            try:
                return _call_hooked(block, _compiled_runner(policy, plan), args)
            except torch._dynamo.exc.TorchDynamoException as exc:
                # Raised while tracing/compiling, before the block computed anything: eager gives the same result.
                if not plan.fallback:
                    raise
                log.warning("torch.compile failed, the transformer blocks run without it: %s", str(exc)[:500])
                compiled[0] = False
        return _call_hooked(block, _RUNNERS[policy], args)

    # diffusers calls this for every block when gradients are enabled and checkpointing is switched on.
    model.enable_gradient_checkpointing(gradient_checkpointing_func=run_block)
