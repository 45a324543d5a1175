"""LoRA adapters: attaching them to a Wan transformer (peft), ComfyUI-native files, reading the LoRA files of other
trainers (:mod:`.formats`), checking they fit a model (:mod:`.fit`) and merging what no adapter holds
(:mod:`.patches`)."""

from .fit import wan_weight_shapes
from .formats import adapter_config, check_lora_fits, inspect_lora_file, pair_warnings, read_lora_file
from .init_file import check_lora_init, init_expert_lora, init_warnings
from .io import (
    load_lora_state,
    load_lora_tensors,
    lora_file_name,
    lora_state_dict_comfy,
    save_lora,
    save_lora_tensors,
)
from .patches import merged_patches, split_patches
from .wiring import attach_lora, detach_lora, lora_parameters

__all__ = [
    "adapter_config",
    "attach_lora",
    "check_lora_fits",
    "check_lora_init",
    "detach_lora",
    "init_expert_lora",
    "init_warnings",
    "inspect_lora_file",
    "load_lora_state",
    "load_lora_tensors",
    "lora_file_name",
    "lora_parameters",
    "lora_state_dict_comfy",
    "merged_patches",
    "pair_warnings",
    "read_lora_file",
    "save_lora",
    "save_lora_tensors",
    "split_patches",
    "wan_weight_shapes",
]
