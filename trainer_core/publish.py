"""Copies of a finished run's LoRA pair in a shared folder (ComfyUI's ``models/loras``), named so that no copy ever
replaces another run's file or one this trainer did not write.

A pair is published as ``<name>_high_noise.safetensors`` / ``<name>_low_noise.safetensors``. A name the user fixed is
kept: its earlier copy is replaced when this trainer wrote it (that run's own pair stays in its run folder), and a
file of any other origin there refuses the job before it trains. A name derived from the run (its folder's name,
unique only within one output folder) moves on to ``<name>_2``, ``<name>_3``, ... past every file that is not
already this pair.
"""

from __future__ import annotations

import filecmp
import shutil
from collections.abc import Iterable
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .errors import ConfigError
from .fileio import atomic_write
from .names import EXPERT_SUFFIX, TRAINER

#: How far a derived name counts up before giving up (each step is a pair of files with that name).
_MAX_SUFFIX = 1000


def pair_paths(folder: Path, name: str, experts: Iterable[str]) -> dict[str, Path]:
    """``{expert: folder/<name>_<high|low>_noise.safetensors}``."""
    return {e: folder / f"{name}_{EXPERT_SUFFIX[e]}.safetensors" for e in experts}


def written_by_this_trainer(path: Path) -> bool:
    """True if ``path`` is a LoRA file whose ``trainer`` metadata names this trainer."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            trainer = (fh.metadata() or {}).get("trainer", "")
    except (SafetensorError, OSError):
        return False
    return trainer.split(" ")[0] == TRAINER


def check_fixed_name(folder: Path, name: str, experts: Iterable[str], setting: str) -> None:
    """Refuse a fixed ``name`` whose files in ``folder`` exist and were not written by this trainer."""
    for path in pair_paths(folder, name, experts).values():
        if path.exists() and not written_by_this_trainer(path):
            raise ConfigError(f"{setting}: {path} exists and was not written by this trainer - choose another name, "
                              "or move that file away")


def publish_pair(files: dict[str, Path], folder: Path, name: str, fixed: bool) -> tuple[str, dict[str, Path]]:
    """Copy ``files`` (``{expert: LoRA file}``) into ``folder`` as the pair ``name`` (atomically; nothing is copied
    when the files there are already these). ``fixed``: the user's name, see the module's docstring. Returns the
    name used and the copies."""
    candidates = [name] if fixed else [name, *(f"{name}_{n}" for n in range(2, _MAX_SUFFIX))]
    for candidate in candidates:
        dests = pair_paths(folder, candidate, files)
        existing = [e for e, d in dests.items() if d.exists()]
        if len(existing) == len(files) and all(filecmp.cmp(files[e], dests[e], shallow=False) for e in existing):
            return candidate, dests
        if not existing or fixed:
            if fixed:
                check_fixed_name(folder, candidate, files, "lora_name")
            for e, dest in dests.items():
                atomic_write(dest, lambda tmp, src=files[e]: shutil.copyfile(src, tmp))
            return candidate, dests
    raise ConfigError(f"{folder} holds {_MAX_SUFFIX} LoRA pairs named {name}_N - clear some out")
