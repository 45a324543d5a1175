"""Render preview videos with both Wan 2.2 experts (and their LoRAs), step for step as diffusers' WanPipeline does.

Prompts are encoded once (:func:`encode_sample_prompts`) into a small :class:`PromptCache`, so the text encoder can be
freed before any video is rendered. :func:`sample_videos` then denoises and decodes: steps with ``t ≥ boundary·1000``
run on the high-noise expert with ``guidance_high``, the rest on the low-noise expert with ``guidance_low``, with
classifier-free guidance against the negative prompt. Sampling leaves training undisturbed: no autograd, the global
RNG untouched (the initial noise comes from a private CPU generator, as in WanPipeline with a CPU generator), every
module's train/eval mode and every LoRA scale restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanTransformer3DModel
from peft.helpers import rescale_adapter_scale
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from ..config import SampleConfig
from ..errors import ConfigError
from ..models import decode_latents, encode_prompts
from ..schedule import expert_for_timestep

#: Called after every denoising step with (steps done, total steps over all prompts); may raise to cancel.
StepCallback = Callable[[int, int], None]

#: SampleConfig fields that shape the pixels (written into each video's metadata as JSON).
_RENDER_SETTINGS = (
    "width",
    "height",
    "num_frames",
    "steps",
    "shift",
    "sampler",
    "guidance_high",
    "guidance_low",
    "lora_strength_high",
    "lora_strength_low",
    "fps",
    "walk_seeds",
)


@dataclass
class PromptCache:
    """Text embeddings of the sample prompts and the negative prompt, on the CPU.

    ``embeddings`` is ``[len(prompts), 512, text_dim]``, ``negative_embedding`` ``[1, 512, text_dim]``, both in the
    text encoder's dtype; they are cast to each expert's dtype when used.
    """

    prompts: list[str]
    embeddings: torch.Tensor
    negative_prompt: str
    negative_embedding: torch.Tensor


def _require_prompts(cfg: SampleConfig) -> None:
    if not cfg.prompts:
        raise ConfigError("sample.prompts is empty: add at least one prompt to render")


def encode_sample_prompts(
    text_encoder: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, cfg: SampleConfig
) -> PromptCache:
    """Encode ``cfg.prompts`` and ``cfg.negative_prompt`` once, where the encoder lives, and keep the results on the
    CPU (call it before freeing the encoder). Each prompt is encoded on its own, as WanPipeline encodes one prompt."""
    _require_prompts(cfg)
    embeddings = [encode_prompts(text_encoder, tokenizer, [p], device="cpu") for p in cfg.prompts]
    negative = encode_prompts(text_encoder, tokenizer, [cfg.negative_prompt], device="cpu")
    return PromptCache(list(cfg.prompts), torch.cat(embeddings), cfg.negative_prompt, negative)


def make_scheduler(cfg: SampleConfig) -> FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler:
    """A fresh flow-matching scheduler for ``cfg.sampler`` with ``cfg.shift`` (schedulers are stateful: one per video).

    UniPC uses the settings of Wan-AI's diffusers scheduler config (flow prediction, flow sigmas, order 2, bh2).
    """
    if cfg.sampler == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=cfg.shift)
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=cfg.shift)


def sample_metadata(cfg: SampleConfig, index: int, boundary: float) -> dict[str, str]:
    """Container metadata for the video of prompt ``index``: prompt, negative prompt, seed and render settings."""
    settings = {k: getattr(cfg, k) for k in _RENDER_SETTINGS} | {"boundary": boundary}
    return {
        "prompt": cfg.prompts[index],
        "negative_prompt": cfg.negative_prompt,
        "seed": str(cfg.seed_for(index)),
        "settings": json.dumps(settings, ensure_ascii=False),
    }


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextlib.contextmanager
def _eval_modes(*models: nn.Module) -> Iterator[None]:
    """Put every module in eval mode (no dropout: deterministic, no RNG draws) and restore each one's own mode."""
    modes = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _lora_strength(model: nn.Module, strength: float) -> contextlib.AbstractContextManager:
    """Scale every LoRA on ``model`` by ``strength`` (peft restores the exact scales on exit); no-op without LoRA."""
    if strength == 1.0 or not any(isinstance(m, LoraLayer) for m in model.modules()):
        return contextlib.nullcontext()
    return rescale_adapter_scale(model, float(strength))


@contextlib.contextmanager
def _vae_tiling(vae: AutoencoderKLWan, on: bool) -> Iterator[None]:
    was = vae.use_tiling
    if on:
        vae.enable_tiling()
    try:
        yield
    finally:
        vae.use_tiling = was


def _check_inputs(
    high: WanTransformer3DModel | None,
    low: WanTransformer3DModel | None,
    prompts: PromptCache,
    cfg: SampleConfig,
    boundary: float,
) -> None:
    _require_prompts(cfg)
    if high is None or low is None:
        missing = " and ".join(n for n, m in (("high-noise", high), ("low-noise", low)) if m is None)
        raise ConfigError(
            f"sampling needs both experts; the {missing} expert is not loaded - load it (its base weights are "
            "enough when it was not trained)"
        )
    if not 0.0 < boundary < 1.0:
        raise ConfigError(
            f"multistage.boundary must lie strictly between 0 and 1 (Wan 2.2 T2V uses 0.875), got {boundary}"
        )
    if prompts.prompts != list(cfg.prompts) or prompts.negative_prompt != cfg.negative_prompt:
        raise ConfigError(
            "the prompt cache was encoded for other sample prompts or another negative prompt than "
            "sample.prompts / sample.negative_prompt - encode them again with encode_sample_prompts"
        )
    text_dim = prompts.embeddings.shape[-1]
    for name, model in (("high-noise", high), ("low-noise", low)):
        if model.config.text_dim != text_dim:
            raise ConfigError(
                f"the prompt embeddings have {text_dim} channels but the {name} expert expects "
                f"{model.config.text_dim}: encode the prompts with this model's text encoder"
            )


def _predict(
    model: WanTransformer3DModel,
    latents: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """One guided velocity prediction, as WanPipeline computes it (separate cond / uncond passes)."""
    device, dtype = _device(model), model.dtype
    x = latents.to(device, dtype)
    timestep = t.to(device).expand(x.shape[0])

    def run(text: torch.Tensor) -> torch.Tensor:
        out = model(hidden_states=x, timestep=timestep, encoder_hidden_states=text.to(device, dtype), return_dict=False)
        return out[0]

    pred = run(cond)
    if guidance != 1.0:  # scale 1 is the conditional prediction alone: skip the negative pass
        neg = run(uncond)
        pred = neg + guidance * (pred - neg)
    return pred.to(latents.device)


@torch.no_grad()
def sample_videos(
    high: WanTransformer3DModel | None,
    low: WanTransformer3DModel | None,
    vae: AutoencoderKLWan,
    prompts: PromptCache,
    cfg: SampleConfig,
    boundary: float,
    *,
    on_step: StepCallback | None = None,
) -> list[torch.Tensor]:
    """Render one video per prompt of ``prompts`` (which must be ``cfg``'s prompts) with both experts.

    Each model runs where it lives (move the experts and the VAE to the GPU first); the latents start on the
    high-noise expert's device. LoRA adapters attached to an expert (peft, e.g. after :func:`attach_lora` or
    :func:`attach_lora_file`) are applied at ``cfg.lora_strength_high`` / ``cfg.lora_strength_low`` (0 = base model,
    1 = as trained); plain experts render the base model. ``boundary`` is ``JobConfig.multistage.boundary``.

    Returns a list of ``[F, H, W, 3]`` float32 CPU tensors in 0..1 (ComfyUI's IMAGE layout), one per prompt.
    """
    _check_inputs(high, low, prompts, cfg, boundary)
    temporal, spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    latent_frames = (cfg.num_frames - 1) // temporal + 1
    shape = (1, high.config.in_channels, latent_frames, cfg.height // spatial, cfg.width // spatial)
    guidance = {"high": cfg.guidance_high, "low": cfg.guidance_low}
    experts = {"high": high, "low": low}
    total, done = cfg.steps * len(prompts.prompts), 0
    videos = []
    try:
        with contextlib.ExitStack() as restore:
            restore.enter_context(_eval_modes(high, low, vae))
            restore.enter_context(_lora_strength(high, cfg.lora_strength_high))
            restore.enter_context(_lora_strength(low, cfg.lora_strength_low))
            restore.enter_context(_vae_tiling(vae, cfg.vae_tiling))
            for i in range(len(prompts.prompts)):
                # Noise from a private CPU generator: the same numbers on every device, the global RNG untouched.
                generator = torch.Generator("cpu").manual_seed(cfg.seed_for(i))
                latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(_device(high))
                scheduler = make_scheduler(cfg)
                scheduler.set_timesteps(cfg.steps, device=latents.device)
                scheduler.set_begin_index(0)
                cond, uncond = prompts.embeddings[i : i + 1], prompts.negative_embedding
                for t in scheduler.timesteps:
                    name = expert_for_timestep(float(t), boundary)
                    pred = _predict(experts[name], latents, t, cond, uncond, guidance[name])
                    latents = scheduler.step(pred, t, latents, return_dict=False)[0]
                    done += 1
                    if on_step is not None:
                        on_step(done, total)
                pixels = decode_latents(vae, latents)
                videos.append((pixels[0].float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu())
                del latents, pred, pixels, scheduler
    finally:
        if any(_device(m).type == "cuda" for m in (high, low, vae)):
            torch.cuda.empty_cache()
    return videos
