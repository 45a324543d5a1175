"""Render videos with the base model and any Wan LoRA pair, headless (``python -m trainer_core sample``).

The model comes from the job's ``model`` section, the sampler settings from its ``sample`` section and the expert
switch from ``multistage.boundary``; the LoRA files (any format :mod:`trainer_core.lora.formats` reads) are checked
against the experts from their headers before any weight loads.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from pydantic import ValidationError

from ..config import JobConfig, SampleConfig, format_validation_error
from ..errors import ConfigError
from ..fileio import check_writable
from ..lora import merged_patches, pair_warnings, read_lora_file, split_patches
from ..lora.formats import expert_arch
from ..models import check_model_files, load_components, load_expert
from ..names import EXPERT_SUFFIX
from .lora_files import attach_lora_tensors
from .sampler import encode_sample_prompts, sample_metadata, sample_videos
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


def render_job(
    cfg: JobConfig, loras: dict[str, Path | None], out: Path, prompts: list[str] | None = None,
    device: torch.device | None = None,
) -> list[Path]:
    """Render one video per prompt with both experts, each with its LoRA file from ``loras`` (``high`` / ``low``;
    ``None`` renders that expert's base model), and write them to ``out`` (see :func:`video_paths`)."""
    sample = render_settings(cfg, prompts, out)
    check_writable(out.parent, "--out")
    files = {e: Path(p) for e, p in loras.items() if p is not None}
    settings = {e: f"--lora-{e}" for e in EXPERT_SUFFIX}
    # read and checked before anything loads (minutes for the real experts); LoRA files are small
    tensors = {e: read_lora_file(p, settings[e], arch=expert_arch(cfg.model, e), expert=e) for e, p in files.items()}
    for warning in pair_warnings(files, settings):
        log.warning("warning: %s", warning)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_model_files(cfg.model)
    comps = load_components(cfg.model, high=False, low=False)
    with torch.no_grad():
        prompt_cache = encode_sample_prompts(comps.text_encoder.to(device), comps.tokenizer, sample)
    comps.text_encoder = None  # freed before the experts arrive
    # The experts render on the device: read there one by one (ComfyUI files go straight to the card, no host copy
    # of 2 x 28 GB; the H200 run measured a 94.8 GB host peak when both were read into host memory first).
    for expert in EXPERT_SUFFIX:
        load_expert(cfg.model, expert, comps, device)
    boundary = cfg.multistage.boundary
    with contextlib.ExitStack() as patched:
        for expert, path in files.items():
            adapter, patches = split_patches(tensors[expert])
            if adapter:
                attach_lora_tensors(getattr(comps, expert), adapter, f"--lora-{expert}: {path}")
            # what no adapter holds (ComfyUI's trainer's differences) is merged at the strength the sampler gives it
            strength = getattr(sample, f"lora_strength_{expert}")
            patched.enter_context(merged_patches(getattr(comps, expert), patches, strength, f"--lora-{expert}: {path}"))
        for module in (comps.high, comps.low, comps.vae):
            module.to(device)
        videos = sample_videos(comps.high, comps.low, comps.vae, prompt_cache, sample, boundary)
    written = []
    for i, (frames, path) in enumerate(zip(videos, video_paths(out, len(videos)))):
        meta = sample_metadata(sample, i, boundary, prompt_cache)
        meta |= {f"lora_{e}": files[e].name if e in files else "none" for e in EXPERT_SUFFIX}
        written.append(write_video(frames, path, sample.fps, sample.format, meta, full_disk=_FULL_DISK))
    return written
