"""Preview Sample (SAMPLE panel) and the preview settings Train LoRA renders with while it trains."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from trainer_core.config import WAN_NEGATIVE_PROMPT, SampleConfig, format_validation_error
from trainer_core.errors import ConfigError
from trainer_core.sample import SCHEDULERS, native_recipe

from . import host
from .bundle import CATEGORY, EXPERTS, LORA

if TYPE_CHECKING:
    from trainer_core.api import ExpertsBundle, LoraPair

SAMPLE = "WAN22_SAMPLE"
_T = "tooltip"
_SAMPLERS = ("euler", "diffusers_unipc")


def _default(name: str) -> Any:
    """The default of a SampleConfig field: the node and the job file start from the same preview settings."""
    return SampleConfig.model_fields[name].default


def _render_inputs(seed_control: bool) -> dict[str, tuple]:
    """Widgets shared by Preview Sample and Configure Training Previews (the render settings of SampleConfig)."""
    return {
        "prompts": ("STRING", {"default": "", "multiline": True, _T: (
            "One prompt per line, one video each; use the trigger word as in the captions")}),
        "negative_prompt": ("STRING", {"default": WAN_NEGATIVE_PROMPT, "multiline": True, _T: (
            "What to steer away from (Wan's standard negative prompt by default)")}),
        "width": ("INT", {"default": _default("width"), "min": 16, "max": 2048, "step": 16, _T: (
            "Multiple of 16; render near the training size (24 GB: 512)")}),
        "height": ("INT", {"default": _default("height"), "min": 16, "max": 2048, "step": 16, _T: "Multiple of 16"}),
        "num_frames": ("INT", {"default": _default("num_frames"), "min": 1, "max": 257, "step": 4, _T: (
            "4n+1 frames; as trained (33 on 24 GB, 81 = 5 s at 16 fps)")}),
        "steps": ("INT", {"default": _default("steps"), "min": 1, "max": 200, _T: (
            "Denoising steps: 40 for final quality, 20-30 for quick previews")}),
        "shift": ("FLOAT", {"default": _default("shift"), "min": 0.1, "max": 100.0, "step": 0.01, _T: (
            "Flow shift of the schedule (ModelSamplingSD3's shift): 12 is Wan 2.2 T2V's (ComfyUI's template uses 8)")}),
        "sampler": (_SAMPLERS, {"default": _default("sampler"), _T: (
            "euler: ComfyUI's euler - the native graph renders the same video (recipe in the node text and the "
            "video's metadata); diffusers_unipc: diffusers UniPC, Wan's own solver, not reproducible natively")}),
        "scheduler": (SCHEDULERS, {"default": _default("scheduler"), _T: (
            "ComfyUI scheduler of the euler sampler: normal is also diffusers' flow-match Euler grid; simple is "
            "what most native workflows use. Set the same one in KSamplerAdvanced")}),
        "guidance_high": ("FLOAT", {"default": _default("guidance_high"), "min": 1.0, "max": 20.0, "step": 0.01, _T: (
            "CFG on the high-noise expert: 2-4 (Wan: 4); 1 disables CFG and halves the time")}),
        "guidance_low": ("FLOAT", {"default": _default("guidance_low"), "min": 1.0, "max": 20.0, "step": 0.01, _T: (
            "CFG on the low-noise expert: 2-4 (Wan: 3)")}),
        "seed": ("INT", {"default": _default("seed"), "min": 0, "max": 2**63 - 1,
                         "control_after_generate": seed_control, _T: (
            "Noise seed of the first prompt; the same seed in KSamplerAdvanced gives the same noise")}),
        "walk_seeds": ("BOOLEAN", {"default": True, _T: (
            "Prompt i uses seed + i; off renders every prompt with the same seed (compare prompts)")}),
        "vae_tiling": ("BOOLEAN", {"default": False, _T: (
            "Decode in tiles: needed for 1024 px / 81 frames on 24 GB, slower")}),
    }


def _sample_config(prompts: str, **settings: Any) -> SampleConfig:
    lines = [p.strip() for p in prompts.splitlines() if p.strip()]
    try:
        return SampleConfig(prompts=lines, **settings)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "sample settings")) from None


class PreviewSample:
    """Render videos with both experts and (optionally) a trained pair; output frames for CreateVideo."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "experts": (EXPERTS, {_T: (
                    "Base model from Load Wan22 Experts, or Quantize ARA to render with the quantized experts")}),
                **_render_inputs(seed_control=True),
                "lora_strength_high": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05, _T: (
                    "Strength of the high-noise LoRA: 1 as trained, 0 = base model")}),
                "lora_strength_low": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05, _T: (
                    "Strength of the low-noise LoRA: 1 as trained, 0 = base model")}),
                "boundary": ("FLOAT", {"default": 0.875, "min": 0.01, "max": 0.99, "step": 0.005, _T: (
                    "Noise level where the low-noise expert takes over; 0.875 for Wan 2.2 T2V")}),
            },
            "optional": {
                "lora": (LORA, {_T: (
                    "A LoRA pair: trained by Train LoRA, or any Wan 2.2 pair from Load Wan22 LoRA Pair; without it "
                    "the base model renders")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("Frames of every prompt's video, one after another: CreateVideo -> SaveVideo.",)
    FUNCTION = "render"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Render test videos with the base model or a freshly trained LoRA pair, without saving files; the "
                   "node text gives the native ComfyUI settings that render the same video.")

    def render(
        self,
        experts: ExpertsBundle,
        prompts: str,
        negative_prompt: str,
        width: int,
        height: int,
        num_frames: int,
        steps: int,
        shift: float,
        sampler: str,
        scheduler: str,
        guidance_high: float,
        guidance_low: float,
        seed: int,
        walk_seeds: bool,
        vae_tiling: bool,
        lora_strength_high: float,
        lora_strength_low: float,
        boundary: float,
        lora: LoraPair | None = None,
        unique_id: str | None = None,
    ) -> tuple[torch.Tensor]:
        """Encode the prompts, render each video, and return all frames as one IMAGE batch ``[F, H, W, 3]``."""
        # The sampler's libraries (diffusers, peft, transformers) load on first use, not at ComfyUI's start.
        from trainer_core.api import lora_attached, placed
        from trainer_core.sample import encode_sample_prompts, sample_videos

        cfg = _sample_config(
            prompts,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_frames=num_frames,
            steps=steps,
            shift=shift,
            sampler=sampler,
            scheduler=scheduler,
            guidance_high=guidance_high,
            guidance_low=guidance_low,
            seed=seed,
            walk_seeds=walk_seeds,
            vae_tiling=vae_tiling,
            lora_strength_high=lora_strength_high,
            lora_strength_low=lora_strength_low,
        )
        if not cfg.prompts:
            raise ConfigError("Preview Sample: prompts is empty - write at least one prompt (one per line)")
        host.free_host_models()
        device = host.compute_device()
        comps = experts.components(quantize_on=device)  # with Quantize ARA: the experts training quantized
        progress = host.Progress(cfg.steps * len(cfg.prompts), unique_id)
        progress.text(native_recipe(cfg, boundary))  # how ComfyUI's native graph renders the same video

        def on_step(done: int, total: int) -> None:
            host.check_interrupt()
            progress.update(done, total)

        with placed(device, comps.text_encoder):
            cache = encode_sample_prompts(comps.text_encoder, comps.tokenizer, cfg)
        with lora_attached(comps.high, lora, "high"), lora_attached(comps.low, lora, "low"):
            with placed(device, comps.high, comps.low, comps.vae):
                videos = sample_videos(comps.high, comps.low, comps.vae, cache, cfg, boundary, on_step=on_step)
        return (torch.cat(videos),)


class ConfigureTrainingPreviews:
    """Preview videos Train LoRA renders every N steps (saved in the run folder's samples/, shown as progress)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_render_inputs(seed_control=False),
                "sample_every": ("INT", {"default": 250, "min": 0, "max": 100000, _T: (
                    "Render every N steps (250-500); 0 = only at the start if sample_at_start")}),
                "sample_at_start": ("BOOLEAN", {"default": False, _T: (
                    "Also render before the first step: the base model's look, for comparison")}),
                "fps": ("INT", {"default": 16, "min": 1, "max": 120, _T: "Frame rate of the saved preview videos"}),
                "format": (("mp4", "webm"), {"default": "mp4", _T: "mp4 (H.264) or webm (VP9) preview files"}),
            }
        }

    RETURN_TYPES = (SAMPLE,)
    RETURN_NAMES = ("previews",)
    OUTPUT_TOOLTIPS = ("Preview settings for Train LoRA's previews input.",)
    FUNCTION = "configure"
    CATEGORY = CATEGORY
    DESCRIPTION = "Sample videos during training with the LoRAs so far, to watch a run and pick a checkpoint."

    def configure(
        self,
        prompts: str,
        negative_prompt: str,
        width: int,
        height: int,
        num_frames: int,
        steps: int,
        shift: float,
        sampler: str,
        scheduler: str,
        guidance_high: float,
        guidance_low: float,
        seed: int,
        walk_seeds: bool,
        vae_tiling: bool,
        sample_every: int,
        sample_at_start: bool,
        fps: int,
        format: str,
    ) -> tuple[SampleConfig]:
        """Validate the settings into a :class:`SampleConfig` (at least one prompt)."""
        cfg = _sample_config(
            prompts,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_frames=num_frames,
            steps=steps,
            shift=shift,
            sampler=sampler,
            scheduler=scheduler,
            guidance_high=guidance_high,
            guidance_low=guidance_low,
            seed=seed,
            walk_seeds=walk_seeds,
            vae_tiling=vae_tiling,
            sample_every=sample_every,
            sample_at_start=sample_at_start,
            fps=fps,
            format=format,
        )
        if not cfg.prompts:
            raise ConfigError("Configure Training Previews: prompts is empty - write at least one prompt per line")
        return (cfg,)
