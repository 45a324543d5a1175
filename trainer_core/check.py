"""A training job's dry run: whether it can train here (or on a card of a given size), and what it will need.

:func:`check_job` runs, without loading a model weight, what training checks before its first step and what it
would otherwise only find out later:

* the pre-flight :func:`~.train.loop.preflight` (device, regularizer and objective settings, the accuracy recovery
  adapter's and the LoRA init files' headers, writable output and cache folders, the model files' headers);
* the dataset as training scans it (the report training prints: items per bucket, frames, fps, durations, black
  bars, uncaptioned, skipped and short clips), then one sample of every file decoded as training would decode it,
  so a file that breaks past its first frames is named now rather than when a step reaches it;
* the VRAM plan (:func:`~.memory.planner.estimate_peak_vram`) for the job's GPU, or for a card with ``gpu_gib``
  free, and the host-RAM estimate (:func:`~.memory.planner.estimate_host_memory`).

The stages do not depend on each other, so each runs even when an earlier one failed and one check lists every
stage's reason a job cannot train, one line each (the pre-flight stops at its first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import JobConfig
from .data import VideoDataset, build_dataset
from .data.scan import ScanProgress
from .data.text_cache import unload_caption
from .errors import ConfigError, TrainerError
from .memory import check_plan, estimate_host_memory, estimate_peak_vram, model_arch
from .memory.planner import GIB, host_memory_warning
from .quant.choice import auto_transformer_quant
from .quant.float8 import supports_fp8_matmul
from .train.distributed import DistContext
from .train.loop import preflight, run_warnings
from .train.placement import resolve_device

#: Decode failures listed one per line before the rest are counted in one more line.
_MAX_DECODE_REASONS = 10


@dataclass
class JobCheck:
    """What :func:`check_job` found: report sections (title, text) in order, warnings, and the reasons the job
    cannot train (one line each; none: it can)."""

    sections: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def can_train(self) -> bool:
        """True when no stage found a reason the job cannot train."""
        return not self.reasons

    def report(self) -> str:
        """Every section under its title, then the warnings and the verdict."""
        parts = [f"== {title} ==\n{text}" for title, text in self.sections]
        if self.warnings:
            parts.append("== warnings ==\n" + "\n".join(f"warning: {w}" for w in self.warnings))
        if self.can_train:
            parts.append("== verdict ==\nthe job can train")
        else:
            lines = "\n".join(f"  {r}" for r in self.reasons)
            parts.append(f"== verdict ==\nthe job cannot train ({len(self.reasons)} reason(s)):\n{lines}")
        return "\n\n".join(parts)

    def fail(self, title: str, exc: TrainerError) -> None:
        """Record ``exc`` as a reason: its first line; any further lines (a list of files) become a section."""
        first, *rest = str(exc).splitlines() or [type(exc).__name__]
        if first in self.reasons:  # one cause that two stages meet (no dataset: the plan and the scan) is one line
            return
        self.reasons.append(first)
        if rest:
            self.sections.append((title, "\n".join([first, *rest])))


def check_job(
    cfg: JobConfig,
    *,
    gpu_gib: float | None = None,
    gpu_fp8: bool = False,
    decode: bool = True,
    progress: ScanProgress | None = None,
) -> JobCheck:
    """Check ``cfg`` as training would before its first step, and plan its GPU and host memory; loads no weight.

    ``gpu_gib``: plan for a CUDA card with that many GiB free (the job runs elsewhere: the visibility of the job's
    device here is not checked); without it, for the device the job resolves to here (see :func:`plan_target`).
    ``gpu_fp8``: that card multiplies in fp8 (RTX 40xx/50xx, L40S, H100), which decides ``quant.transformer: auto``
    and the plan's advice; a card here is asked instead.
    ``decode``: decode one sample of every dataset file (off: the scan's probe and keyframes only). ``progress``
    hears of every file scanned and decoded, as ``(what, done, total)``.
    """
    result = JobCheck()
    target = None
    try:
        target = plan_target(cfg, gpu_gib, gpu_fp8)
    except TrainerError as exc:  # a device that cannot be had here: the preflight names it
        result.fail("VRAM plan", exc)
    if target is not None and cfg.quant.transformer == "auto":
        quant = auto_transformer_quant(target.device_type, target.fp8_matmul)
        cfg = cfg.model_copy(update={"quant": cfg.quant.model_copy(update={"transformer": quant})})
        result.sections.append(("quantization", f"quant.transformer: auto -> {quant} on {target.description}"))
    _check_preflight(cfg, gpu_gib, result)
    dataset = _check_dataset(cfg, decode, progress, result)
    if dataset is not None:
        result.warnings += run_warnings(cfg, dataset, DistContext())  # this check is one process, as `train` is
    if target is not None:
        _check_memory(cfg, target, gpu_gib, result)
    return result


def _check_preflight(cfg: JobConfig, gpu_gib: float | None, result: JobCheck) -> None:
    if gpu_gib is not None:  # the job trains on another machine's card: whether this one has a GPU does not matter
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cpu"})})
    try:
        preflight(cfg, dry_run=True)
    except TrainerError as exc:
        result.fail("pre-flight", exc)


def _check_dataset(
    cfg: JobConfig, decode: bool, progress: ScanProgress | None, result: JobCheck
) -> VideoDataset | None:
    """The dataset as training builds it (:func:`~.train.loop.job_dataset`, here with progress), its report, and
    every file's first sample decoded."""
    try:
        caption = unload_caption(cfg.text_encoder.mode, cfg.trigger_word)
        dataset = build_dataset(cfg.datasets, cfg.trigger_word, cfg.train.seed, caption, progress=progress)
    except TrainerError as exc:
        result.fail("dataset", exc)
        return None
    result.sections.append(("dataset", dataset.report()))
    if decode:
        failures = decode_failures(dataset, progress)
        result.reasons += failures[:_MAX_DECODE_REASONS]
        if len(failures) > _MAX_DECODE_REASONS:
            result.reasons.append(f"... and {len(failures) - _MAX_DECODE_REASONS} more file(s) that cannot be decoded")
    return dataset


def decode_failures(dataset: VideoDataset, progress: ScanProgress | None = None) -> list[str]:
    """Decode each media file's first sample of epoch 0 as training would (the frames it picks, at its bucket);
    one line per file that fails, naming it and what to do."""
    first_item: dict[str, int] = {}
    for index, item in enumerate(dataset.items):  # a file listed at several resolutions decodes once
        first_item.setdefault(str(item.media.path), index)
    failures = []
    for done, index in enumerate(first_item.values(), 1):
        if progress is not None:
            progress("decoding one sample per file", done, len(first_item))
        try:
            dataset.frames(dataset.plan(index, 0))  # sample id `index` = item `index`'s first appearance
        except TrainerError as exc:
            failures.append(f"{exc} (training would stop at it)")
    return failures


@dataclass(frozen=True)
class PlanTarget:
    """The device a plan is made for: its type, its free bytes (``None``: no card to compare with) and in words."""

    device_type: str
    free_bytes: int | None
    description: str
    fp8_matmul: bool = False  # the card multiplies in fp8 (known for the card here, not for --gpu-gib)


def plan_target(cfg: JobConfig, gpu_gib: float | None, gpu_fp8: bool = False) -> PlanTarget:
    """Where the job's memory is planned: a card with ``gpu_gib`` free when given; else the GPU ``train.device``
    resolves to here, with its free memory; ``device: cpu`` on the CPU (no GPU memory to plan); and a job meant for a
    GPU on a machine without one as a CUDA card with no verdict (the plan says what it would need)."""
    if gpu_gib is not None:
        fp8 = " with fp8 matmuls (--gpu-fp8)" if gpu_fp8 else ""
        return PlanTarget("cuda", int(gpu_gib * GIB), f"a card with {gpu_gib:g} GiB free (--gpu-gib){fp8}", gpu_fp8)
    if cfg.train.device == "cpu":
        return PlanTarget("cpu", None, "train.device is cpu: the job trains on the CPU")
    if not torch.cuda.is_available():
        return PlanTarget("cuda", None, "no CUDA GPU here: what a GPU would need; give --gpu-gib N for a verdict on "
                                        "a card with N GiB free (24 for a 24 GB card)")
    device = resolve_device(cfg.train.device)
    free = torch.cuda.mem_get_info(device)[0]
    return PlanTarget("cuda", free, f"{torch.cuda.get_device_name(device)} ({device}), {free / GIB:.1f} GiB free",
                      supports_fp8_matmul(device))


def _check_memory(cfg: JobConfig, target: PlanTarget, gpu_gib: float | None, result: JobCheck) -> None:
    """The VRAM plan against ``target``'s free memory (:func:`~.memory.planner.check_plan`'s verdict and advice),
    and the host-RAM estimate (against this machine's RAM unless the job runs elsewhere: ``gpu_gib``)."""
    try:
        plan = estimate_peak_vram(cfg, model_arch(cfg.model), target.free_bytes, device_type=target.device_type,
                                  fp8_matmul=target.fp8_matmul)
    except TrainerError as exc:
        result.fail("VRAM plan", exc)
        return
    text = plan.summary()
    try:
        check_plan(plan)
    except ConfigError as exc:
        text = str(exc)  # the summary and the settings that would fit
        needs = f"{text.splitlines()[0].rstrip('.')}; see 'VRAM plan' for what to change"
        if cfg.memory.check_vram:
            result.reasons.append(needs)
        else:
            result.warnings.append(f"{needs} - memory.check_vram is off: training would try anyway")
    result.sections.append(("VRAM plan", f"planned for {target.description}\n{text}"))
    host = estimate_host_memory(cfg, plan)
    result.sections.append(("host RAM", host.summary()))
    warning = host_memory_warning(host) if gpu_gib is None else None  # planned for another machine: its RAM unknown
    if warning:
        result.warnings.append(f"{warning}; see 'host RAM'")
