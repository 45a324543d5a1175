"""ComfyUI's native Wan 2.2 sampling, as formulas: the sigma schedules, the expert split step and the recipe text.

The preview sampler's ``euler`` path runs exactly the schedule ComfyUI's native graph runs — ``ModelSamplingSD3
(shift)`` → ``KSamplerAdvanced`` (euler, scheduler ``simple`` or ``normal``), the high-noise expert on steps
``0 → split``, the low-noise one on ``split → steps`` — so a preview can be rendered again in ComfyUI from the
recipe :func:`native_recipe` writes. Everything here is plain math on floats (float64); nothing imports ComfyUI.

ComfyUI's flow model sampling (``ModelSamplingDiscreteFlow``, shift ``s``), in our words:

* the shifted noise level of a time ``u ∈ [0, 1]`` is ``σ(u) = s·u / (1 + (s − 1)·u)``;
* the model keeps a table of 1000 levels ``σ((i + 1)/1000)``, ``i = 0 … 999`` (σ_min first, σ_max = 1 last);
* the model is called with the timestep ``1000·σ`` (a float, not rounded);
* ``simple``: step ``k`` takes the table entry ``999 − ⌊k·1000/steps⌋``; ``normal``: ``steps`` timesteps evenly
  spaced from ``1000·σ_max`` to ``1000·σ_min``, each mapped through ``σ(t/1000)`` again; both end with σ = 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..config import SampleConfig
from ..schedule.routing import high_noise_mask

#: ComfyUI scheduler names the euler sampler supports (KSamplerAdvanced's ``scheduler`` widget).
SCHEDULERS: tuple[str, ...] = ("normal", "simple")
#: ComfyUI's flow sampling keeps this many discrete noise levels (``ModelSamplingDiscreteFlow``'s table).
_TABLE_SIZE = 1000
#: ComfyUI's FLOAT widgets for cfg, shift and LoRA strength step by 0.01: finer values do not survive the UI.
_WIDGET_DECIMALS = 2


def shift_sigma(u: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The shifted noise level ``s·u / (1 + (s − 1)·u)`` of time ``u`` (ComfyUI's ``time_snr_shift``)."""
    if shift == 1.0:  # ComfyUI returns u unchanged here (no rounding through the formula)
        return u
    return shift * u / (1 + (shift - 1) * u)


def _sigma_table(shift: float) -> torch.Tensor:
    """The 1000 noise levels of ComfyUI's flow model sampling, lowest first (float64)."""
    u = torch.arange(1, _TABLE_SIZE + 1, dtype=torch.float64) / _TABLE_SIZE
    return shift_sigma(u, shift)


def _simple(steps: int, shift: float) -> torch.Tensor:
    table = _sigma_table(shift)
    stride = _TABLE_SIZE / steps  # a Python float, so the index rounding matches ComfyUI's
    picked = [float(table[-(1 + int(k * stride))]) for k in range(steps)]
    return torch.tensor([*picked, 0.0], dtype=torch.float64)


def _normal(steps: int, shift: float) -> torch.Tensor:
    table = _sigma_table(shift)
    start, end = _TABLE_SIZE * table[-1].item(), _TABLE_SIZE * table[0].item()
    # ComfyUI: when the last level is already ~0 it spends one more grid point instead of appending 0.
    ends_at_zero = math.isclose(float(shift_sigma(end / _TABLE_SIZE, shift)), 0.0, abs_tol=1e-5)
    t = torch.linspace(start, end, steps + 1 if ends_at_zero else steps, dtype=torch.float64)
    sigmas = shift_sigma(t / _TABLE_SIZE, shift)
    return sigmas if ends_at_zero else torch.cat([sigmas, sigmas.new_zeros(1)])


def comfy_sigmas(scheduler: str, steps: int, shift: float) -> torch.Tensor:
    """ComfyUI's sigma schedule (``steps + 1`` float64 values, σ_max = 1 first, 0 last) for ``scheduler``
    after ``ModelSamplingSD3(shift)``."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if steps < 1 or shift <= 0:
        raise ValueError(f"steps must be >= 1 and shift > 0, got steps={steps}, shift={shift}")
    return _simple(steps, shift) if scheduler == "simple" else _normal(steps, shift)


def model_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The timesteps the experts are called with for the steps of ``sigmas``: 1000·σ in float32, as ComfyUI (its
    schedule is float32) and WanPipeline (float32 sigmas times 1000) compute them."""
    return sigmas[:-1].to(torch.float32) * 1000


def switch_step(sigmas: torch.Tensor, boundary: float) -> int:
    """How many leading steps of ``sigmas`` (a schedule ending in its final σ) run on the high-noise expert:
    those whose timestep is ≥ 1000·``boundary`` (Wan's rule), decided as WanPipeline decides it
    (:func:`~trainer_core.schedule.high_noise_mask`). The native graph's high KSamplerAdvanced ends at this step and
    the low one starts there."""
    return int(high_noise_mask(model_timesteps(sigmas), boundary).sum())


def split_step(steps: int, shift: float, scheduler: str, boundary: float) -> int:
    """The expert switch step ComfyUI users must set for ``steps``, ``shift``, ``scheduler`` and ``boundary``."""
    return switch_step(comfy_sigmas(scheduler, steps, shift), boundary)


def comfy_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ComfyUI's initial noise for an empty latent of ``shape`` (``comfy.sample.prepare_noise``): float32 standard
    normal numbers drawn on the CPU by a generator seeded with ``seed``, so every device gets the same numbers (and
    the global RNG is left alone)."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def _num(x: float) -> str:
    """A setting as a person types it into a widget (12.0 -> 12, 3.5 -> 3.5)."""
    return f"{x:g}"


def _widget_safe(*values: float) -> bool:
    """Whether ComfyUI's 0.01-step FLOAT widgets can hold every value exactly as the preview used it."""
    return all(round(v, _WIDGET_DECIMALS) == v for v in values)


def _seed_text(cfg: SampleConfig, index: int | None) -> str:
    if index is not None:
        return f"seed {cfg.seed_for(index)}"
    if cfg.walk_seeds and len(cfg.prompts) > 1:
        return f"seed {cfg.seed} (+i for prompt i)"
    return f"seed {cfg.seed}"


def _applied_strength(cfg: SampleConfig, expert: str, loaded: Mapping[str, float]) -> float:
    """The LoraLoaderModelOnly strength that renders ``expert``'s LoRA as the preview did: the render's strength
    times the one already folded into the pair (Load Wan22 LoRA Pair's), to 12 digits (0.6 · 0.7 reads 0.42)."""
    return float(f"{getattr(cfg, f'lora_strength_{expert}') * loaded.get(expert, 1.0):.12g}")


def _quantized_text(quantized: Mapping[str, str]) -> str:
    """`` · rendered on float8 experts (...)`` for the experts rendered quantized (expert -> mode), else ''."""
    on = {e: m for e, m in quantized.items() if m != "none"}
    if not on:
        return ""
    modes = sorted(set(on.values()))
    what = (f"{modes[0]} experts" if len(on) == 2 and len(modes) == 1
            else " and ".join(f"a {m} {e}-noise expert" for e, m in sorted(on.items())))  # fmt: skip
    return f" · rendered on {what} (native graph: weights as loaded)"


def native_recipe(
    cfg: SampleConfig,
    boundary: float,
    index: int | None = None,
    loaded_strength: Mapping[str, float] | None = None,
    quantized: Mapping[str, str] | None = None,
) -> str:
    """One line saying how ComfyUI's native Wan 2.2 graph renders what the preview rendered, e.g.
    ``ModelSamplingSD3 12 · KSamplerAdvanced euler/normal 40 · high 0→25 cfg 4 · low 25→40 cfg 3 · seed 42 · ...``.

    ``index`` names the prompt (its own seed); without it the seed of prompt 0 and the walking rule are given.
    ``loaded_strength`` (per expert) is the strength already folded into the rendered pair (Load Wan22 LoRA Pair's):
    the LoRA strength stated is the product. ``quantized`` (expert -> ``float8`` / ``4bit_ara``) names experts the
    render ran quantized: the native graph runs the weights as loaded, so the line says so. The ``diffusers_unipc``
    sampler has no native equivalent, and the line says so.
    """
    high, low = (_applied_strength(cfg, e, loaded_strength or {}) for e in ("high", "low"))
    tail = (
        f"{_seed_text(cfg, index)} · EmptyHunyuanLatentVideo {cfg.width}×{cfg.height}×{cfg.num_frames} · "
        f"LoRA strength {_num(high)} / {_num(low)} · boundary {_num(boundary)}{_quantized_text(quantized or {})}"
    )
    if cfg.sampler == "diffusers_unipc":
        return (
            f"diffusers UniPC, not reproducible natively (shift {_num(cfg.shift)}, {cfg.steps} steps, cfg "
            f"{_num(cfg.guidance_high)} / {_num(cfg.guidance_low)}, {tail}) - set sampler euler to preview what "
            "ComfyUI renders"
        )
    split = split_step(cfg.steps, cfg.shift, cfg.scheduler, boundary)
    line = (
        f"ModelSamplingSD3 {_num(cfg.shift)} · KSamplerAdvanced {cfg.sampler}/{cfg.scheduler} {cfg.steps} · "
        f"high 0→{split} cfg {_num(cfg.guidance_high)} · low {split}→{cfg.steps} cfg {_num(cfg.guidance_low)} · {tail}"
    )
    values = (cfg.shift, cfg.guidance_high, cfg.guidance_low, high, low)
    if not _widget_safe(*values):
        line += " · not exact natively: ComfyUI's widgets keep 2 decimals of shift, cfg and LoRA strength"
    return line
