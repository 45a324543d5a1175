"""Configure MultiStage (MULTISTAGE panel): which experts train and how training alternates between them."""

from __future__ import annotations

from pydantic import ValidationError

from trainer_core.config import MultiStageConfig, format_validation_error
from trainer_core.errors import ConfigError

from .bundle import CATEGORY, MULTISTAGE


class ConfigureMultiStage:
    """Expert selection, switching period and the noise boundary between the experts."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "train_high_noise": ("BOOLEAN", {"default": True, "tooltip": (
                    "Train the high-noise expert (layout, motion, camera): needed for motion LoRAs")}),
                "train_low_noise": ("BOOLEAN", {"default": True, "tooltip": (
                    "Train the low-noise expert (detail, texture, identity): needed for character/style LoRAs")}),
                "switch_every": ("INT", {"default": 10, "min": 1, "max": 10000, "tooltip": (
                    "Optimizer steps per expert before switching. 24 GB (one expert resident): 10; "
                    "H100/H200 (both resident): 1")}),
                "boundary": ("FLOAT", {"default": 0.875, "min": 0.01, "max": 0.99, "step": 0.005, "tooltip": (
                    "Noise level where the experts hand over: t >= boundary*1000 is the high-noise expert. "
                    "Wan 2.2 T2V: 0.875")}),
            }
        }

    RETURN_TYPES = (MULTISTAGE,)
    RETURN_NAMES = ("multistage",)
    OUTPUT_TOOLTIPS = ("Multi-stage settings for Train LoRA.",)
    FUNCTION = "configure"
    CATEGORY = CATEGORY
    DESCRIPTION = "Which of the two Wan 2.2 experts get a LoRA, and how often training switches between them."

    def configure(
        self, train_high_noise: bool, train_low_noise: bool, switch_every: int, boundary: float
    ) -> tuple[MultiStageConfig]:
        """Validate the settings into a :class:`MultiStageConfig`."""
        try:
            cfg = MultiStageConfig(
                train_high_noise=train_high_noise,
                train_low_noise=train_low_noise,
                switch_every=switch_every,
                boundary=boundary,
            )
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "Configure MultiStage")) from None
        return (cfg,)
