"""Render preview videos with both Wan 2.2 experts (and their LoRAs) exactly as ComfyUI's native Wan 2.2 graph does.

Prompts are encoded once (:func:`encode_sample_prompts`) into a small :class:`PromptCache`, so the text encoder can be
freed before any video is rendered. :func:`sample_latents` then denoises. With ``sampler: euler`` it runs ComfyUI's
``ModelSamplingSD3`` + two ``KSamplerAdvanced`` (see :mod:`.native`): ComfyUI's noise for the seed, ComfyUI's sigma
schedule, the model called at the float timestep 1000·σ, the high-noise expert with ``guidance_high`` on steps
``0 → split`` and the low-noise one with ``guidance_low`` on ``split → steps``, classifier-free guidance against the
negative prompt; :func:`native_recipe` states the native settings. Scheduler ``normal`` is also step for step
diffusers' WanPipeline with ``FlowMatchEulerDiscreteScheduler``. ``diffusers_unipc`` steps diffusers' UniPC scheduler
as WanPipeline does (no native equivalent). :func:`sample_videos` decodes the latents.

Sampling leaves training undisturbed: no autograd, the global RNG untouched (the noise comes from a private CPU
generator), every module's train/eval mode and every LoRA scale restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from peft.helpers import rescale_adapter_scale
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from ..config import SampleConfig
from ..errors import ConfigError
from ..models import ComfyPrompt, comfy_prompt, decode_latents, encode_prompts
from ..schedule import expert_for_timestep
from .native import comfy_noise, comfy_sigmas, model_timesteps, native_recipe, switch_step

#: Called after every denoising step with (steps done, total steps over all prompts); may raise to cancel.
StepCallback = Callable[[int, int], None]

#: A guided velocity prediction: (expert name, latents, timestep) -> velocity.
Predictor = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]

#: Latent frames and pixels per latent cell of the Wan 2.1 VAE both experts use (ComfyUI's EmptyHunyuanLatentVideo).
_TEMPORAL, _SPATIAL = 4, 8

#: SampleConfig fields that shape the pixels (written into each video's metadata as JSON).
_RENDER_SETTINGS = (
    "width",
    "height",
    "num_frames",
    "steps",
    "shift",
    "sampler",
    "scheduler",
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
    comfy: list[ComfyPrompt]  #: what ComfyUI's CLIPTextEncode must be given for each prompt
    comfy_negative: ComfyPrompt


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
    comfy = [comfy_prompt(tokenizer, p) for p in cfg.prompts]
    return PromptCache(list(cfg.prompts), torch.cat(embeddings), cfg.negative_prompt, negative, comfy,
                       comfy_prompt(tokenizer, cfg.negative_prompt))  # fmt: skip


def _comfy_note(label: str, written: str, comfy: ComfyPrompt) -> str | None:
    """A line on what to type into CLIPTextEncode for ``written``, or ``None`` when it is the text as written (up to
    whitespace, which neither tokenizer keeps)."""
    if comfy.text == " ".join(written.split()) and comfy.tokens == comfy.kept and not comfy.caveat:
        return None
    line = f"{label} in ComfyUI's CLIPTextEncode: {comfy.text}"
    if comfy.tokens > comfy.kept:
        line += (f" (its first {comfy.kept} of {comfy.tokens} tokens: the render, as WanPipeline, encodes no more, "
                 "ComfyUI would encode them all)")  # fmt: skip
    return line + (f" - not exact: {comfy.caveat}" if comfy.caveat else "")


def comfy_prompt_notes(tokenizer: PreTrainedTokenizerBase, cfg: SampleConfig) -> list[str]:
    """One line for each of ``cfg``'s prompts (and the negative prompt) that must be typed into ComfyUI's
    CLIPTextEncode otherwise than written to render the same (:func:`~trainer_core.models.text.comfy_prompt`): weight
    brackets escaped, HTML entities resolved, a prompt over 512 tokens cut. Empty when every prompt reads the same.
    Needs the tokenizer only."""
    labelled = [(f"prompt {i}", p) for i, p in enumerate(cfg.prompts)] + [("negative prompt", cfg.negative_prompt)]
    notes = (_comfy_note(label, p, comfy_prompt(tokenizer, p)) for label, p in labelled)
    return [n for n in notes if n is not None]


def make_scheduler(cfg: SampleConfig) -> UniPCMultistepScheduler:
    """A fresh diffusers UniPC scheduler for ``sampler: diffusers_unipc`` with ``cfg.shift`` (schedulers are
    stateful: one per video), with the settings of Wan-AI's diffusers scheduler config (flow prediction, flow sigmas,
    order 2, bh2). The ``euler`` sampler needs none: it steps ComfyUI's schedule itself."""
    if cfg.sampler != "diffusers_unipc":
        raise ConfigError(f"make_scheduler is for sampler diffusers_unipc; {cfg.sampler!r} steps ComfyUI's schedule")
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=cfg.shift)


def sample_metadata(
    cfg: SampleConfig, index: int, boundary: float, prompts: PromptCache, quantized: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Container metadata for the video of prompt ``index``: prompt, negative prompt, seed, render settings, the
    native ComfyUI recipe that renders the same video (:func:`native_recipe`; ``quantized`` as it takes it) and the
    texts to type into its CLIPTextEncode nodes (from ``prompts``, the cache the video was rendered from)."""
    settings = {k: getattr(cfg, k) for k in _RENDER_SETTINGS} | {"boundary": boundary}
    meta = {
        "prompt": cfg.prompts[index],
        "negative_prompt": cfg.negative_prompt,
        "seed": str(cfg.seed_for(index)),
        "settings": json.dumps(settings, ensure_ascii=False),
        "native_recipe": native_recipe(cfg, boundary, index, quantized=quantized),
        "comfyui_prompt": prompts.comfy[index].text,
        "comfyui_negative_prompt": prompts.comfy_negative.text,
    }
    notes = [_comfy_note(label, written, comfy) for label, written, comfy in
             (("prompt", cfg.prompts[index], prompts.comfy[index]),
              ("negative prompt", cfg.negative_prompt, prompts.comfy_negative))]  # fmt: skip
    if any(notes):
        meta["comfyui_prompt_note"] = "; ".join(n for n in notes if n)
    return meta


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextlib.contextmanager
def eval_modes(*models: nn.Module) -> Iterator[None]:
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
def _render_state(high: nn.Module, low: nn.Module, cfg: SampleConfig) -> Iterator[None]:
    """Both experts in eval mode with their LoRAs at the configured strengths, all restored on exit."""
    with eval_modes(high, low), _lora_strength(high, cfg.lora_strength_high):
        with _lora_strength(low, cfg.lora_strength_low):
            yield


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


def _guided(
    experts: dict[str, WanTransformer3DModel], guidance: dict[str, float], cond: torch.Tensor, uncond: torch.Tensor
) -> Predictor:
    """The guided velocity of the named expert, as WanPipeline and ComfyUI compute it (separate cond / uncond
    passes; ComfyUI's CFG on x0 = x − σ·v is the same mix of the velocities)."""

    def predict(name: str, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model, scale = experts[name], guidance[name]
        device, dtype = _device(model), model.dtype
        x = latents.to(device, dtype)
        timestep = t.to(device).expand(x.shape[0])

        def run(text: torch.Tensor) -> torch.Tensor:
            out = model(hidden_states=x, timestep=timestep, encoder_hidden_states=text.to(device, dtype),
                        return_dict=False)  # fmt: skip
            return out[0].float()  # ComfyUI guides and steps in float32 whatever the experts' dtype

        pred = run(cond)
        if scale != 1.0:  # scale 1 is the conditional prediction alone: skip the negative pass (ComfyUI does too)
            neg = run(uncond)
            pred = neg + scale * (pred - neg)
        return pred.to(latents.device)

    return predict


def _denoise_euler(
    predict: Predictor, latents: torch.Tensor, cfg: SampleConfig, boundary: float, tick: Callable[[], None]
) -> torch.Tensor:
    """ComfyUI's euler on its ``cfg.scheduler`` schedule, the experts split as two KSamplerAdvanced split them."""
    sigmas64 = comfy_sigmas(cfg.scheduler, cfg.steps, cfg.shift)
    split = switch_step(sigmas64, boundary)
    timesteps = model_timesteps(sigmas64)
    sigmas = sigmas64.to(torch.float32)  # ComfyUI holds its schedule, and computes 1000·σ, in float32
    for i in range(cfg.steps):
        velocity = predict("high" if i < split else "low", latents, timesteps[i])
        # x + (σ_next − σ)·v: ComfyUI's step with denoised = x − σ·v, written without the round trip.
        latents = latents + (sigmas[i + 1] - sigmas[i]) * velocity
        tick()
    return latents


def _denoise_diffusers_unipc(
    predict: Predictor, latents: torch.Tensor, cfg: SampleConfig, boundary: float, tick: Callable[[], None]
) -> torch.Tensor:
    """diffusers' UniPC as WanPipeline steps it (integer timesteps, one scheduler across the expert switch)."""
    scheduler = make_scheduler(cfg)
    scheduler.set_timesteps(cfg.steps, device=latents.device)
    scheduler.set_begin_index(0)
    for t in scheduler.timesteps:
        velocity = predict(expert_for_timestep(t, boundary), latents, t)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        tick()
    return latents


def _latent_shape(model: WanTransformer3DModel, cfg: SampleConfig) -> tuple[int, ...]:
    frames = (cfg.num_frames - 1) // _TEMPORAL + 1
    return (1, model.config.in_channels, frames, cfg.height // _SPATIAL, cfg.width // _SPATIAL)


@torch.no_grad()
def sample_latents(
    high: WanTransformer3DModel | None,
    low: WanTransformer3DModel | None,
    prompts: PromptCache,
    cfg: SampleConfig,
    boundary: float,
    *,
    on_step: StepCallback | None = None,
) -> list[torch.Tensor]:
    """Denoise one latent per prompt of ``prompts`` (which must be ``cfg``'s prompts) with both experts.

    Each model runs where it lives (move the experts to the GPU first); the latents live on the high-noise expert's
    device. LoRA adapters attached to an expert (peft, e.g. after :func:`attach_lora` or :func:`attach_lora_file`)
    are applied at ``cfg.lora_strength_high`` / ``cfg.lora_strength_low`` (0 = base model, 1 = as trained); plain
    experts render the base model. ``boundary`` is ``JobConfig.multistage.boundary``.

    Returns ``[1, 16, T, H/8, W/8]`` float32 latents in the experts' normalized space (ComfyUI's sampling space:
    its KSamplerAdvanced outputs them as ``latents·std + mean`` with the VAE's ``latents_mean`` / ``latents_std``).
    """
    _check_inputs(high, low, prompts, cfg, boundary)
    experts = {"high": high, "low": low}
    guidance = {"high": cfg.guidance_high, "low": cfg.guidance_low}
    denoise = _denoise_diffusers_unipc if cfg.sampler == "diffusers_unipc" else _denoise_euler
    total, done = cfg.steps * len(prompts.prompts), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, total)

    out = []
    with _render_state(high, low, cfg):
        for i in range(len(prompts.prompts)):
            noise = comfy_noise(_latent_shape(high, cfg), cfg.seed_for(i)).to(_device(high))
            predict = _guided(experts, guidance, prompts.embeddings[i : i + 1], prompts.negative_embedding)
            out.append(denoise(predict, noise, cfg, boundary, tick))
    return out


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
    """Render one video per prompt: :func:`sample_latents`, then the VAE (move it to the GPU first).

    Returns a list of ``[F, H, W, 3]`` float32 CPU tensors in 0..1 (ComfyUI's IMAGE layout), one per prompt.
    """
    try:
        latents = sample_latents(high, low, prompts, cfg, boundary, on_step=on_step)
        with eval_modes(vae), _vae_tiling(vae, cfg.vae_tiling):
            return [_frames(decode_latents(vae, x)) for x in latents]
    finally:
        if any(m is not None and _device(m).type == "cuda" for m in (high, low, vae)):
            torch.cuda.empty_cache()


def _frames(pixels: torch.Tensor) -> torch.Tensor:
    """``[1, 3, F, H, W]`` pixels in [-1, 1] -> ``[F, H, W, 3]`` float32 CPU frames in 0..1."""
    return (pixels[0].float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu()
