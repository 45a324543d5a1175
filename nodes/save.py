"""Save Checkpoint (SAVE panel): periodic LoRA pairs and training states, and the final pair in models/loras."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from trainer_core.config import SaveConfig, format_validation_error
from trainer_core.errors import ConfigError

from . import host
from .bundle import CATEGORY, SAVE
from .widgets import inputs, partial_config

_T = "tooltip"


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

    #: The widgets that are SaveConfig settings (defaults, limits and tooltips are the config's).
    FIELDS = {
        "output_dir": "save.output_dir",
        "save_every": "save.save_every",
        "keep_last": "save.keep_last",
        "dtype": "save.dtype",
        "save_training_state": "save.save_training_state",
    }
    #: A folder named after the trainer inside ComfyUI's output folder rather than the core's generic "output".
    UI = {"output_dir": {"default": "wan22_lora"}}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **inputs(cls.FIELDS, cls.UI),
                # ComfyUI's side of saving: the final pair in models/loras, where LoraLoaderModelOnly lists it
                "copy_to_loras": ("BOOLEAN", {"default": True, _T: (
                    "Copy the final pair into models/loras so LoraLoaderModelOnly lists it at once")}),
                "lora_name": ("STRING", {"default": "", _T: (
                    "Name of the pair in models/loras: <name>_high_noise / _low_noise.safetensors are written (give "
                    "the name without those suffixes; it may contain a subfolder, e.g. wan22/my_style); empty = the "
                    "run folder's name (the job name, or job name_run2 for a later run of it), with _2, _3, ... added "
                    "where another run's copy holds that name. A name given here replaces this trainer's earlier "
                    "copy of it (that run keeps its pair in its run folder); a file from elsewhere with that name "
                    "refuses the job before it trains")}),
            }
        }

    RETURN_TYPES = (SAVE,)
    RETURN_NAMES = ("save",)
    OUTPUT_TOOLTIPS = ("Save settings for Train LoRA.",)
    FUNCTION = "configure"
    CATEGORY = CATEGORY
    DESCRIPTION = "How Train LoRA saves checkpoints during training and where the final LoRA pair goes."

    def configure(self, copy_to_loras: bool, lora_name: str, **values: Any) -> tuple[SaveSettings]:
        """Validate the settings; ``output_dir`` is resolved against ComfyUI's output folder."""
        output_dir = values["output_dir"].strip()
        if not output_dir:
            raise ConfigError("Save Checkpoint: output_dir is empty - give a folder name such as wan22_lora")
        name = lora_name.strip().replace("\\", "/").rstrip("/")
        if name.lower().endswith(".safetensors") and name[: -len(".safetensors")].rstrip("/"):
            name = name[: -len(".safetensors")]  # the pair's file names add it after their suffix
        if name.endswith(("_high_noise", "_low_noise")):
            raise ConfigError(f"Save Checkpoint: lora_name {lora_name!r} ends in a suffix of the pair - give the name "
                              "without it: _high_noise / _low_noise.safetensors are added to it")
        if name.startswith("/") or re.match(r"[A-Za-z]:", name):
            raise ConfigError(f"Save Checkpoint: lora_name {lora_name!r} is a name inside models/loras, not a path - "
                              "give e.g. my_style or wan22/my_style")
        if name and not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", name) or ".." in name.split("/"):
            raise ConfigError(
                f"Save Checkpoint: lora_name {lora_name!r} may use letters, digits, '_', '-', '.' and '/' for "
                "subfolders inside models/loras"
            )
        values = {**values, "output_dir": str(host.output_path(output_dir, "Save Checkpoint: output_dir"))}
        try:
            cfg = SaveConfig(**partial_config(self.FIELDS, values)["save"])
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "Save Checkpoint")) from None
        return (SaveSettings(cfg, copy_to_loras, name),)
