"""Build Video Dataset (DATASETS panel): one folder of clips and captions; chain several nodes to mix datasets."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pydantic import ValidationError

from trainer_core.config import DatasetConfig, format_validation_error
from trainer_core.errors import ConfigError

from . import host
from .bundle import CATEGORY, DATASET

_T = "tooltip"


class BuildVideoDataset:
    """Validate one dataset folder and report what training will see; outputs the chain of datasets so far."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {"default": "", _T: (
                    "Clips (mp4 webm mov mkv gif) and images with captions; relative to ComfyUI's input folder, "
                    "or absolute. 10-30 clips of 3-8 s is typical")}),
                "caption_ext": ("STRING", {"default": "txt", _T: "Caption file extension: clip01.mp4 + clip01.txt"}),
                "default_caption": ("STRING", {"default": "", "multiline": True, _T: (
                    "Caption for files without a caption file; [trigger] is replaced by the trigger word")}),
                "num_frames": ("INT", {"default": 33, "min": 1, "max": 257, "step": 4, _T: (
                    "Frames per sample (4n+1). 24 GB: 33 at 512; H100/H200: 41-81 at 768-1024; 1 = stills")}),
                "frame_sampling": (("uniform", "fps"), {"default": "uniform", _T: (
                    "uniform: spread num_frames over the whole clip. fps: a window at 'fps', motion at real "
                    "speed (pick this for motion LoRAs)")}),
                "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 120.0, "step": 0.5, _T: (
                    "Frame rate of the window for frame_sampling=fps; Wan 2.2 is trained at 16")}),
                "window_start": (("random", "start"), {"default": "random", _T: (
                    "fps sampling: a random window each epoch (more variety) or always the clip's start")}),
                "short_clip": (("pad", "skip"), {"default": "pad", _T: (
                    "Clips shorter than the window: pad by repeating the last frame, or skip them (listed in "
                    "the report)")}),
                "resolutions": ("STRING", {"default": "512", _T: (
                    "Training sizes, multiples of 16, comma separated (e.g. '512, 768'); aspect ratios are "
                    "bucketed. 24 GB: 512; H100/H200: 768-1024")}),
                "weight": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0, "step": 0.05, _T: (
                    "Relative share of this dataset per epoch when several are chained")}),
                "repeats": ("INT", {"default": 1, "min": 1, "max": 1000, _T: (
                    "Times each item appears per epoch; raise it for small datasets you mix with large ones")}),
                "caption_dropout": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 1.0, "step": 0.01, _T: (
                    "Share of samples trained with an empty caption; ~0.05 keeps prompts without the trigger "
                    "working")}),
                "prepend_trigger": ("BOOLEAN", {"default": False, _T: (
                    "Put the trigger word in front of captions that lack it (needs a trigger word on Train LoRA)")}),
                "flip_x": ("BOOLEAN", {"default": False, _T: (
                    "Mirror half the samples left-right; keep off for video (it reverses directional motion)")}),
                "flip_y": ("BOOLEAN", {"default": False, _T: "Flip half the samples upside down; almost always off"}),
                "is_regularization": ("BOOLEAN", {"default": False, _T: (
                    "Mark this folder as regularization data (generic clips that keep the base model's look)")}),
                "cache_latents": ("BOOLEAN", {"default": False, _T: (
                    "Encode each clip once and cache it on disk; pays off with fixed windows and no flips "
                    "(usually off for video)")}),
                "strict": ("BOOLEAN", {"default": False, _T: (
                    "Stop at the first unreadable or uncaptioned file; off skips such files and lists them in the "
                    "report")}),
            },
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
        root = host.input_path(folder.strip())
        digest = hashlib.sha256(str(root).encode())
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    st = (Path(dirpath) / name).stat()
                    digest.update(f"{Path(dirpath, name).relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
        return digest.hexdigest()

    def build(
        self,
        folder: str,
        caption_ext: str,
        default_caption: str,
        num_frames: int,
        frame_sampling: str,
        fps: float,
        window_start: str,
        short_clip: str,
        resolutions: str,
        weight: float,
        repeats: int,
        caption_dropout: float,
        prepend_trigger: bool,
        flip_x: bool,
        flip_y: bool,
        is_regularization: bool,
        cache_latents: bool,
        strict: bool,
        dataset: tuple[DatasetConfig, ...] | None = None,
    ) -> tuple[tuple[DatasetConfig, ...], str]:
        """Validate this folder's settings, scan the chain of datasets and report on it."""
        # The decoders (av) load on first use, not at ComfyUI's start.
        from trainer_core.data import build_dataset
        from trainer_core.data.captions import TRIGGER_TOKEN

        if not folder.strip():
            raise ConfigError("Build Video Dataset: folder is empty - give a folder of clips under ComfyUI's input")
        settings = dict(
            folder=str(host.input_path(folder.strip())),
            caption_ext=caption_ext,
            default_caption=default_caption,
            num_frames=num_frames,
            frame_sampling=frame_sampling,
            fps=fps,
            window_start=window_start,
            short_clip=short_clip,
            resolutions=_resolutions(resolutions),
            weight=weight,
            repeats=repeats,
            caption_dropout=caption_dropout,
            prepend_trigger=prepend_trigger,
            flip_x=flip_x,
            flip_y=flip_y,
            is_regularization=is_regularization,
            cache_latents=cache_latents,
            strict=strict,
        )
        try:
            cfg = DatasetConfig(**settings)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"Build Video Dataset ({folder})")) from None
        chain = (*(dataset or ()), cfg)
        # The trigger word lives on Train LoRA; the placeholder keeps [trigger] captions and prepend_trigger
        # reportable here. Train LoRA scans again with the real word.
        report = build_dataset(list(chain), TRIGGER_TOKEN, seed=0).report()
        return (chain, report)


def _resolutions(text: str) -> list[int]:
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ConfigError(
            f"Build Video Dataset: resolutions {text!r} must be whole numbers separated by commas, e.g. '512, 768'"
        ) from None
