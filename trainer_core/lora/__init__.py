"""LoRA adapters: attaching them to a Wan transformer (peft), ComfyUI-native files, and reading the LoRA files of
other trainers (:mod:`.formats`)."""

from .formats import adapter_config, inspect_lora_file, read_lora_file
from .init_file import check_lora_init, init_expert_lora
from .io import (
    load_lora_state,
    load_lora_tensors,
    lora_file_name,
    lora_state_dict_comfy,
    save_lora,
    save_lora_tensors,
)
from .wiring import attach_lora, detach_lora, lora_parameters

__all__ = [
    "adapter_config",
    "attach_lora",
    "check_lora_init",
    "detach_lora",
    "init_expert_lora",
    "inspect_lora_file",
    "load_lora_state",
    "load_lora_tensors",
    "lora_file_name",
    "lora_parameters",
    "lora_state_dict_comfy",
    "read_lora_file",
    "save_lora",
    "save_lora_tensors",
]
