"""VRAM planner: the peak GPU memory of a training job, estimated from its settings before anything is loaded.

The estimate is the largest of three phases: caption encoding (the text encoder alone on the GPU), training, and
preview sampling. Training, in bytes (what ``torch.cuda.max_memory_allocated`` reports):

**Weights.** Counted exactly from the expert's config (a ``WanTransformer3DModel`` built on the meta device), in
``model.dtype`` with diffusers' fp32-kept modules (rope, time_embedder, scale_shift_table, norms) in fp32. The 400
block Linear weights are replaced by their quantized layout: float8 ``out*in + 4*out`` (per-row fp32 scales); NF4
``out*in/2`` plus double-quantized absmax (1 byte per 64 weights, fp32 per 256 absmax); uint4 ``out*in/2`` plus a
scale and a zero point per 64; ``4bit_ara`` adds the adapter, ``ara_rank*(in+out)`` in the compute dtype. With
``offload_blocks = S`` and ``prefetch = p`` the active expert holds its head, its ``L - S`` resident blocks and at most
``min(S, p + 1)`` streamed blocks. The other expert (both trained) adds its head and resident blocks, or nothing
with ``low_vram``. The VAE stays on the GPU during training; the text encoder too in ``text_encoder.mode: live``.

**LoRA + optimizer.** Per trained expert ``rank*(in+out)`` fp32 weights per targeted Linear, plus AdamW's two fp32
states (AdamW8bit: one byte each, tensors under 4096 elements stay 32-bit), plus fp32 gradients for the active
expert.

**Activations** for ``T`` video tokens (largest bucket of every dataset: ``((F-1)/4+1)*(H/16)*(W/16)``, times the
batch). What autograd saves inside one ``WanTransformerBlock`` per video token, with ``D`` = dim, ``Fd`` = ffn_dim,
``nh`` heads and ``s`` = activation bytes (2 under bf16 autocast):

* the inputs of the three fp32 LayerNorms, ``3*4*D``, and their mean/rstd, ``24``;
* RMSNorm inputs of q, k (self-attention) and q (cross-attention): ``3*(s*D + 4)`` (fp32 on the CPU, whose RMSNorm
  upcasts);
* attention: self q, k, v, out ``4*s*D`` and cross q, out ``2*s*D``, plus fp32 log-sum-exp ``2*4*nh`` (flash and cuDNN
  attention keep nothing quadratic: memory is linear in tokens);
* the GELU input ``s*Fd``;
* the LoRA inputs. Without a dtype cast (LoRA and activations both fp32) q/k/v share one input ``s*D``, the output
  projections reuse the attention output (free), cross q ``s*D``, ffn.0 ``s*D``, ffn.2 ``s*Fd``. Otherwise peft casts
  the input to the fp32 LoRA weight and each targeted Linear keeps its own copy (``s`` bytes under autocast, which
  casts it back; 4 without): one ``D``-wide copy for each of the eight ``D``-wide Linears, ``Fd`` for ffn.2. Plus each
  LoRA's rank-wide middle, ``s*rank``.

That is ``12*D + 2*Fd`` activation elements plus ``3*D`` fp32 per token without casts (46.8 D-bytes in bf16 at the
A14B's dims, 240 kB/token) and ``16*D + 2*Fd`` with them (281 kB); under autocast the trainer switches peft's casts
off, so they apply only to bf16 activations without autocast. Cross-attention adds per sample and block the text
side (512 tokens: RMSNorm input, k, v, LoRA inputs).

**Checkpointing policy per block** (``train.gradient_checkpointing``, :mod:`.blocks`): an ``off`` block keeps all of
the above; a ``full`` block keeps only its input ``s*D``; a ``selective`` block its input plus its self-attention
output and log-sum-exp ``s*D + 4*nh``. While a checkpointed block is rebuilt during backward, one block's worth is
alive again, and under autocast another ``2*s*Fd + 4*s*D`` per token (measured: +0.83 GiB at 9,216 tokens, +2.5 GiB
at 25,344; the plain bf16 loop without autocast does not show it). ``auto`` starts from all ``full`` and, where the
card's free memory allows, moves blocks to ``selective`` and then to ``off`` (:func:`.blocks.choose_block_plan`).
When ``offload_blocks: auto`` has to stream blocks anyway, it streams more (up to half the blocks) where that makes
room for every block to be ``selective`` (:func:`_streamed_for_selective`).
On top: RoPE tables ``2*4*head_dim`` per token, the final LayerNorm input ``4*D``, and the backward transient of the
block being differentiated, ``2*s*Fd + 4*D`` (the GELU's input and output gradients and an fp32 residual gradient)
plus ``2*4*D`` for peft's fp32 input gradients when inputs are cast. Differential Output Preservation runs its
LoRA-on and preservation samples as one forward: twice the tokens (not with ``low_vram``, which runs them apart).

Measured with this trainer's eager step (bf16 expert, fp32 LoRA r16 under bf16 autocast, AdamW, no VAE;
``benchmarks/perf_bench.py`` on an H200, ``benchmarks/memory_bench.py`` on an H100, 2026-11-26): 35.08 GiB at
512x512x33 with full checkpointing (this estimate: 35.07), 47.97 GiB at 768x768x41 (47.74), 111.71 GiB with
checkpointing off at 512x33 (111.72), 23.25 / 16.68 GiB with 20 / 30 blocks offloaded (23.29 / 16.74).
Compiled blocks keep less than eager autograd: the fast paths peaked 9-12% under the estimate (101.2 vs 111.7 GiB
at 512x33 bf16, 62.8 vs 68.6 GiB at 768x41 float8), so ``auto`` errs on the safe side. FACTS.md's plain
diffusers+peft loop (bf16 LoRA, so no casts, no autocast) peaked at 33.5 / 44.7 / 86.7 GiB at 512x33 / 768x41 /
1024x81 (estimate 33.7 / 44.9 / 87.1) and at 111 GiB without checkpointing (111.1).

**VAE.** Encoding (latents are not cached on the GPU) happens before the forward pass, so it competes with the
activations, not with them: measured on the Wan 2.1 VAE, peak ``4300*s_vae`` bytes per pixel of one frame plus the
input clip (temporal chunks make it independent of the frame count); decoding (sampling) ``5750*s_vae`` per pixel.
Previews of a job that trains one expert also hold the other one on the GPU, unquantized, while they render.

**Workspace.** Quantized layers rebuild a dequantized weight per matmul (largest Linear times 2 bytes for NF4, 6
for float8's fp32 detour, 9 for uint4's unpacking). A fragmentation allowance of 3% of the peak and
``memory.headroom_gib`` are required free on top of the estimate.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
from diffusers import WanTransformer3DModel

from ..config import DEFAULT_LORA_TARGETS, JobConfig, ModelConfig
from ..data.buckets import bucket_sizes
from ..errors import ConfigError, ModelLoadError
from ..keys import LORA_TARGET_TO_DIFFUSERS
from ..models.loading import expert_config
from ..models.single_file import fp32_kept_modules, tensor_dtype
from ..names import DTYPES, EXPERTS
from ..quant.choice import auto_transformer_quant
from ..quant.float8 import supports_fp8_matmul
from .allocator import FRAGMENTATION, fragmentation_share
from .blocks import choose_block_plan

log = logging.getLogger(__name__)

GIB = 2**30
#: ``WanTransformer3DModel`` config of each Wan 2.2 T2V A14B expert (FACTS.md).
WAN22_A14B_ARCH: dict = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
#: Text tokens per caption (UMT5 output length Wan is conditioned on).
TEXT_TOKENS = 512
#: Peak bytes per pixel of one frame (times the VAE dtype's bytes) of Wan 2.1 VAE encode / decode, measured.
VAE_ENCODE_PER_PIXEL = 4300
VAE_DECODE_PER_PIXEL = 5750
#: Transient bytes per element of the largest Linear while a quantized layer dequantizes it.
DEQUANT_BYTES = {"float8": 6, "nf4": 2, "uint4": 9}
_ADAMW8BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit states for smaller tensors


@dataclass(frozen=True)
class SideModels:
    """Sizes of the components beside the experts (defaults: Wan 2.1 VAE and the UMT5-XXL encoder)."""

    vae_params: int = 126_892_531
    text_encoder_params: int = 5_680_910_336  # token embedding counted once (tied)
    text_encoder_linear_params: int = 4_630_511_616
    text_encoder_linear_rows: int = 983_040

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> "SideModels":
        """The tiny preset's own sizes for ``source: tiny``, else the real Wan 2.2 components."""
        if cfg.source != "tiny" or cfg.text_encoder or cfg.vae:
            return cls()
        from ..models import tiny  # the tiny builders are cheap on the meta device

        with torch.device("meta"):
            te, vae = tiny.tiny_text_encoder(), tiny.tiny_vae()
        linears = [m for m in te.modules() if type(m) is torch.nn.Linear]
        return cls(
            vae_params=sum(p.numel() for p in vae.parameters()),
            text_encoder_params=sum(p.numel() for p in te.parameters()),
            text_encoder_linear_params=sum(m.weight.numel() for m in linears),
            text_encoder_linear_rows=sum(m.weight.shape[0] for m in linears),
        )


@dataclass(frozen=True)
class ExpertShapes:
    """What the planner needs of one expert, read off a model built on the meta device from its config."""

    num_blocks: int
    dim: int
    ffn_dim: int
    heads: int
    head_dim: int
    tensors: tuple[tuple[str, int], ...]  # (name, numel) of every parameter and buffer
    block_linears: tuple[tuple[str, int, int], ...]  # (original target name, in, out) of one block's Linears

    @classmethod
    def from_arch(cls, arch: dict) -> "ExpertShapes":
        """Shapes of a ``WanTransformer3DModel(**arch)`` (cached; builds on the meta device, no memory)."""
        return _shapes(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in arch.items())))


@lru_cache(maxsize=8)
def _shapes(arch_items: tuple) -> ExpertShapes:
    arch = dict(arch_items)
    with torch.device("meta"):
        model = WanTransformer3DModel(**arch)
    tensors = tuple((n, t.numel()) for n, t in (*model.named_parameters(), *model.named_buffers()))
    block = model.blocks[0]
    linears = []
    for target in DEFAULT_LORA_TARGETS:
        layer = block.get_submodule(LORA_TARGET_TO_DIFFUSERS[target])
        linears.append((target, layer.in_features, layer.out_features))
    return ExpertShapes(
        num_blocks=len(model.blocks),
        dim=model.config.num_attention_heads * model.config.attention_head_dim,
        ffn_dim=model.config.ffn_dim,
        heads=model.config.num_attention_heads,
        head_dim=model.config.attention_head_dim,
        tensors=tensors,
        block_linears=tuple(linears),
    )


def quantized_weight_bytes(out_f: int, in_f: int, quant: str, quantizer: str, ara_rank: int, weight_bytes: int) -> int:
    """Bytes of one quantized block Linear weight (bias excluded), as ``trainer_core.quant`` stores it."""
    n = out_f * in_f
    if quant == "float8":
        return n + 4 * out_f
    compute_bytes = weight_bytes if weight_bytes == 2 else 4
    ara = ara_rank * (in_f + out_f) * compute_bytes
    if quantizer == "nf4":  # bitsandbytes: packed nibbles, uint8 absmax per 64, fp32 absmax per 256 of those
        blocks = math.ceil(n / 64)
        codes = 16 * 4 + 256 * 4  # the NF4 code and the absmax quantizer's dynamic map (fp32)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 + codes + ara  # 4: offset
    return n // 2 + (n // 64) * (weight_bytes + 1) + ara  # uint4: codes, scale (weight dtype), zero point


@dataclass(frozen=True)
class _Knobs:
    """Every setting the estimate depends on (derived from a JobConfig; suggestions vary them)."""

    model_dtype: str
    quant: str
    quantizer: str
    ara_rank: int
    rank: int
    targets: tuple[str, ...]
    optimizer: str
    batch: int
    passes: int  # samples per sample in one training forward: 2 with DOP's batched passes (LoRA on, preservation)
    checkpointing: str  # auto | full | selective | off
    low_vram: bool
    offload_blocks: int | str
    prefetch: int
    experts: int
    shards: int  # GPUs the frozen weights are sharded over (distributed.shard_experts), else 1
    grouped: bool  # each expert on its own GPUs (distributed.expert_groups with several ranks)
    autocast_bytes: int | None  # activation bytes under autocast; None = no autocast
    device_type: str
    text_mode: str
    text_quant: str
    te_dtype: str
    vae_dtype: str
    clips: tuple[tuple[int, int], ...]  # (resolution, frames) of every dataset
    sample: tuple[int, int, int] | None  # (width, height, frames) of previews, None = no sampling
    fragmentation: float = FRAGMENTATION  # share of the peak the allocator reserves beyond it


def _knobs(cfg: JobConfig, device_type: str, world: int = 1, fp8_matmul: bool = False) -> _Knobs:
    if not cfg.datasets:
        raise ConfigError("datasets: no dataset configured - add at least one folder under 'datasets'")
    autocast = device_type == "cuda" and cfg.train.compute_dtype != "fp32"
    s, quant = cfg.sample, cfg.quant.transformer
    return _Knobs(
        model_dtype=cfg.model.dtype,
        quant=auto_transformer_quant(device_type, fp8_matmul) if quant == "auto" else quant,
        quantizer=cfg.quant.quantizer,
        ara_rank=cfg.quant.ara_rank,
        rank=cfg.lora.rank,
        targets=tuple(cfg.lora.target_modules),
        optimizer=cfg.optimizer.name,
        batch=cfg.train.batch_size,
        passes=2 if cfg.advanced.dop and not cfg.memory.low_vram else 1,
        checkpointing=cfg.train.gradient_checkpointing,
        low_vram=cfg.memory.low_vram,
        offload_blocks=cfg.memory.offload_blocks,
        prefetch=cfg.memory.prefetch,
        # with expert groups (several ranks) each GPU holds one expert
        experts=1 if cfg.distributed.expert_groups and world > 1 else len(cfg.multistage.stages),
        shards=world if cfg.distributed.shard_experts else 1,
        grouped=cfg.distributed.expert_groups and world > 1,
        autocast_bytes=DTYPES[cfg.train.compute_dtype].itemsize if autocast else None,
        device_type=device_type,
        text_mode=cfg.text_encoder.mode,
        text_quant=cfg.quant.text_encoder,
        te_dtype=cfg.model.text_encoder_dtype,
        vae_dtype=cfg.model.vae_dtype,
        clips=tuple((max(d.resolutions), d.num_frames) for d in cfg.datasets),
        sample=(s.width, s.height, s.num_frames) if s.during_training else None,
    )


def clip_tokens(resolution: int, frames: int) -> int:
    """Video tokens of the largest bucket of ``resolution``: ``((F-1)/4+1)*(H/16)*(W/16)``."""
    patches = max((w // 16) * (h // 16) for w, h in bucket_sizes(resolution))
    return ((frames - 1) // 4 + 1) * patches


@dataclass(frozen=True)
class ActivationModel:
    """Per-token activation bytes of one training forward+backward (see the module docstring)."""

    per_block: int  # saved inside one block, per video token
    text_per_block: int  # saved inside one block, per text token (cross-attention k/v side)
    text_shared: int  # per text token, once (the projected text when LoRA inputs are not copied)
    checkpoint_input: int  # kept per block and token with gradient checkpointing
    attention_saved: int  # kept per block and token by selective checkpointing (self-attention output + log-sum-exp)
    global_per_token: int  # RoPE tables + final norm input
    backward_transient: int  # per token, while one block is differentiated
    recompute_transient: int  # per token, extra while a checkpointed block is rebuilt and differentiated

    @classmethod
    def build(
        cls,
        shapes: ExpertShapes,
        rank: int,
        targets: tuple[str, ...],
        s: int,
        copy_bytes: int,
        rms_bytes: int | None = None,
        autocast: bool = False,
    ) -> "ActivationModel":
        """``s``: activation bytes; ``copy_bytes``: bytes of each LoRA input copy (0 = inputs shared, no cast);
        ``rms_bytes``: bytes of the saved RMSNorm inputs (default ``s``; PyTorch's CPU RMSNorm upcasts to fp32);
        ``autocast``: the step runs under autocast (the recompute of a checkpointed block then holds more)."""
        D, Fd, nh = shapes.dim, shapes.ffn_dim, shapes.heads
        t = set(targets)
        mid = s if copy_bytes in (0, s) else copy_bytes  # lora_A's output dtype follows its input
        per_block = 3 * 4 * D + 3 * 2 * 4  # fp32 LayerNorm inputs + mean/rstd
        rms = rms_bytes or s
        per_block += 3 * (rms * D + 4)  # RMSNorm inputs + rstd
        per_block += 6 * s * D + 2 * 4 * nh  # attention q,k,v,out (self) q,out (cross) + lse
        per_block += s * Fd  # GELU input
        video = [x for x in DEFAULT_LORA_TARGETS if x in t and x not in ("cross_attn.k", "cross_attn.v")]
        if copy_bytes:
            per_block += sum(copy_bytes * (Fd if x == "ffn.2" else D) for x in video)
        else:
            qkv = any(x in t for x in ("self_attn.q", "self_attn.k", "self_attn.v"))
            per_block += s * (D * (qkv + ("cross_attn.q" in t) + ("ffn.0" in t)) + Fd * ("ffn.2" in t))
        per_block += mid * rank * len(video)
        kv = [x for x in ("cross_attn.k", "cross_attn.v") if x in t]
        text_per_block = (rms * D + 4) + 2 * s * D + mid * rank * len(kv) + copy_bytes * D * len(kv)
        text_shared = s * D if kv and not copy_bytes else 0
        transient = 2 * s * Fd + 4 * D + (2 * 4 * D if copy_bytes else 0)
        attention = s * D + 4 * nh  # the self-attention output with its log-sum-exp
        recompute = 2 * s * Fd + 4 * s * D if autocast else 0  # measured, see the module docstring
        return cls(
            per_block, text_per_block, text_shared, s * D, attention, 2 * 4 * shapes.head_dim + 4 * D + 8, transient,
            recompute,
        )

    def training_bytes(self, tokens: int, text_tokens: int, split: tuple[int, int, int]) -> int:
        """Peak activation bytes of a training step over ``tokens`` video and ``text_tokens`` text tokens with
        ``split = (off, selective, full)`` blocks per checkpointing policy."""
        off, selective, full = split
        checkpointed = selective + full
        kept_blocks = off + (1 if checkpointed else 0)  # a checkpointed block is rebuilt during its backward
        video = tokens * (self.per_block * kept_blocks + self.global_per_token + self.backward_transient)
        video += tokens * (self.checkpoint_input * checkpointed + self.attention_saved * selective)
        if checkpointed:
            video += tokens * self.recompute_transient
        return video + text_tokens * (self.text_per_block * kept_blocks + self.text_shared)


@dataclass
class PlanItem:
    """One line of the estimate."""

    category: str  # weights | lora_optimizer | activations | workspace
    label: str
    nbytes: int


@dataclass
class Plan:
    """A peak-memory estimate, its breakdown, and the verdict against the card's free memory."""

    items: list[PlanItem]
    phase: str  # the phase that peaks: "training", "sampling" or "caption encoding"
    phases: dict[str, int]
    free_bytes: int | None
    headroom_bytes: int
    offload_blocks: int
    tokens: int
    host_bytes: int  # pinned host memory the offloaded weights need
    prefetch_next_expert: bool  # low VRAM: both experts' working sets fit at once around a switch
    block_split: tuple[int, int, int] = (0, 0, 0)  # (off, selective, full) checkpointing policies, in block order
    suggestions: list[str] = field(default_factory=list)
    fragmentation: float = FRAGMENTATION  # share of the peak the allocator reserves beyond it

    @property
    def peak_bytes(self) -> int:
        """Estimated peak allocated GPU bytes."""
        return max(self.phases.values())

    @property
    def required_bytes(self) -> int:
        """Free memory the job needs: the peak plus fragmentation and headroom."""
        return int(self.peak_bytes * (1 + self.fragmentation)) + self.headroom_bytes

    @property
    def fits(self) -> bool:
        """True when the card has enough free memory (always True without a GPU to compare with)."""
        return self.free_bytes is None or self.required_bytes <= self.free_bytes

    def by_category(self) -> dict[str, int]:
        """Bytes per category of the peaking phase."""
        out = {"weights": 0, "lora_optimizer": 0, "activations": 0, "workspace": 0}
        for item in self.items:
            out[item.category] += item.nbytes
        return out

    def summary(self) -> str:
        """Human-readable estimate beside the card's free memory."""
        cat = self.by_category()
        lines = [
            f"VRAM plan: peak {self.peak_bytes / GIB:.1f} GiB during {self.phase} (weights {cat['weights'] / GIB:.1f}, "
            f"LoRA+optimizer {cat['lora_optimizer'] / GIB:.1f}, activations {cat['activations'] / GIB:.1f}, "
            f"workspace {cat['workspace'] / GIB:.1f}); {self.tokens:,} video tokens per step; "
            f"offload_blocks {self.offload_blocks}; checkpointing off/selective/full "
            f"{'/'.join(map(str, self.block_split))} blocks"
        ]
        lines += [f"  {i.label}: {i.nbytes / GIB:.2f} GiB" for i in self.items if i.nbytes]
        if self.host_bytes:
            lines.append(f"  pinned host memory for offloaded weights: {self.host_bytes / GIB:.1f} GiB")
        if self.free_bytes is None:
            lines.append("  no GPU to compare with")
        else:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(
                f"  needs {self.required_bytes / GIB:.1f} GiB (with {self.fragmentation:.0%} fragmentation and "
                f"{self.headroom_bytes / GIB:.1f} GiB headroom) of {self.free_bytes / GIB:.1f} GiB free: {verdict}"
            )
        return "\n".join(lines)


def _expert_bytes(shapes: ExpertShapes, k: _Knobs) -> tuple[int, int]:
    """(head bytes, bytes of one block) of one expert's frozen weights."""
    ara = k.ara_rank if k.quant == "4bit_ara" else 0
    return _weight_bytes(shapes, k.model_dtype, k.quant, k.quantizer, ara)


@lru_cache(maxsize=64)
def _weight_bytes(shapes: ExpertShapes, model_dtype: str, quant: str, quantizer: str, ara_rank: int) -> tuple[int, int]:
    dtype = DTYPES[model_dtype]
    kept = fp32_kept_modules(WanTransformer3DModel, dtype)
    quantized = {f"{LORA_TARGET_TO_DIFFUSERS[t]}.weight": (i, o) for t, i, o in shapes.block_linears}
    head = block = 0
    for name, numel in shapes.tensors:
        if not name.startswith("blocks."):
            head += numel * tensor_dtype(name, kept, dtype).itemsize
        elif name.startswith("blocks.0."):
            local = name.removeprefix("blocks.0.")
            if quant != "none" and local in quantized:
                i, o = quantized[local]
                block += quantized_weight_bytes(o, i, quant, quantizer, ara_rank, dtype.itemsize)
            else:
                block += numel * tensor_dtype(name, kept, dtype).itemsize
    return head, block


def _lora_bytes(shapes: ExpertShapes, k: _Knobs) -> tuple[int, int, int]:
    """(weights, optimizer states, gradients) bytes of one expert's LoRA."""
    sizes = [k.rank * n for t, i, o in shapes.block_linears if t in k.targets for n in (i, o)]
    weights = 4 * sum(sizes) * shapes.num_blocks
    if k.optimizer == "adamw8bit":
        states = sum(2 * n + 8 * math.ceil(n / 256) if n >= _ADAMW8BIT_MIN_SIZE else 8 * n for n in sizes)
    else:
        states = 8 * sum(sizes)
    return weights, states * shapes.num_blocks, weights


def _te_bytes(side: SideModels, k: _Knobs) -> int:
    b = DTYPES[k.te_dtype].itemsize
    if k.text_quant == "float8":
        other = side.text_encoder_params - side.text_encoder_linear_params
        return side.text_encoder_linear_params + 4 * side.text_encoder_linear_rows + b * other
    return b * side.text_encoder_params


def _resolve_offload(k: _Knobs, shapes: ExpertShapes) -> int:
    if k.offload_blocks == "auto":
        return 0
    if k.offload_blocks > shapes.num_blocks:
        raise ConfigError(
            f"memory.offload_blocks is {k.offload_blocks} but the experts have {shapes.num_blocks} blocks - "
            f"use 0..{shapes.num_blocks} or 'auto'"
        )
    return k.offload_blocks


def _activation_bytes(k: _Knobs) -> tuple[int, int, int]:
    """(activation bytes, bytes of each LoRA input copy or 0, bytes of saved RMSNorm inputs) for these settings.

    The LoRA weights are fp32. Under autocast the trainer switches peft's input cast off (autocast computes the LoRA
    in the compute dtype anyway), so the inputs are shared; without autocast peft casts them unless the activations
    are fp32 too. PyTorch's CPU RMSNorm saves its input upcast to fp32.
    """
    s = k.autocast_bytes or DTYPES[k.model_dtype].itemsize
    if k.autocast_bytes:
        copy_bytes = 0
    else:
        copy_bytes = 0 if s == 4 else 4
    return s, copy_bytes, 4 if k.device_type == "cpu" else s


def _working_set(k: _Knobs, shapes: ExpertShapes, offload: int) -> int:
    """Bytes of the active expert's frozen weights on the device: head, resident blocks, the streaming window."""
    head, block = _expert_bytes(shapes, k)
    if k.shards > 1:  # 1/N of every block, plus the gathered block and the next one FSDP prefetches; head whole
        return head + math.ceil(shapes.num_blocks * block / k.shards) + 2 * block
    return head + (shapes.num_blocks - offload + min(offload, k.prefetch + 1)) * block


def _phases(
    k: _Knobs, shapes: ExpertShapes, side: SideModels, offload: int, split: tuple[int, int, int]
) -> dict[str, list[PlanItem]]:
    """The items of every phase of the job."""
    head, block = _expert_bytes(shapes, k)
    L = shapes.num_blocks
    active = _working_set(k, shapes, offload)
    others = (k.experts - 1) * (0 if k.low_vram else head + math.ceil((L - offload) * block / k.shards))
    weights = [PlanItem("weights", "active expert", active), PlanItem("weights", "other expert", others)]
    vae_b = DTYPES[k.vae_dtype].itemsize
    vae_w = PlanItem("weights", "VAE", side.vae_params * vae_b)
    te = _te_bytes(side, k)
    lw, ls, lg = _lora_bytes(shapes, k)
    lora = [
        PlanItem("lora_optimizer", "LoRA weights + optimizer states", k.experts * (lw + ls)),
        PlanItem("lora_optimizer", "LoRA gradients (active expert)", lg),
    ]
    s, copy_bytes, rms_bytes = _activation_bytes(k)
    act = ActivationModel.build(shapes, k.rank, k.targets, s, copy_bytes, rms_bytes, k.autocast_bytes is not None)
    tokens = max(clip_tokens(r, f) for r, f in k.clips)
    n = k.batch * k.passes
    train_act = act.training_bytes(tokens * n, TEXT_TOKENS * n, split)
    encode = max((VAE_ENCODE_PER_PIXEL + 3 * f) * vae_b * r * r for r, f in k.clips) * k.batch
    dequant = 0
    if k.quant != "none":
        largest = max(i * o for _, i, o in shapes.block_linears)
        dequant = largest * DEQUANT_BYTES["float8" if k.quant == "float8" else k.quantizer]
    live_te = [PlanItem("weights", "text encoder (live)", te)] if k.text_mode == "live" else []
    training = [*weights, vae_w, *live_te, *lora]
    if train_act + dequant >= encode:
        training += [
            PlanItem("activations", f"activations (checkpointing off/selective/full {'/'.join(map(str, split))})",
                     train_act),
            PlanItem("workspace", "dequantization", dequant),
        ]
    else:
        training.append(PlanItem("workspace", "VAE encoding", encode))
    phases = {"training": training}
    if k.sample is not None:
        w, h, f = k.sample
        sample_tokens = ((f - 1) // 4 + 1) * (w // 16) * (h // 16)
        no_grad = sample_tokens * (2 * s * shapes.ffn_dim + (s + 8) * shapes.dim + 8 * shapes.head_dim)
        decode = (VAE_DECODE_PER_PIXEL + 3 * f) * vae_b * w * h
        sampling = PlanItem("workspace", "sampling (largest of denoising and VAE decoding)", max(no_grad, decode))
        visiting = []
        if k.experts == 1:  # previews render both experts: the one not trained here visits the GPU as loaded
            vh, vb = _expert_bytes(shapes, replace(k, quant="none"))
            visiting = [PlanItem("weights", "untrained expert (visits for previews, as loaded)", vh + L * vb)]
        phases["sampling"] = [*weights, vae_w, *live_te, lora[0], *visiting, sampling]
    if k.text_mode != "live":
        phases["caption encoding"] = [PlanItem("weights", "text encoder", te)]
    return phases


def _uniform_split(policy: str, blocks: int) -> tuple[int, int, int]:
    """``(off, selective, full)`` with every block on ``policy`` (``auto`` starts from all ``full``)."""
    return {"off": (blocks, 0, 0), "selective": (0, blocks, 0)}.get(policy, (0, 0, blocks))


def _one_plan(
    k: _Knobs, shapes: ExpertShapes, side: SideModels, free: int | None, headroom: int, offload: int,
    split: tuple[int, int, int],
) -> Plan:
    phases = _phases(k, shapes, side, offload, split)
    totals = {name: sum(i.nbytes for i in items) for name, items in phases.items()}
    peak = max(totals, key=totals.get)
    head, block = _expert_bytes(shapes, k)
    managed = k.low_vram or offload > 0
    return Plan(
        items=phases[peak],
        phase=peak,
        phases=totals,
        free_bytes=free,
        headroom_bytes=headroom,
        offload_blocks=offload,
        tokens=max(clip_tokens(r, f) for r, f in k.clips) * k.batch,
        host_bytes=k.experts * (head + shapes.num_blocks * block) if managed else 0,
        prefetch_next_expert=False,
        block_split=split,
        fragmentation=k.fragmentation,
    )


def _streamed_for_selective(
    k: _Knobs, shapes: ExpertShapes, side: SideModels, free: int, headroom: int, fewest: int
) -> int:
    """Blocks to stream when ``memory.offload_blocks: auto`` already streams ``fewest`` of them: the fewest at or
    above that which leave room for every block to keep its self-attention output (``selective`` instead of
    ``full`` checkpointing), at most half the blocks (or ``fewest`` if more).

    Streaming a block costs copy time that hides behind the compute of the resident blocks between two streamed
    ones; selective checkpointing saves each block's attention forward in backward. Measured: 7 and 14 streamed
    float8 blocks ran at the same speed under a 22 GiB cap (H200), as did 0 and 20 streamed bf16 blocks (H100).
    A job that fits without streaming (``fewest`` 0) keeps every block resident.
    """
    if k.offload_blocks != "auto" or fewest == 0:
        return fewest
    most = max(fewest, shapes.num_blocks // 2)
    everything_selective = (0, shapes.num_blocks, 0)
    for offload in range(fewest, most + 1):
        if _one_plan(k, shapes, side, free, headroom, offload, everything_selective).fits:
            return offload
    return most


def _plan(k: _Knobs, shapes: ExpertShapes, side: SideModels, free: int | None, headroom: int) -> Plan:
    candidates = range(shapes.num_blocks + 1) if k.offload_blocks == "auto" else [_resolve_offload(k, shapes)]
    split = _uniform_split(k.checkpointing, shapes.num_blocks)
    for offload in candidates:
        plan = _one_plan(k, shapes, side, free, headroom, offload, split)
        if plan.fits:
            break
    if k.checkpointing == "auto" and free is not None and plan.fits:
        # Faster policies for as many blocks as the card holds, streaming more blocks for them where that is free.
        offload = _streamed_for_selective(k, shapes, side, free, headroom, plan.offload_blocks)
        split = choose_block_plan(
            shapes.num_blocks, lambda *s: _one_plan(k, shapes, side, free, headroom, offload, s).fits
        )
        plan = _one_plan(k, shapes, side, free, headroom, offload, split)
    if k.low_vram and k.experts > 1 and free is not None:
        working = _working_set(k, shapes, plan.offload_blocks)
        both = int((plan.phases["training"] + working) * (1 + k.fragmentation)) + headroom
        plan.prefetch_next_expert = both <= free
    return plan


def _smaller_clips(
    k: _Knobs, shapes: ExpertShapes, side: SideModels, free: int, headroom: int
) -> list[tuple[str, _Knobs]]:
    """The largest resolution, and separately the most frames, that make ``k`` fit (if any)."""
    found = []
    top, frames = max(r for r, _ in k.clips), max(f for _, f in k.clips)
    for res in range(top - 16, 15, -16):
        knobs = replace(k, clips=tuple((min(r, res), f) for r, f in k.clips))
        if _plan(knobs, shapes, side, free, headroom).fits:
            found.append((f"datasets resolutions: [{res}] or lower", knobs))
            break
    for n in range(frames - 4, 0, -4):
        knobs = replace(k, clips=tuple((r, min(f, n)) for r, f in k.clips))
        if _plan(knobs, shapes, side, free, headroom).fits:
            found.append((f"datasets num_frames: {n} or fewer", knobs))
            break
    return found


def _suggestions(
    k: _Knobs, shapes: ExpertShapes, side: SideModels, free: int, headroom: int, world: int = 1,
    fp8_matmul: bool = False,
) -> list[str]:
    """Single setting changes that make the plan fit (with their estimate), else one combination that does. On a
    card with fp8 matmuls (``fp8_matmul``) a combination with float8 weights comes first when it fits: faster than
    4-bit there and closer to bf16, and faster than streaming most blocks of a bf16 expert."""
    changes: list[tuple[str, dict]] = []
    if world > 1 and k.shards == 1 and not k.grouped and k.quant == "none" and not k.low_vram and k.offload_blocks == 0:
        changes.append(("distributed.shard_experts: true", {"shards": world}))
    if k.offload_blocks != "auto":
        changes.append(("memory.offload_blocks: auto", {"offload_blocks": "auto"}))
    if not k.low_vram and k.experts > 1:
        changes.append(("memory.low_vram: true", {"low_vram": True}))
    for quant in ("float8", "4bit_ara"):
        if (k.quant, quant) in (("none", "float8"), ("none", "4bit_ara"), ("float8", "4bit_ara")):
            changes.append((f"quant.transformer: {quant}", {"quant": quant}))
    if k.optimizer == "adamw":
        changes.append(("optimizer.name: adamw8bit", {"optimizer": "adamw8bit"}))
    if k.checkpointing in ("off", "selective"):
        changes.append(("train.gradient_checkpointing: auto", {"checkpointing": "auto"}))
    if k.text_mode == "live":
        changes.append(("text_encoder.mode: cache", {"text_mode": "cache"}))
    if k.batch > 1:
        changes.append(("train.batch_size: 1", {"batch": 1}))
    if k.sample is not None:
        changes.append(("sample.sample_every: 0 and sample_at_start: false", {"sample": None}))
    candidates = [(text, replace(k, **c)) for text, c in changes] + _smaller_clips(k, shapes, side, free, headroom)
    fitting = []
    if k.fragmentation > FRAGMENTATION and _plan(replace(k, fragmentation=FRAGMENTATION), shapes, side, free,
                                                 headroom).fits:
        fitting.append(f"the native CUDA allocator, which gets expandable segments and needs {FRAGMENTATION:.0%} "
                       f"spare instead of {k.fragmentation:.0%} (ComfyUI: start it with --disable-cuda-malloc)")
    for text, knobs in candidates:
        plan = _plan(knobs, shapes, side, free, headroom)
        if plan.fits:
            detail = f", offload_blocks {plan.offload_blocks}" if knobs.offload_blocks == "auto" else ""
            fitting.append(f"{text} (-> {plan.peak_bytes / GIB:.1f} GiB{detail})")
    if fp8_matmul and k.quant == "none":
        # float8 first, then what lets it fit: one expert on the GPU at a time, then as few streamed blocks as needed
        rank = {"quant": 0, "low_vram": 1, "offload_blocks": 2}
        order = sorted((c for c in changes if c[1].get("quant") != "4bit_ara"),
                       key=lambda c: rank.get(next(iter(c[1])), 3))
        with_float8 = _combination(k, order, shapes, side, free, headroom, shrink=False)
        if with_float8 is not None:
            return [with_float8, *fitting]
    if fitting:
        return fitting
    order = [c for c in changes if not (c[1].get("quant") == "float8" and k.quant == "none")]  # 4bit_ara saves more
    combination = _combination(k, order, shapes, side, free, headroom)
    return [combination] if combination is not None else []


def _combination(
    k: _Knobs, changes: list[tuple[str, dict]], shapes: ExpertShapes, side: SideModels, free: int, headroom: int,
    shrink: bool = True,
) -> str | None:
    """``changes`` added in order until the plan fits, then smaller clips if ``shrink`` allows; ``None`` when
    nothing fits."""
    combined, texts = k, []
    for text, c in changes:
        combined, texts = replace(combined, **c), [*texts, text]
        if _plan(combined, shapes, side, free, headroom).fits:
            break
    else:
        smaller = _smaller_clips(combined, shapes, side, free, headroom) if shrink else []
        if not smaller:
            return None
        text, combined = smaller[0]
        texts.append(text)
    plan = _plan(combined, shapes, side, free, headroom)
    detail = f", offload_blocks {plan.offload_blocks}" if combined.offload_blocks == "auto" else ""
    return "all of " + "; ".join(texts) + f" (-> {plan.peak_bytes / GIB:.1f} GiB{detail})"


def estimate_peak_vram(
    cfg: JobConfig,
    model_arch: dict,
    device_free_bytes: int | None,
    *,
    device_type: str = "cuda",
    side_models: SideModels | None = None,
    world: int = 1,
    fp8_matmul: bool = False,
    fragmentation: float = FRAGMENTATION,
) -> Plan:
    """Estimate the job's peak GPU memory from its settings alone (nothing is loaded).

    ``model_arch``: the experts' ``WanTransformer3DModel`` config (:data:`WAN22_A14B_ARCH`, or the tiny preset's).
    ``device_free_bytes``: free memory of the card (``torch.cuda.mem_get_info()[0]``), ``None`` without a GPU.
    ``memory.offload_blocks: auto`` resolves to the smallest count that fits (``plan.offload_blocks``; with
    ``train.gradient_checkpointing: auto`` more where that makes every block ``selective``). When the
    plan does not fit, ``plan.suggestions`` lists settings that would make it fit. ``world``: GPUs of a
    ``torchrun`` job (with ``distributed.shard_experts`` each holds 1/world of the frozen weights).
    ``fp8_matmul``: the card multiplies in fp8 (Ada, Hopper, Blackwell): suggestions lead with float8 weights, and
    ``quant.transformer: auto`` plans float8 (else 4bit_ara on a GPU). ``fragmentation``: the share of the peak the
    CUDA allocator reserves beyond it (:func:`.allocator.fragmentation_share`).
    """
    shapes = ExpertShapes.from_arch(model_arch)
    side = side_models or SideModels.for_model(cfg.model)
    k = replace(_knobs(cfg, device_type, world, fp8_matmul), fragmentation=fragmentation)
    headroom = int(cfg.memory.headroom_gib * GIB)
    plan = _plan(k, shapes, side, device_free_bytes, headroom)
    if not plan.fits:
        plan.suggestions = _suggestions(k, shapes, side, device_free_bytes, headroom, world, fp8_matmul)
    return plan


def experts_load_on_device(cfg: JobConfig, plan: Plan, experts: int, sharded: bool = False) -> bool:
    """Whether ``experts`` expert files can be read straight onto the GPU rather than into host memory first.

    Reading to the GPU keeps host RAM near the size of the files (a bf16 copy of two 14B experts is 56 GB of host
    memory) and skips a host-to-device copy. It is chosen only when the experts stay whole on the GPU (no Low VRAM,
    no streamed blocks, no sharding) and the card holds their unquantized weights beside the planned peak and the
    text encoder's visit: quantization happens after loading, in place.
    """
    if plan.free_bytes is None or cfg.memory.low_vram or plan.offload_blocks or sharded or not experts:
        return False
    shapes = ExpertShapes.from_arch(model_arch(cfg.model))
    head, block = _weight_bytes(shapes, cfg.model.dtype, "none", "", 0)
    loaded = experts * (head + shapes.num_blocks * block)
    stored = experts * sum(i.nbytes for i in plan.items if i.label == "active expert")  # whole: no offloading
    extra = max(0, loaded - stored) + _te_bytes(SideModels.for_model(cfg.model), _knobs(cfg, "cuda"))
    return plan.required_bytes + extra <= plan.free_bytes



@dataclass
class HostMemory:
    """Host (CPU) memory a job needs in each phase of its set-up and training, estimated like the VRAM plan."""

    phases: dict[str, list[PlanItem]]

    @property
    def phase(self) -> str:
        """The phase that needs the most host memory."""
        return max(self.phases, key=lambda name: sum(i.nbytes for i in self.phases[name]))

    @property
    def peak_bytes(self) -> int:
        """Host bytes of the heaviest phase."""
        return sum(i.nbytes for i in self.phases[self.phase])

    def summary(self) -> str:
        """The peak with what it holds, and the other phases' totals."""
        lines = [f"host RAM: about {self.peak_bytes / GIB:.1f} GiB at the peak, {self.phase}"]
        lines += [f"  {i.label}: {i.nbytes / GIB:.2f} GiB" for i in self.phases[self.phase] if i.nbytes]
        others = [f"{name} {sum(i.nbytes for i in items) / GIB:.1f} GiB" for name, items in self.phases.items()
                  if name != self.phase]
        if others:
            lines.append(f"  other phases: {', '.join(others)}")
        lines.append("  (plus the Python process and the data workers, a few GiB)")
        return "\n".join(lines)


def estimate_host_memory(cfg: JobConfig, plan: Plan) -> HostMemory:
    """The job's host memory per phase, from its settings and its VRAM ``plan`` (nothing is loaded).

    Caption encoding: the text encoder (in ``model.text_encoder_dtype``, before any float8) and the VAE are read into
    host memory. Loading the experts: one at a time, each unquantized in ``model.dtype`` in host memory unless it is
    a ComfyUI file read straight to the GPU (:func:`experts_load_on_device`), beside the pinned copies of the experts
    placed before it. Training: the pinned weights Low VRAM and block offloading keep in host memory
    (``plan.host_bytes``), and any expert rendered in previews but not trained, which waits on the CPU unquantized.
    """
    shapes = ExpertShapes.from_arch(model_arch(cfg.model))
    head, block = _weight_bytes(shapes, cfg.model.dtype, "none", "", 0)
    expert = head + shapes.num_blocks * block
    side = SideModels.for_model(cfg.model)
    trained = cfg.multistage.stages
    waiting = [n for n in EXPERTS if cfg.sample.during_training and n not in trained]
    direct = not waiting and experts_load_on_device(cfg, plan, len(trained))
    files = {"high": cfg.model.high_noise, "low": cfg.model.low_noise}
    through_host = [n for n in trained if not (direct and files[n])]
    pinned_before_last = plan.host_bytes * (len(trained) - 1) // max(len(trained), 1)
    phases = {
        "caption encoding": [
            PlanItem("host", "text encoder",
                     side.text_encoder_params * DTYPES[cfg.model.text_encoder_dtype].itemsize),
            PlanItem("host", "VAE", side.vae_params * DTYPES[cfg.model.vae_dtype].itemsize),
        ],
        "training": [
            PlanItem("host", "pinned weights (Low VRAM / offloaded blocks)", plan.host_bytes),
            *(PlanItem("host", f"{n}-noise expert (previews only, waits on the CPU)", expert) for n in waiting),
        ],
    }
    if through_host:
        phases["loading the experts"] = [
            PlanItem("host", "pinned copies of the experts loaded before it", pinned_before_last),
            PlanItem("host", f"one expert as loaded ({cfg.model.dtype}, before quantization)", expert),
        ]
    return HostMemory(phases)


def physical_memory() -> int | None:
    """This machine's RAM in bytes, where the OS says (POSIX); ``None`` elsewhere."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def host_memory_warning(host: HostMemory) -> str | None:
    """One line when ``host``'s peak exceeds this machine's RAM (None when it fits or the RAM is unknown)."""
    physical = physical_memory()
    if physical is None or host.peak_bytes <= physical:
        return None
    return (f"the job needs about {host.peak_bytes / GIB:.1f} GiB of host RAM ({host.phase}) but this machine has "
            f"{physical / GIB:.1f} GiB - expect swapping or an out-of-memory kill")


def check_plan(plan: Plan) -> Plan:
    """Return ``plan`` if it fits, else raise :class:`ConfigError` naming the settings to change."""
    if plan.fits:
        return plan
    if plan.suggestions:
        advice = "change one of:\n  - " + "\n  - ".join(plan.suggestions)
        if len(plan.suggestions) == 1 and plan.suggestions[0].startswith("all of "):
            advice = "no single setting is enough; change " + plan.suggestions[0]
    else:
        advice = "no combination of memory, quantization, batch, resolution or frame settings fits this card"
    raise ConfigError(
        f"this job needs about {plan.required_bytes / GIB:.1f} GiB of GPU memory but only "
        f"{plan.free_bytes / GIB:.1f} GiB are free - it would run out of memory.\n{plan.summary()}\n{advice}\n"
        "(or set memory.check_vram: false to try anyway)"
    )


def model_arch(cfg: ModelConfig) -> dict:
    """The experts' ``WanTransformer3DModel`` config without loading any weight (:func:`~..models.loading.
    expert_config`): the high-noise expert's, else the low-noise one's (a ComfyUI file's header, the tiny preset, a
    diffusers folder's or cached repo's config.json); else Wan 2.2 T2V A14B's, the model this trainer is for (a repo
    id not in the local cache, ComfyUI files that cannot be read: the pre-flight names what is wrong with them). A
    source folder neither expert's config.json can be read from raises that :class:`ModelLoadError` instead of
    planning for a model of another size."""
    source_error = None
    for part in EXPERTS:
        try:
            config = expert_config(cfg, part)
        except ModelLoadError as exc:  # the other expert may do: one trained expert needs nothing of the other
            if cfg.source and not getattr(cfg, f"{part}_noise"):
                source_error = source_error or exc
            continue
        if config is not None:
            return {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in WAN22_A14B_ARCH}
    if source_error is not None:
        raise source_error
    return dict(WAN22_A14B_ARCH)


def plan_job(cfg: JobConfig, device: torch.device, world: int = 1, *, quiet: bool = False) -> Plan:
    """Plan the job for ``device`` (one of ``world`` ranks) before anything is loaded: log the estimate beside the
    free memory (unless ``quiet``: a pre-flight that only refuses, the run logs it) and, with
    ``memory.check_vram``, refuse (:class:`ConfigError`) what will not fit. ``plan.offload_blocks`` is the count to
    use (``auto`` resolved)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    share = fragmentation_share(device, warn=not quiet)
    plan = estimate_peak_vram(cfg, model_arch(cfg.model), free, device_type=device.type, world=world,
                              fp8_matmul=supports_fp8_matmul(device), fragmentation=share)
    if not quiet:
        log.info("%s", plan.summary())
        warning = host_memory_warning(estimate_host_memory(cfg, plan))
        if warning:  # the loading phase is where a short machine swaps or is killed: say so before it starts
            log.warning("%s - lower the host-RAM peak (see `python -m trainer_core check`) or add swap", warning)
    return check_plan(plan) if cfg.memory.check_vram else plan
