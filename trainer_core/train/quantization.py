"""Quantizing the trained experts before LoRA is attached: identities for the adapter cache, calibration inputs; and
the same quantization outside training (``python -m trainer_core sample``), with the adapters training cached."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import WanTransformer3DModel

from ..config import JobConfig, QuantConfig
from ..data import VideoDataset
from ..flow import noisy_latents
from ..models.loading import SUBFOLDERS
from ..quant import adapters_cached, model_file_identity, quantize_expert
from ..schedule import sample_sigmas

log = logging.getLogger(__name__)

LatentFn = Callable[[list[int], int], torch.Tensor]


def expert_identity(cfg: JobConfig, expert: str) -> tuple[str, Path]:
    """(cache key, cache folder) of an expert's weights.

    Computed adapters are cached inside a diffusers folder; for ComfyUI single files and repo ids they go to
    ``<output_dir>/ara_cache`` (beside the file they would show up in ComfyUI's diffusion-model lists).
    """
    file = cfg.model.high_noise if expert == "high" else cfg.model.low_noise
    fallback = Path(cfg.save.output_dir) / "ara_cache"
    if file:
        return f"{model_file_identity(file)}|{expert}", fallback
    source = cfg.model.source or ""
    folder = Path(source).expanduser()
    if folder.is_dir():
        sub = folder / SUBFOLDERS[expert]
        return f"{model_file_identity(sub)}|{expert}", folder
    if source == "tiny":
        return f"tiny|{expert}", fallback
    return f"{source}@{cfg.model.revision or 'main'}|{expert}", fallback


def calibration_batches(
    cfg: JobConfig,
    expert: str,
    dataset: VideoDataset,
    latents: LatentFn,
    condition: Callable[[Sequence[str]], torch.Tensor],
    dtype: torch.dtype,
) -> Callable[[], list[dict[str, Any]]]:
    """A callable giving ``ara_calibration_samples`` forward-call kwargs built like training inputs for ``expert``.

    Samples come from the first batches of epoch 0 (batch size 1) with a fixed generator, so they are the user's own
    clips at the expert's own noise levels. Built only when the adapter cache misses.
    """

    def make() -> list[dict[str, Any]]:
        gen = torch.Generator().manual_seed(cfg.train.seed + 7919)
        batches = dataset.batches(0, 1)[: cfg.quant.ara_calibration_samples]
        out = []
        for ids in batches:
            x0 = latents(ids, 0).float().cpu()
            sig = sample_sigmas(
                1, expert=expert, boundary=cfg.multistage.boundary, timestep_type=cfg.train.timestep_type,
                timestep_bias=cfg.train.timestep_bias, shift=cfg.train.timestep_shift, generator=gen,
            )  # fmt: skip
            noise = torch.randn(x0.shape, generator=gen)
            text = condition([dataset.plan(i, 0).caption for i in ids]).cpu()
            out.append(
                dict(
                    hidden_states=noisy_latents(x0, noise, sig).to(dtype),
                    timestep=sig * 1000.0,
                    encoder_hidden_states=text.to(dtype),
                    return_dict=False,
                )
            )
        return out

    return make


def quantize_experts(
    cfg: JobConfig,
    models: dict[str, WanTransformer3DModel],
    dataset: VideoDataset,
    latents: LatentFn,
    condition: Callable[[Sequence[str]], torch.Tensor],
    device: torch.device,
) -> None:
    """Quantize each given expert in place per ``cfg.quant`` (before its LoRA is attached) and log the report."""
    if cfg.quant.transformer == "none":
        return
    for name, model in models.items():
        key, folder = expert_identity(cfg, name)
        calibration = calibration_batches(cfg, name, dataset, latents, condition, model.dtype)
        report = quantize_expert(
            model, cfg.quant, expert=name, cache_key=key, device=device, calibration=calibration, cache_dir=folder
        )
        log.info("%s", report.summary())


def render_quant(cfg: JobConfig, expert: str) -> QuantConfig:
    """``cfg.quant`` (``auto`` already resolved) for quantizing ``expert`` outside training, decided before anything
    loads.

    4-bit adapters computed by calibrating on the training clips come from the cache training wrote, so a render
    equals the run's previews. With no such cache (the job never trained here) there are no clips to calibrate on:
    they are computed from the weights alone, as the Preview Sample node does, and a warning says the render then
    differs slightly from what training's previews show."""
    quant = cfg.quant
    if quant.transformer != "4bit_ara" or quant.ara_source != "compute" or quant.ara_calibration_samples == 0:
        return quant
    key, folder = expert_identity(cfg, expert)
    if adapters_cached(quant, key, folder):
        return quant
    log.warning("warning: no accuracy recovery adapters for the %s-noise expert calibrated on the training clips in "
                "%s (training this job writes them there): computed from the weights alone, so the render differs "
                "slightly from the previews training would show", expert, quant.ara_cache_dir or folder)  # fmt: skip
    return quant.model_copy(update={"ara_calibration_samples": 0})


def quantize_for_render(
    cfg: JobConfig, expert: str, model: WanTransformer3DModel, quant: QuantConfig, device: torch.device
) -> None:
    """Quantize ``expert`` in place as training quantizes it (``quant`` from :func:`render_quant`; its adapters from
    the same cache) and log the report; it ends on ``device``. ``quant.transformer: none`` changes nothing."""
    if quant.transformer == "none":
        return
    key, folder = expert_identity(cfg, expert)
    report = quantize_expert(model, quant, expert=expert, cache_key=key, device=device, cache_dir=folder)
    log.info("%s", report.summary())
