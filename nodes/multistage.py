"""Configure MultiStage (MULTISTAGE panel): which experts train and how training alternates between them."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from trainer_core.config import MultiStageConfig, format_validation_error
from trainer_core.errors import ConfigError

from .bundle import CATEGORY, MULTISTAGE
from .widgets import inputs, partial_config


class ConfigureMultiStage:
    """Expert selection, switching period and the noise boundary between the experts."""

    #: The widgets -> the settings they set (defaults, limits and tooltips are the config's).
    FIELDS = {
        "train_high_noise": "multistage.train_high_noise",
        "train_low_noise": "multistage.train_low_noise",
        "switch_every": "multistage.switch_every",
        "boundary": "multistage.boundary",
    }

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": inputs(cls.FIELDS)}

    RETURN_TYPES = (MULTISTAGE,)
    RETURN_NAMES = ("multistage",)
    OUTPUT_TOOLTIPS = ("Multi-stage settings for Train LoRA.",)
    FUNCTION = "configure"
    CATEGORY = CATEGORY
    DESCRIPTION = "Which of the two Wan 2.2 experts get a LoRA, and how often training switches between them."

    def configure(self, **values: Any) -> tuple[MultiStageConfig]:
        """Validate the settings into a :class:`MultiStageConfig`."""
        try:
            cfg = MultiStageConfig(**partial_config(self.FIELDS, values)["multistage"])
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "Configure MultiStage")) from None
        return (cfg,)
