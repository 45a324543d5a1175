"""The one typed configuration shared by the ComfyUI nodes, the CLI and YAML files.

Every setting is validated here, once. Unknown keys are refused by name (``extra="forbid"``, with the closest
valid key of that section suggested), so a typo in a YAML file fails before any model is loaded instead of being
silently ignored. No float setting takes ``.inf`` or ``.nan`` (``allow_inf_nan=False`` on every section), and the
settings with a sane range (learning rate, Adam's betas and eps, shifts, guidance...) refuse values outside it.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError

DType = Literal["bf16", "fp16", "fp32"]

#: Flow shifts beyond this put every timestep at pure noise; Wan 2.2 trains at 5 and samples at 12.
_MAX_SHIFT = 100.0
_SHIFT_USUAL = "usual 1 to 12; Wan 2.2 trains with 5 and samples with 12"
#: Upper limits of sizes: far beyond what Wan 2.2 makes (81 frames, 1280x720), low enough that a typo (an extra
#: digit) is refused at once instead of filling the memory, or the hours, of a run that cannot finish.
_MAX_FRAMES = 257
_MAX_SIDE = 2048
_MAX_RANK = 1024
_MAX_BATCH = 1024
_MAX_SEED = 2**63 - 1
_MAX_NAME = 100  # file names add '_run12', '_000000_high_noise.safetensors' and stay below 255 bytes

#: LoRA targets in original Wan / ComfyUI naming (inside ``blocks.N.``).
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)


class _Strict(BaseModel):
    # allow_inf_nan=False: no float setting of any section takes .inf / .nan (YAML's infinity and not-a-number, or
    # a number too large for a float such as 1e400); format_validation_error words the refusal.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic takes true/false as 1/0 for a number, so `rank: yes` (YAML's true) would train a rank-1 LoRA
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(v, bool) and field is not None and _numeric(field.annotation):
            default = "" if field.default is None else f", such as the default {field.default!r}"
            raise ValueError(f"must be a number, not true/false - write a number{default}")
        return v


def _numeric(annotation: Any) -> bool:
    """Whether a setting of this type takes a number and never a boolean (``int``, ``float | None``...)."""
    args = get_args(annotation) or (annotation,)
    return bool not in args and any(a in (int, float) for a in args)


def _frames_ok(v: int, what: str = "num_frames") -> int:
    """``v`` when it is a frame count Wan can make (4n+1, at most _MAX_FRAMES), else a ValueError saying which
    counts are."""
    if v < 1 or (v - 1) % 4:
        lo = max(1, ((v - 1) // 4) * 4 + 1)
        raise ValueError(f"{what} must be 4n+1 (1, 5, 9, 17, 33, 81 ...); {v} is not - use {lo} or {lo + 4}")
    if v > _MAX_FRAMES:
        raise ValueError(f"{what} must be at most {_MAX_FRAMES} (Wan 2.2 makes up to 81 frames, 5 s at 16 fps) - "
                         "use 81 or fewer")
    return v


def _in_range(name: str, v: float, lo: float, hi: float, usual: str, *, lo_open: bool = False,
              hi_open: bool = False) -> float:
    """``v`` when it lies in the range (closed unless ``*_open``), else a ValueError saying the range and the usual
    values (format_validation_error adds the value given)."""
    above = v > lo if lo_open else v >= lo
    below = v < hi if hi_open else v <= hi
    if not (above and below):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {left}{lo:g}, {hi:g}{right} ({usual})")
    return v


class ModelConfig(_Strict):
    """Where the base weights come from.

    ``source`` supplies every component that has no explicit file: ``"tiny"`` (built-in preset), a diffusers-layout
    folder, or a Hugging Face repo id. Explicit ComfyUI single files (``high_noise``, ``low_noise``,
    ``text_encoder``, ``vae``) override the matching component.
    """

    source: str | None = Field(default=None, description="'tiny', a diffusers folder, or a Hugging Face repo id")
    high_noise: str | None = Field(default=None, description="ComfyUI high-noise expert .safetensors")
    low_noise: str | None = Field(default=None, description="ComfyUI low-noise expert .safetensors")
    text_encoder: str | None = Field(default=None, description="ComfyUI UMT5-XXL .safetensors")
    vae: str | None = Field(default=None, description="ComfyUI Wan 2.1 VAE .safetensors")
    tokenizer: str | None = Field(default=None, description="tokenizer folder or repo id (if not in the TE file)")
    revision: str | None = Field(default=None, description="Hugging Face revision when source is a repo id")
    dtype: DType = Field(default="bf16", description="storage dtype of the frozen base weights")
    text_encoder_dtype: DType = "bf16"
    vae_dtype: DType = "fp32"

    @model_validator(mode="after")
    def _has_some_source(self) -> "ModelConfig":
        if self.source is None and not (self.high_noise or self.low_noise):
            raise ValueError(
                "no model given: set model.source to 'tiny', a diffusers folder or a repo id, "
                "or give ComfyUI files in model.high_noise / model.low_noise"
            )
        return self


class LoraConfig(_Strict):
    """The trainable adapter, one per expert."""

    rank: int = Field(default=16, description="LoRA rank (linear dim)")
    alpha: float | None = Field(default=None, description="LoRA alpha; scale = alpha / rank; default = rank")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    init_high: str | None = Field(default=None, description=(
        "LoRA file (.safetensors, any common Wan format) the high-noise expert's LoRA starts from"))
    init_low: str | None = Field(default=None, description=(
        "LoRA file (.safetensors, any common Wan format) the low-noise expert's LoRA starts from"))

    @field_validator("rank")
    @classmethod
    def _rank_ok(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("rank must be a positive integer - use 16 or 32 (typical)")
        if v > _MAX_RANK:
            # a rank-100000 LoRA of a 14B expert needs more memory than any machine has: refuse it before loading
            raise ValueError(f"rank must be at most {_MAX_RANK} (LoRAs use 16 to 64; 128 is large) - use 16 or 32")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha_positive(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("alpha must be positive - set it to the rank, or leave it out to use the rank")
        return v

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("target_modules is empty: list at least one of " + ", ".join(DEFAULT_LORA_TARGETS))
        unknown = [t for t in v if t not in DEFAULT_LORA_TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {unknown}; valid: {', '.join(DEFAULT_LORA_TARGETS)}")
        return list(dict.fromkeys(v))

    @property
    def effective_alpha(self) -> float:
        """Alpha actually used (defaults to the rank, i.e. scale 1)."""
        return float(self.alpha if self.alpha is not None else self.rank)


class MultiStageConfig(_Strict):
    """Which experts train, how often training switches between them, and where the boundary lies."""

    train_high_noise: bool = True
    train_low_noise: bool = True
    switch_every: int = Field(default=10, description="optimizer steps before switching expert (1 = alternate)")
    boundary: float = Field(default=0.875, description="t >= boundary*1000 goes to the high-noise expert")

    @field_validator("switch_every")
    @classmethod
    def _switch_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("switch_every must be >= 1 - use 1 to alternate every step, or 10 (the default)")
        return v

    @field_validator("boundary")
    @classmethod
    def _boundary_open_unit(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError("boundary must lie strictly between 0 and 1 - use 0.875 (Wan 2.2 T2V's)")
        return v

    @model_validator(mode="after")
    def _one_stage_on(self) -> "MultiStageConfig":
        if not (self.train_high_noise or self.train_low_noise):
            raise ValueError("train_high_noise and train_low_noise are both off: enable at least one expert")
        return self

    @property
    def stages(self) -> list[str]:
        """Active stages in training order."""
        return [s for s, on in (("high", self.train_high_noise), ("low", self.train_low_noise)) if on]


class OptimizerConfig(_Strict):
    """Optimizer and learning-rate schedule (one optimizer state per expert)."""

    name: Literal["adamw", "adamw8bit"] = "adamw8bit"
    lr: float = Field(default=1e-4, description="learning rate, in (0, 1]; LoRAs train at about 1e-5 to 1e-3")
    weight_decay: float = Field(default=1e-4, description="decoupled weight decay, in [0, 1]; usual 0 to 0.1")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="Adam's decay rates, each in [0, 1)")
    eps: float = Field(default=1e-8, description="Adam's epsilon, in (0, 0.01]; usual 1e-8 to 1e-6")
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0, description="0 disables gradient clipping")

    @field_validator("lr")
    @classmethod
    def _lr_ok(cls, v: float) -> float:
        return _in_range("lr", v, 0.0, 1.0, "a LoRA trains with AdamW at about 1e-5 to 1e-3; 1e-4 is typical",
                         lo_open=True)

    @field_validator("weight_decay")
    @classmethod
    def _weight_decay_ok(cls, v: float) -> float:
        return _in_range("weight_decay", v, 0.0, 1.0, "usual 0 to 0.1; 0 turns it off")

    @field_validator("betas")
    @classmethod
    def _betas_ok(cls, v: tuple[float, float]) -> tuple[float, float]:
        for i, b in enumerate(v):
            _in_range(f"betas[{i}]", b, 0.0, 1.0, "Adam's decay rates; usual (0.9, 0.999)", hi_open=True)
        return v

    @field_validator("eps")
    @classmethod
    def _eps_ok(cls, v: float) -> float:
        return _in_range("eps", v, 0.0, 0.01, "usual 1e-8 to 1e-6", lo_open=True)


class TrainConfig(_Strict):
    """The training run itself."""

    steps: int = Field(default=2000, ge=1, description="total optimizer steps (shared by both experts)")
    batch_size: int = Field(default=1, ge=1, le=_MAX_BATCH)
    gradient_accumulation: int = Field(default=1, ge=1)
    gradient_checkpointing: Literal["auto", "full", "selective", "off"] = Field(
        default="auto",
        description=(
            "activation checkpointing per transformer block: 'full' recomputes each block in backward (least "
            "memory), 'selective' keeps the self-attention outputs and recomputes the rest, 'off' keeps everything "
            "(fastest); 'auto' lets the VRAM planner give as many blocks the faster policies as the card fits "
            "(on the CPU: full). true/false mean full/off"
        ),
    )
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "torch.compile the transformer blocks; 'auto' = on for CUDA with Triton, unless blocks are offloaded, the "
            "base is 4-bit or the weights are sharded, and eager if compiling fails; 'on' = always, errors raised"
        ),
    )
    timestep_type: Literal["linear", "sigmoid", "shift", "weighted"] = "linear"
    timestep_shift: float = Field(default=5.0, description="shift s for timestep_type=shift, in (0, 100]")
    timestep_bias: Literal["balanced", "high_noise", "low_noise"] = "balanced"
    compute_dtype: DType = Field(default="bf16", description="autocast dtype on GPU (CPU always computes fp32)")
    seed: int = Field(default=42, ge=0, le=_MAX_SEED, description="seed of the data order, noise and LoRA init")
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    num_workers: int = Field(
        default=2, ge=0, le=32, description="processes decoding clips while the GPU trains; 0 = in the training process"
    )

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_bool(cls, v: Any) -> Any:
        return {True: "full", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("timestep_shift")
    @classmethod
    def _shift_ok(cls, v: float) -> float:
        return _in_range("timestep_shift", v, 0.0, _MAX_SHIFT, _SHIFT_USUAL, lo_open=True)

    @field_validator("device")
    @classmethod
    def _device_ok(cls, v: str) -> str:
        # torch.device() would refuse 'gpu' or 'cuda:x' with a traceback, and only once training starts
        device = v.strip().lower()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError("device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N = the GPU's index) - use 'auto'")
        return device


class SaveConfig(_Strict):
    """Where and how LoRAs and training states are written."""

    output_dir: str = "output"
    save_every: int = Field(default=250, ge=0, description="0 saves only at the end")
    keep_last: int = Field(default=4, ge=0, description="checkpoints to keep; 0 keeps all")
    dtype: DType = "bf16"
    save_training_state: bool = True


class DatasetConfig(_Strict):
    """One folder of clips/images with captions.

    Bad files (unreadable, zero-length, unsupported type, caption not UTF-8, no caption at all) are reported and
    skipped; the build fails only when a dataset has nothing usable left, or at the first bad file with ``strict``.

    How often a dataset's items appear: ``repeats`` and ``weight`` scale its part of every epoch with its size;
    ``share`` fixes that part whatever the size (ai-toolkit trains its ``is_reg`` data on every other step, i.e. a
    share of one half, however many files either side holds). ``is_regularization`` makes the samples prior data:
    their target is the base model's own prediction (ai-toolkit's ``prior_reg``).
    """

    folder: str = Field(description="the folder of clips/images and their caption files, e.g. folder: /data/clips")
    caption_ext: str = "txt"
    default_caption: str = ""
    num_frames: int = 33
    frame_sampling: Literal["uniform", "fps"] = "uniform"
    fps: float = Field(default=16.0, description="model frame rate for frame_sampling=fps, in (0, 240]")
    window_start: Literal["random", "start"] = "random"
    short_clip: Literal["pad", "skip"] = "pad"
    resolutions: list[int] = Field(default_factory=lambda: [512])
    weight: float = Field(default=1.0, gt=0)
    share: float | None = Field(default=None, gt=0.0, le=1.0, description=(
        "fixed fraction of every epoch's samples for this dataset whatever its size (its weight is then unused); "
        "unset: by repeats and weight"))
    repeats: int = Field(default=1, ge=1)
    caption_dropout: float = Field(default=0.05, ge=0.0, le=1.0)
    prepend_trigger: bool = False
    trigger_separator: Literal[", ", " "] = Field(default=", ", description=(
        "what prepend_trigger puts between the trigger word and the caption: ', ' or ' ' (ai-toolkit's)"))
    flip_x: bool = False
    flip_y: bool = False
    is_regularization: bool = False
    cache_latents: bool = False
    strict: bool = Field(default=False, description="fail on the first bad file instead of skipping and reporting it")

    @field_validator("caption_ext")
    @classmethod
    def _caption_ext_ok(cls, v: str) -> str:
        ext = v.strip().removeprefix(".")
        media = {"mp4", "webm", "mov", "mkv", "gif", "png", "jpg", "jpeg", "webp"}
        if not ext or any(c in ext for c in "/\\") or ext.lower() in media:
            raise ValueError(f"caption_ext must be a text file extension such as 'txt' or 'caption', got {v!r}")
        return ext

    @field_validator("fps")
    @classmethod
    def _fps_ok(cls, v: float) -> float:
        return _in_range("fps", v, 0.0, 240.0, "Wan 2.2 is trained at 16 frames per second", lo_open=True)

    @field_validator("num_frames")
    @classmethod
    def _four_n_plus_one(cls, v: int) -> int:
        return _frames_ok(v)

    @field_validator("resolutions", mode="before")
    @classmethod
    def _one_resolution(cls, v: Any) -> Any:
        # `resolutions: 512` means [512] (ai-toolkit's `resolution` takes both forms too)
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("resolutions")
    @classmethod
    def _res_ok(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("resolutions is empty: give at least one, e.g. [512]")
        bad = [r for r in v if r < 16 or r % 16]
        if bad:
            fix = ", ".join(f"{max(16, r // 16 * 16)}" for r in bad)
            raise ValueError(f"resolutions must be multiples of 16 and >= 16; {bad} are not - use e.g. {fix}")
        big = [r for r in v if r > _MAX_SIDE]
        if big:
            raise ValueError(f"resolutions must be at most {_MAX_SIDE} (Wan 2.2 trains at up to 1280x720, about "
                             f"960); {big} are not - use e.g. 512 or 768")
        return sorted(set(v))


def share_problem(datasets: Sequence[DatasetConfig]) -> str | None:
    """Why the datasets' ``share`` values cannot all hold (they are fractions of one epoch), or ``None``."""
    given = [(d, ds.share) for d, ds in enumerate(datasets) if ds.share is not None]
    if not given:
        return None
    keys = ", ".join(f"datasets[{d}].share" for d, _ in given)
    total = sum(s for _, s in given)
    whole = math.isclose(total, 1.0, abs_tol=1e-6)
    sums = "is" if len(given) == 1 else "add up to"
    if total > 1.0 and not whole:
        return (f"{keys} {sums} {total:g}: shares are fractions of every epoch, so together they may be 1 at "
                "most - lower them")
    if len(given) == len(datasets) and not whole:
        return (f"every dataset has a share ({keys}), and they come to {total:g}, not 1 - make them add up to 1, "
                "or unset one dataset's share so that it takes the rest")
    if len(given) < len(datasets) and whole:
        rest = ", ".join(f"datasets[{d}]" for d, ds in enumerate(datasets) if ds.share is None)
        return f"{keys} {sums} 1, which leaves no sample for {rest} (no share) - lower them below 1"
    return None


#: Wan's standard negative prompt (``sample_neg_prompt`` in Wan 2.1/2.2's ``wan/configs/shared_config.py``).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class SampleConfig(_Strict):
    """Preview videos rendered with both experts (and their LoRAs). The expert boundary is
    ``multistage.boundary``; defaults follow the official T2V recipe (40 steps, shift 12, guidance 4 / 3) with
    ComfyUI's euler / normal, so ComfyUI's native Wan 2.2 graph renders the same video (see ``sample.native``)."""

    prompts: list[str] = Field(default_factory=list, description="one video per prompt; empty = no sampling")
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    width: int = 832
    height: int = 480
    num_frames: int = 33
    steps: int = Field(default=40, ge=1, description="denoising steps (previews may use fewer)")
    shift: float = Field(default=12.0, description="flow shift of the schedule (ModelSamplingSD3), in (0, 100]")
    sampler: Literal["euler", "diffusers_unipc"] = Field(default="euler", description=(
        "euler: ComfyUI's euler, reproduced exactly by the native graph; diffusers_unipc: diffusers' UniPC (Wan's "
        "own solver, own sigma grid), not reproducible natively ('unipc' is read as diffusers_unipc)"))
    scheduler: Literal["normal", "simple"] = Field(default="normal", description=(
        "ComfyUI scheduler of the euler sampler; normal is also diffusers' FlowMatchEuler grid (WanPipeline)"))
    guidance_high: float = Field(default=4.0, description="CFG scale on the high-noise expert, in [1, 30]; 1 = off")
    guidance_low: float = Field(default=3.0, description="CFG scale on the low-noise expert, in [1, 30]; 1 = off")
    seed: int = Field(default=42, ge=0, le=2**63 - 1)
    walk_seeds: bool = Field(default=True, description="prompt i uses seed + i; off: every prompt uses seed")
    lora_strength_high: float = Field(default=1.0, description="in [-10, 10]; 0 = base model")
    lora_strength_low: float = Field(default=1.0, description="in [-10, 10]; 0 = base model")
    fps: int = Field(default=16, ge=1, le=240, description="frame rate written into the video file")
    format: Literal["mp4", "webm"] = Field(default="mp4", description="mp4 (H.264) or webm (VP9)")
    vae_tiling: bool = Field(default=False, description="decode in spatial tiles (less memory, large sizes)")
    sample_every: int = Field(default=0, ge=0, description="render every N optimizer steps; 0 = off")
    sample_at_start: bool = Field(default=False, description="also render before the first step")

    @field_validator("shift")
    @classmethod
    def _shift_ok(cls, v: float) -> float:
        return _in_range("shift", v, 0.0, _MAX_SHIFT, _SHIFT_USUAL, lo_open=True)

    @field_validator("guidance_high", "guidance_low")
    @classmethod
    def _guidance_ok(cls, v: float, info: ValidationInfo) -> float:
        return _in_range(info.field_name, v, 1.0, 30.0, "usual 3 to 5 for Wan 2.2; 1 turns guidance off")

    @field_validator("sampler", mode="before")
    @classmethod
    def _legacy_unipc(cls, v: Any) -> Any:
        # Job files written before the ComfyUI-native samplers name diffusers' UniPC plain 'unipc'.
        return "diffusers_unipc" if v == "unipc" else v

    @field_validator("lora_strength_high", "lora_strength_low")
    @classmethod
    def _strength_ok(cls, v: float, info: ValidationInfo) -> float:
        return _in_range(info.field_name, v, -10.0, 10.0, "usual 0.5 to 1.5; 0 renders the base model")

    @field_validator("prompts")
    @classmethod
    def _prompts_not_blank(cls, v: list[str]) -> list[str]:
        blank = [i for i, p in enumerate(v) if not p.strip()]
        if blank:
            raise ValueError(f"prompt(s) at index {blank} are blank - write a prompt or remove the entry")
        return v

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v < 16 or v % 16:
            lo = max(16, v // 16 * 16)
            raise ValueError(f"must be a multiple of 16 (>= 16); {v} is not - use {lo} or {lo + 16}")
        if v > _MAX_SIDE:
            raise ValueError(f"must be at most {_MAX_SIDE} (Wan 2.2 makes up to 1280x720) - use e.g. 832 or 480")
        return v

    @field_validator("num_frames")
    @classmethod
    def _frames_four_n_plus_one(cls, v: int) -> int:
        return _frames_ok(v)

    @model_validator(mode="after")
    def _prompts_when_scheduled(self) -> "SampleConfig":
        if (self.sample_every or self.sample_at_start) and not self.prompts:
            raise ValueError(
                "sampling during training is on (sample_every / sample_at_start) but prompts is empty - "
                "add sample prompts or set sample_every to 0 and sample_at_start to false"
            )
        return self

    @property
    def during_training(self) -> bool:
        """Whether previews are rendered while training (prompts given, and a schedule on)."""
        return bool(self.prompts) and (self.sample_every > 0 or self.sample_at_start)

    def seed_for(self, index: int) -> int:
        """Seed of prompt ``index``: ``seed + index`` with ``walk_seeds``, else ``seed``."""
        return self.seed + index if self.walk_seeds else self.seed


class TextEncoderConfig(_Strict):
    """How captions become text embeddings.

    ``cache``: encode every distinct caption once, keep the embeddings on disk, free the text encoder.
    ``unload``: train every sample on the trigger word alone (needs ``trigger_word``), encode it once, free the
    encoder. ``live``: keep the encoder loaded and encode each batch's captions at every step.
    """

    mode: Literal["cache", "unload", "live"] = "cache"
    cache_dir: str | None = Field(default=None, description="embeddings folder; default <save.output_dir>/text_cache")


class QuantConfig(_Strict):
    """Storage of the frozen base weights (the trained LoRA itself always stays fp32).

    ``transformer``: ``none`` keeps the experts as loaded; ``float8`` stores the block Linear weights as float8 e4m3
    with one scale per output row; ``4bit_ara`` stores them in 4 bits (``quantizer``) with a frozen low-rank
    accuracy recovery adapter (ARA) beside each layer. Embeddings, norms, modulation and the head are never touched.
    ``ara_source`` is ``compute`` (derived locally from the weights, calibrated on activations of the training data,
    cached on disk) or an adapter ``.safetensors`` file (e.g. ai-toolkit's ``wan22_14b_t2i_torchao_uint4``, which
    needs ``quantizer: uint4``).
    """

    transformer: Literal["none", "float8", "4bit_ara"] = "none"
    quantizer: Literal["nf4", "uint4"] = Field(
        default="nf4",
        description="4-bit format: 'nf4' (bitsandbytes NF4) or 'uint4' (asymmetric, groups of 64, ai-toolkit's ARAs)",
    )
    ara_source: str = Field(default="compute", description="'compute' or an adapter .safetensors file")
    ara_rank: int = Field(default=16, ge=1, le=1024, description="rank of the accuracy recovery adapters")
    ara_calibration_samples: int = Field(
        default=8, ge=0, le=256, description="training samples whose activations calibrate computed adapters; 0 = none"
    )
    ara_cache_dir: str | None = Field(
        default=None, description="computed-adapter cache; default: the diffusers folder, else <output_dir>/ara_cache"
    )
    text_encoder: Literal["bf16", "float8"] = Field(
        default="bf16", description="text encoder Linear weights: as loaded, or float8 e4m3 with per-row scales"
    )
    fp8_backward: bool = Field(
        default=True,
        description=(
            "float8 experts on fp8 GPUs: compute the input gradients through the frozen layers in fp8 too (faster; "
            "about 3% relative error per element, like the forward) instead of with the bf16-dequantized weight"
        ),
    )

    @field_validator("ara_source")
    @classmethod
    def _ara_source_ok(cls, v: str) -> str:
        v = v.strip()
        if v != "compute" and not v.lower().endswith(".safetensors"):
            raise ValueError(f"ara_source must be 'compute' or a .safetensors adapter file, got {v!r}")
        return v

    @model_validator(mode="after")
    def _adapter_needs_4bit(self) -> "QuantConfig":
        if self.ara_source != "compute" and self.transformer != "4bit_ara":
            raise ValueError(
                f"ara_source names an adapter file but transformer is {self.transformer!r}; accuracy recovery "
                "adapters only apply to transformer: 4bit_ara - set it, or set ara_source: compute"
            )
        return self


class MemoryConfig(_Strict):
    """Where the frozen expert weights live during training (the trained LoRA and its optimizer stay on the GPU).

    ``low_vram``: only the active expert's weights on the GPU; the other waits in pinned host memory and is copied
    in when training switches expert. ``offload_blocks``: how many of the 40 transformer blocks are NOT kept on the
    GPU but streamed in from host memory for every forward and backward pass, ``prefetch`` blocks ahead of the
    computation; 0 keeps every block resident, ``auto`` picks the smallest number that fits the card. The VRAM
    planner checks the settings against the card's free memory before any model is loaded.
    """

    low_vram: bool = Field(default=False, description="keep only the active expert on the GPU (swap at switches)")
    offload_blocks: int | Literal["auto"] = Field(
        default=0, description="transformer blocks streamed from host memory; 0 = all resident; 'auto' = fit the card"
    )
    prefetch: int = Field(default=1, ge=1, le=8, description="offloaded blocks copied ahead of the computation")
    headroom_gib: float = Field(
        default=1.0, ge=0.0, le=1024.0,
        description="GPU memory (GiB) the planner leaves free beyond its estimate (other programs), in [0, 1024]",
    )
    check_vram: bool = Field(default=True, description="refuse settings that the planner says will not fit")

    @field_validator("offload_blocks")
    @classmethod
    def _offload_non_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("offload_blocks must be 0 (all blocks resident), a positive count or 'auto' - use 0")
        return v


class AdvancedConfig(_Strict):
    """Optional regularizers (``trainer_core.regularizers``).

    ``dop``: Differential Output Preservation - each step also asks the LoRA to keep the base model's prediction
    for the caption with the trigger word replaced by ``dop_class``; needs ``trigger_word``; about three transformer
    passes per step instead of one. ``diff_guidance``: regress towards ``pred + scale·(target − pred)``; with MSE this
    multiplies the gradient by ``scale`` exactly (with Adam-type optimizers nearly a no-op, see the docs).
    ``ema``: keep an exponential moving average of each expert's LoRA, saved as ``..._ema_<expert>.safetensors`` and
    used for previews.
    """

    dop: bool = Field(default=False, description="Differential Output Preservation (needs trigger_word)")
    dop_multiplier: float = Field(default=1.0, description="weight of the preservation loss")
    dop_class: str = Field(default="person", description="word that replaces the trigger word, e.g. person, scene")
    diff_guidance: bool = Field(default=False, description="differential guidance of the regression target")
    diff_guidance_scale: float = Field(default=3.0, description="target = pred + scale·(target − pred)")
    ema: bool = Field(default=False, description="save an EMA of each expert's LoRA beside the live one")
    ema_decay: float = Field(default=0.99, description="EMA decay per optimizer step of the expert, in (0, 1)")

    @field_validator("dop_multiplier")
    @classmethod
    def _dop_multiplier_ok(cls, v: float) -> float:
        if not (math.isfinite(v) and 0.0 < v <= 100.0):
            raise ValueError("dop_multiplier must be > 0 and <= 100 (typical 1.0; to disable DOP set dop: false)")
        return v

    @field_validator("dop_class")
    @classmethod
    def _dop_class_ok(cls, v: str) -> str:
        v = " ".join(v.split())
        if not v or "[trigger]" in v:
            raise ValueError("dop_class must be a plain class word such as 'person', 'woman' or 'scene'")
        return v

    @field_validator("diff_guidance_scale")
    @classmethod
    def _guidance_scale_ok(cls, v: float) -> float:
        if not (math.isfinite(v) and 0.0 < v <= 100.0):
            raise ValueError("diff_guidance_scale must be > 0 and <= 100 (typical 3; 1 changes nothing)")
        return v

    @field_validator("ema_decay")
    @classmethod
    def _ema_decay_ok(cls, v: float) -> float:
        if not (math.isfinite(v) and 0.0 < v < 1.0):
            raise ValueError("ema_decay must lie strictly between 0 and 1 (typical 0.99 to 0.999)")
        return v


class DistributedConfig(_Strict):
    """Several GPUs under ``torchrun`` (ignored in a single process).

    Data parallelism is always on: each rank trains on its slice of every global batch and the LoRA gradients are
    summed across ranks. ``shard_experts`` also shards the frozen expert weights with FSDP2 (``fully_shard``, one
    all-gather per transformer block): each GPU holds ``1/N`` of every expert plus the block being computed, for
    settings whose weights do not fit one GPU. The LoRA, its optimizer and its gradients stay replicated (tiny).
    """

    shard_experts: bool = Field(
        default=False, description="FSDP2-shard the frozen expert weights across the GPUs (bf16 experts only)"
    )
    expert_groups: bool = Field(
        default=False,
        description="both experts at once: the first half of the GPUs holds and trains the high-noise expert, the "
        "second half the low-noise one (even GPU count, switch_every 1); no expert ever swaps",
    )


def _refuse_clashes(setting: str, clashes: list[str]) -> None:
    """Raise one error naming every setting that ``setting: true`` cannot be combined with (none: nothing)."""
    if clashes:
        raise ValueError(
            f"{setting} cannot be combined with " + "; ".join(clashes) + f" - change those settings or set {setting}: "
            "false"
        )


class JobConfig(_Strict):
    """A complete training job."""

    name: str = "wan22_lora"
    trigger_word: str | None = None
    model: ModelConfig = Field(description=(
        "the base weights, e.g. model: {source: tiny}; model.source takes 'tiny', a diffusers folder or a repo id, "
        "model.high_noise / model.low_noise ComfyUI files"
    ))
    lora: LoraConfig = Field(default_factory=LoraConfig)
    multistage: MultiStageConfig = Field(default_factory=MultiStageConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)
    datasets: list[DatasetConfig] = Field(default_factory=list)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    advanced: AdvancedConfig = Field(default_factory=AdvancedConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    resume: str | None = Field(default=None, description="training-state file/folder, or 'latest' in output_dir")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError(f"name {v!r} must start with a letter or digit and hold only letters, digits, '_', '-' "
                             "or '.' (it becomes part of folder and file names) - rename it, e.g. my_lora")
        if len(v) > _MAX_NAME:
            raise ValueError(f"name is {len(v)} characters long; it becomes part of file names, which the file "
                             f"system limits - shorten it to at most {_MAX_NAME}")
        return v

    @field_validator("trigger_word")
    @classmethod
    def _trigger_or_none(cls, v: str | None) -> str | None:
        # Blank means none, as everywhere it is read (captions, DOP, the LoRA metadata): one answer for all of them.
        if v is None or not v.strip():
            return None
        return v.strip()

    @field_validator("resume")
    @classmethod
    def _resume_latest(cls, v: str | None) -> str | None:
        # 'Latest', 'latest ' (a stray space from a UI field or the shell) all mean the keyword, not a file name.
        if v is None or not v.strip():
            return None
        return "latest" if v.strip().lower() == "latest" else v.strip()

    @model_validator(mode="after")
    def _expert_group_combinations(self) -> "JobConfig":
        if not self.distributed.expert_groups:
            return self
        clashes = []
        if len(self.multistage.stages) != 2:
            clashes.append("training one expert only (turn on both multistage.train_high_noise and train_low_noise)")
        if self.multistage.switch_every != 1:
            clashes.append(
                f"multistage.switch_every: {self.multistage.switch_every} (both experts train every round: use 1)"
            )
        if self.distributed.shard_experts:
            clashes.append("distributed.shard_experts (each group holds a whole expert)")
        if self.memory.low_vram:
            clashes.append("memory.low_vram (each GPU holds one expert: there is nothing to swap)")
        if self.sample.during_training:
            clashes.append("previews during training (sample.sample_every / sample_at_start; render afterwards)")
        _refuse_clashes("distributed.expert_groups", clashes)
        return self

    @model_validator(mode="after")
    def _shares_fit(self) -> "JobConfig":
        problem = share_problem(self.datasets)
        if problem is not None:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _sharding_combinations(self) -> "JobConfig":
        if not self.distributed.shard_experts:
            return self
        clashes = []
        if self.quant.transformer != "none":
            clashes.append(f"quant.transformer: {self.quant.transformer} (quantized weights cannot be sharded)")
        if self.memory.low_vram or self.memory.offload_blocks != 0:
            clashes.append("memory.low_vram / memory.offload_blocks (sharding replaces them)")
        if self.sample.during_training:
            clashes.append("previews during training (sample.sample_every / sample_at_start; render afterwards)")
        _refuse_clashes("distributed.shard_experts", clashes)
        return self

    @property
    def run_dir(self) -> Path:
        """Folder holding this job's LoRAs, training states and logs."""
        return Path(self.save.output_dir) / self.name


def _loc(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err["loc"]) or "<root>"


#: Other trainers' (ai-toolkit, kohya, diffusers scripts) names of settings -> this trainer's name, by section.
KEY_ALIASES: dict[str, dict[str, str]] = {
    "optimizer": {
        "learning_rate": "lr", "learningrate": "lr", "unet_lr": "lr", "optimizer": "name", "optimizer_type": "name",
        "scheduler": "lr_scheduler", "lr_warmup_steps": "warmup_steps", "warmup": "warmup_steps",
        "num_warmup_steps": "warmup_steps", "clip_grad_norm": "max_grad_norm", "grad_clip": "max_grad_norm",
        "gradient_clipping": "max_grad_norm",
    },
    "train": {
        "max_train_steps": "steps", "max_steps": "steps", "num_steps": "steps", "train_steps": "steps",
        "train_batch_size": "batch_size", "gradient_accumulation_steps": "gradient_accumulation",
        "grad_accum": "gradient_accumulation", "mixed_precision": "compute_dtype",
    },
    "lora": {
        "network_dim": "rank", "linear": "rank", "dim": "rank", "lora_rank": "rank", "network_alpha": "alpha",
        "linear_alpha": "alpha", "lora_alpha": "alpha", "lora_dropout": "dropout",
    },
    "model": {"name_or_path": "source", "pretrained_model_name_or_path": "source", "path": "source"},
    "datasets": {
        "folder_path": "folder", "path": "folder", "train_data_dir": "folder", "caption_extension": "caption_ext",
        "caption_dropout_rate": "caption_dropout", "num_repeats": "repeats", "resolution": "resolutions",
    },
    "save": {
        "save_every_n_steps": "save_every", "max_step_saves_to_keep": "keep_last", "training_folder": "output_dir",
    },
    "sample": {"sample_steps": "steps", "negative": "negative_prompt", "neg": "negative_prompt"},
}  # fmt: skip


def _normalized(key: str) -> str:
    return re.sub(r"[\s-]+", "_", key.strip()).lower()


def closest_key(key: str, known: Iterable[str], aliases: Mapping[str, str] | None = None) -> str | None:
    """The known key ``key`` most likely stands for: a listed alias of it (other trainers' names), the same key in
    other case or with '-' for '_', else the closest spelling (difflib, ratio >= 0.75); None when nothing is close."""
    known = list(known)
    norm = _normalized(key)
    target = (aliases or {}).get(norm)
    if target in known:
        return target
    for k in known:
        if _normalized(k) == norm:
            return k
    matches = difflib.get_close_matches(norm, known, n=1, cutoff=0.75)
    return matches[0] if matches else None


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config class holding the settings at ``loc`` (a path of section names and list indexes)."""
    model: type[BaseModel] = JobConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        inner = _model_in(field.annotation)
        if inner is None:
            return None
        model = inner
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _sections() -> dict[str, type[BaseModel]]:
    return {
        name: model for name, f in JobConfig.model_fields.items() if (model := _model_in(f.annotation)) is not None
    }


def _unknown_key_hint(loc: tuple[Any, ...]) -> str:
    """' - did you mean ...?' for an unknown key at ``loc``, or the generic advice."""
    *parent, key = loc
    key = str(key)
    section = str(parent[0]) if parent else ""
    model = _section_model(tuple(parent))
    if model is not None:
        near = closest_key(key, model.model_fields, KEY_ALIASES.get(section))
        if near is not None:
            return f" - did you mean '{'.'.join(map(str, [*parent, near]))}'? Rename it"
    # The right key (or another trainer's name for it) in the wrong section, e.g. train.lr, which is optimizer.lr.
    norm = _normalized(key)
    for name, other in _sections().items():
        if name == section:
            continue
        target = KEY_ALIASES.get(name, {}).get(norm, norm)
        if target in other.model_fields:
            where = f"{name}[...]" if name == "datasets" else name
            return f" - did you mean '{where}.{target}'? Move it to the '{name}' section"
    return " - remove it or check its spelling"


def _field_default(loc: tuple[Any, ...]) -> Any:
    """The default of the setting at ``loc`` (list/tuple indexes dropped), or None when there is none."""
    names = [p for p in loc if not isinstance(p, int)]
    if not names:
        return None
    model = _section_model(tuple(names[:-1]))
    field = model.model_fields.get(str(names[-1])) if model is not None else None
    if field is None or field.is_required():
        return None
    return field.get_default(call_default_factory=True)


def _field_description(loc: tuple[Any, ...]) -> str | None:
    """The description of the setting at ``loc`` (list indexes dropped), or None."""
    names = [p for p in loc if not isinstance(p, int)]
    model = _section_model(tuple(names[:-1])) if names else None
    field = model.model_fields.get(str(names[-1])) if model is not None else None
    return field.description if field is not None else None


#: pydantic's error types for a value of the wrong kind, and what the setting takes instead.
_KIND_ERRORS = {
    "model_type": "a section of settings (indented 'key: value' lines)",
    "model_attributes_type": "a section of settings (indented 'key: value' lines)",
    "dict_type": "a section of settings (indented 'key: value' lines)",
    "list_type": "a list, e.g. [a, b] or one '- item' line per entry",
    "tuple_type": "a list, e.g. [0.9, 0.999]",
    "string_type": "a text",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}


#: pydantic's error types for a number out of its bounds, and the comparison they state.
_BOUND_ERRORS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a pasted paragraph would bury the message)."""
    text = "nothing (null)" if value is None else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind_problem(err: dict[str, Any]) -> str:
    """' must be <kind>, got <value> - <what to do>' for a value of the wrong kind."""
    kind, given = _KIND_ERRORS[err["type"]], err.get("input")
    if err["type"] == "string_type" and isinstance(given, (int, float)) and not isinstance(given, bool):
        return f" must be a text, got the number {given!r} - write it in quotes ('{given}')"
    default, what = _field_default(err["loc"]), _field_description(err["loc"])
    if kind.startswith("a section"):
        fix = "write its settings under it" + (", or remove the line to use the defaults" if default else "")
    elif kind.startswith("a list"):
        fix = "write it as a list"
    elif default is not None:
        fix = f"write {kind} such as the default {default!r}"
    else:
        fix = f"write {kind}"
    if default is None and what:  # a required setting: say what goes there
        fix += f": {what}"
    return f" must be {kind}, got {_shown(given)} - {fix}"


def _bound_problem(err: dict[str, Any]) -> str:
    """' must be >= 1, got 0 - <what to do>' for a number out of its bounds."""
    op = _BOUND_ERRORS[err["type"]]
    limit = next(iter((err.get("ctx") or {}).values()), "?")
    default = _field_default(err["loc"])
    fix = f"use e.g. the default {default!r}" if isinstance(default, (int, float)) else f"use a value {op} {limit}"
    return f" must be {op} {limit}, got {_shown(err.get('input'))} - {fix}"


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """Turn pydantic's error list into one line per bad setting, naming it and saying what to do."""
    lines = []
    for err in exc.errors():
        where = _loc(err)
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown setting '{where}'{_unknown_key_hint(err['loc'])}")
        elif err["type"] == "missing":
            what = _field_description(err["loc"])
            lines.append(f"{source}: required setting '{where}' is missing - add it" + (f": {what}" if what else ""))
        elif err["type"] in _KIND_ERRORS:
            lines.append(f"{source}: '{where}'{_kind_problem(err)}")
        elif err["type"] in _BOUND_ERRORS:
            lines.append(f"{source}: '{where}'{_bound_problem(err)}")
        elif err["type"] == "finite_number":
            default = _field_default(err["loc"])
            fix = f" (the default is {default!r})" if default is not None else ""
            lines.append(
                f"{source}: '{where}': must be a finite number, got {err.get('input')!r} - .inf, .nan and numbers "
                f"too large for a float are not settings; give an ordinary number{fix}"
            )
        elif not err["loc"]:  # a rule across sections names its settings itself; the input is the whole job
            lines.append(f"{source}: {err['msg'].removeprefix('Value error, ')}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: '{where}': {msg} (got {_shown(err.get('input'))})")
    return "\n".join(lines)


def job_from_dict(data: dict[str, Any], source: str = "config") -> JobConfig:
    """Validate a plain dict as a :class:`JobConfig`, raising :class:`ConfigError` with readable messages."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of settings at the top level, got {type(data).__name__} - write the job as "
            "'key: value' lines starting at the left margin (model:, datasets:, train: ...; see the README's Job "
            "YAML schema)"
        )
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def job_warnings(cfg: JobConfig) -> list[str]:
    """Combinations that are valid but almost surely not what was meant, one line each naming the settings and what
    to do. They are warnings, not errors: the job runs as written (a later resume may raise ``train.steps``)."""
    from .schedule import expert_step_counts  # imports torch: only once a job is about to run

    ms, steps, warmup = cfg.multistage, cfg.train.steps, cfg.optimizer.warmup_steps
    out = []
    for expert, n in expert_step_counts(steps, ms.stages, ms.switch_every).items():
        if n == 0:
            out.append(
                f"the {expert}-noise expert gets no step: train.steps ({steps}) is not above multistage.switch_every "
                f"({ms.switch_every}), so its LoRA is saved untrained - raise train.steps above {ms.switch_every}, "
                f"lower switch_every, or set multistage.train_{expert}_noise: false"
            )
        elif warmup >= n:
            out.append(
                f"optimizer.warmup_steps ({warmup}) is not below the {n} step(s) of the {expert}-noise expert (each "
                "expert warms up over its own steps), so its learning rate never reaches optimizer.lr - lower "
                "warmup_steps (about a tenth of them is usual)"
            )
    return out


#: Leading bytes of files that are given as a job file by mistake.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a WebP image or WAV/AVI file"),
    (b"\x1aE\xdf\xa3", "a WebM/MKV video"),
    (b"PK\x03\x04", "a zip archive (or a PyTorch .pt/.ckpt checkpoint)"),
    (b"GGUF", "a GGUF model file"),
    (b"\x80\x02", "a pickle (PyTorch checkpoint)"),
    (b"%PDF", "a PDF document"),
)


def _binary_kind(head: bytes) -> str | None:
    """What a file that is not text looks like ('a PNG image', 'a safetensors file'...), None for text."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[4:8] == b"ftyp":
        return "an MP4/MOV video"
    if len(head) > 9 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") > 0:
        return "a safetensors file"
    if b"\x00" in head:
        return "binary data"
    return None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML job file into a dict; a missing path, a folder, a binary file, text that is not UTF-8 or broken
    YAML is refused in one line naming the file and saying what to do."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".yaml", ".yml") and p.is_file())
        hint = f" (it holds {', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''})" if inside else ""
        raise ConfigError(f"config file {path} is a folder - give the path of the job YAML file inside it{hint}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist - check the path")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"config file {path} cannot be read ({reason}) - check its permissions") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"config file {path} is saved as UTF-16 - save it as UTF-8 (e.g. Save As, encoding UTF-8)")
    kind = _binary_kind(raw[:8192])
    if kind is not None:
        raise ConfigError(
            f"config file {path} is not a YAML text file (it looks like {kind}) - give the path of the job .yaml file"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}, probably Latin-1 or "
            "Windows-1252) - save it as UTF-8 (e.g. Save As, encoding UTF-8)"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty - write the job's settings into it")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a key given twice in one mapping: PyYAML would keep the last value silently,
    so `steps: 5000` written twice, or an edited copy of a section below the original, would train the other one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' keys may be overridden, by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                again = key in first
            except TypeError:  # an unhashable key: construct_mapping refuses it in its own words
                continue
            if again:
                raise yaml.constructor.ConstructorError(
                    f"first on line {first[key] + 1}; keep one of them", None, f"'{key}' is given twice",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: the problem and where it is."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "") + " - fix the file there"
