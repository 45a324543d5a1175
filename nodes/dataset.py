"""Build Video Dataset (DATASETS panel): one folder of clips and captions; chain several nodes to mix datasets."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainer_core.config import DatasetConfig, format_validation_error
from trainer_core.errors import ConfigError

from . import host
from .bundle import CATEGORY, DATASET
from .widgets import inputs, partial_config

_T = "tooltip"


class BuildVideoDataset:
    """Validate one dataset folder and report what training will see; outputs the chain of datasets so far."""

    #: The widgets -> the settings they set (defaults, limits and tooltips are the config's).
    FIELDS = {
        "folder": "datasets.folder",
        "caption_ext": "datasets.caption_ext",
        "default_caption": "datasets.default_caption",
        "num_frames": "datasets.num_frames",
        "frame_sampling": "datasets.frame_sampling",
        "fps": "datasets.fps",
        "window_start": "datasets.window_start",
        "short_clip": "datasets.short_clip",
        "resolutions": "datasets.resolutions",
        "weight": "datasets.weight",
        "repeats": "datasets.repeats",
        "caption_dropout": "datasets.caption_dropout",
        "prepend_trigger": "datasets.prepend_trigger",
        "flip_x": "datasets.flip_x",
        "flip_y": "datasets.flip_y",
        "is_regularization": "datasets.is_regularization",
        "cache_latents": "datasets.cache_latents",
        "strict": "datasets.strict",
        "validation": "datasets.validation",
        "validation_split": "datasets.validation_split",
    }
    UI = {"default_caption": {"multiline": True}}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": inputs(cls.FIELDS, cls.UI),
            "optional": {
                "dataset": (DATASET, {_T: "Datasets built by other Build Video Dataset nodes, trained together"}),
            },
        }

    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_TOOLTIPS = (
        "This dataset after the chained ones; connect to Train LoRA or another Build Video Dataset.",
        "What training will see: items, buckets, epoch shares, skipped files, warnings.",
    )
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "A folder of training clips/images with captions, checked now rather than when training starts."

    @classmethod
    def IS_CHANGED(cls, folder: str, **_) -> str:
        """A digest of the folder's files (names, sizes, times): adding or editing clips re-runs the graph."""
        try:
            root = host.input_path(folder.strip())
        except ConfigError:  # a folder outside ComfyUI's input: build() refuses it by name, nothing to walk here
            return folder
        digest = hashlib.sha256(str(root).encode())
        if root.is_dir():
            seen: set[str] = set()  # real folders walked: symlinked ones are followed as the scan follows them, once
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                real = os.path.realpath(dirpath)
                if real in seen:
                    dirnames.clear()
                    continue
                seen.add(real)
                dirnames.sort()
                for name in sorted(filenames):
                    try:
                        st = (Path(dirpath) / name).stat()
                    except OSError:  # a broken link or an unreadable file: the scan reports it by name
                        continue
                    digest.update(f"{Path(dirpath, name).relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
        return digest.hexdigest()

    def build(
        self, dataset: tuple[DatasetConfig, ...] | None = None, **values: Any
    ) -> tuple[tuple[DatasetConfig, ...], str]:
        """Validate this folder's settings, scan the chain of datasets and report on it."""
        # The decoders (av) load on first use, not at ComfyUI's start.
        from trainer_core.data import build_dataset
        from trainer_core.data.captions import TRIGGER_TOKEN

        folder = values["folder"].strip()
        if not folder:
            raise ConfigError("Build Video Dataset: folder is empty - give a folder of clips under ComfyUI's input")
        values = {**values, "folder": str(host.input_path(folder, "Build Video Dataset: folder"))}
        settings = partial_config(self.FIELDS, values, source="Build Video Dataset")["datasets"]
        try:
            cfg = DatasetConfig(**settings)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"Build Video Dataset ({folder})")) from None
        chain = (*(dataset or ()), cfg)
        # The trigger word lives on Train LoRA; the placeholder keeps [trigger] captions and prepend_trigger
        # reportable here. Train LoRA scans again with the real word.
        report = build_dataset(list(chain), TRIGGER_TOKEN, seed=0).report()
        return (chain, report)

