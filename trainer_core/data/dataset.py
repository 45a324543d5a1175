"""Video/image datasets: folders scanned once into bucketed items, then deterministic epochs of samples.

Terms:

* **item**: one media file at one training resolution (a file listed under two resolutions is two items), with
  its bucket ``(width, height)``, frames per sample (``num_frames``, or 1 for images and when ``num_frames`` is 1)
  and caption (trigger rules applied, before dropout).
* **sample id**: what :meth:`VideoDataset.batches` returns and :meth:`VideoDataset.load` takes. It encodes the item
  and which of the item's appearances in the epoch it is (``occurrence * len(dataset) + item``), so two repeats of
  one item in an epoch get independent random choices.

Repeats and weights. A dataset with ``n`` items and ``repeats`` r contributes ``n * r`` to the epoch length
``L = sum(n * r)``; weights do not change ``L``. Dataset ``d`` then gets ``L * w_d n_d r_d / sum(w n r)`` samples of
the epoch (rounded by largest remainder, ties to the earlier dataset), so with equal weights every item appears
exactly ``repeats`` times, and a dataset of weight 2 appears twice as often per item as one of weight 1. A dataset
with a ``share`` gets ``L * share`` samples whatever its size (its weight is unused), and the datasets without one
split the rest as above (ai-toolkit's ``is_reg`` data, drawn on every other step, is a share of 1/2). A dataset's
samples are spread over its items as evenly as possible: every item ``count // n`` times, plus a seeded, per-epoch
random choice of ``count % n`` distinct items once more.

Determinism (exact resume). Everything random is a pure function of ``(seed, epoch, ...)`` through its own
``numpy`` generator: the epoch's sample order from ``(seed, epoch)``, and a sample's window start, caption dropout
and flips from ``(seed, epoch, sample id)``. Four uniform numbers are drawn per sample in a fixed order whatever
the settings, so turning flips on does not change which windows or dropouts the other draws give. A run resumed at
``(epoch, position in batches(epoch, ...))`` therefore reproduces the uninterrupted run, provided the folders are
unchanged (compare :meth:`VideoDataset.fingerprint`).

Batches hold samples of one bucket (same width, height and frame count): the epoch's samples are shuffled,
grouped by bucket in that order, cut into batches (each bucket's last batch may be smaller), and the batches are
shuffled again.

Folders are scanned by :func:`~trainer_core.data.scan.build_dataset`; this module holds what it builds.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import DatasetConfig
from ..errors import ConfigError, DatasetError
from .captions import dropout_caption
from .frames import (
    fps_indices,
    frame_stride,
    padded_indices,
    spread_indices,
    stride_indices,
    uniform_indices,
)
from .media import MediaInfo, read_frames

# Independent random streams (first word of each generator's seed).
_RNG_SUBSET, _RNG_ORDER, _RNG_BATCH_ORDER, _RNG_SAMPLE, _RNG_HOLDOUT = 1, 2, 3, 4, 5
_MAX_LISTED = 10  # file names listed in one message before "... and N more"
_MAX_FILES_LISTED = 50  # per-file lines in the report, per dataset


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed % 2**64, *keys])


def listing(lines: Sequence[str], limit: int = _MAX_LISTED, indent: str = "  ") -> str:
    """Indented lines, at most ``limit`` of them, then "... and N more"."""
    shown = list(lines[:limit])
    if len(lines) > limit:
        shown.append(f"... and {len(lines) - limit} more")
    return "\n".join(f"{indent}{line}" for line in shown)


@dataclass(frozen=True)
class Item:
    """One media file at one resolution (see the module docstring)."""

    media: MediaInfo
    dataset: int
    resolution: int
    bucket: tuple[int, int]
    frames: int
    caption: str
    window_starts: int  # fps / stride sampling: valid window starts (0 = short clip)

    @property
    def bucket_key(self) -> tuple[int, int, int]:
        """``(width, height, frames)``: samples batch together only with the same key."""
        return (*self.bucket, self.frames)


@dataclass(frozen=True)
class SamplePlan:
    """Every choice for one sample, made without decoding anything (the latent cache keys on it)."""

    item: int
    source: Path
    bucket: tuple[int, int]
    frame_indices: tuple[int, ...]
    flip_x: bool
    flip_y: bool
    caption: str
    is_regularization: bool
    cache_latents: bool


@dataclass
class Sample:
    """One training sample: ``pixels`` float32 ``[3, F, H, W]`` in [-1, 1]."""

    pixels: torch.Tensor
    caption: str
    is_regularization: bool
    source: str


@dataclass
class Batch:
    """Samples of one bucket stacked: ``pixels`` ``[B, 3, F, H, W]``, ``is_regularization`` bool ``[B]``."""

    pixels: torch.Tensor
    captions: list[str]
    is_regularization: torch.Tensor
    sources: list[str]


def sample_frames(cfg: DatasetConfig, item: Item, u_start: float) -> list[int]:
    """The source frames of one sample of a video item (see :mod:`.frames`); ``u_start`` in [0, 1) picks a random
    window start."""
    media, frames, starts = item.media, item.frames, item.window_starts
    total, fps = media.num_frames, Fraction(repr(cfg.fps))
    spread = cfg.frame_sampling in ("uniform", "aitoolkit_uniform")
    if spread and total >= frames:
        return uniform_indices(total, frames) if cfg.frame_sampling == "uniform" else spread_indices(total, frames)
    if cfg.short_clip == "stretch" and (spread or starts == 0):
        return spread_indices(total, frames)
    if spread:
        return padded_indices(total, frames)
    start = int(u_start * starts) if cfg.window_start == "random" and starts > 0 else 0
    if cfg.frame_sampling == "fps":
        return fps_indices(media.frame_times, frames, fps, start)
    return stride_indices(total, frames, frame_stride(media.frame_times, fps), start)


def frames_to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 RGB frames ``[..., F, H, W, 3]`` as float32 pixels ``[..., 3, F, H, W]`` in [-1, 1]."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -4).float()
    return pixels.div_(127.5).sub_(1.0)  # in place: these are large (33 x 512 x 512 x 3 floats is 100 MiB)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples of one bucket into a :class:`Batch`."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    shapes = {tuple(s.pixels.shape) for s in samples}
    if len(shapes) > 1:
        raise DatasetError(f"a batch mixes sample shapes {sorted(shapes)}; build batches with VideoDataset.batches")
    return Batch(
        pixels=torch.stack([s.pixels for s in samples]),
        captions=[s.caption for s in samples],
        is_regularization=torch.tensor([s.is_regularization for s in samples], dtype=torch.bool),
        sources=[s.source for s in samples],
    )


def epoch_counts(
    sizes: Sequence[int],
    repeats: Sequence[int],
    weights: Sequence[float],
    shares: Sequence[float | None] | None = None,
) -> list[int]:
    """Samples per epoch for each dataset (see the module docstring for the rule); ``shares[d]``, when not None,
    fixes dataset ``d``'s fraction of the epoch (the shares are checked by :func:`~trainer_core.config.share_problem`:
    at most 1 together, exactly 1 when every dataset has one)."""
    base = [n * r for n, r in zip(sizes, repeats)]
    total = sum(base)
    shares = list(shares) if shares is not None else [None] * len(base)
    fixed = {d: Fraction(s) for d, s in enumerate(shares) if s is not None}
    if len(fixed) == len(base):  # every dataset has a share: they add up to 1 within rounding; make it exact
        norm = sum(fixed.values())
        fixed = {d: s / norm for d, s in fixed.items()}
    mass = [Fraction(0) if d in fixed else Fraction(w) * b for d, (w, b) in enumerate(zip(weights, base))]
    rest = total * (1 - sum(fixed.values()))
    free = sum(mass)
    exact = [total * fixed[d] if d in fixed else (rest * m / free if free else Fraction(0)) for d, m in enumerate(mass)]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(counts)), key=lambda d: (counts[d] - exact[d], d))
    for d in by_remainder[: total - sum(counts)]:
        counts[d] += 1
    return counts


def _how_often(cfg: DatasetConfig) -> str:
    """The settings that decide a dataset's part of every epoch, for the report."""
    return f"share {cfg.share:g}" if cfg.share is not None else f"repeats {cfg.repeats}, weight {cfg.weight}"


class _EpochView(Dataset):
    """Map-style view of one epoch for ``torch.utils.data.DataLoader`` (index = sample id)."""

    def __init__(self, dataset: "VideoDataset", epoch: int) -> None:
        self.dataset, self.epoch = dataset, epoch

    def __getitem__(self, sample_id: int) -> Sample:
        return self.dataset.load(sample_id, self.epoch)


@dataclass
class DatasetScan:
    """What scanning one dataset folder found: its items and the raw material of the report.

    ``skipped`` holds one message per file left out (why, and what to do); ``uncaptioned`` the media files that use
    ``default_caption``; ``letterboxed`` one line per file with large black bars; ``files`` one report line per
    usable file; ``durations``/``rates`` the usable clips' lengths (s) and frame rates.
    """

    items: list[Item]
    kinds: Counter  # usable files per kind ("video", "image")
    files: list[str] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    uncaptioned: list[Path] = field(default_factory=list)
    letterboxed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class VideoDataset:
    """Scanned, bucketed items of one or more dataset folders. Build it with :func:`build_dataset`.

    ``caption_override``, when set, is the caption of every item (caption files were not read). ``validation``: the
    clips held out for the validation loss (see :mod:`~.holdout`), never part of an epoch of this dataset; sample
    id ``i`` of its epoch 0 is its item ``i``.
    """

    def __init__(
        self,
        configs: Sequence[DatasetConfig],
        scans: Sequence[DatasetScan],
        seed: int,
        caption_override: str | None = None,
        validation: VideoDataset | None = None,
    ) -> None:
        self.validation = validation
        self.configs = tuple(configs)
        self.scans = tuple(scans)
        self.items = tuple(it for s in scans for it in s.items)
        self.seed = seed
        self.caption_override = caption_override
        self.skipped = tuple(m for s in scans for m in s.skipped)
        self.notes = tuple(m for s in scans for m in s.notes)
        self.uncaptioned = tuple(p for s in scans for p in s.uncaptioned)
        self._by_dataset = [[i for i, it in enumerate(self.items) if it.dataset == d] for d in range(len(configs))]
        self.counts = epoch_counts(
            [len(ix) for ix in self._by_dataset],
            [c.repeats for c in configs],
            [c.weight for c in configs],
            [c.share for c in configs],
        )
        starved = [
            f"dataset {d + 1} ({c.folder}): {_how_often(c)} gives it no sample in an epoch - raise its "
            + ("share" if c.share is not None else "weight")
            for d, (c, n) in enumerate(zip(configs, self.counts))
            if n == 0
        ]
        self.warnings = tuple(m for s in scans for m in s.warnings) + tuple(starved)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def samples_per_epoch(self) -> int:
        """Number of samples in every epoch (sum of per-dataset counts)."""
        return sum(self.counts)

    def batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        """The epoch's batches of sample ids, each within one bucket (see the module docstring)."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        n_items = len(self.items)
        entries: list[int] = []
        for d, (members, count) in enumerate(zip(self._by_dataset, self.counts)):
            full, rest = divmod(count, len(members))
            for occurrence in range(full):
                entries.extend(occurrence * n_items + i for i in members)
            if rest:
                extra = _rng(self.seed, _RNG_SUBSET, epoch, d).choice(len(members), size=rest, replace=False)
                entries.extend(full * n_items + members[j] for j in sorted(extra))
        groups: dict[tuple[int, int, int], list[int]] = {}
        for j in _rng(self.seed, _RNG_ORDER, epoch).permutation(len(entries)):
            sid = entries[j]
            groups.setdefault(self.items[sid % n_items].bucket_key, []).append(sid)
        batches = [g[k : k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
        return [batches[j] for j in _rng(self.seed, _RNG_BATCH_ORDER, epoch).permutation(len(batches))]

    def plan(self, sample_id: int, epoch: int) -> SamplePlan:
        """Resolve every choice of a sample (frames, flips, caption) as a pure function of (seed, epoch, id)."""
        if sample_id < 0:
            raise IndexError(f"sample id must be >= 0, got {sample_id}")
        index = sample_id % len(self.items)
        item = self.items[index]
        cfg = self.configs[item.dataset]
        u_start, u_drop, u_flip_x, u_flip_y = _rng(self.seed, _RNG_SAMPLE, epoch, sample_id).random(4)
        media = item.media
        indices = [0] if media.kind == "image" else sample_frames(cfg, item, float(u_start))
        return SamplePlan(
            item=index,
            source=media.path,
            bucket=item.bucket,
            frame_indices=tuple(indices),
            flip_x=cfg.flip_x and bool(u_flip_x < 0.5),
            flip_y=cfg.flip_y and bool(u_flip_y < 0.5),
            caption=dropout_caption(item.caption, cfg.caption_dropout, u_drop),
            is_regularization=cfg.is_regularization,
            cache_latents=cfg.cache_latents,
        )

    def frames(self, plan: SamplePlan) -> np.ndarray:
        """Decode a planned sample: uint8 RGB ``[F, H, W, 3]``, flips applied (4x smaller than its pixels, so
        worker processes hand these over)."""
        frames = read_frames(self.items[plan.item].media, plan.frame_indices, plan.bucket)
        if plan.flip_x:
            frames = frames[:, :, ::-1]
        if plan.flip_y:
            frames = frames[:, ::-1]
        return np.ascontiguousarray(frames)

    def pixels(self, plan: SamplePlan) -> torch.Tensor:
        """Decode a planned sample: float32 ``[3, F, H, W]`` in [-1, 1], flips applied."""
        return frames_to_pixels(self.frames(plan))

    def load(self, sample_id: int, epoch: int) -> Sample:
        """Decode one sample of ``epoch``."""
        plan = self.plan(sample_id, epoch)
        return Sample(self.pixels(plan), plan.caption, plan.is_regularization, str(plan.source))

    def epoch_view(self, epoch: int) -> Dataset:
        """A ``torch`` map-style dataset for one epoch: use with ``DataLoader(view, batch_sampler=batches,
        collate_fn=collate, num_workers=...)`` to decode in worker processes."""
        return _EpochView(self, epoch)

    def captions(self) -> set[str]:
        """Every caption a sample can carry ("" included when caption dropout is on), to encode each once."""
        live = [d for d, n in enumerate(self.counts) if n > 0]
        out = {it.caption for it in self.items if it.dataset in live}
        if any(self.configs[d].caption_dropout > 0 for d in live):
            out.add("")
        return out

    def fingerprint(self) -> str:
        """Hash of everything that decides epoch order and sample choices; store it to check a resume."""
        state = {
            "seed": self.seed,
            "counts": self.counts,
            "configs": [c.model_dump(mode="json") for c in self.configs],
            "items": [
                [str(it.media.path), it.media.num_frames, it.bucket, it.frames, it.caption, it.window_starts]
                for it in self.items
            ],
        }
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    def report(self) -> str:
        """Human summary: items per dataset and bucket, epoch shares, every usable file with its duration, frame
        rate, bucket and the frames a sample takes from it, captions missing, black bars, skipped files (and why),
        notes and warnings."""
        total = self.samples_per_epoch
        lines = [f"{len(self.configs)} dataset(s), {len(self.items)} item(s), {total} sample(s) per epoch"]
        for d, (cfg, scan, members, count) in enumerate(zip(self.configs, self.scans, self._by_dataset, self.counts)):
            sampling = "" if cfg.num_frames == 1 else f", {cfg.frame_sampling} sampling"
            lines.append(
                f"dataset {d + 1}: {cfg.folder}\n"
                f"  {scan.kinds['video']} video(s), {scan.kinds['image']} image(s) -> {len(members)} item(s) at "
                f"resolution(s) {', '.join(map(str, cfg.resolutions))}; {cfg.num_frames} frame(s){sampling}\n"
                f"  {_how_often(cfg)}: {count} sample(s) per epoch "
                f"({100 * count / max(total, 1):.1f}%)" + ("; regularization" if cfg.is_regularization else "")
            )
            if scan.durations:
                rates = f", {min(scan.rates):.3g}-{max(scan.rates):.3g} fps" if scan.rates else ""
                lines.append(
                    f"  clips: {len(scan.durations)}, {min(scan.durations):.2f}-{max(scan.durations):.2f} s "
                    f"(median {float(np.median(scan.durations)):.2f} s){rates}"
                )
            lines.append(f"  files ({len(scan.files)} usable):")
            lines.append(listing(scan.files, limit=_MAX_FILES_LISTED, indent="    "))
            lines.append("  captions: " + self._caption_summary(cfg, scan))
        buckets = Counter(it.bucket_key for it in self.items)
        lines.append("buckets (width x height x frames: items):")
        lines += [f"  {w}x{h}x{f}: {n}" for (w, h, f), n in sorted(buckets.items())]
        if self.validation is not None:
            held = [f"{c.folder}: {n} file(s)" for c, n in zip(self.validation.configs, self.validation.file_counts())]
            lines.append(f"validation (held out, never trained on): {len(self.validation)} item(s)\n" + listing(held))
        letterboxed = [m for s in self.scans for m in s.letterboxed]
        for title, entries in (
            ("skipped", self.skipped),
            ("letterboxed", letterboxed),
            ("notes", self.notes),
            ("warnings", self.warnings),
        ):
            if entries:
                lines.append(f"{title} ({len(entries)}):")
                lines += [f"  {e}" for e in entries]
        return "\n".join(lines)

    def file_counts(self) -> list[int]:
        """Distinct media files per dataset."""
        return [len({self.items[i].media.path for i in members}) for members in self._by_dataset]

    def _caption_summary(self, cfg: DatasetConfig, scan: DatasetScan) -> str:
        if self.caption_override is not None:
            return f"every sample uses the fixed caption {self.caption_override!r} (caption files are not read)"
        n = sum(scan.kinds.values())
        if not scan.uncaptioned:
            return f"every usable file has a .{cfg.caption_ext} caption file"
        names = ", ".join(p.name for p in scan.uncaptioned[:_MAX_LISTED])
        more = f" ... and {len(scan.uncaptioned) - _MAX_LISTED} more" if len(scan.uncaptioned) > _MAX_LISTED else ""
        return (
            f"{len(scan.uncaptioned)} of {n} usable file(s) have no .{cfg.caption_ext} file and use default_caption "
            f"{cfg.default_caption!r}: {names}{more}"
        )
