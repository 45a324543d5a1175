"""Save Checkpoint (SAVE panel): periodic LoRA pairs and training states, and the final pair in models/loras."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import ValidationError

from trainer_core.config import SaveConfig, format_validation_error
from trainer_core.errors import ConfigError

from . import host
from .bundle import CATEGORY, SAVE


@dataclass(frozen=True)
class SaveSettings:
    """What Train LoRA needs to save: the core's :class:`SaveConfig` (absolute ``output_dir``) and where the
    final pair goes in ComfyUI's loras folder (``lora_name`` empty: the run folder's name; ``copy_to_loras`` off:
    nowhere)."""

    config: SaveConfig
    copy_to_loras: bool
    lora_name: str


class SaveCheckpoint:
    """Saving is done by Train LoRA while it trains; this node only says how (connect it to Train LoRA's save)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "output_dir": ("STRING", {"default": "wan22_lora", "tooltip": (
                    "Folder for run folders (checkpoints, states, losses.csv), relative to ComfyUI's output "
                    "folder or absolute; a job's first run writes into <output_dir>/<job name>, later fresh runs "
                    "of the same name into <job name>_run2, _run3, ...")}),
                "save_every": ("INT", {"default": 250, "min": 0, "max": 100000, "tooltip": (
                    "Save a LoRA pair and resumable state every N steps (250-500); 0 = only at the end")}),
                "keep_last": ("INT", {"default": 4, "min": 0, "max": 1000, "tooltip": (
                    "Checkpoints kept in the run folder, older ones deleted (4-6 is plenty); 0 keeps all")}),
                "dtype": (("bf16", "fp16", "fp32"), {"default": "bf16", "tooltip": (
                    "LoRA file dtype: bf16 (what ComfyUI loads everywhere); fp32 doubles the size")}),
                "save_training_state": ("BOOLEAN", {"default": True, "tooltip": (
                    "Write optimizer/scheduler state beside each checkpoint so a run can resume (and a cancel "
                    "keeps the progress); off saves disk")}),
                "copy_to_loras": ("BOOLEAN", {"default": True, "tooltip": (
                    "Copy the final pair into models/loras so LoraLoaderModelOnly lists it at once")}),
                "lora_name": ("STRING", {"default": "", "tooltip": (
                    "File name in models/loras: <name>_high_noise / _low_noise.safetensors (may contain a "
                    "subfolder, e.g. wan22/my_style); empty = the run folder's name (the job name, or job name_run2 "
                    "for a later run of it). A name given here overwrites its previous copy")}),
            }
        }

    RETURN_TYPES = (SAVE,)
    RETURN_NAMES = ("save",)
    OUTPUT_TOOLTIPS = ("Save settings for Train LoRA.",)
    FUNCTION = "configure"
    CATEGORY = CATEGORY
    DESCRIPTION = "How Train LoRA saves checkpoints during training and where the final LoRA pair goes."

    def configure(
        self,
        output_dir: str,
        save_every: int,
        keep_last: int,
        dtype: str,
        save_training_state: bool,
        copy_to_loras: bool,
        lora_name: str,
    ) -> tuple[SaveSettings]:
        """Validate the settings; ``output_dir`` is resolved against ComfyUI's output folder."""
        if not output_dir.strip():
            raise ConfigError("Save Checkpoint: output_dir is empty - give a folder name such as wan22_lora")
        name = lora_name.strip().replace("\\", "/").strip("/")
        if name and not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", name) or ".." in name.split("/"):
            raise ConfigError(
                f"Save Checkpoint: lora_name {lora_name!r} may use letters, digits, '_', '-', '.' and '/' for "
                "subfolders inside models/loras"
            )
        try:
            cfg = SaveConfig(
                output_dir=str(host.output_path(output_dir.strip())),
                save_every=save_every,
                keep_last=keep_last,
                dtype=dtype,
                save_training_state=save_training_state,
            )
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "Save Checkpoint")) from None
        return (SaveSettings(cfg, copy_to_loras, name),)
