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
exactly ``repeats`` times, and a dataset of weight 2 appears twice as often per item as one of weight 1. A dataset's
share is spread over its items as evenly as possible: every item ``count // n`` times, plus a seeded, per-epoch
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
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import DatasetConfig
from ..errors import ConfigError, DatasetError
from .buckets import assign_bucket, bucket_sizes, resize_crop_plan
from .captions import TRIGGER_TOKEN, apply_trigger, dropout_caption, normalize_caption
from .frames import fps_indices, fps_start_count, padded_indices, uniform_indices
from .media import IMAGE_EXTS, VIDEO_EXTS, MediaInfo, media_kind, probe, read_frames

# Independent random streams (first word of each generator's seed).
_RNG_SUBSET, _RNG_ORDER, _RNG_BATCH_ORDER, _RNG_SAMPLE = 1, 2, 3, 4
_MAX_LISTED = 10  # file names listed in one message before "... and N more"


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed % 2**64, *keys])


def _listing(lines: Sequence[str]) -> str:
    shown = list(lines[:_MAX_LISTED])
    if len(lines) > _MAX_LISTED:
        shown.append(f"... and {len(lines) - _MAX_LISTED} more")
    return "\n".join(f"  {line}" for line in shown)


@dataclass(frozen=True)
class Item:
    """One media file at one resolution (see the module docstring)."""

    media: MediaInfo
    dataset: int
    resolution: int
    bucket: tuple[int, int]
    frames: int
    caption: str
    window_starts: int  # fps sampling: valid window starts (0 = short clip, padded)

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


def epoch_counts(sizes: Sequence[int], repeats: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Samples per epoch for each dataset (see the module docstring for the rule)."""
    base = [n * r for n, r in zip(sizes, repeats)]
    total = sum(base)
    mass = [Fraction(w) * b for w, b in zip(weights, base)]
    exact = [total * m / sum(mass) for m in mass]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(counts)), key=lambda d: (counts[d] - exact[d], d))
    for d in by_remainder[: total - sum(counts)]:
        counts[d] += 1
    return counts


class _EpochView(Dataset):
    """Map-style view of one epoch for ``torch.utils.data.DataLoader`` (index = sample id)."""

    def __init__(self, dataset: "VideoDataset", epoch: int) -> None:
        self.dataset, self.epoch = dataset, epoch

    def __getitem__(self, sample_id: int) -> Sample:
        return self.dataset.load(sample_id, self.epoch)


class VideoDataset:
    """Scanned, bucketed items of one or more dataset folders. Build it with :func:`build_dataset`."""

    def __init__(
        self,
        configs: Sequence[DatasetConfig],
        items: Sequence[Item],
        seed: int,
        skipped: Sequence[str],
        notes: Sequence[str],
        warnings: Sequence[str],
        file_counts: Sequence[Counter],
    ) -> None:
        self.configs = tuple(configs)
        self.items = tuple(items)
        self.seed = seed
        self.skipped = tuple(skipped)
        self.notes = tuple(notes)
        self._file_counts = tuple(file_counts)
        self._by_dataset = [[i for i, it in enumerate(self.items) if it.dataset == d] for d in range(len(configs))]
        self.counts = epoch_counts(
            [len(ix) for ix in self._by_dataset], [c.repeats for c in configs], [c.weight for c in configs]
        )
        starved = [
            f"dataset {d + 1} ({c.folder}): weight {c.weight} gives it no sample in an epoch - raise its weight"
            for d, (c, n) in enumerate(zip(configs, self.counts))
            if n == 0
        ]
        self.warnings = tuple(warnings) + tuple(starved)

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
        if media.kind == "image":
            indices = [0]
        elif cfg.frame_sampling == "uniform":
            total = media.num_frames
            indices = (
                uniform_indices(total, item.frames) if total >= item.frames else padded_indices(total, item.frames)
            )
        else:
            random_start = cfg.window_start == "random" and item.window_starts > 0
            start = int(u_start * item.window_starts) if random_start else 0
            indices = fps_indices(media.frame_times, item.frames, Fraction(repr(cfg.fps)), start)
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

    def pixels(self, plan: SamplePlan) -> torch.Tensor:
        """Decode a planned sample: float32 ``[3, F, H, W]`` in [-1, 1], flips applied."""
        frames = read_frames(self.items[plan.item].media, plan.frame_indices, plan.bucket)  # [F, H, W, 3]
        if plan.flip_x:
            frames = frames[:, :, ::-1]
        if plan.flip_y:
            frames = frames[:, ::-1]
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float()
        return pixels / 127.5 - 1.0

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
        """Human summary: items per dataset and bucket, epoch shares, skipped files, notes and warnings."""
        total = self.samples_per_epoch
        lines = [f"{len(self.configs)} dataset(s), {len(self.items)} item(s), {total} sample(s) per epoch"]
        for d, (cfg, members, count) in enumerate(zip(self.configs, self._by_dataset, self.counts)):
            files = self._file_counts[d]
            sampling = "" if cfg.num_frames == 1 else f", {cfg.frame_sampling} sampling"
            lines.append(
                f"dataset {d + 1}: {cfg.folder}\n"
                f"  {files['video']} video(s), {files['image']} image(s) -> {len(members)} item(s) at "
                f"resolution(s) {', '.join(map(str, cfg.resolutions))}; {cfg.num_frames} frame(s){sampling}\n"
                f"  repeats {cfg.repeats}, weight {cfg.weight}: {count} sample(s) per epoch "
                f"({100 * count / max(total, 1):.1f}%)" + ("; regularization" if cfg.is_regularization else "")
            )
        buckets = Counter(it.bucket_key for it in self.items)
        lines.append("buckets (width x height x frames: items):")
        lines += [f"  {w}x{h}x{f}: {n}" for (w, h, f), n in sorted(buckets.items())]
        for title, entries in (("skipped", self.skipped), ("notes", self.notes), ("warnings", self.warnings)):
            if entries:
                lines.append(f"{title} ({len(entries)}):")
                lines += [f"  {e}" for e in entries]
        return "\n".join(lines)


def _caption_for(path: Path, cfg: DatasetConfig, label: str, trigger: str | None) -> tuple[str, bool]:
    """Processed caption of a media file and whether it came from a caption file."""
    cap_path = path.with_suffix("." + cfg.caption_ext)
    has_file = cap_path.is_file()
    if has_file:
        try:
            raw = cap_path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DatasetError(f"caption file {cap_path} is not UTF-8 text - re-save it as UTF-8") from None
        except OSError as exc:
            raise DatasetError(f"cannot read caption file {cap_path}: {exc}") from None
    else:
        raw = cfg.default_caption
    try:
        return apply_trigger(normalize_caption(raw), trigger, cfg.prepend_trigger), has_file
    except ValueError:
        where = f"caption file {cap_path}" if has_file else f"{label}.default_caption"
        raise DatasetError(
            f"{where} uses {TRIGGER_TOKEN} but no trigger word is set - set the job's trigger_word "
            f"or remove {TRIGGER_TOKEN}"
        ) from None


def _short_reason(info: MediaInfo, cfg: DatasetConfig) -> str:
    if cfg.frame_sampling == "uniform":
        return f"{info.num_frames} frame(s), fewer than num_frames={cfg.num_frames}"
    rate = f" at {info.fps:.3g} fps" if info.fps else ""
    need = (cfg.num_frames - 1) / cfg.fps
    return (
        f"{float(info.frame_times[-1]):.2f} s from first to last frame ({info.num_frames} frame(s){rate}), "
        f"the {cfg.num_frames}-frame window at {cfg.fps:g} fps needs {need:.2f} s"
    )


def _scan_folder(folder: Path, label: str) -> tuple[list[Path], list[Path]]:
    """Media files and all other non-hidden files under ``folder``, sorted by relative path."""
    if not folder.exists():
        raise DatasetError(f"{label}.folder: {folder} does not exist - check the path")
    if not folder.is_dir():
        raise DatasetError(f"{label}.folder: {folder} is a file, not a folder of videos/images")
    # Hidden files and folders (".cache", macOS "._clip.mp4" forks) are not data.
    files = sorted(
        (
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)
        ),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    media = [p for p in files if media_kind(p)]
    if not media:
        raise DatasetError(
            f"{label}.folder: {folder} holds no videos or images "
            f"({', '.join(sorted(VIDEO_EXTS | IMAGE_EXTS))}) - add media or fix the path"
        )
    return media, [p for p in files if not media_kind(p)]


def _setting_warnings(where: str, cfg: DatasetConfig) -> list[str]:
    out = []
    if cfg.flip_x:
        out.append(
            f"{where}: flip_x mirrors half the samples left-right, so motion to the left becomes motion "
            "to the right (and text is mirrored) while captions stay the same - keep it off for directional motion"
        )
    if cfg.flip_y:
        out.append(
            f"{where}: flip_y turns half the samples upside down (falling becomes rising) while captions stay "
            "the same - keep it off for natural footage"
        )
    random_window = cfg.frame_sampling == "fps" and cfg.window_start == "random"
    if cfg.cache_latents and (random_window or cfg.flip_x or cfg.flip_y):
        out.append(
            f"{where}: cache_latents with random window starts or flips stores one latent per distinct "
            "window/flip, so it only saves work when a choice repeats - use window_start=start and no flips "
            "to encode each clip once"
        )
    return out


@dataclass
class _Scanned:
    """One dataset folder turned into items, plus what the report says about it."""

    items: list[Item]
    kinds: Counter
    skipped: list[str]
    notes: list[str]
    warnings: list[str]


def _scan_dataset(d: int, cfg: DatasetConfig, trigger: str | None) -> _Scanned:
    label = f"datasets[{d}]"
    if cfg.prepend_trigger and trigger is None:
        raise ConfigError(f"{label}.prepend_trigger is on but no trigger_word is set - set one or turn it off")
    folder = Path(cfg.folder).expanduser().resolve()
    media_paths, others = _scan_folder(folder, label)

    infos, unreadable = [], []
    for path in media_paths:
        try:
            infos.append(probe(path))
        except DatasetError as exc:
            unreadable.append(str(exc))
    if unreadable:
        raise DatasetError(f"{label}: {len(unreadable)} unreadable media file(s) in {folder}:\n" + _listing(unreadable))

    fps = Fraction(repr(cfg.fps))
    grids = {res: bucket_sizes(res) for res in cfg.resolutions}
    out = _Scanned([], Counter(info.kind for info in infos), [], [], [])
    uncaptioned, padded, upscaled = 0, [], Counter()
    for info in infos:
        caption, has_file = _caption_for(info.path, cfg, label, trigger)
        uncaptioned += not has_file
        frames = 1 if info.kind == "image" else cfg.num_frames
        starts = fps_start_count(info.frame_times, frames, fps) if cfg.frame_sampling == "fps" else 0
        short = info.num_frames < frames if cfg.frame_sampling == "uniform" else starts == 0
        if info.kind == "video" and short:
            reason = f"{info.path}: {_short_reason(info, cfg)}"
            if cfg.short_clip == "skip":
                out.skipped.append(f"{reason} (short_clip=skip)")
                continue
            padded.append(reason)
        for res in cfg.resolutions:
            bucket = assign_bucket(info.width, info.height, grids[res])
            if resize_crop_plan(info.width, info.height, *bucket)[0] > info.width:
                upscaled[res] += 1
            out.items.append(Item(info, d, res, bucket, frames, caption, starts))
    if not out.items:
        raise DatasetError(
            f"{label}: no usable clip in {folder}: every file is shorter than the sampling window "
            f"(num_frames={cfg.num_frames}) - lower num_frames, use frame_sampling=uniform, or set short_clip=pad"
        )

    where = f"dataset {d + 1} ({folder})"
    if padded:
        out.notes.append(
            f"{where}: {len(padded)} short clip(s) padded by repeating their last frame:\n" + _listing(padded)
        )
    if out.kinds["image"] and cfg.num_frames > 1:
        out.notes.append(f"{where}: images train as 1-frame samples, in buckets of their own")
    stems = {p.with_suffix("") for p in media_paths}
    orphans = [p.name for p in others if p.suffix == "." + cfg.caption_ext and p.with_suffix("") not in stems]
    if orphans:
        out.notes.append(
            f"{where}: ignored {len(orphans)} caption file(s) without media: {', '.join(orphans[:_MAX_LISTED])}"
        )
    if uncaptioned and not cfg.default_caption.strip() and not cfg.prepend_trigger:
        out.warnings.append(
            f"{where}: {uncaptioned} file(s) have no caption file and default_caption is empty: "
            "they train with an empty caption"
        )
    for res, n in sorted(upscaled.items()):
        out.warnings.append(f"{where}: {n} file(s) are smaller than their bucket at resolution {res} and are upscaled")
    out.warnings += _setting_warnings(where, cfg)
    return out


def build_dataset(datasets: Sequence[DatasetConfig], trigger_word: str | None, seed: int) -> VideoDataset:
    """Scan every dataset folder (subfolders included), read captions, assign buckets and plan epochs.

    Raises :class:`DatasetError` naming the folder or file for a missing or empty folder, unreadable media, an
    undecodable caption, ``[trigger]`` without a trigger word, or a dataset left with no usable item;
    :class:`ConfigError` for no datasets or ``prepend_trigger`` without a trigger word.
    """
    if not datasets:
        raise ConfigError("no datasets configured - add at least one entry under 'datasets' with a folder")
    trigger = (trigger_word or "").strip() or None
    scans = [_scan_dataset(d, cfg, trigger) for d, cfg in enumerate(datasets)]
    return VideoDataset(
        datasets,
        [it for s in scans for it in s.items],
        seed,
        skipped=[m for s in scans for m in s.skipped],
        notes=[m for s in scans for m in s.notes],
        warnings=[m for s in scans for m in s.warnings],
        file_counts=[s.kinds for s in scans],
    )
