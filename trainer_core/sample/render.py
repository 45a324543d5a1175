"""Render videos with the base model and any Wan LoRA pair, headless (``python -m trainer_core sample``).

The model comes from the job's ``model`` section, held as its ``quant`` and ``memory`` sections say, as training's
previews hold it: the experts quantized as training quantizes them (4-bit adapters from the cache training wrote),
the text encoder too, and with ``memory.low_vram`` only the expert in use on the GPU (the high-noise one for its
steps, then the low-noise one), with ``memory.offload_blocks`` blocks streamed. The sampler settings come from the
``sample`` section and the expert switch from ``multistage.boundary``; the LoRA files (any format
:mod:`trainer_core.lora.formats` reads) and the output files are checked before any weight loads.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import torch
from pydantic import ValidationError
from tqdm.auto import tqdm

from ..config import DatasetConfig, JobConfig, QuantConfig, SampleConfig, format_validation_error
from ..errors import ConfigError
from ..fileio import check_writable
from ..lora import merged_patches, pair_warnings, read_lora_file, split_patches
from ..lora.formats import expert_arch
from ..memory import ExpertMemory, estimate_peak_vram, model_arch
from ..memory.allocator import fragmentation_share
from ..models import WanComponents, check_model_files, load_components, load_expert
from ..names import EXPERT_SUFFIX
from ..quant import quantize_text_encoder, supports_fp8_matmul
from ..quant.choice import resolve_transformer_quant
from ..train.quantization import quantize_for_render, render_quant
from .lora_files import attach_lora_tensors
from .sampler import (
    PromptCache,
    comfy_prompt_notes,
    encode_sample_prompts,
    sample_metadata,
    sample_videos,
)
from .video_io import write_video

log = logging.getLogger(__name__)

#: What to do about a full disk while a video is written.
_FULL_DISK = "free space (or give --out a folder on another disk) and render again"


def render_settings(cfg: JobConfig, prompts: list[str] | None, out: Path) -> SampleConfig:
    """The job's sample settings with ``prompts`` (when given) and the video format of ``out``'s suffix."""
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("mp4", "webm"):
        raise ConfigError(f"--out {out}: name the video *.mp4 or *.webm")
    settings = cfg.sample.model_dump() | {"format": fmt, "sample_every": 0, "sample_at_start": False}
    if prompts is not None:
        settings["prompts"] = prompts
    try:
        sample = SampleConfig(**settings)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "sample (--prompt and the job's sample section)")) from None
    if not sample.prompts:
        raise ConfigError("no prompt to render: pass --prompt TEXT or list sample.prompts in the job file")
    return sample


def video_paths(out: Path, count: int) -> list[Path]:
    """``out`` for one video; ``<stem>_00<suffix>``, ``<stem>_01<suffix>``, ... for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:02d}{out.suffix}") for i in range(count)]


def check_out(out: Path, paths: list[Path]) -> None:
    """Refuse, before anything loads, videos that cannot be written (a name that is a folder, a folder that cannot
    be written), and warn about videos of the same name from another render that this one leaves in place."""
    for path in paths:
        if path.is_dir():
            raise ConfigError(f"--out {out}: {path} is a folder - name a video file, e.g. "
                              f"{path / ('video' + out.suffix)}")  # fmt: skip
    check_writable(out.parent, "--out")
    others = older_videos(out, paths)
    if others:
        # a render never deletes what it did not write; mixing them silently is what the line prevents
        log.warning("warning: --out %s: %s in %s %s not written by this render (it writes %s) - move or delete %s, "
                    "or choose another --out, so the renders do not mix", out, ", ".join(p.name for p in others),
                    out.parent, "is" if len(others) == 1 else "are", ", ".join(p.name for p in paths),
                    "it" if len(others) == 1 else "them")  # fmt: skip


def older_videos(out: Path, paths: list[Path]) -> list[Path]:
    """The files named as :func:`video_paths` names ``out``'s videos, for any number of prompts, that are not
    ``paths``: the videos of an earlier render with another prompt count."""
    pattern = re.compile(rf"{re.escape(out.stem)}(_\d{{2,}})?{re.escape(out.suffix)}")
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file() and p not in paths)


class _Progress:
    """A progress bar per video on stderr (as training shows its steps): the denoising steps of each prompt."""

    def __init__(self, sample: SampleConfig, enabled: bool):
        self.steps, self.count, self.enabled = sample.steps, len(sample.prompts), enabled
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        """The sampler's step callback: ``done`` of ``total`` denoising steps over all prompts."""
        index, step = divmod(done - 1, self.steps)
        if step == 0:
            self.close()
            self.bar = tqdm(total=self.steps, desc=f"video {index + 1}/{self.count}", unit="step",
                            dynamic_ncols=True, disable=not self.enabled)  # fmt: skip
        self.bar.update(1)

    def close(self) -> None:
        """End the current bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def render_job(
    cfg: JobConfig, loras: dict[str, Path | None], out: Path, prompts: list[str] | None = None,
    device: torch.device | None = None, progress_bar: bool = True,
) -> list[Path]:
    """Render one video per prompt with both experts, each with its LoRA file from ``loras`` (``high`` / ``low``;
    ``None`` renders that expert's base model), and write them to ``out`` (see :func:`video_paths`); a progress bar
    per video on stderr unless ``progress_bar`` is off."""
    sample = render_settings(cfg, prompts, out)
    paths = video_paths(out, len(sample.prompts))
    check_out(out, paths)
    files = {e: Path(p) for e, p in loras.items() if p is not None}
    settings = {e: f"--lora-{e}" for e in EXPERT_SUFFIX}
    # read and checked before anything loads (minutes for the real experts); LoRA files are small
    tensors = {e: read_lora_file(p, settings[e], arch=expert_arch(cfg.model, e), expert=e) for e, p in files.items()}
    for warning in pair_warnings(files, settings):
        log.warning("warning: %s", warning)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_model_files(cfg.model)
    cfg = resolve_transformer_quant(cfg, device)
    quant = {e: render_quant(cfg, e) for e in EXPERT_SUFFIX}  # its warning comes before minutes of loading
    comps = load_components(cfg.model, high=False, low=False)
    prompt_cache = _encode_prompts(cfg, comps, sample, device)
    progress = _Progress(sample, progress_bar)
    boundary = cfg.multistage.boundary
    with contextlib.ExitStack() as patched:
        _place_experts(cfg, comps, device, quant, {e: (files[e], tensors[e]) for e in files}, sample, patched)
        comps.vae.to(device)
        try:
            videos = sample_videos(comps.high, comps.low, comps.vae, prompt_cache, sample, boundary, on_step=progress)
        finally:
            progress.close()
        # The experts are dropped with this function: putting patched weights back would only cost device memory
        # (with low_vram for an expert that is not on the GPU), so they stay as rendered.
        patched.pop_all()
    quantized = {e: q.transformer for e, q in quant.items()}
    written = []
    for i, (frames, path) in enumerate(zip(videos, paths)):
        meta = sample_metadata(sample, i, boundary, prompt_cache, quantized)
        meta |= {f"lora_{e}": files[e].name if e in files else "none" for e in EXPERT_SUFFIX}
        written.append(write_video(frames, path, sample.fps, sample.format, meta, full_disk=_FULL_DISK))
    return written


def _encode_prompts(cfg: JobConfig, comps: WanComponents, sample: SampleConfig, device: torch.device) -> PromptCache:
    """The prompts encoded as training's previews encode them (the text encoder quantized per
    ``quant.text_encoder``), then the encoder freed before the experts arrive."""
    if cfg.quant.text_encoder != "bf16":
        log.info("%s", quantize_text_encoder(comps.text_encoder, cfg.quant, device).summary())
    for note in comfy_prompt_notes(comps.tokenizer, sample):
        log.info("note: %s", note)
    with torch.no_grad():
        cache = encode_sample_prompts(comps.text_encoder.to(device), comps.tokenizer, sample)
    comps.text_encoder = None
    return cache


def _place_experts(
    cfg: JobConfig,
    comps: WanComponents,
    device: torch.device,
    quant: dict[str, QuantConfig],
    loras: dict[str, tuple[Path, dict[str, torch.Tensor]]],
    sample: SampleConfig,
    patched: contextlib.ExitStack,
) -> None:
    """Load each expert, quantize it as training does, attach its LoRA (weight patches merged into ``patched``) and
    hand it to the memory manager training uses (its hooks keep it alive): with ``low_vram`` an expert waits in host
    memory until the sampler calls it, and the other one leaves the GPU then."""
    memory = ExpertMemory(device, low_vram=cfg.memory.low_vram, offload_blocks=_offload_blocks(cfg, sample, device),
                          prefetch=cfg.memory.prefetch)  # fmt: skip
    # Straight to the device only what stays there whole; ComfyUI files then skip a host copy of 2 x 28 GB (the H200
    # run measured a 94.8 GB host peak when both were read into host memory first).
    whole = not memory.managed and cfg.quant.transformer == "none"
    for expert in EXPERT_SUFFIX:
        model = load_expert(cfg.model, expert, comps, device if whole else "cpu")
        quantize_for_render(cfg, expert, model, quant[expert], device)
        if expert in loras:
            path, tensors = loras[expert]
            adapter, patches = split_patches(tensors)
            if adapter:
                attach_lora_tensors(model, adapter, f"--lora-{expert}: {path}")
            # what no adapter holds (ComfyUI's trainer's differences) is merged at the strength the sampler gives it
            strength = getattr(sample, f"lora_strength_{expert}")
            patched.enter_context(merged_patches(model, patches, strength, f"--lora-{expert}: {path}"))
        memory.place(expert, model)
        if memory.low_vram:
            memory.offload(expert)  # the GPU stays free for the next expert's quantization


def _offload_blocks(cfg: JobConfig, sample: SampleConfig, device: torch.device) -> int:
    """``memory.offload_blocks``, ``auto`` resolved by the VRAM planner as for training previews of the render's
    size (its sampling phase), with a training step too small to matter: the fewest blocks streamed to render."""
    if cfg.memory.offload_blocks != "auto":
        return cfg.memory.offload_blocks
    planned = cfg.model_copy(update={
        "datasets": [DatasetConfig(folder=".", resolutions=[16], num_frames=1)],
        "train": cfg.train.model_copy(update={"batch_size": 1}),
        "sample": sample.model_copy(update={"sample_every": 1}),
    })  # fmt: skip
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    plan = estimate_peak_vram(planned, model_arch(cfg.model), free, device_type=device.type,
                              fp8_matmul=supports_fp8_matmul(device),
                              fragmentation=fragmentation_share(device))  # fmt: skip
    return plan.offload_blocks
