"""Preview Sample (SAMPLE panel) and the preview settings Train LoRA renders with while it trains."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from trainer_core.config import MultiStageConfig, SampleConfig, format_validation_error
from trainer_core.errors import ConfigError
from trainer_core.sample import native_recipe

from . import host
from .bundle import CATEGORY, EXPERTS, LORA, TIMES_LOAD_STRENGTH
from .widgets import inputs, limits_problem, partial_config, setting, widget

if TYPE_CHECKING:
    from trainer_core.api import ExpertsBundle, LoraPair

SAMPLE = "WAN22_SAMPLE"
_T = "tooltip"
#: The render widgets both nodes share -> SampleConfig settings (defaults, limits and tooltips are the config's).
RENDER_FIELDS = {
    "negative_prompt": "sample.negative_prompt",
    "width": "sample.width",
    "height": "sample.height",
    "num_frames": "sample.num_frames",
    "steps": "sample.steps",
    "shift": "sample.shift",
    "sampler": "sample.sampler",
    "scheduler": "sample.scheduler",
    "guidance_high": "sample.guidance_high",
    "guidance_low": "sample.guidance_low",
    "seed": "sample.seed",
    "walk_seeds": "sample.walk_seeds",
    "vae_tiling": "sample.vae_tiling",
}
_RENDER_UI = {"negative_prompt": {"multiline": True}}


def _prompts_input() -> dict[str, tuple]:
    # prompts is a list in the config; the widget holds one prompt per line (_sample_config splits them)
    return {"prompts": widget("sample.prompts", multiline=True)}


def _sample_config(node: type, prompts: str, values: dict[str, Any], source: str) -> SampleConfig:
    """``prompts`` (one per line) and the node's widget values (``node.FIELDS``) as a :class:`SampleConfig`."""
    lines = [p.strip() for p in prompts.splitlines() if p.strip()]
    try:
        return SampleConfig(prompts=lines, **partial_config(node.FIELDS, values)["sample"])
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def _checked_config(prompts: str, values: dict[str, Any]) -> SampleConfig:
    """Preview Sample's settings as a :class:`SampleConfig` with at least one prompt; its boundary is checked with
    the config's bounds (strictly between 0 and 1)."""
    cfg = _sample_config(PreviewSample, prompts, values, "Preview Sample")
    if not cfg.prompts:
        raise ConfigError("Preview Sample: prompts is empty - write at least one prompt (one per line)")
    try:
        MultiStageConfig(boundary=values["boundary"])
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "Preview Sample")) from None
    return cfg


class PreviewSample:
    """Render videos with both experts and (optionally) a trained pair; output frames for CreateVideo."""

    #: The widgets -> the settings they set; boundary (this node's own widget) is multistage's setting, the experts'
    #: hand-over.
    FIELDS = {
        **RENDER_FIELDS,
        "lora_strength_high": "sample.lora_strength_high",
        "lora_strength_low": "sample.lora_strength_low",
        "boundary": "multistage.boundary",
    }
    UI = {
        **_RENDER_UI,
        "seed": {"control_after_generate": True},  # a test render: a new seed per queue when asked
        "lora_strength_high": {
            "tooltip": setting("sample.lora_strength_high")[0].description + TIMES_LOAD_STRENGTH},
        "lora_strength_low": {
            "tooltip": setting("sample.lora_strength_low")[0].description + TIMES_LOAD_STRENGTH},
    }

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "experts": (EXPERTS, {_T: (
                    "Base model from Load Wan22 Experts, or Quantize ARA to render with the quantized experts")}),
                **_prompts_input(),
                **inputs(cls.FIELDS, cls.UI),
            },
            "optional": {
                "lora": (LORA, {_T: (
                    "A LoRA pair: trained by Train LoRA, or any Wan 2.2 pair from Load Wan22 LoRA Pair; without it "
                    "the base model renders")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    #: Checked when the prompt is queued (VALIDATE_INPUTS) rather than when the node runs, after a training upstream:
    #: the widgets whose setting has rules beyond the widget's own limits. ComfyUI attaches the one message to each
    #: of them and skips its own range check for them (so VALIDATE_INPUTS checks those limits too); every other
    #: widget keeps ComfyUI's own checks, attached to it alone.
    CHECKED_EARLY = ("prompts", "width", "height", "num_frames", "shift", "boundary")

    @classmethod
    def VALIDATE_INPUTS(
        cls, prompts: Any, width: Any, height: Any, num_frames: Any, shift: Any, boundary: Any
    ) -> bool | str:
        """Refuse a render that cannot work before the graph runs (one fed by Train LoRA would otherwise fail only
        once training is done). Inputs fed by a link (None here) are checked when the node runs."""
        given = {k: v for k, v in zip(cls.CHECKED_EARLY, (prompts, width, height, num_frames, shift, boundary))
                 if v is not None}  # fmt: skip
        spec = cls.INPUT_TYPES()["required"]
        for name, value in given.items():
            if (problem := limits_problem(spec[name], value)) is not None:
                return f"Preview Sample: {name} {problem}"
        values = {**{name: spec[name][1]["default"] for name in cls.FIELDS}, **given}
        try:
            _checked_config(values.pop("prompts", "x"), values)
        except ConfigError as exc:
            return str(exc)
        return True

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
        lora: LoraPair | None = None,
        unique_id: str | None = None,
        **values: Any,
    ) -> tuple[torch.Tensor]:
        """Encode the prompts, render each video, and return all frames as one IMAGE batch ``[F, H, W, 3]``."""
        # The sampler's libraries (diffusers, peft, transformers) load on first use, not at ComfyUI's start.
        from trainer_core.api import check_pair_fits, lora_attached, placed
        from trainer_core.quant.choice import resolved_quant
        from trainer_core.sample import (
            comfy_prompt_notes,
            encode_sample_prompts,
            sample_videos,
        )

        cfg = _checked_config(prompts, values)
        boundary = values["boundary"]
        check_pair_fits(lora, experts.model)  # a LoRA for another model: refused before minutes of loading
        host.free_host_models()
        device = host.compute_device()
        comps = experts.components(quantize_on=device)  # with Quantize ARA: the experts training quantized
        progress = host.Progress(cfg.steps * len(cfg.prompts), unique_id)
        # how ComfyUI's native graph renders the same video: Load Wan22 LoRA Pair's strengths included, the experts'
        # quantization named, and the prompt texts its CLIPTextEncode must be given where they differ
        mode = resolved_quant(experts.quant, device).transformer
        recipe = native_recipe(cfg, boundary, loaded_strength=lora.strength if lora is not None else None,
                               quantized={"high": mode, "low": mode})  # fmt: skip
        progress.text("\n".join([recipe, *comfy_prompt_notes(comps.tokenizer, cfg)]))

        def on_step(done: int, total: int) -> None:
            host.check_interrupt()
            progress.update(done, total)

        with placed(device, comps.text_encoder):
            cache = encode_sample_prompts(comps.text_encoder, comps.tokenizer, cfg)
        with (
            lora_attached(comps.high, lora, "high", cfg.lora_strength_high),
            lora_attached(comps.low, lora, "low", cfg.lora_strength_low),
        ):
            with placed(device, comps.high, comps.low, comps.vae):
                videos = sample_videos(comps.high, comps.low, comps.vae, cache, cfg, boundary, on_step=on_step)
        return (torch.cat(videos),)


class ConfigureTrainingPreviews:
    """Preview videos Train LoRA renders every N steps (saved in the run folder's samples/, shown as progress)."""

    #: The widgets -> the settings they set.
    FIELDS = {
        **RENDER_FIELDS,
        "sample_every": "sample.sample_every",
        "sample_at_start": "sample.sample_at_start",
        "fps": "sample.fps",
        "format": "sample.format",
    }
    # A previews node exists to preview: every 250 steps rather than the job file's 'none'; a training seed never
    # randomizes after a queue (that would retrain).
    UI = {**_RENDER_UI, "sample_every": {"default": 250}, "seed": {"control_after_generate": False}}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**_prompts_input(), **inputs(cls.FIELDS, cls.UI)}}

    RETURN_TYPES = (SAMPLE,)
    RETURN_NAMES = ("previews",)
    OUTPUT_TOOLTIPS = ("Preview settings for Train LoRA's previews input.",)
    FUNCTION = "configure"
    CATEGORY = CATEGORY
    DESCRIPTION = "Sample videos during training with the LoRAs so far, to watch a run and pick a checkpoint."

    def configure(self, prompts: str, **values: Any) -> tuple[SampleConfig]:
        """Validate the settings into a :class:`SampleConfig` (at least one prompt)."""
        cfg = _sample_config(ConfigureTrainingPreviews, prompts, values, "Configure Training Previews")
        if not cfg.prompts:
            raise ConfigError("Configure Training Previews: prompts is empty - write at least one prompt per line")
        return (cfg,)
