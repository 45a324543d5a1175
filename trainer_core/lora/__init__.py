"""LoRA adapters: attaching them to a Wan transformer (peft) and ComfyUI-native files."""

from .io import load_lora_state, lora_file_name, lora_state_dict_comfy, save_lora, save_lora_tensors
from .wiring import attach_lora, detach_lora, lora_parameters

__all__ = [
    "attach_lora",
    "detach_lora",
    "load_lora_state",
    "lora_file_name",
    "lora_parameters",
    "lora_state_dict_comfy",
    "save_lora",
    "save_lora_tensors",
]
