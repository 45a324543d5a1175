"""Preview sampling: both experts with their LoRAs, as ComfyUI's native Wan 2.2 graph renders them (and
WanPipeline-exact where the settings coincide), and video files with metadata.

The schedule formulas (:mod:`.native`) and video files (:mod:`.video_io`) import with torch alone; the sampler and
the LoRA-file attachment import diffusers, peft and transformers, so their names load on first use: ComfyUI imports
the pack, and with it this package's light half (scheduler names for the node widgets), at every server start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .native import SCHEDULERS, comfy_noise, comfy_sigmas, native_recipe, split_step, switch_step
from .video_io import read_video_metadata, write_video

#: Name -> submodule of the names that load on first use.
_ON_FIRST_USE = {
    "attach_lora_file": ".lora_files",
    "PromptCache": ".sampler",
    "comfy_prompt_notes": ".sampler",
    "encode_sample_prompts": ".sampler",
    "make_scheduler": ".sampler",
    "sample_latents": ".sampler",
    "sample_metadata": ".sampler",
    "sample_videos": ".sampler",
}

if TYPE_CHECKING:
    from .lora_files import attach_lora_file
    from .sampler import (
        PromptCache,
        comfy_prompt_notes,
        encode_sample_prompts,
        make_scheduler,
        sample_latents,
        sample_metadata,
        sample_videos,
    )


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (PEP 562) and keep the name here."""
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_ON_FIRST_USE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_ON_FIRST_USE})


__all__ = [
    "SCHEDULERS",
    "PromptCache",
    "attach_lora_file",
    "comfy_noise",
    "comfy_prompt_notes",
    "comfy_sigmas",
    "encode_sample_prompts",
    "make_scheduler",
    "native_recipe",
    "read_video_metadata",
    "sample_latents",
    "sample_metadata",
    "sample_videos",
    "split_step",
    "switch_step",
    "write_video",
]
