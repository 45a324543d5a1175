"""Scanning dataset folders into items: probing, captions, buckets, black-bar checks and the report's material.

Bad input. A file that cannot be used is a *bad file*: an unreadable or corrupt video or image, a zero-length clip,
an unsupported video/image format (``.avi``, ``.bmp`` ...), a caption file that is not UTF-8, and a file whose caption
would be empty (no caption file, or an empty one, with an empty ``default_caption`` and no ``prepend_trigger``).
Training on an empty caption is almost never intended: the model would learn the clip as its unconditional output.
By default each bad file is skipped and listed in the report with what to do about it, and a dataset fails only when
nothing usable is left in it; with ``strict`` the first bad file (in path order) fails the build. Whole-dataset
problems always fail: a missing or empty folder, ``[trigger]`` or ``prepend_trigger`` without a trigger word.
Other files (notes, metadata) are listed as ignored, and so are hidden files and folders (``.DS_Store``, macOS
``._clip.mp4`` copies, ``.cache``), counted.

Folders. Sub-folders are scanned, symlinked ones too (each real folder once: a link to a folder above it, which
would loop, or to one already scanned is reported and not followed again). A sub-folder that cannot be read is a
bad entry: its files would be missing from training without a word.

Reading notes. How a file is read when that is not obvious is noted per file: which of several video streams, HDR
(no tone mapping), interlacing (no deinterlacing), an animated WebP/PNG trained as a clip.

Transparency. Images with transparent pixels train composited onto black (see :mod:`~.media`); the report warns
and lists them, since the LoRA learns that background.

Letterboxing. Each usable file is checked on a few keyframes for black bars (:func:`~.media.black_bars`); bars of
at least :data:`BAR_SHARE` of the picture on both opposite sides are reported, since the LoRA would learn them.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

from ..config import DatasetConfig, nothing_to_learn, share_problem
from ..errors import ConfigError, DatasetError
from .buckets import assign_bucket, bucket_sizes, resize_crop_plan
from .captions import TRIGGER_TOKEN, apply_trigger, normalize_caption
from .dataset import DatasetScan, Item, VideoDataset, listing
from .frames import fps_start_count, frame_stride, stride_start_count

#: Frame samplings that spread num_frames over the whole clip (no window start).
_SPREAD = ("uniform", "aitoolkit_uniform")
from .holdout import split_validation
from .media import (
    IMAGE_EXTS,
    UNSUPPORTED_MEDIA_EXTS,
    VIDEO_EXTS,
    MediaInfo,
    black_bars,
    media_kind,
    probe,
    shown,
    unsupported_error,
)

#: Black bars covering at least this share of the picture on both the top and bottom (or left and right) are
#: reported as letterboxing (pillarboxing).
BAR_SHARE = 0.05
#: A bucket crop that keeps less than this share of a file's picture is warned about. Buckets span aspect ratios
#: 1:4 to 4:1 and a file within that range keeps over 90%; below half, more of the picture is cut away than
#: trained on (an 18x2000 strip keeps 3.6%), so the subject is likely cut off.
KEEP_SHARE = 0.5
#: Files named in a warning line before "... and N more".
_NAMED = 5
#: Uniform sampling that plays a clip at least this many times faster (or slower) than real time gets a note.
_SPEED_NOTE = 2.0


class _BadFile(Exception):
    """A file to skip (or, in strict mode, to fail on); the message names it and the remedy."""


class _NoTrigger(DatasetError):
    """A caption needs the trigger word but none is set: a missing setting, so it fails the build."""


def _read_caption(cap_path: Path) -> str:
    try:
        return cap_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _BadFile(f"caption file {shown(cap_path)} is not UTF-8 text - re-save it as UTF-8") from None
    except OSError as exc:
        raise _BadFile(f"cannot read caption file {shown(cap_path)}: {exc} - check its permissions") from None


def _other_case(cap_path: Path) -> Path | None:
    """A file beside ``cap_path`` whose name differs from it only in case (``clip.TXT`` for ``clip.txt``)."""
    try:
        return next((p for p in cap_path.parent.iterdir() if p.name.lower() == cap_path.name.lower()), None)
    except OSError:
        return None


def _caption_for(path: Path, cfg: DatasetConfig, label: str, trigger: str | None) -> tuple[str, bool]:
    """Processed caption of a media file and whether it came from a caption file."""
    cap_path = path.with_suffix("." + cfg.caption_ext)
    has_file = cap_path.is_file()
    raw = _read_caption(cap_path) if has_file else cfg.default_caption
    try:
        caption = apply_trigger(normalize_caption(raw), trigger, cfg.prepend_trigger, cfg.trigger_separator,
                                cfg.trigger_match)
    except ValueError:
        where = f"caption file {shown(cap_path)}" if has_file else f"{label}.default_caption"
        raise _NoTrigger(
            f"{where} uses {TRIGGER_TOKEN} but no trigger word is set - set the job's trigger_word "
            f"or remove {TRIGGER_TOKEN}"
        ) from None
    if not caption:
        if has_file:
            raise _BadFile(
                f"caption file {shown(cap_path)} is empty - write a caption in it, or delete it to use "
                "default_caption"
            )
        other = _other_case(cap_path)
        if other is not None:  # caption_ext matches case-sensitively (as on Linux file systems)
            raise _BadFile(
                f"{shown(path)}: no caption - there is no {shown(cap_path.name)}, but there is {shown(other.name)}: "
                f"rename it to {shown(cap_path.name)}"
            )
        raise _BadFile(
            f"{shown(path)}: no caption - there is no {shown(cap_path.name)} and {label}.default_caption is empty; "
            "add the caption file, set default_caption, or turn on prepend_trigger (with a trigger_word)"
        )
    return caption, has_file


def _short_reason(info: MediaInfo, cfg: DatasetConfig) -> str:
    if cfg.frame_sampling in _SPREAD:
        return f"{info.num_frames} frame(s), fewer than num_frames={cfg.num_frames}"
    if cfg.frame_sampling == "stride":
        k = frame_stride(info.frame_times, Fraction(repr(cfg.fps)))
        return f"{info.num_frames} frame(s), fewer than num_frames={cfg.num_frames} at {_every(k)}"
    rate = f" at {info.fps:.3g} fps" if info.fps else ""
    need = (cfg.num_frames - 1) / cfg.fps
    return (
        f"{float(info.frame_times[-1]):.2f} s from first to last frame ({info.num_frames} frame(s){rate}), "
        f"the {cfg.num_frames}-frame window at {cfg.fps:g} fps needs {need:.2f} s"
    )


def _every(k: int) -> str:
    """'every frame', 'every 2nd frame', ... 'every 11th frame' for a stride of ``k``."""
    if k == 1:
        return "every frame"
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"every {k}{suffix} frame"


def _uniform_speed(info: MediaInfo, frames: int, fps: float) -> float:
    """How many times faster than real time a uniformly sampled clip plays at the model's ``fps``."""
    return float(info.frame_times[-1]) * fps / (frames - 1)


def _frames_used(info: MediaInfo, cfg: DatasetConfig, frames: int, starts: int, short: bool) -> str:
    """What one sample takes from a file, in words."""
    if info.kind == "image":
        return "image: 1 frame"
    n, span = info.num_frames, float(info.frame_times[-1])
    if short and cfg.short_clip == "stretch":
        return f"{frames} frames spread over all {n} (short: frames repeat, stretched)"
    if cfg.frame_sampling in _SPREAD:
        if frames == 1:
            return f"the middle frame of {n}" if cfg.frame_sampling == "uniform" else f"the first frame of {n}"
        if short:
            return f"all {n} frames, then the last one repeated {frames - n}x (short, padded)"
        speed = _uniform_speed(info, frames, cfg.fps)
        return f"{frames} of {n} frames spread over {span:.2f} s: {speed:.2g}x real speed"
    start = f"random start among the first {starts} frames" if cfg.window_start == "random" else "from the start"
    if cfg.frame_sampling == "stride":
        k = frame_stride(info.frame_times, Fraction(repr(cfg.fps)))
        if short:
            return f"{_every(k)} from the start, last frame repeated (short, padded)"
        return f"{frames} of {n} frames, {_every(k)}, {start}"
    window = (frames - 1) / cfg.fps
    if short:
        return f"{span:.2f} s is shorter than the {window:.2f} s window: from the start, last frame repeated (padded)"
    if frames == 1:
        return f"1 frame, {start}"
    return f"{frames} frames at {cfg.fps:g} fps = {window:.2f} s of {span:.2f} s, {start}"


def _letterbox(info: MediaInfo) -> str | None:
    """A report line when the file has large black bars, else ``None``."""
    top, bottom, left, right = black_bars(info)
    sides = []
    if min(top, bottom) >= BAR_SHARE:
        sides.append(f"top/bottom {100 * top:.0f}%/{100 * bottom:.0f}% of the height")
    if min(left, right) >= BAR_SHARE:
        sides.append(f"left/right {100 * left:.0f}%/{100 * right:.0f}% of the width")
    if not sides:
        return None
    return (
        f"{shown(info.path)}: black bars {' and '.join(sides)} - crop them (ffmpeg's cropdetect filter finds the "
        "size), or the LoRA learns to draw them"
    )


@dataclass
class _Listing:
    """What walking a dataset folder found: its files (sorted by relative path), how many hidden files and folders
    it left out, and one line per folder it could not (or would not again) enter."""

    files: list[Path]
    hidden: int = 0
    unreadable: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)


def _walk(folder: Path) -> _Listing:
    """Every non-hidden file under ``folder``, following symlinked folders, each real folder once."""
    out = _Listing([])
    seen = {os.path.realpath(folder)}

    def unreadable(exc: OSError) -> None:
        out.unreadable.append(f"cannot read folder {shown(exc.filename)} - check its permissions")

    # Hidden files and folders (".cache", macOS "._clip.mp4" forks) are not data.
    for root, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        entered = []
        for d in sorted(dirs):
            path, real = os.path.join(root, d), os.path.realpath(os.path.join(root, d))
            if d.startswith("."):
                out.hidden += 1
            elif real not in seen:
                seen.add(real)
                entered.append(d)
            elif os.path.realpath(root).startswith(real + os.sep) or os.path.realpath(root) == real:
                out.links.append(f"{shown(path)} links to {shown(real)}, a folder above it - not followed (it loops)")
            else:
                out.links.append(f"{shown(path)} is {shown(real)} again - its files are used once")
        dirs[:] = entered
        for name in names:
            path = Path(root, name)
            if name.startswith("."):
                out.hidden += 1
            elif path.is_file():
                out.files.append(path)
            elif path.is_symlink():
                out.unreadable.append(f"{shown(path)} is a link to a missing file - fix or remove the link")
    out.files.sort(key=lambda p: p.relative_to(folder).as_posix())
    return out


def _scan_folder(folder: Path, label: str) -> _Listing:
    """The files under ``folder`` (see :func:`_walk`); :class:`DatasetError` when there is no media among them."""
    if not folder.exists():
        raise DatasetError(f"{label}.folder: {folder} does not exist - check the path")
    if not folder.is_dir():
        raise DatasetError(
            f"{label}.folder: {folder} is a file, not a folder of videos/images - give the folder that holds the "
            f"clips and their captions (e.g. {folder.parent})"
        )
    walked = _walk(folder)
    if not any(media_kind(p) or p.suffix.lower() in UNSUPPORTED_MEDIA_EXTS for p in walked.files):
        unread = f"; {'; '.join(walked.unreadable)}" if walked.unreadable else ""
        raise DatasetError(
            f"{label}.folder: {folder} holds no videos or images "
            f"({', '.join(sorted(VIDEO_EXTS | IMAGE_EXTS))}) - add media or fix the path{unread}"
        )
    return walked


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
    random_window = cfg.frame_sampling in ("fps", "stride") and cfg.window_start == "random"
    if cfg.cache_latents and (random_window or cfg.flip_x or cfg.flip_y):
        out.append(
            f"{where}: cache_latents with random window starts or flips stores one latent per distinct "
            "window/flip, so it only saves work when a choice repeats - use window_start=start and no flips "
            "to encode each clip once"
        )
    return out


#: ``progress(what, files done, files in all)``: called as each file of a dataset folder is scanned, with ``what``
#: naming the folder's dataset (``scanning datasets[0]``).
ScanProgress = Callable[[str, int, int], None]


class _Scanner:
    """Turns one dataset folder into a :class:`DatasetScan`."""

    def __init__(
        self, d: int, cfg: DatasetConfig, trigger: str | None, caption_override: str | None,
        progress: ScanProgress | None = None,
    ) -> None:
        self.d, self.cfg, self.trigger, self.override, self.progress = d, cfg, trigger, caption_override, progress
        self.label = f"datasets[{d}]"
        self.folder = Path(cfg.folder).expanduser().resolve()
        self.where = f"dataset {d + 1} ({self.folder})"
        self.out = DatasetScan(items=[], kinds=Counter())
        self.grids = {res: bucket_sizes(res) for res in cfg.resolutions}
        self.padded: list[str] = []
        self.transparent: list[MediaInfo] = []  # transparent images, videos with alpha: composited onto black
        self.upscaled: dict[int, list[str]] = {}  # resolution -> files smaller than their bucket
        self.cropped: list[tuple[float, str]] = []  # (share of the picture kept, file) under KEEP_SHARE
        self.read_notes: list[str] = []  # how files are read (stream, HDR, interlacing, animation)
        self.hidden = 0
        self.speeds: list[float] = []
        self.short_skipped = 0

    def bad(self, message: str) -> None:
        if self.cfg.strict:
            raise DatasetError(f"{message} ({self.label}.strict is on: fix or remove the file, or turn strict off)")
        self.out.skipped.append(message)

    def scan(self) -> DatasetScan:
        walked = _scan_folder(self.folder, self.label)
        files, self.hidden = walked.files, walked.hidden
        for problem in walked.unreadable:
            self.bad(problem)
        self.read_notes += walked.links
        ignored = []
        for done, path in enumerate(files, 1):
            if self.progress is not None:
                self.progress(f"scanning {self.label}", done, len(files))
            if media_kind(path):
                try:
                    self.add(probe(path))
                except _NoTrigger:
                    raise
                except (_BadFile, DatasetError) as exc:
                    self.bad(str(exc))
            elif path.suffix.lower() in UNSUPPORTED_MEDIA_EXTS:
                self.bad(str(unsupported_error(path)))
            elif path.suffix != "." + self.cfg.caption_ext:
                ignored.append(shown(path.name))
        if not self.out.items:
            self.fail_empty()
        self.summarize(files, ignored)
        return self.out

    def add(self, info: MediaInfo) -> None:
        cfg = self.cfg
        if self.override is None:
            caption, has_file = _caption_for(info.path, cfg, self.label, self.trigger)
        else:
            caption, has_file = self.override, True
        frames = 1 if info.kind == "image" else cfg.num_frames
        fps = Fraction(repr(cfg.fps))
        starts = 0
        if cfg.frame_sampling == "fps":
            starts = fps_start_count(info.frame_times, frames, fps)
        elif cfg.frame_sampling == "stride":
            starts = stride_start_count(info.num_frames, frames, frame_stride(info.frame_times, fps))
        short = info.kind == "video" and (info.num_frames < frames if cfg.frame_sampling in _SPREAD else starts == 0)
        if short:
            reason = f"{shown(info.path)}: {_short_reason(info, cfg)}"
            if cfg.short_clip == "skip":
                self.out.skipped.append(f"{reason} (short_clip=skip)")
                self.short_skipped += 1
                return
            self.padded.append(reason)
        bars = _letterbox(info)  # decodes a few keyframes: also catches files that break after the first frame
        buckets = []
        name = shown(info.path.relative_to(self.folder).as_posix())
        kept = 1.0
        for res in cfg.resolutions:
            bucket = assign_bucket(info.width, info.height, self.grids[res])
            rw, rh, _, _ = resize_crop_plan(info.width, info.height, *bucket)
            if rw > info.width:
                self.upscaled.setdefault(res, []).append(name)
            kept = min(kept, bucket[0] * bucket[1] / (rw * rh))
            self.out.items.append(Item(info, self.d, res, bucket, frames, caption, starts))
            buckets.append(f"{bucket[0]}x{bucket[1]} ({res})")
        self.out.kinds[info.kind] += 1
        if bars:
            self.out.letterboxed.append(bars)
        if not has_file:
            self.out.uncaptioned.append(info.path)
        size = f"{round(info.width)}x{round(info.height)}"
        if info.kind == "video":
            self.out.durations.append(float(info.frame_times[-1]))
            if info.fps:
                self.out.rates.append(info.fps)
                size += f", {info.num_frames} frames, {float(info.frame_times[-1]):.2f} s, {info.fps:.3g} fps"
            if cfg.frame_sampling in _SPREAD and frames > 1 and not short:
                self.speeds.append(_uniform_speed(info, frames, cfg.fps))
        if info.transparent:
            self.transparent.append(info)
        if kept < KEEP_SHARE:
            self.cropped.append((kept, name))
        self.read_notes += info.notes
        if info.animated_image:
            kind = info.path.suffix[1:].upper()
            self.read_notes.append(f"{shown(info.path)}: animated {kind} image: trains as a clip of its frames")
        self.out.files.append(
            f"{name}: {size} -> {', '.join(buckets)}; {_frames_used(info, cfg, frames, starts, short)}"
        )

    def fail_empty(self) -> None:
        remedy = "fix or remove the files listed"
        if self.short_skipped:
            # uniform spreading helps only a clip too short in time, not one with fewer frames than num_frames
            spread = "" if self.cfg.frame_sampling in _SPREAD else "use frame_sampling=uniform, "
            remedy += (
                f"; for clips shorter than the sampling window (num_frames={self.cfg.num_frames}) lower num_frames, "
                f"{spread}or set short_clip=pad or stretch"
            )
        raise DatasetError(
            f"{self.label}: no usable clip or image in {self.folder} - {remedy}:\n" + listing(self.out.skipped)
        )

    def summarize(self, files: Sequence[Path], ignored: list[str]) -> None:
        out, cfg, where = self.out, self.cfg, self.where
        if self.padded:
            how = (
                "stretched over num_frames, frames repeating" if cfg.short_clip == "stretch"
                else "padded by repeating their last frame"
            )
            out.notes.append(
                f"{where}: {len(self.padded)} short clip(s) {how}:\n"
                + listing(self.padded)
            )
        if out.kinds["image"] and cfg.num_frames > 1:
            out.notes.append(f"{where}: images train as 1-frame samples, in buckets of their own")
        far = [s for s in self.speeds if s >= _SPEED_NOTE or s <= 1 / _SPEED_NOTE]
        if far:
            out.notes.append(
                f"{where}: {cfg.frame_sampling} sampling plays {len(far)} clip(s) far from real speed "
                f"({min(far):.2g}x-{max(far):.2g}x) - frame_sampling=fps keeps motion at its real speed"
            )
        fixed = cfg.frame_sampling in _SPREAD or cfg.window_start == "start"
        if out.kinds["video"] and fixed and not (cfg.flip_x or cfg.flip_y) and not cfg.cache_latents:
            out.notes.append(
                f"{where}: every epoch trains the same frames of each clip ({cfg.frame_sampling} sampling, no flips), "
                "so cache_latents: true would VAE-encode each clip once instead of at every step (0.37 of 1.50 s per "
                "step at 512x512x33 on an H200)"
            )
        stems = {p.with_suffix("") for p in files if media_kind(p)}
        orphans = [shown(p.name) for p in files if p.suffix == "." + cfg.caption_ext and p.with_suffix("") not in stems]
        if orphans and self.override is None:
            out.notes.append(
                f"{where}: ignored {len(orphans)} caption file(s) without media: {', '.join(orphans[:10])}"
            )
        if ignored:
            out.notes.append(
                f"{where}: ignored {len(ignored)} file(s) that are neither media nor .{cfg.caption_ext} captions: "
                + ", ".join(ignored[:10])
                + (" ..." if len(ignored) > 10 else "")
            )
        if self.hidden:
            out.notes.append(
                f"{where}: ignored {self.hidden} hidden file(s)/folder(s) (names starting with '.', such as "
                ".DS_Store and macOS ._ copies)"
            )
        if self.read_notes:
            out.notes.append(f"{where}: how {len(self.read_notes)} file(s) are read:\n" + listing(self.read_notes))
        self.summarize_pixels()
        out.warnings += _setting_warnings(where, cfg)

    def summarize_pixels(self) -> None:
        """Warnings about what training does to some files' pixels: alpha, extreme crops, black bars, upscaling."""
        out, where, folder = self.out, self.where, self.folder
        if self.transparent:
            images = sum(info.kind == "image" for info in self.transparent)
            what = [f"{images} image(s) have transparent pixels"] if images else []
            if len(self.transparent) > images:
                what.append(f"{len(self.transparent) - images} video(s) have an alpha channel")
            out.warnings.append(
                f"{where}: {' and '.join(what)}; their alpha channel is dropped and they train composited onto "
                "black - flatten them onto the background you want:\n"
                + listing([shown(info.path.relative_to(folder).as_posix()) for info in self.transparent])
            )
        if self.cropped:
            out.warnings.append(
                f"{where}: {len(self.cropped)} file(s) keep less than {KEEP_SHARE:.0%} of their picture after the "
                "bucket crop (aspect ratio beyond the buckets' 1:4-4:1) - crop them to the part to learn:\n"
                + listing([f"{name}: keeps {kept:.1%}" for kept, name in self.cropped])
            )
        if out.letterboxed:
            out.warnings.append(
                f"{where}: {len(out.letterboxed)} file(s) have large black bars (see 'letterboxed') - crop them"
            )
        for res, names in sorted(self.upscaled.items()):
            more = f" ... and {len(names) - _NAMED} more" if len(names) > _NAMED else ""
            out.warnings.append(
                f"{where}: {len(names)} file(s) are smaller than their bucket at resolution {res} and are upscaled: "
                f"{', '.join(names[:_NAMED])}{more}"
            )


def build_dataset(
    datasets: Sequence[DatasetConfig],
    trigger_word: str | None,
    seed: int,
    caption_override: str | None = None,
    progress: ScanProgress | None = None,
) -> VideoDataset:
    """Scan every dataset folder (subfolders included), read captions, assign buckets and plan epochs.

    ``caption_override`` makes every item's caption that exact text and skips reading caption files (text-encoder
    ``unload`` mode: see :func:`~trainer_core.data.text_cache.unload_caption`). ``progress`` hears of every file
    scanned (a large folder takes a while: each media file is opened and a few of its frames decoded).

    Bad files are skipped and reported (see the module docstring). Raises :class:`DatasetError` naming the folder
    or file for a missing or empty folder, ``[trigger]`` without a trigger word, a dataset left with no usable
    item, a ``validation_split`` that leaves nothing to train on, or (``strict``) the first bad file;
    :class:`ConfigError` for no datasets, shares that do not fit in one epoch, an empty ``caption_override`` or
    ``prepend_trigger`` without a trigger word. Validation folders and held-out files (:mod:`~.holdout`) make the
    returned dataset's ``validation``.
    """
    if not datasets:
        raise ConfigError("datasets: no dataset configured - add at least one folder under 'datasets'")
    problem = nothing_to_learn(datasets) or share_problem(datasets)
    if problem is not None:
        raise ConfigError(problem)
    if caption_override is not None and not caption_override.strip():
        raise ConfigError("caption_override is empty - pass the fixed caption (e.g. the trigger word) or None")
    trigger = (trigger_word or "").strip() or None
    if caption_override is None:
        for d, cfg in enumerate(datasets):
            if cfg.prepend_trigger and trigger is None:
                raise ConfigError(
                    f"datasets[{d}].prepend_trigger is on but no trigger_word is set - set one or turn it off"
                )
    scans = [_Scanner(d, cfg, trigger, caption_override, progress).scan() for d, cfg in enumerate(datasets)]
    for d, first in _repeated_entries(datasets).items():
        scans[d].warnings.append(
            f"datasets[{d}] repeats datasets[{first}] (the same folder with the same settings), so its files count "
            f"twice per epoch - remove it, and raise datasets[{first}].repeats or weight if that was the intent"
        )
    train, held = split_validation(datasets, scans, seed)
    validation = None
    if held:
        validation = VideoDataset([c for c, _ in held], [s for _, s in held], seed, caption_override)
    return VideoDataset([c for c, _ in train], [s for _, s in train], seed, caption_override, validation)


def _repeated_entries(datasets: Sequence[DatasetConfig]) -> dict[int, int]:
    """Dataset index -> the index of an earlier entry with the same folder (however written) and settings. The same
    folder with other settings (another num_frames, a regularization copy) is a legitimate second dataset."""
    seen: dict[str, int] = {}
    out = {}
    for d, cfg in enumerate(datasets):
        key = repr((Path(cfg.folder).expanduser().resolve(), cfg.model_dump(exclude={"folder"})))
        if key in seen:
            out[d] = seen[key]
        else:
            seen[key] = d
    return out
