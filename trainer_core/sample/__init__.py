"""Preview sampling: both experts with their LoRAs, WanPipeline-exact, and video files with metadata."""

from .lora_files import attach_lora_file
from .sampler import PromptCache, encode_sample_prompts, make_scheduler, sample_metadata, sample_videos
from .video_io import read_video_metadata, write_video

__all__ = [
    "PromptCache",
    "attach_lora_file",
    "encode_sample_prompts",
    "make_scheduler",
    "read_video_metadata",
    "sample_metadata",
    "sample_videos",
    "write_video",
]
