"""Preview sampling: both experts with their LoRAs, as ComfyUI's native Wan 2.2 graph renders them (and
WanPipeline-exact where the settings coincide), and video files with metadata."""

from .lora_files import attach_lora_file
from .native import SCHEDULERS, comfy_noise, comfy_sigmas, native_recipe, split_step, switch_step
from .sampler import (
    PromptCache,
    encode_sample_prompts,
    make_scheduler,
    sample_latents,
    sample_metadata,
    sample_videos,
)
from .video_io import read_video_metadata, write_video

__all__ = [
    "SCHEDULERS",
    "PromptCache",
    "attach_lora_file",
    "comfy_noise",
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
