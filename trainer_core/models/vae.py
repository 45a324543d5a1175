"""Video <-> normalized Wan latents with the Wan 2.1 VAE (AutoencoderKLWan)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan

from ..errors import DatasetError


def _latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, pixels: torch.Tensor) -> torch.Tensor:
    """Normalized latents ``z = (mode - latents_mean) / latents_std`` (float32) of a video batch.

    ``pixels``: ``[B, 3, F, H, W]`` in [-1, 1] with F = 4n+1 and H, W multiples of 8; the result is
    ``[B, 16, (F-1)/4+1, H/8, W/8]``. The posterior mode is used, so encoding is deterministic.
    """
    if pixels.ndim != 5 or pixels.shape[1] != 3:
        raise DatasetError(f"video batch must be [B, 3, F, H, W], got {list(pixels.shape)}")
    frames, height, width = pixels.shape[2:]
    if (frames - 1) % 4 or height % 8 or width % 8:
        raise DatasetError(
            f"video of {frames} frames at {height}x{width}: Wan's VAE needs 4n+1 frames (1, 5, ... 33, 81) "
            "and height/width multiples of 8"
        )
    lo, hi = pixels.aminmax()
    if lo < -1.001 or hi > 1.001:
        raise DatasetError(
            f"video pixels must lie in [-1, 1], got {lo.item():.3f}..{hi.item():.3f} (map 0..1 with x*2-1)"
        )
    param = next(vae.parameters())
    mode = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode().float()
    mean, std = _latent_stats(vae, mode)
    return (mode - mean) / std


@torch.no_grad()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (``[B, 3, F, H, W]``, the VAE's dtype) from normalized latents, undoing
    :func:`encode_video`'s normalization the way WanPipeline does before ``vae.decode``."""
    param = next(vae.parameters())
    mean, std = _latent_stats(vae, latents)
    raw = latents.float() * std + mean
    return vae.decode(raw.to(param.device, param.dtype), return_dict=False)[0]
