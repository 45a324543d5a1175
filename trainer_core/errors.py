"""Error types raised before (or instead of) spending hours of compute.

Every message names the offending setting or file and says what to do about it.
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base class for all errors the trainer raises on purpose."""


class ConfigError(TrainerError, ValueError):
    """A setting, or a combination of settings, that cannot work."""


class ModelLoadError(TrainerError):
    """A model file or folder that is missing, unreadable or of the wrong architecture."""


class LoraFileError(TrainerError):
    """A LoRA or training-state file that does not fit the model being trained."""


class DatasetError(TrainerError):
    """A dataset folder, media file or caption that cannot be used."""


class TrainingDiverged(TrainerError):
    """The loss became NaN/Inf; good checkpoints were kept untouched."""
