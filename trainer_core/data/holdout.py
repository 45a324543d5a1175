"""Held-out clips for the validation loss: whole validation folders, and a seeded fraction of a training folder.

``datasets[].validation: true`` holds out a whole folder; ``datasets[].validation_split: f`` holds out
``max(1, round(f * n))`` of a training folder's ``n`` usable files, chosen from ``(train.seed, dataset index)`` so
the same job always holds out the same files. Files, not items, are held out: a file listed at two resolutions is
held out at both, so no clip the validation loss reads is ever trained on at another size.

Validation clips are read as training reads them (same buckets, frames and caption rules, ``[trigger]`` and
``prepend_trigger`` included), once each, at epoch 0's window choice, without caption dropout, flips, repeats or
weights: the validation loss of a step measures the same inputs as at every other step.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..config import DatasetConfig
from ..errors import DatasetError
from .dataset import _RNG_HOLDOUT, DatasetScan, Item, _rng, listing

#: How a validation clip is read, whatever its folder's training settings say.
_VALIDATION_READING = {"caption_dropout": 0.0, "flip_x": False, "flip_y": False, "repeats": 1, "weight": 1.0,
                       "share": None, "validation": True, "validation_split": 0.0}  # fmt: skip

Part = tuple[DatasetConfig, DatasetScan]


def held_out_files(d: int, cfg: DatasetConfig, scan: DatasetScan, seed: int) -> set[Path]:
    """The files of training folder ``d`` that ``validation_split`` holds out (see the module docstring). Refuses,
    in one line, a split that would leave nothing to train on."""
    files = list(dict.fromkeys(it.media.path for it in scan.items))
    k = max(1, round(cfg.validation_split * len(files)))
    if k >= len(files):
        raise DatasetError(
            f"datasets[{d}].validation_split {cfg.validation_split:g} holds out {k} of the {len(files)} usable "
            f"file(s) in {cfg.folder}, leaving none to train on - lower it, add clips, or hold out a separate "
            "folder (validation: true)"
        )
    return {files[j] for j in _rng(seed, _RNG_HOLDOUT, d).choice(len(files), size=k, replace=False)}


def _part(items: Sequence[Item], scan: DatasetScan, **changes: object) -> DatasetScan:
    kinds = Counter(it.media.kind for it in {it.media.path: it for it in items}.values())
    return dataclasses.replace(scan, items=list(items), kinds=kinds, **changes)


def split_validation(configs: Sequence[DatasetConfig], scans: Sequence[DatasetScan], seed: int) -> tuple[
        list[Part], list[Part]]:  # fmt: skip
    """(training parts, validation parts) of the scanned folders: validation folders move over whole, a
    ``validation_split`` folder's held-out files move over and the rest stays. Each side's items are renumbered to
    index its own list of settings."""
    train: list[Part] = []
    held: list[Part] = []
    for d, (cfg, scan) in enumerate(zip(configs, scans)):
        reading = cfg.model_copy(update=_VALIDATION_READING)
        if cfg.validation:
            held.append((reading, scan))
            continue
        if cfg.validation_split:
            out = held_out_files(d, cfg, scan, seed)
            names = sorted(p.name for p in out)
            note = f"dataset {d + 1} ({cfg.folder}): {len(out)} file(s) held out for validation:\n" + listing(names)
            held.append((reading, _part([it for it in scan.items if it.media.path in out], scan)))
            scan = _part([it for it in scan.items if it.media.path not in out], scan, notes=[*scan.notes, note])
        train.append((cfg, scan))
    _refuse_trained(configs, scans, {it.media.path for _, scan in train for it in scan.items})
    return _renumbered(train), _renumbered(held)


def _refuse_trained(configs: Sequence[DatasetConfig], scans: Sequence[DatasetScan], trained: set[Path]) -> None:
    """Refuse a validation folder whose files are also trained on (the same folder, or one inside a training
    folder: folders are scanned with their subfolders); it would hide overfitting instead of showing it."""
    for d, (cfg, scan) in enumerate(zip(configs, scans)):
        both = sorted({it.media.path for it in scan.items} & trained) if cfg.validation else []
        if both:
            raise DatasetError(
                f"datasets[{d}] is a validation folder, but {len(both)} of its file(s) are also trained on (e.g. "
                f"{both[0]}) - move the validation clips out of the training folders"
            )


def _renumbered(parts: list[Part]) -> list[Part]:
    """``parts`` with every item's ``dataset`` index pointing at its part's position."""
    return [(cfg, dataclasses.replace(scan, items=[dataclasses.replace(it, dataset=d) for it in scan.items]))
            for d, (cfg, scan) in enumerate(parts)]  # fmt: skip
