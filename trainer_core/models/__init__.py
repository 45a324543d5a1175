"""Model loading (tiny preset, diffusers folders, Hugging Face repos, ComfyUI single files), prompt and video coding."""

from .loading import WanComponents, check_model_files, describe_base_model, load_components, load_expert
from .text import ComfyPrompt, comfy_prompt, encode_prompts
from .vae import decode_latents, encode_video

__all__ = [
    "ComfyPrompt",
    "WanComponents",
    "check_model_files",
    "comfy_prompt",
    "decode_latents",
    "describe_base_model",
    "encode_prompts",
    "encode_video",
    "load_components",
    "load_expert",
]
