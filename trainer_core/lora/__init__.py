"""LoRA adapters: attaching them to a Wan transformer (peft) and ComfyUI-native files."""

from .io import load_lora_state, lora_file_name, lora_state_dict_comfy, save_lora
from .wiring import attach_lora, lora_parameters

__all__ = ["attach_lora", "lora_parameters", "lora_file_name", "lora_state_dict_comfy", "load_lora_state", "save_lora"]
