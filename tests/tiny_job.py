"""The tiny-preset job the end-to-end tests start from: fp32 on the CPU, rank 4, two clips per batch, no workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_job(out: Path, clips: Path, steps: int, *, name: str, seed: int, switch_every: int,
             saving: dict[str, Any], **over: Any) -> dict[str, Any]:
    """A job dict for ``clips`` writing into ``out`` (``saving``: the base save settings); each ``over`` section is
    merged into (or replaces) the base."""
    job: dict[str, Any] = {
        "name": name,
        "model": {"source": "tiny", "dtype": "fp32", "text_encoder_dtype": "fp32"},
        "lora": {"rank": 4},
        "multistage": {"switch_every": switch_every},
        "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.0},
        "train": {"steps": steps, "batch_size": 2, "gradient_checkpointing": "off", "compute_dtype": "fp32",
                  "device": "cpu", "seed": seed, "num_workers": 0},
        "save": {"output_dir": str(out), **saving},
        "datasets": [{"folder": str(clips), "num_frames": 5, "resolutions": [32]}],
    }
    for section, values in over.items():
        job[section] = {**job.get(section, {}), **values} if isinstance(values, dict) else values
    return job
