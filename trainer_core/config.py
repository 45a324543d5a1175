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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

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
from pydantic.fields import FieldInfo

from .errors import ConfigError

DType = Literal["bf16", "fp16", "fp32"]

#: Flow shifts beyond this put every timestep at pure noise; Wan 2.2 trains at 5 and samples at 12.
_MAX_SHIFT = 100.0
_SHIFT_USUAL = "usual 1 to 12; Wan 2.2 trains with 5 and samples with 12"
_GUIDANCE_USUAL = "usual 3 to 5 for Wan 2.2; 1 turns guidance off"
_STRENGTH_USUAL = "usual 0.5 to 1.5; 0 renders the base model"
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


# A setting's description is also its ComfyUI tooltip. What only a widget needs sits in the setting's
# Field(json_schema_extra=...): "step" (the widget's increment, and the precision the UI rounds to) and "widget_max"
# (the largest value a widget offers where the setting has no upper limit). nodes/widgets.py reads them beside the
# Range and pydantic's own limits.
@dataclass(frozen=True)
class Range:
    """The limits of a number setting (of each number of a pair such as ``betas``), declared beside the setting in
    its ``Annotated`` type: every section refuses a value outside them (``_Strict._within_range``) with ``message``
    or, by default, the range and the ``usual`` values, and the ComfyUI widgets take their min and max from here.
    ``hi=None``: no upper limit. ``checked=False``: the setting's own validator refuses with a more precise message
    (4n+1 frames, multiples of 16); the limits are still these."""

    lo: float
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    usual: str = ""
    message: str = ""
    checked: bool = True

    def check(self, name: str, v: float) -> None:
        """Raise a ValueError naming ``name`` when ``v`` lies outside the limits."""
        hi = math.inf if self.hi is None else self.hi
        if self.message:
            if not _inside(v, self.lo, hi, self.lo_open, self.hi_open):
                raise ValueError(self.message)
        else:
            _in_range(name, v, self.lo, hi, self.usual, lo_open=self.lo_open, hi_open=self.hi_open)


def range_of(field: FieldInfo) -> Range | None:
    """The :class:`Range` declared for a setting, if any."""
    return next((m for m in field.metadata if isinstance(m, Range)), None)


class _Strict(BaseModel):
    # allow_inf_nan=False: no float setting of any section takes .inf / .nan (YAML's infinity and not-a-number, or
    # a number too large for a float such as 1e400); format_validation_error words the refusal.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _within_range(cls, v: Any, info: ValidationInfo) -> Any:
        limits = range_of(cls.model_fields[info.field_name or ""])
        if limits is None or not limits.checked or v is None:
            return v
        for i, x in enumerate(v) if isinstance(v, tuple) else [(None, v)]:
            limits.check(info.field_name if i is None else f"{info.field_name}[{i}]", x)
        return v

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
    if not _inside(v, lo, hi, lo_open, hi_open):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {left}{lo:g}, {hi:g}{right} ({usual})")
    return v


def _inside(v: float, lo: float, hi: float, lo_open: bool, hi_open: bool) -> bool:
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


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
    dtype: DType = Field(default="bf16", description=(
        "Storage dtype of the frozen experts: bf16 (26.6 GiB per expert) is the usual choice; fp8 files are "
        "dequantized to it"))
    text_encoder_dtype: DType = Field(default="bf16", description=(
        "UMT5 dtype: bf16 (10.6 GiB); it encodes the captions, then leaves memory (unless the text-encoder mode is "
        "live)"))
    vae_dtype: DType = Field(default="fp32", description=(
        "VAE dtype: fp32 is exact and the VAE is small; bf16 saves memory at large sizes"))

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

    # a rank-100000 LoRA of a 14B expert needs more memory than any machine has: refused before loading
    rank: Annotated[int, Range(1, _MAX_RANK, message=(
        f"rank must be a positive integer of at most {_MAX_RANK} (LoRAs use 16 to 64; 128 is large) - use 16 or "
        "32"))] = Field(default=16, description=(
            "LoRA rank: 16 for most LoRAs, 32 for large or detailed datasets (H100/H200)"))
    alpha: Annotated[float | None, Range(0.0, lo_open=True, message=(
        "alpha must be positive - set it to the rank, or leave it out to use the rank"))] = Field(
        default=None, json_schema_extra={"widget_max": float(_MAX_RANK)}, description=(
            "LoRA alpha (scale = alpha / rank); unset = the rank (scale 1), the usual choice"))
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description=(
        "Dropout inside the LoRA: 0 is standard, 0.05-0.1 against overfitting tiny datasets"))
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), description=(
        "Layers inside each transformer block that get a LoRA (ComfyUI names); the default is every attention and "
        "feed-forward layer"))
    init_high: str | None = Field(default=None, description=(
        "LoRA file (.safetensors, any common Wan format) the high-noise expert's LoRA starts from"))
    init_low: str | None = Field(default=None, description=(
        "LoRA file (.safetensors, any common Wan format) the low-noise expert's LoRA starts from"))

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

    train_high_noise: bool = Field(default=True, description=(
        "Train the high-noise expert (layout, motion, camera): needed for motion LoRAs"))
    train_low_noise: bool = Field(default=True, description=(
        "Train the low-noise expert (detail, texture, identity): needed for character/style LoRAs"))
    switch_every: Annotated[int, Range(1, message=(
        "switch_every must be >= 1 (1 alternates the experts every step) - use e.g. 10 (the default)"))] = Field(
        default=10, json_schema_extra={"widget_max": 10_000}, description=(
            "Optimizer steps per expert before switching to the other: 10 on 24 GB (one expert on the GPU at a "
            "time), 1 on H100/H200 (both resident)"))
    boundary: Annotated[float, Range(0.0, 1.0, lo_open=True, hi_open=True, message=(
        "boundary must lie strictly between 0 and 1 - use 0.875 (Wan 2.2 T2V's)"))] = Field(
        default=0.875, json_schema_extra={"step": 0.001}, description=(
            "Noise level where the experts hand over: t >= boundary*1000 goes to the high-noise expert; Wan 2.2 "
            "T2V: 0.875"))

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

    name: Literal["adamw", "adamw8bit"] = Field(default="adamw8bit", description=(
        "adamw8bit keeps the optimizer state in 8 bits (less memory, same results); adamw is full precision"))
    lr: Annotated[float, Range(0.0, 1.0, lo_open=True, usual=(
        "a LoRA trains with AdamW at about 1e-5 to 1e-3; 1e-4 is typical"))] = Field(
        default=1e-4, json_schema_extra={"step": 1e-6}, description=(
            "Learning rate: 1e-4 is the usual choice; 5e-5 if the loss jumps or samples fall apart"))
    weight_decay: Annotated[float, Range(0.0, 1.0, usual="usual 0 to 0.1; 0 turns it off")] = Field(
        default=1e-4, json_schema_extra={"step": 1e-5}, description=(
            "AdamW's decoupled weight decay on the LoRA weights: 1e-4 is usual; 0 turns it off"))
    betas: Annotated[tuple[float, float], Range(0.0, 1.0, hi_open=True, usual=(
        "Adam's decay rates; usual (0.9, 0.999)"))] = Field(
        default=(0.9, 0.999), json_schema_extra={"step": 1e-4}, description=(
            "Adam's decay rates of the gradient's mean (beta1) and square (beta2): leave them at 0.9 and 0.999"))
    eps: Annotated[float, Range(0.0, 0.01, lo_open=True, usual="usual 1e-8 to 1e-6")] = Field(
        default=1e-8, json_schema_extra={"step": 1e-9}, description="Adam's epsilon: leave it at 1e-8")
    lr_scheduler: Literal["constant", "cosine", "linear"] = Field(default="constant", description=(
        "Learning-rate schedule, per expert: constant is standard for LoRAs"))
    warmup_steps: int = Field(default=0, ge=0, json_schema_extra={"widget_max": 100_000}, description=(
        "Steps of linear learning-rate warm-up, per expert: 0-100"))
    max_grad_norm: float = Field(default=1.0, ge=0, json_schema_extra={"widget_max": 100.0}, description=(
        "Gradient clipping norm: 1.0 is usual; 0 disables clipping"))


class TrainConfig(_Strict):
    """The training run itself."""

    steps: int = Field(default=2000, ge=1, json_schema_extra={"widget_max": 1_000_000}, description=(
        "Total optimizer steps, shared by the trained experts: motion 1500-2500, character/style 2000-3000"))
    batch_size: int = Field(default=1, ge=1, le=_MAX_BATCH, description="Clips per step: 1 on 24 GB, 1-2 on H100/H200")
    gradient_accumulation: int = Field(default=1, ge=1, json_schema_extra={"widget_max": 256}, description=(
        "Micro-batches summed per step: a larger effective batch (batch size x this) without more memory"))
    gradient_checkpointing: Literal["auto", "full", "selective", "off"] = Field(
        default="auto",
        description=(
            "Recompute activations in the backward pass, per transformer block: full recomputes each block (least "
            "memory); selective keeps the self-attention outputs and recomputes the rest; off keeps everything "
            "(fastest, most memory); auto lets the VRAM planner give as many blocks the faster policies as the card "
            "fits (on the CPU: full). true/false mean full/off"
        ),
    )
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "torch.compile the transformer blocks (faster steps after a slow first one): auto = on for a CUDA GPU "
            "with Triton (streamed blocks too), unless the base is 4-bit or the weights are sharded, and eager if "
            "compiling fails; on = always, errors raised; off = never"
        ),
    )
    timestep_type: Literal["linear", "sigmoid", "shift", "weighted"] = Field(default="linear", description=(
        "Noise-level sampling within each expert's range: motion linear; style linear or shift; character sigmoid "
        "or linear"))
    timestep_shift: Annotated[float, Range(0.0, _MAX_SHIFT, lo_open=True, usual=_SHIFT_USUAL)] = Field(
        default=5.0, json_schema_extra={"step": 0.1}, description=(
            "Shift s for timestep type shift (higher pushes toward noisier levels): 5 is usual"))
    timestep_bias: Literal["balanced", "high_noise", "low_noise"] = Field(default="balanced", description=(
        "Favour noisier (composition, motion) or cleaner (detail) levels: balanced for most, high_noise for pure "
        "camera moves or style"))
    compute_dtype: DType = Field(default="bf16", description=(
        "Autocast dtype on the GPU: bf16 on H100/H200 and RTX 30xx or newer (the CPU always computes fp32)"))
    seed: int = Field(default=42, ge=0, le=_MAX_SEED, description=(
        "Seed of the data order, noise, timesteps and LoRA init: a given seed and settings train identically"))
    device: str = Field(default="auto", description="auto (the first GPU, else the CPU), cuda, cuda:1, cpu")
    num_workers: int = Field(default=2, ge=0, le=32, description=(
        "Processes decoding clips while the GPU trains: 2 is plenty; 0 decodes in the training process"))
    validate_every: int | None = Field(
        default=None, ge=0, description=(
            "steps between validation losses on the held-out clips (datasets[].validation / validation_split); "
            "unset: at every save; 0 = off; always also before the first step and at the end"),
    )

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_bool(cls, v: Any) -> Any:
        return {True: "full", False: "off"}.get(v, v) if isinstance(v, bool) else v

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

    output_dir: str = Field(default="output", description=(
        "Folder of the run folders (checkpoints, states, losses.csv; in ComfyUI relative to its output folder): a "
        "job's first run writes into <output_dir>/<job name>, later fresh runs of the same name into <job "
        "name>_run2, _run3, ..."))
    save_every: int = Field(default=250, ge=0, json_schema_extra={"widget_max": 100_000}, description=(
        "Save a LoRA pair and a resumable state every N steps (250-500); 0 = only at the end"))
    keep_last: int = Field(default=4, ge=0, json_schema_extra={"widget_max": 1000}, description=(
        "Checkpoints kept in the run folder, older ones deleted (4-6 is plenty); 0 keeps all"))
    dtype: DType = Field(default="bf16", description=(
        "LoRA file dtype: bf16 (what ComfyUI loads everywhere); fp32 doubles the size"))
    save_training_state: bool = Field(default=True, description=(
        "Write the optimizer and scheduler state beside each checkpoint so a run can resume (and a cancel keeps its "
        "progress); off saves disk"))
    tensorboard: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "TensorBoard event files in the run folder's 'tensorboard' subfolder (losses, validation, learning "
            "rates, s/step, preview frames): 'auto' = when the tensorboard package is installed, 'on' = refuse to "
            "start without it, 'off' = never. true/false mean on/off"
        ),
    )

    @field_validator("tensorboard", mode="before")
    @classmethod
    def _tensorboard_bool(cls, v: Any) -> Any:
        # YAML reads a bare on/off as true/false
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class DatasetConfig(_Strict):
    """One folder of clips/images with captions.

    Bad files (unreadable, zero-length, unsupported type, caption not UTF-8, no caption at all) are reported and
    skipped; the build fails only when a dataset has nothing usable left, or at the first bad file with ``strict``.

    How often a dataset's items appear: ``repeats`` and ``weight`` scale its part of every epoch with its size;
    ``share`` fixes that part whatever the size (ai-toolkit trains its ``is_reg`` data on every other step, i.e. a
    share of one half, however many files either side holds). ``is_regularization`` makes the samples prior data:
    their target is the base model's own prediction (ai-toolkit's ``prior_reg``).
    """

    folder: str = Field(description=(
        "the folder of clips (mp4 webm mov mkv gif) and images with their caption files, e.g. folder: /data/clips "
        "(in ComfyUI relative to its input folder); 10-30 clips of 3-8 s is typical"))
    caption_ext: str = Field(default="txt", description="Caption file extension: clip01.mp4 + clip01.txt")
    default_caption: str = Field(default="", description=(
        "Caption for files without a caption file; [trigger] is replaced by the trigger word"))
    num_frames: Annotated[int, Range(1, _MAX_FRAMES, checked=False)] = Field(
        default=33, json_schema_extra={"step": 4}, description=(
            "Frames per sample (4n+1): 33 at 512 px on 24 GB; 41-81 at 768-1024 px on H100/H200; 1 = stills"))
    frame_sampling: Literal["uniform", "fps", "stride", "aitoolkit_uniform"] = Field(default="uniform", description=(
        "uniform: spread the frames over the whole clip; fps: a window at 'fps', motion at real speed (pick this "
        "for motion LoRAs); stride: every k-th frame from a random start, k = round(clip fps / fps) (ai-toolkit's "
        "shrink_video_to_frames: false); aitoolkit_uniform: uniform rounded as ai-toolkit rounds (halves to even)"))
    fps: Annotated[float, Range(0.0, 240.0, lo_open=True, usual="Wan 2.2 is trained at 16 frames per second")] = Field(
        default=16.0, json_schema_extra={"step": 0.5}, description=(
            "Frame rate of the window for frame sampling fps and stride; Wan 2.2 is trained at 16"))
    window_start: Literal["random", "start"] = Field(default="random", description=(
        "fps and stride sampling: a random window each epoch (more variety) or always the clip's start"))
    short_clip: Literal["pad", "skip", "stretch"] = Field(default="pad", description=(
        "Clips shorter than the window: pad by repeating the last frame, skip them (listed in the report), or "
        "stretch num_frames evenly over the whole clip, frames repeating (ai-toolkit's way)"))
    resolutions: list[int] = Field(default_factory=lambda: [512], description=(
        "Training sizes, multiples of 16 (e.g. 512, 768); aspect ratios are bucketed. 24 GB: 512; H100/H200: "
        "768-1024"))
    weight: float = Field(default=1.0, gt=0, json_schema_extra={"step": 0.05, "widget_max": 100.0}, description=(
        "Relative share of this dataset per epoch when several are trained together"))
    share: float | None = Field(default=None, gt=0.0, le=1.0, description=(
        "fixed fraction of every epoch's samples for this dataset whatever its size (its weight is then unused); "
        "unset: by repeats and weight"))
    repeats: int = Field(default=1, ge=1, json_schema_extra={"widget_max": 1000}, description=(
        "Times each item appears per epoch; raise it for small datasets mixed with large ones"))
    caption_dropout: float = Field(default=0.05, ge=0.0, le=1.0, description=(
        "Share of samples trained with an empty caption: about 0.05 keeps prompts without the trigger working"))
    prepend_trigger: bool = Field(default=False, description=(
        "Put the trigger word in front of captions that lack it (needs a trigger word)"))
    trigger_separator: Literal[", ", " "] = Field(default=", ", description=(
        "what prepend_trigger puts between the trigger word and the caption: ', ' or ' ' (ai-toolkit's)"))
    trigger_match: Literal["word", "substring"] = Field(default="word", description=(
        "when prepend_trigger counts a caption as already holding the trigger word: 'word' (as a whole word) or "
        "'substring' (anywhere, even inside a longer word: ai-toolkit's rule)"))
    flip_x: bool = Field(default=False, description=(
        "Mirror half the samples left-right; keep off for video (it reverses directional motion)"))
    flip_y: bool = Field(default=False, description="Flip half the samples upside down; almost always off")
    is_regularization: bool = Field(default=False, description=(
        "Regularization data: generic clips whose target is the base model's own prediction (keeps its look)"))
    cache_latents: bool = Field(default=False, description=(
        "Encode each clip once and cache it on disk; pays off with fixed windows and no flips (usually off for "
        "video)"))
    strict: bool = Field(default=False, description=(
        "Stop at the first unreadable or uncaptioned file; off skips such files and lists them in the report"))
    validation: bool = Field(default=False, description=(
        "a held-out folder: never trained on; its clips give the validation loss (train.validate_every)"))
    validation_split: Annotated[float, Range(0.0, 1.0, hi_open=True, usual=(
        "0.1 holds out a tenth of the files; 0 = none"))] = Field(default=0.0, description=(
        "fraction of this folder's files held out for the validation loss (at least one file; chosen from "
        "train.seed), in [0, 1); 0 = none"))

    @field_validator("caption_ext")
    @classmethod
    def _caption_ext_ok(cls, v: str) -> str:
        ext = v.strip().removeprefix(".")
        media = {"mp4", "webm", "mov", "mkv", "gif", "png", "jpg", "jpeg", "webp"}
        if not ext or any(c in ext for c in "/\\") or ext.lower() in media:
            raise ValueError(f"caption_ext must be a text file extension such as 'txt' or 'caption', got {v!r}")
        return ext

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

    @model_validator(mode="after")
    def _validation_combinations(self) -> "DatasetConfig":
        if not self.validation:
            if self.validation_split and self.is_regularization:
                raise ValueError("validation_split cannot be combined with is_regularization (a regularization "
                                 "clip's target is the base model, not the clip) - hold out clips of a training "
                                 "folder, or give a validation folder (validation: true)")
            return self
        clashes = [f"{k} ({why})" for k, on, why in (
            ("validation_split", self.validation_split > 0, "the whole folder is held out already"),
            ("is_regularization", self.is_regularization, "validation folders are never trained on"),
            ("share", self.share is not None, "validation folders take no part of an epoch"),
        ) if on]  # fmt: skip
        _refuse_clashes("validation", clashes)
        return self


def nothing_to_learn(datasets: Sequence[DatasetConfig]) -> str | None:
    """The refusal of datasets none of which teaches the LoRA anything (all validation folders, or all
    regularization data, whose target is the base model's own prediction: the LoRA would stay zero), or ``None``."""
    if datasets and all(d.validation for d in datasets):
        return ("every dataset is a validation folder (datasets[].validation: true), so there is nothing to train "
                "on - add a training folder, or set validation: false on one")
    if datasets and all(d.validation or d.is_regularization for d in datasets):
        return ("every training dataset is regularization data (datasets[].is_regularization: true), whose target is "
                "the base model's own prediction, so the LoRA would learn nothing - add a folder of the clips to "
                "learn, or set is_regularization: false on one")
    return None


def share_problem(datasets: Sequence[DatasetConfig]) -> str | None:
    """Why the datasets' ``share`` values cannot all hold (they are fractions of one epoch), or ``None``. Validation
    folders take no part of an epoch and are left out."""
    trained = [(d, ds) for d, ds in enumerate(datasets) if not ds.validation]
    given = [(d, ds.share) for d, ds in trained if ds.share is not None]
    if not given:
        return None
    keys = ", ".join(f"datasets[{d}].share" for d, _ in given)
    total = sum(s for _, s in given)
    whole = math.isclose(total, 1.0, abs_tol=1e-6)
    sums = "is" if len(given) == 1 else "add up to"
    if total > 1.0 and not whole:
        return (f"{keys} {sums} {total:g}: shares are fractions of every epoch, so together they may be 1 at "
                "most - lower them")
    if len(given) == len(trained) and not whole:
        return (f"every dataset has a share ({keys}), and they come to {total:g}, not 1 - make them add up to 1, "
                "or unset one dataset's share so that it takes the rest")
    if len(given) < len(trained) and whole:
        rest = ", ".join(f"datasets[{d}]" for d, ds in trained if ds.share is None)
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

    prompts: list[str] = Field(default_factory=list, description=(
        "Prompts, one video each (one per line in ComfyUI); use the trigger word as in the captions; empty = no "
        "sampling"))
    negative_prompt: str = Field(default=WAN_NEGATIVE_PROMPT, description=(
        "What to steer away from (Wan's standard negative prompt by default)"))
    width: Annotated[int, Range(16, _MAX_SIDE, checked=False)] = Field(
        default=832, json_schema_extra={"step": 16}, description=(
            "Multiple of 16; render near the training size (24 GB: 512)"))
    height: Annotated[int, Range(16, _MAX_SIDE, checked=False)] = Field(
        default=480, json_schema_extra={"step": 16}, description="Multiple of 16")
    num_frames: Annotated[int, Range(1, _MAX_FRAMES, checked=False)] = Field(
        default=33, json_schema_extra={"step": 4}, description=(
            "4n+1 frames: as trained (33 on 24 GB; 81 = 5 s at 16 fps)"))
    steps: int = Field(default=40, ge=1, json_schema_extra={"widget_max": 200}, description=(
        "Denoising steps: 40 for final quality, 20-30 for quick previews"))
    shift: Annotated[float, Range(0.0, _MAX_SHIFT, lo_open=True, usual=_SHIFT_USUAL)] = Field(
        default=12.0, description=(
            "Flow shift of the schedule (ModelSamplingSD3's shift): 12 is Wan 2.2 T2V's (ComfyUI's template uses "
            "8)"))
    sampler: Literal["euler", "diffusers_unipc"] = Field(default="euler", description=(
        "euler: ComfyUI's euler - the native graph renders the same video (the recipe is in the node text and the "
        "video's metadata); diffusers_unipc: diffusers' UniPC, Wan's own solver and sigma grid, not reproducible "
        "natively ('unipc' is read as diffusers_unipc)"))
    scheduler: Literal["normal", "simple"] = Field(default="normal", description=(
        "ComfyUI scheduler of the euler sampler: normal is also diffusers' flow-match Euler grid (WanPipeline); "
        "simple is what most native workflows use. Set the same one in KSamplerAdvanced"))
    guidance_high: Annotated[float, Range(1.0, 30.0, usual=_GUIDANCE_USUAL)] = Field(default=4.0, description=(
        "CFG on the high-noise expert: 2-4 (Wan: 4); 1 disables CFG and halves the time"))
    guidance_low: Annotated[float, Range(1.0, 30.0, usual=_GUIDANCE_USUAL)] = Field(default=3.0, description=(
        "CFG on the low-noise expert: 2-4 (Wan: 3); 1 disables CFG"))
    seed: int = Field(default=42, ge=0, le=_MAX_SEED, description=(
        "Noise seed of the first prompt; the same seed in KSamplerAdvanced gives the same noise"))
    walk_seeds: bool = Field(default=True, description=(
        "Prompt i uses seed + i; off renders every prompt with the same seed (compare prompts)"))
    lora_strength_high: Annotated[float, Range(-10.0, 10.0, usual=_STRENGTH_USUAL)] = Field(
        default=1.0, json_schema_extra={"step": 0.05}, description=(
            "Strength of the high-noise LoRA: 1 as trained, 0 = base model"))
    lora_strength_low: Annotated[float, Range(-10.0, 10.0, usual=_STRENGTH_USUAL)] = Field(
        default=1.0, json_schema_extra={"step": 0.05}, description=(
            "Strength of the low-noise LoRA: 1 as trained, 0 = base model"))
    fps: int = Field(default=16, ge=1, le=240, description="Frame rate written into the preview video files")
    format: Literal["mp4", "webm"] = Field(default="mp4", description="mp4 (H.264) or webm (VP9) preview files")
    vae_tiling: bool = Field(default=False, description=(
        "Decode in spatial tiles: needed for 1024 px / 81 frames on 24 GB, slower"))
    sample_every: int = Field(default=0, ge=0, json_schema_extra={"widget_max": 100_000}, description=(
        "Render previews every N optimizer steps (250-500); 0 = none, or only at the start with sample_at_start"))
    sample_at_start: bool = Field(default=False, description=(
        "Also render before the first step: the base model's look, for comparison"))

    @field_validator("sampler", mode="before")
    @classmethod
    def _legacy_unipc(cls, v: Any) -> Any:
        # Job files written before the ComfyUI-native samplers name diffusers' UniPC plain 'unipc'.
        return "diffusers_unipc" if v == "unipc" else v

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

    mode: Literal["cache", "unload", "live"] = Field(default="cache", description=(
        "cache: encode every caption once, then free UMT5 (24-32 GB); unload: train on the trigger word alone; "
        "live: keep UMT5 loaded and encode each step (big cards)"))
    cache_dir: str | None = Field(default=None, description=(
        "Folder of the cached caption embeddings, shared by runs (in ComfyUI relative to its output folder); unset "
        "= <save output_dir>/text_cache"))


class QuantConfig(_Strict):
    """Storage of the frozen base weights (the trained LoRA itself always stays fp32).

    ``transformer``: ``none`` keeps the experts as loaded; ``float8`` stores the block Linear weights as float8 e4m3
    with one scale per output row; ``4bit_ara`` stores them in 4 bits (``quantizer``) with a frozen low-rank
    accuracy recovery adapter (ARA) beside each layer; ``auto`` picks float8 or 4bit_ara for the card
    (:mod:`.quant.choice`). Embeddings, norms, modulation and the head are never touched.
    ``ara_source`` is ``compute`` (derived locally from the weights, calibrated on activations of the training data,
    cached on disk) or an adapter ``.safetensors`` file (e.g. ai-toolkit's ``wan22_14b_t2i_torchao_uint4``, which
    needs ``quantizer: uint4``).
    """

    transformer: Literal["none", "float8", "4bit_ara", "auto"] = Field(default="none", description=(
        "24-32 GB: auto = float8 on cards with fp8 matmuls (RTX 40xx/50xx, L4/L40, H100/H200; ~13 GiB per expert), "
        "4bit_ara on the others (RTX 30xx, A6000; ~7 GiB); none keeps the experts as loaded"))
    quantizer: Literal["nf4", "uint4"] = Field(default="nf4", description=(
        "4-bit format: nf4 (bitsandbytes NF4) for computed adapters; uint4 (asymmetric, groups of 64) for "
        "ai-toolkit's *_torchao_uint4 adapter files"))
    ara_source: str = Field(default="compute", description="'compute' or an adapter .safetensors file")
    ara_rank: int = Field(default=16, ge=1, le=1024, description=(
        "Rank of the accuracy recovery adapters: 16 recovers most of the 4-bit error; an adapter file's rank must "
        "match"))
    ara_calibration_samples: int = Field(default=8, ge=0, le=256, description=(
        "Training clips whose activations tune computed adapters: 8; 0 = from the weights alone (faster)"))
    ara_cache_dir: str | None = Field(default=None, description=(
        "Folder that keeps computed adapters for the next run (in ComfyUI relative to its models folder, where no "
        "loader lists them); unset: the diffusers folder, else <output_dir>/ara_cache"))
    text_encoder: Literal["bf16", "float8"] = Field(default="bf16", description=(
        "UMT5 weights: float8 (e4m3, per-row scales) halves its memory and is fine on every card; bf16 keeps them "
        "as loaded"))
    fp8_backward: bool = Field(
        default=True,
        description=(
            "float8 experts on fp8 GPUs (RTX 40xx, L40, H100/H200): compute the backward pass through the frozen "
            "layers in fp8 too (faster; about 3% relative error per element, like the forward); off uses the "
            "bf16-dequantized weight there"
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

    low_vram: bool = Field(default=False, description=(
        "Keep only the expert being trained on the GPU, swapped at each switch: on for 24 GB, off for H100/H200"))
    offload_blocks: int | Literal["auto"] = Field(default=0, description=(
        "Transformer blocks (of 40) streamed from host memory every pass: 0 = all on the GPU; auto = the fewest "
        "that fit the card; a count such as 20 for bf16 on 24 GB"))
    prefetch: int = Field(default=1, ge=1, le=8, description=(
        "Offloaded blocks copied ahead of the computation: 1-2; more hides copy time but uses VRAM"))
    headroom_gib: float = Field(default=1.0, ge=0.0, le=1024.0, json_schema_extra={"step": 0.5}, description=(
        "GPU memory (GiB) left free beyond the planner's estimate, for other programs; raise it if the card also "
        "drives a display"))
    check_vram: bool = Field(default=True, description=(
        "Refuse settings the VRAM planner says will not fit (it suggests what to change); off = try anyway"))

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

    dop: bool = Field(default=False, description=(
        "Differential Output Preservation keeps the base model's look for the class word: character/style on, "
        "motion off; needs a trigger word (about three passes per step)"))
    dop_multiplier: Annotated[float, Range(0.0, 100.0, lo_open=True, message=(
        "dop_multiplier must be > 0 and <= 100 (typical 1.0; to disable DOP set dop: false)"))] = Field(
        default=1.0, json_schema_extra={"step": 0.05}, description=(
            "Weight of DOP's preservation loss: 1 is usual; lower it if the LoRA learns too weakly"))
    dop_class: str = Field(default="person", description=(
        "Word that replaces the trigger word in DOP's prompt: person, woman, man for characters; scene or style for "
        "styles"))
    diff_guidance: bool = Field(default=False, description=(
        "Differential guidance: regress toward pred + scale·(target − pred), past the target; with AdamW it "
        "changes almost nothing - usually off"))
    diff_guidance_scale: Annotated[float, Range(0.0, 100.0, lo_open=True, message=(
        "diff_guidance_scale must be > 0 and <= 100 (typical 3; 1 changes nothing)"))] = Field(
        default=3.0, json_schema_extra={"step": 0.1}, description=(
            "Differential guidance strength: 3 is typical, 1 = off"))
    ema: bool = Field(default=False, description=(
        "Keep a moving average of each expert's LoRA, saved beside it (..._ema_<expert>) and used for previews: "
        "smoother results; Train LoRA outputs and copies the EMA pair"))
    ema_decay: Annotated[float, Range(0.0, 1.0, lo_open=True, hi_open=True, message=(
        "ema_decay must lie strictly between 0 and 1 (typical 0.99 to 0.999)"))] = Field(
        default=0.99, json_schema_extra={"step": 1e-4}, description=(
            "EMA decay per step of an expert: 0.99 for short runs, 0.999 for 3000+ steps"))

    @field_validator("dop_class")
    @classmethod
    def _dop_class_ok(cls, v: str) -> str:
        v = " ".join(v.split())
        if not v or "[trigger]" in v:
            raise ValueError("dop_class must be a plain class word such as 'person', 'woman' or 'scene'")
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

    name: str = Field(default="wan22_lora", description=(
        "Run folder and file-name prefix (letters, digits, _ - .); a new run of a used name gets a folder of its "
        "own (<name>_run2, ...), and resume 'latest' continues this name's newest run"))
    trigger_word: str | None = Field(default=None, description=(
        "Word that calls the LoRA (e.g. sqz): replaces [trigger] in captions; needed by DOP and the unload "
        "text-encoder mode; empty = none"))
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
    resume: str | None = Field(default=None, description=(
        "Continue a run: 'latest' (this job's newest training state), a training_state_*.safetensors file or a "
        "run folder; empty starts fresh"))

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
            clashes.append("previews during training (sample.sample_every / sample.sample_at_start; render afterwards)")
        _refuse_clashes("distributed.expert_groups", clashes)
        return self

    @model_validator(mode="after")
    def _datasets_fit_together(self) -> "JobConfig":
        # something left to train on, and shares that fit in one epoch
        for problem in (nothing_to_learn(self.datasets), share_problem(self.datasets)):
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
            clashes.append("previews during training (sample.sample_every / sample.sample_at_start; render afterwards)")
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


def field_default(loc: tuple[Any, ...]) -> Any:
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
    default, what = field_default(err["loc"]), _field_description(err["loc"])
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
    default = field_default(err["loc"])
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
            default = field_default(err["loc"])
            fix = f" (the default is {default!r})" if default is not None else ""
            lines.append(
                f"{source}: '{where}': must be a finite number, got {err.get('input')!r} - .inf, .nan and numbers "
                f"too large for a float are not settings; give an ordinary number{fix}"
            )
        elif not err["loc"]:  # a rule across sections names its settings itself; the input is the whole job
            lines.append(f"{source}: {err['msg'].removeprefix('Value error, ')}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = _shown(err.get("input"))
            # a message that already shows the value (", got 'x'") is not followed by it again
            lines.append(f"{source}: '{where}': {msg}" + ("" if f"got {got}" in msg else f" (got {got})"))
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
            start = cfg.lora.init_high if expert == "high" else cfg.lora.init_low
            saved = f"saved as it starts (lora.init_{expert}: {start})" if start else "saved untrained"
            out.append(
                f"the {expert}-noise expert gets no step: train.steps ({steps}) is not above multistage.switch_every "
                f"({ms.switch_every}), so its LoRA is {saved} - raise train.steps above {ms.switch_every}, "
                f"lower switch_every, or set multistage.train_{expert}_noise: false"
            )
        elif warmup >= n:
            out.append(
                f"optimizer.warmup_steps ({warmup}) is not below the {n} step(s) of the {expert}-noise expert (each "
                "expert warms up over its own steps), so its learning rate never reaches optimizer.lr - lower "
                "warmup_steps (about a tenth of them is usual)"
            )
    out += _unused_warnings(cfg)
    held_out = any(d.validation or d.validation_split for d in cfg.datasets)
    if cfg.train.validate_every and not held_out:
        out.append(
            f"train.validate_every is {cfg.train.validate_every} but no clip is held out, so there is no validation "
            "loss - add a validation folder (datasets[].validation: true) or set a datasets[].validation_split"
        )
    for i, d in enumerate(cfg.datasets):
        if d.caption_dropout >= 1:
            out.append(
                f"datasets[{i}].caption_dropout is 1: every caption of {d.folder} is dropped, so the LoRA learns that "
                "data without its text (a trigger word or prompt will not call it up) - lower caption_dropout (about "
                "0.05 keeps prompts without the trigger working)"
            )
    return out


@dataclass(frozen=True)
class _Off:
    """A setting another one switches off: its path (list items by index), why it has no effect and what would use
    it; ``warn``: say so when it differs from its default (False where the value is legitimately kept for later)."""

    path: str
    why: str
    fix: str
    warn: bool = True


def _switched_off(cfg: JobConfig) -> list[_Off]:
    q, adv, ms = cfg.quant, cfg.advanced, cfg.multistage
    off: list[_Off] = []
    if cfg.train.timestep_type != "shift":
        off.append(_Off("train.timestep_shift", f"only timestep_type: shift uses it, and it is "
                        f"{cfg.train.timestep_type}", "set timestep_type to shift"))
    for flag, keys in (("dop", ("dop_multiplier", "dop_class")), ("diff_guidance", ("diff_guidance_scale",)),
                       ("ema", ("ema_decay",))):
        if not getattr(adv, flag):
            off += [_Off(f"advanced.{k}", f"only advanced.{flag}: true uses it, and {flag} is off",
                         f"turn on advanced.{flag}") for k in keys]
    if q.transformer in ("none", "float8"):
        off += [_Off(f"quant.{k}", f"only 4-bit experts use it, and quant.transformer is {q.transformer}",
                     "set quant.transformer to 4bit_ara") for k in ("quantizer", "ara_rank", "ara_calibration_samples")]
    if q.transformer in ("none", "4bit_ara"):
        off.append(_Off("quant.fp8_backward", f"only float8 experts use it, and quant.transformer is {q.transformer}",
                        "set quant.transformer to float8"))
    if len(ms.stages) == 1:
        off.append(_Off("multistage.switch_every", f"only the {ms.stages[0]}-noise expert trains, so there is "
                        "nothing to switch", "train both experts"))
    if not cfg.sample.during_training:  # kept for `trainer_core sample` and Preview Sample: no warning
        off.append(_Off("sample", "no preview renders during training", "", warn=False))
    if not any(d.validation or d.validation_split for d in cfg.datasets):  # job_warnings names it on its own
        off.append(_Off("train.validate_every", "no clip is held out", "", warn=False))
    for i, d in enumerate(cfg.datasets):
        if not d.prepend_trigger:
            off += [_Off(f"datasets.{i}.{k}", "only prepend_trigger: true uses it, and it is off",
                         f"turn on datasets[{i}].prepend_trigger") for k in ("trigger_separator", "trigger_match")]
        if d.frame_sampling in ("uniform", "aitoolkit_uniform"):
            off.append(_Off(f"datasets.{i}.window_start", f"frame_sampling {d.frame_sampling} spreads the frames over "
                            "the whole clip (there is no window)", f"set datasets[{i}].frame_sampling to fps"))
            # fps still words the clip's playback speed in `check`: no effect on training, but no warning either
            off.append(_Off(f"datasets.{i}.fps", "", "", warn=False))
    return off


def inert_settings(cfg: JobConfig) -> list[str]:
    """Dotted paths (list items by index: ``datasets.0.fps``) of the settings that cannot change what this job
    learns because another setting switches their use off (``advanced.ema_decay`` without ``advanced.ema``, the
    whole ``sample`` section when no preview renders during training...). A finished run and a resumed state are
    matched without them, so editing such a widget neither retrains a finished run nor blocks a resume."""
    return [o.path for o in _switched_off(cfg)]


def _at(model: BaseModel, path: str) -> tuple[Any, Any]:
    """(value, default) of the setting at dotted ``path`` in ``model``."""
    *parents, leaf = path.split(".")
    for part in parents:
        model = model[int(part)] if isinstance(model, list) else getattr(model, part)
    field = type(model).model_fields[leaf]
    return getattr(model, leaf), field.get_default(call_default_factory=True)


def _as_written(v: Any) -> str:
    """A setting's value as a job file writes it: false, 0.9, 'woman'."""
    if isinstance(v, bool):
        return str(v).lower()
    return f"{v:g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)


def _unused_warnings(cfg: JobConfig) -> list[str]:
    """One line per setting changed from its default that another setting switches off."""
    out = []
    for o in _switched_off(cfg):
        value, default = _at(cfg, o.path)
        if o.warn and value != default:
            leaf = o.path.rsplit(".", 1)[-1]
            name = re.sub(r"\.(\d+)\.", r"[\1].", o.path)
            out.append(f"{name} is {_as_written(value)} but {o.why} - {o.fix}, or leave {leaf} at {_as_written(default)}")
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
