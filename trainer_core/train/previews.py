"""Preview videos during training: rendered with the current LoRAs, saved beside the checkpoints."""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Callable

import torch

from ..config import JobConfig
from ..fileio import ArtifactWriteError
from ..models import WanComponents
from ..sample import (
    comfy_prompt_notes,
    encode_sample_prompts,
    sample_metadata,
    sample_videos,
    write_video,
)
from ..timing import logged_seconds
from .experts import Expert
from .placement import same_device

log = logging.getLogger(__name__)

#: ``(training step, denoising steps done, of total)`` while a preview renders: progress, and a cancel check that may
#: raise (the loop then keeps a resumable state of that step).
PreviewProgress = Callable[[int, int, int], None]
#: A full disk while a preview is written: the run goes on, but its next checkpoint needs the space.
_FULL_DISK = "free space (or point save.output_dir at another disk) before the next checkpoint is due"


def previews_enabled(cfg: JobConfig) -> bool:
    """Whether this job renders previews while it trains."""
    return cfg.sample.during_training


def preview_quantization(cfg: JobConfig) -> dict[str, str]:
    """Expert -> quantization (``quant.transformer``, ``auto`` resolved) of the experts previews render quantized:
    the trained ones, which training quantizes; an expert rendered for previews only stays as loaded."""
    mode = cfg.quant.transformer
    return {} if mode == "none" else {e: mode for e in cfg.multistage.stages}


class PreviewRenderer:
    """Renders ``cfg.sample`` prompts at the configured steps.

    Prompts are encoded once at construction (before the text encoder is freed). An expert that is not being
    trained stays on the CPU and visits the GPU only while a preview renders.
    """

    def __init__(
        self,
        cfg: JobConfig,
        components: WanComponents,
        device: torch.device,
        folder: Path,
        on_sample: Callable[[int, list[torch.Tensor]], None] | None = None,
        on_progress: PreviewProgress | None = None,
    ):
        self.cfg, self.components, self.device, self.on_sample = cfg, components, device, on_sample
        self.on_progress = on_progress
        te = components.text_encoder.to(device)
        self.prompts = encode_sample_prompts(te, components.tokenizer, cfg.sample)
        for note in comfy_prompt_notes(components.tokenizer, cfg.sample):
            log.info("previews: %s", note)
        self.folder = folder

    def due(self, step: int) -> bool:
        """True at step 0 when ``sample_at_start``, and every ``sample_every`` completed steps."""
        s = self.cfg.sample
        if step == 0:
            return s.sample_at_start
        return s.sample_every > 0 and step % s.sample_every == 0

    def render(self, step: int, models: dict[str, torch.nn.Module], experts: dict[str, Expert]) -> list[Path]:
        """Render every prompt with both experts (trained ones carry their LoRAs, EMA weights when enabled)."""
        s = self.cfg.sample
        # Only an expert kept elsewhere (e.g. not trained here) visits and goes back; moving a resident one back to
        # the CPU would break the next training step.
        visiting = [m for m in models.values() if not same_device(next(m.parameters()).device, self.device)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(logged_seconds(log, f"preview of step {step} ({len(s.prompts)} video(s))"))
            for ex in experts.values():
                if ex.ema is not None:
                    stack.enter_context(ex.ema.swapped_in())
            for m in visiting:
                m.to(self.device)
                stack.callback(m.to, "cpu")
            tick = None if self.on_progress is None else functools.partial(self.on_progress, step)
            videos = sample_videos(
                models["high"], models["low"], self.components.vae, self.prompts, s, self.cfg.multistage.boundary,
                on_step=tick,
            )
        paths = [p for i, frames in enumerate(videos) if (p := self._write(step, i, frames)) is not None]
        if self.on_sample is not None:
            self.on_sample(step, videos)
        return paths

    def _write(self, step: int, index: int, frames: torch.Tensor) -> Path | None:
        """Write prompt ``index``'s preview video; ``None`` when the file system refused it (disk full, read-only
        folder). A preview is a by-product: the run goes on, warned in one line. The checkpoints keep their own rule:
        one that cannot be written stops the run, keeping the last state (the next one needs that space too)."""
        s = self.cfg.sample
        meta = sample_metadata(s, index, self.cfg.multistage.boundary, self.prompts, preview_quantization(self.cfg))
        meta["step"] = str(step)
        path = self.folder / f"{self.cfg.name}_{step:06d}_{index:02d}.{s.format}"
        try:
            return write_video(frames, path, s.fps, s.format, meta, full_disk=_FULL_DISK)
        except ArtifactWriteError as exc:
            log.warning("warning: preview of step %d not saved, training goes on: %s", step, exc)
            return None
