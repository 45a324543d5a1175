"""The training recipe: both Wan 2.2 experts, one LoRA each, multi-stage switching, flow matching.

Reads top to bottom: :func:`run_training` runs the pre-flight checks and claims the run folder; :class:`Trainer`
builds the run (memory plan, conditioning, experts one at a time, resumed progress, the batch stream), then
:meth:`Trainer.train` runs rounds of optimizer steps (one step; with expert groups one step per expert, run by the
two GPU groups at once): pick the active expert, run :func:`~.step.train_step` on its micro-batches, exchange the
round, log, checkpoint. Where the work happens (one process, data parallel, sharded, expert groups) is the
:class:`~.placement.Placement`'s business; the loop never asks which one it is. Every random draw of a step comes
from a generator seeded by (seed, step, micro-batch) and the data order from (seed, epoch), so a resumed run
reproduces the uninterrupted one exactly, and any number of ranks, in any placement, computes what one process would.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import JobConfig
from ..data import LatentCache, LoadedBatch, VideoDataset, batch_refs, build_dataset
from ..data.text_cache import unload_caption
from ..errors import ConfigError, TrainerError, TrainingDiverged
from ..fileio import check_writable
from ..lora import check_lora_init, init_warnings, lora_file_name
from ..memory import ExpertMemory, plan_job
from ..memory.planner import experts_load_on_device
from ..memory.swap import SwitchRecord
from ..models import WanComponents, check_model_files, encode_video, load_components, load_expert
from ..names import DTYPES, EXPERTS
from ..quant import check_ara_source, quantize_text_encoder
from ..quant.choice import resolve_transformer_quant
from ..regularizers import check_regularizers
from ..schedule import active_expert, expert_step_counts
from ..timing import logged_seconds
from .checkpoints import expert_snapshot, load_checkpoint, save_checkpoint
from .conditioning import Conditioner, setup_conditioning
from .distributed import (
    DistContext,
    PeerStopped,
    RanksRefused,
    check_expert_groups,
    failed_ranks,
    init_distributed,
    on_every_rank,
    peer_failure,
    record_failure,
)
from .event_log import EventLog, check_tensorboard, open_event_log
from .experts import block_plan_for, prepare_expert
from .objective import MicroBatch, Objective, check_objective, dop_captions
from .placement import Placement, RankBatch, make_placement, resolve_device
from .previews import PreviewProgress, PreviewRenderer, previews_enabled
from .quantization import quantize_experts
from .resume import check_resume_compatible
from .runs import (
    Manifest,
    RunFolder,
    check_resume,
    dataset_key,
    find_finished_run,
    open_run,
    read_losses,
    read_validation,
    resolve_resume,
    state_config,
    write_run_config,
)
from .step import draw_micro_batch, train_step
from .stop import ignore_stop_signals, signals_held
from .validation import Validator, validation_captions, validation_set

log = logging.getLogger(__name__)


@dataclass
class StepInfo:
    """What one finished optimizer step reports to progress displays."""

    step: int
    total_steps: int
    expert: str
    loss: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    """Where a run left its files, and its loss history as (step, expert, loss): training losses and validation
    losses."""

    run_dir: Path
    step: int
    lora_files: dict[str, Path] = field(default_factory=dict)
    state_file: Path | None = None
    losses: list[tuple[int, str, float]] = field(default_factory=list)
    trained: bool = True  # False: an earlier run's result, returned without training (see finished_result)
    validation: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class _Progress:
    """Mutable loop position; everything needed (besides weights/optimizers) to resume exactly."""

    step: int = 0
    epoch: int = 0
    batch_pos: int = 0
    losses: list[tuple[int, str, float]] = field(default_factory=list)
    dataset: str = ""
    validation: list[tuple[int, str, float]] = field(default_factory=list)


def expert_seed(seed: int, expert: str) -> int:
    """The seed of one expert's set-up draws (LoRA initialisation, calibration batches)."""
    entropy = [seed, 1 + EXPERTS.index(expert)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def job_dataset(cfg: JobConfig) -> VideoDataset:
    """The job's dataset (scanned and probed; nothing decoded), as training reads it."""
    if not cfg.datasets:
        raise ConfigError("datasets: no dataset configured - add at least one folder under 'datasets'")
    caption_override = unload_caption(cfg.text_encoder.mode, cfg.trigger_word)
    return build_dataset(cfg.datasets, cfg.trigger_word, cfg.train.seed, caption_override)


def check_output_folders(cfg: JobConfig, create: bool = True) -> None:
    """Refuse an output or cache folder the run could not write, before the text encoder runs (minutes on real
    weights) rather than when its first file is written. ``create=False`` (``check``) leaves no folder behind."""
    out = Path(cfg.save.output_dir)
    check_writable(out, "save.output_dir", create)
    if cfg.text_encoder.cache_dir:
        check_writable(cfg.text_encoder.cache_dir, "text_encoder.cache_dir", create)
    if cfg.quant.ara_cache_dir and cfg.quant.transformer == "4bit_ara":
        check_writable(cfg.quant.ara_cache_dir, "quant.ara_cache_dir", create)


def run_warnings(cfg: JobConfig, dataset: VideoDataset, ctx: DistContext) -> list[str]:
    """Settings that run, but not as written: a batch larger than the dataset, placements without torchrun, init
    files whose names say they are swapped."""
    warnings = []
    if cfg.train.batch_size > dataset.samples_per_epoch:
        warnings.append(f"train.batch_size is {cfg.train.batch_size} but an epoch has {dataset.samples_per_epoch} "
                        "sample(s): every batch holds the whole epoch - lower batch_size or add clips / repeats")
    placed = [k for k in ("expert_groups", "shard_experts") if getattr(cfg.distributed, k)]
    if placed and not ctx.active:
        warnings.append(f"distributed.{placed[0]} is on but this is one process: it trains as a single GPU - launch "
                        "with torchrun (or Train LoRA's gpus) on 2 or more GPUs, or turn it off")
    return warnings + init_warnings(cfg)


def check_same_dataset(dataset: VideoDataset, ctx: DistContext) -> None:
    """Every rank scanned the dataset folders itself: refuse to train unless all found the same data (a folder that
    changes during start-up, e.g. a copy still running, would otherwise give the ranks different batches)."""
    if not ctx.active:
        return
    found = ctx.all_gather_object((dataset_key(dataset), len(dataset.items), dataset.samples_per_epoch))
    if len({key for key, _, _ in found}) > 1:
        counts = ", ".join(f"rank {r}: {n} item(s)/{s} sample(s)" for r, (_, n, s) in enumerate(found))
        raise RanksRefused(f"the dataset changed while the {ctx.world} processes read it ({counts}) - wait until "
                           "its folders stop changing (a copy or sync still running) and start again")


def open_run_on_ranks(cfg: JobConfig, dataset: VideoDataset, ctx: DistContext) -> RunFolder:
    """Rank 0 claims the run folder (:func:`open_run`); every other rank learns it, or rank 0's refusal."""
    opened, error = None, None
    if ctx.is_main:
        try:
            opened = open_run(cfg, dataset)
        except TrainerError as exc:
            error = exc
    shared = ctx.broadcast_object(str(error) if error is not None else
                                  (opened.path, opened.manifest, opened.resume_path) if opened is not None else None)
    if error is not None:
        raise error
    if isinstance(shared, str):
        raise ConfigError(shared)
    return opened or RunFolder(shared[0], shared[1], resume_path=shared[2])


def preflight(cfg: JobConfig, model_files: bool = True, dry_run: bool = False) -> None:
    """Every check that needs no model and no data, before anything slow: the CLI, the nodes and
    :func:`run_training` all run it. ``model_files``: also read the model files' headers (a wrong path or model
    fails before minutes of loading; skipped when the caller brings loaded models). ``dry_run`` (``check``): create
    no folder."""
    resolve_device(cfg.train.device)
    unload_caption(cfg.text_encoder.mode, cfg.trigger_word)
    check_regularizers(cfg)
    check_objective(cfg)
    check_ara_source(cfg.quant)
    check_lora_init(cfg)
    check_output_folders(cfg, create=not dry_run)
    check_tensorboard(cfg)
    check_resume(cfg)
    if model_files:
        previews, stages = previews_enabled(cfg), cfg.multistage.stages
        check_model_files(cfg.model, high=previews or "high" in stages, low=previews or "low" in stages)


def run_training(
    cfg: JobConfig,
    *,
    components: WanComponents | None = None,
    dataset: VideoDataset | None = None,
    on_run: Callable[[RunFolder], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_sample: Callable[[int, list[torch.Tensor]], None] | None = None,
    on_preview_step: PreviewProgress | None = None,
    progress_bar: bool = True,
    stop_file: Path | None = None,
) -> TrainResult:
    """Train the configured experts' LoRAs and write them (and resumable states) into the run's own folder.

    Everything that needs no model is checked first; then the run claims its folder (``<output_dir>/<name>``,
    ``<name>_run2``, ...; with ``resume`` the resumed run's) and tells ``on_run``. ``on_step`` is called after each
    optimizer step; an exception raised there (e.g. a user interrupt) stops training after writing the LoRA pair and
    resumable state of the last completed step.
    ``on_sample(step, videos)`` receives each preview's frames ([F, H, W, 3] in 0..1) when ``cfg.sample`` renders
    previews; ``on_preview_step(step, done, total)`` after each of its denoising steps (an exception raised there
    stops training like one raised in ``on_step``). With expert groups, a ``stop_file`` that appears (or a first SIGINT/SIGTERM) stops every rank at the
    end of the round in flight, with a resumable state. A resume of a state at ``train.steps`` loads no model and
    returns that run's pair.
    """
    ctx = init_distributed(cfg.train.device)
    with _rank_failures(ctx) as opened:
        cfg, dataset = on_every_rank(ctx, lambda: _startup_checks(cfg, ctx, components is None, dataset))
        check_same_dataset(dataset, ctx)
        if ctx.is_main:
            log.info("%s", dataset.report())
            for warning in run_warnings(cfg, dataset, ctx):
                log.warning("warning: %s", warning)
        if cfg.resume and (done := finished_result(cfg)) is not None:
            return done
        with open_run_on_ranks(cfg, dataset, ctx) as run:
            opened.append(run)
            if on_run is not None:
                on_run(run)
            try:
                trainer = Trainer(cfg, make_placement(cfg, ctx), run, dataset, on_sample, on_preview_step)
                trainer.build(components)
                result = trainer.train(on_step, progress_bar, stop_file)
            except TrainingDiverged:
                run.status = "diverged"
                raise
            except KeyboardInterrupt:  # Ctrl-C, SIGTERM, a stop request: one line on what is kept and how to go on
                if ctx.is_main:
                    log.warning("training stopped: %s%s", _failed_elsewhere(ctx), run.stop_message())
                raise
            run.status = "finished"
            return result


def _startup_checks(
    cfg: JobConfig, ctx: DistContext, model_files: bool, dataset: VideoDataset | None
) -> tuple[JobConfig, VideoDataset]:
    """What every rank checks and scans before any collective of the run: the settings (with the transformer's
    quantization resolved for the device), the pre-flight, the expert groups (before the run folder is claimed: a
    refusal leaves none) and the dataset."""
    cfg = resolve_transformer_quant(cfg, resolve_device(cfg.train.device))
    preflight(cfg, model_files=model_files)
    if ctx.active and cfg.distributed.expert_groups:
        check_expert_groups(ctx, cfg.multistage.stages)
    return cfg, dataset or job_dataset(cfg)


@contextmanager
def _rank_failures(ctx: DistContext) -> Iterator[list[RunFolder]]:
    """Several processes: this rank's own error is recorded for the others (:func:`record_failure`) before it goes
    on, and a collective broken by another rank's exit becomes :class:`PeerStopped`, one line naming that rank and
    what the run kept. Yields the list the run folder is put in once claimed."""
    opened: list[RunFolder] = []
    try:
        yield opened
    except Exception as exc:
        if not ctx.active:
            raise
        ignore_stop_signals()  # torchrun's closing SIGTERM (sent as this or another rank exits) must not cut the line
        if not peer_failure(exc):
            record_failure(str(exc))
            raise
        kept = _kept(ctx, opened[0]) if opened else "nothing was saved (training had not started) - start again"
        why = _failed_elsewhere(ctx) or "another process of this run ended (killed, out of memory or crashed); "
        raise PeerStopped(f"training stopped: {why}{kept}") from None


def _kept(ctx: DistContext, run: RunFolder) -> str:
    """:meth:`RunFolder.stop_message` as the run folder holds it now: rank 0 records each checkpoint in the manifest,
    so another rank (speaking when rank 0 is gone) reads it from disk instead of its copy from the start."""
    if not ctx.is_main:
        run = RunFolder(run.path, Manifest.read(run.path) or run.manifest)
    return run.stop_message()


def _failed_elsewhere(ctx: DistContext) -> str:
    """``rank N failed (its own error is above); `` for the other ranks that recorded an error, else ''."""
    others = [r for r in failed_ranks() if r != ctx.rank]
    return f"rank {', '.join(map(str, others))} failed (its own error is above); " if others else ""


def finished_result(cfg: JobConfig, dataset: VideoDataset | None = None) -> TrainResult | None:
    """A result that needs no training (and no model): with ``dataset``, the newest finished run of this job with
    the same settings and data; with ``resume``, a state at ``train.steps`` (the pair saved beside it)."""
    if dataset is not None and (run := find_finished_run(cfg, dataset)) is not None:
        step = run.manifest.step
        return TrainResult(run.path, step, run.pair(step), None, read_losses(run.path), trained=False,
                           validation=read_validation(run.path))
    if not cfg.resume:
        return None
    step, state = resolve_resume(cfg)
    if step != cfg.train.steps:
        return None
    saved = state_config(state)
    check_resume_compatible(saved, step, cfg, str(state))
    log.info("resume: %s is at train.steps (%d): nothing to train; its LoRA pair is the result", state, step)
    files = {n: state.parent / lora_file_name(saved.get("name", cfg.name), step, n) for n in cfg.multistage.stages}
    losses = [row for row in read_losses(state.parent) if row[0] <= step]
    validation = [row for row in read_validation(state.parent) if row[0] <= step]
    return TrainResult(state.parent, step, {n: p for n, p in files.items() if p.is_file()}, state, losses,
                       trained=False, validation=validation)


class VaeEncoder:
    """The run's VAE on its device, as the latent cache calls it for clips not cached yet; counts the clips and the
    seconds it spent (logged at the end of the run)."""

    def __init__(self, vae: torch.nn.Module, device: torch.device) -> None:
        self.vae, self.device = vae, device
        self.clips, self.seconds = 0, 0.0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = encode_video(self.vae, pixels.to(self.device, self.vae.dtype))
        self.clips, self.seconds = self.clips + len(pixels), self.seconds + time.perf_counter() - t0
        return out


class BatchStream:
    """This rank's slices (:class:`~.placement.RankBatch`) of the run's global batches from a saved position, each
    loaded ahead with its latents; :attr:`epoch` and :attr:`position` name the batch after the last one taken."""

    def __init__(self, trainer: Trainer, epoch: int, position: int, first_step: int) -> None:
        cfg, placement = trainer.cfg, trainer.placement
        self.epoch, self.position = epoch, position
        per_step = cfg.train.gradient_accumulation
        refs = batch_refs(trainer.dataset, cfg.train.batch_size, epoch, position)
        # the batch of the k-th micro-batch from here belongs to step first_step + k // per_step: a step this rank
        # does not train (the other expert group's) gets an empty slice, so nothing is loaded for it
        sliced = (placement.slice(ref, placement.trains(first_step + k // per_step)) for k, ref in enumerate(refs))
        self._loaded = trainer.latent_cache.prefetch(trainer.dataset, sliced, cfg.train.num_workers)

    def take(self, n: int) -> list[tuple[RankBatch, LoadedBatch]]:
        """The next ``n`` batches (one step's micro-batches) with their loaded samples."""
        out = []
        for _ in range(n):
            batch, loaded = next(self._loaded)
            out.append((batch, loaded))
            self.epoch, self.position = batch.epoch, batch.position + 1
        return out

    def close(self) -> None:
        self._loaded.close()


@dataclass
class _Round:
    """The optimizer steps of one round and what every rank learned of them."""

    steps: list[int]
    experts: list[str]
    losses: list[float]
    lrs: list[float]
    stop: bool  # a stop was requested: save and stop after this round
    switch: SwitchRecord | None  # the expert switch this round made (its copy is logged)


class Trainer:
    """One run of the recipe. :meth:`build` sets it up (memory plan, conditioning, experts, resumed progress, batch
    stream), :meth:`train` runs it, :meth:`checkpoint` saves it. Extension points: the :class:`Placement` (where the
    work happens), the :class:`~.objective.Objective` (what a micro-batch optimizes) and
    :func:`~.step.train_step` (one optimizer step)."""

    def __init__(
        self,
        cfg: JobConfig,
        placement: Placement,
        run: RunFolder,
        dataset: VideoDataset,
        on_sample: Callable[[int, list[torch.Tensor]], None] | None = None,
        on_preview_step: PreviewProgress | None = None,
    ) -> None:
        self.cfg, self.placement, self.run, self.dataset = cfg, placement, run, dataset
        self.device = placement.device
        self.on_sample, self.on_preview_step = on_sample, on_preview_step
        self.board = EventLog()  # TensorBoard's, once train() opens it
        self.result = TrainResult(run_dir=run.path, step=0)
        self.saved_step, self.failed_save = -1, -1  # the last step saved; a step whose save failed

    # --- build ---------------------------------------------------------------------------------------------------

    def build(self, components: WanComponents | None) -> None:
        """Everything before the first step, in the order that keeps memory low: plan, captions, experts."""
        self._setup_memory()
        self._setup_conditioning(components)
        self._setup_experts()
        self._setup_progress()
        if self.placement.ctx.is_main:
            write_run_config(self.run, self.cfg, self.prog.step)

    def _setup_memory(self) -> None:
        """The memory plan before anything loads: refuses settings that cannot fit the GPU."""
        cfg, device = self.cfg, self.device
        self.plan = plan_job(cfg, device, self.placement.ctx.world)  # also sets the allocator's expandable segments
        self.memory = ExpertMemory.for_plan(cfg.memory, self.plan, device)
        self.blocks = block_plan_for(cfg, self.plan, device, self.placement.sharded)
        log.info("transformer blocks: %s", self.blocks.describe())

    def _setup_conditioning(self, components: WanComponents | None) -> None:
        """Text encoder, VAE and previews; every caption's embedding ready before any expert arrives. The experts
        come later, one at a time, each just before it is quantized and placed: one unquantized 14B expert in memory
        at a time, and the text encoder gone (cached captions) before they arrive."""
        cfg, device = self.cfg, self.device
        self.components = components = components or load_components(cfg.model, high=False, low=False)
        torch.manual_seed(cfg.train.seed)
        if components.text_encoder is not None and cfg.quant.text_encoder != "bf16":
            log.info("%s", quantize_text_encoder(components.text_encoder, cfg.quant, device).summary())
        self.renderer = None
        if previews_enabled(cfg) and self.placement.ctx.is_main:
            self.renderer = PreviewRenderer(cfg, components, device, self.run.path / "samples", self._on_sample,
                                            self.on_preview_step)
        held = validation_set(cfg, self.dataset)
        with logged_seconds(log, "caption embeddings ready"):
            extra = dop_captions(cfg, self.dataset.captions()) | validation_captions(held)
            condition = setup_conditioning(cfg, components, self.dataset, extra, device)
        # Autocast only on CUDA: on CPU the weights' own dtype is used (bf16 autocast on CPU is slow and inexact).
        autocast = DTYPES[cfg.train.compute_dtype] if device.type == "cuda" else None
        autocast = None if autocast == torch.float32 else autocast
        self.objective = Objective(cfg, autocast, condition, collective=self.placement.collective_backward)
        vae = components.vae.to(device).eval()
        self.encoder = VaeEncoder(vae, device)
        self.latent_cache = LatentCache(Path(cfg.save.output_dir) / "latent_cache", f"{components.base_model}|{vae.dtype}")
        self.validator = self._setup_validation(held, condition)

    def _setup_validation(self, held: VideoDataset | None, condition: Conditioner) -> Validator | None:
        """The validation loss on the held-out clips ``held`` (their latents read or encoded now, while no expert
        takes memory), or ``None`` when there are none."""
        if held is None:
            return None
        with logged_seconds(log, f"{len(held)} held-out clip(s) ready for the validation loss"):
            return Validator(self.cfg, held, lambda i: self.latent_cache.get_or_encode(held, [i], 0, self.encoder),
                             condition, self.objective.settings, self.placement)  # fmt: skip

    def _calibration_latents(self, ids: list[int], epoch: int) -> torch.Tensor:
        return self.latent_cache.get_or_encode(self.dataset, ids, epoch, self.encoder).to(self.device, torch.float32)

    def _setup_experts(self) -> None:
        """This rank's experts, one at a time (a quantized expert can leave the GPU before the next one arrives);
        previews need both experts: one not trained here waits on the CPU between previews."""
        cfg, components, mine = self.cfg, self.components, self.placement.experts()
        wanted = [n for n in EXPERTS if previews_enabled(cfg) or n in mine]
        # Straight to the GPU only experts that stay there: a preview-only expert waits on the CPU.
        on_gpu = set(wanted) <= set(mine) and experts_load_on_device(cfg, self.plan, len(wanted),
                                                                     self.placement.sharded)  # fmt: skip
        counts = expert_step_counts(cfg.train.steps, self.placement.stages, cfg.multistage.switch_every)
        self.experts = {}
        for n in mine:
            model = getattr(components, n) or load_expert(cfg.model, n, components, self.device if on_gpu else "cpu")
            # Each expert's random draws (LoRA init, calibration) from its own seed: the same in every placement.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(expert_seed(cfg.train.seed, n))
                with logged_seconds(log, f"{n}-noise expert ready (quantization: {cfg.quant.transformer})"):
                    quantize_experts(cfg, {n: model}, self.dataset, self._calibration_latents,
                                     self.objective.condition, self.device)  # fmt: skip
                    self.experts[n] = prepare_expert(n, model, cfg, counts[n], self.memory, self.blocks,
                                                     self.placement.shard_fn())  # fmt: skip
            if cfg.memory.low_vram and len(mine) > 1:
                self.memory.offload(n)
        for n in wanted:
            if getattr(components, n) is None:
                load_expert(cfg.model, n, components)
        self.models = {n: getattr(components, n) for n in EXPERTS}

    def _setup_progress(self) -> None:
        """Fresh progress, or the resumed state's (weights, optimizers and RNG restored), and the batch stream from
        that position."""
        self.prog = _Progress(dataset=self.dataset.fingerprint())
        resume_path = self.run.resume_path
        if resume_path is not None:
            saved = load_checkpoint(resume_path, self.cfg, self.experts)
            if saved.get("dataset") != self.prog.dataset and self.placement.ctx.is_main:
                log.warning("resume: the dataset changed since %s was saved; the data order will differ", resume_path)
            self.prog = _Progress(saved["step"], saved["epoch"], saved["batch_pos"], saved["losses"], self.prog.dataset,
                                  saved["validation"])
            self.saved_step = self.prog.step
        self.result.step = self.prog.step
        self.stream = BatchStream(self, self.prog.epoch, self.prog.batch_pos, self.prog.step)

    # --- step ----------------------------------------------------------------------------------------------------

    def _take_batches(self) -> list[tuple[RankBatch, LoadedBatch]]:
        """The next step's micro-batches from the stream, advancing the position a state would save."""
        batches = self.stream.take(self.cfg.train.gradient_accumulation)
        self.prog.epoch, self.prog.batch_pos = self.stream.epoch, self.stream.position
        return batches

    def _micro_batches(self, step: int, expert: str) -> Iterator[MicroBatch | None]:
        """Step ``step``'s micro-batches, each encoded and drawn only when the step asks for it (``None``: this rank
        got no sample of it, a bucket's short last batch)."""
        for micro, (batch, loaded) in enumerate(self._take_batches()):
            if not batch.sample_ids:
                yield None
                continue
            x0 = self.latent_cache.finish(loaded, self.encoder).to(self.device, torch.float32)
            captions, regularization = [p.caption for p in loaded.plans], [p.is_regularization for p in loaded.plans]
            yield draw_micro_batch(self.cfg, batch, x0, captions, regularization, expert, step, micro)

    def _run_round(self, stop_requested: Callable[[], bool]) -> _Round:
        """The optimizer steps of the next round this rank trains (the others' batches pass by unloaded), and the
        round as every rank learns it; a non-finite loss stops training."""
        cfg, every, stages = self.cfg, self.cfg.multistage.switch_every, self.placement.stages
        steps = self.placement.round(self.prog.step)
        names = [active_expert(s, stages, every) for s in steps]
        trained = [self.placement.trains(s) for s in steps]
        losses, lrs, switch = [], [], None
        for step, name, mine in zip(steps, names, trained):
            if not mine:
                self._take_batches()
                losses.append(0.0)
                lrs.append(0.0)
                continue
            switch = self.memory.activate(name) or switch
            upcoming = active_expert(step + 1, stages, every)
            if upcoming != name and self.plan.prefetch_next_expert:
                self.memory.prefetch(upcoming)  # overlap the next switch's copy with this step
            lrs.append(self.experts[name].scheduler.get_last_lr()[0])  # the lr this step trains with
            micro_batches = self._micro_batches(step, name)
            losses.append(train_step(self.experts[name], micro_batches, self.objective, self.placement,
                                     cfg.optimizer.max_grad_norm))  # fmt: skip
        losses, lrs, stop = self.placement.exchange(trained, losses, lrs, stop_requested())
        for step, name, loss in zip(steps, names, losses):
            if not math.isfinite(loss):
                raise _diverged(step, name, loss, self.run if self.placement.ctx.is_main else None, cfg)
        return _Round(steps, names, losses, lrs, stop, switch)

    # --- checkpoint ----------------------------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Write the LoRA pair and the resumable state on rank 0, from every expert's snapshot the placement
        collects there."""
        cfg = self.cfg
        snaps = self.placement.collect(lambda n, to_cpu: expert_snapshot(self.experts[n], cfg, cpu=to_cpu))
        if snaps is None:
            return
        with logged_seconds(log, f"checkpoint of step {self.prog.step} written"):
            self.result.lora_files, self.result.state_file = save_checkpoint(
                cfg, self.components.base_model, snaps, vars(self.prog), self.run
            )

    def _save_due(self, first: int, stop: bool) -> None:
        """Save when a periodic save step fell into the round just run, at the last step, or before a stop."""
        every, step = self.cfg.save.save_every, self.prog.step
        if (every and step // every > first // every) or step == self.cfg.train.steps or stop:
            self.failed_save = step  # until it succeeds: a save that failed is not tried again on the way out
            with signals_held(redeliver=True):  # a Ctrl-C now stops the run once this step is saved
                self.checkpoint()
            self.saved_step, self.failed_save = step, -1

    def _save_on_the_way_out(self, start_pos: tuple[int, int] | None) -> None:
        """Interrupted (Ctrl-C, a UI cancel raised from on_step, an error): keep a resumable state of the last
        completed step, unless that step was just saved or the placement cannot save alone."""
        if start_pos is not None:  # the half-accumulated step is discarded; its batches will be drawn again on resume
            self.prog.epoch, self.prog.batch_pos = start_pos
        step = self.prog.step
        if step > 0 and step not in (self.saved_step, self.failed_save) and self.placement.saves_when_interrupted(step):
            with signals_held(redeliver=False) as held:  # a second Ctrl-C must not cut this save short
                self.checkpoint()  # the LoRA pair so far, and the state unless save_training_state is off
            if held:
                log.warning("%s during the save of step %d: the save was finished first",
                            signal.Signals(held[0]).name, step)

    # --- run -----------------------------------------------------------------------------------------------------

    def _finish_round(self, rnd: _Round, seconds: float, bar: tqdm, on_step: Callable[[StepInfo], None] | None) -> None:
        """Record the round, report it, save what is due, render due previews; a requested stop ends here."""
        prog, first = self.prog, self.prog.step
        prog.step += len(rnd.steps)
        numbers = range(first + 1, prog.step + 1)
        prog.losses.extend(zip(numbers, rnd.experts, rnd.losses))
        dt = seconds / len(rnd.steps)
        if rnd.switch is not None:
            log.info("switched to the %s-noise expert: %.1f GiB in %.2f s", rnd.experts[-1],
                     rnd.switch.nbytes / 2**30, rnd.switch.copy_seconds())  # fmt: skip
        bar.update(len(rnd.steps))
        bar.set_postfix(expert=rnd.experts[-1], loss=f"{rnd.losses[-1]:.4f}", lr=f"{rnd.lrs[-1]:.2e}",
                        s_per_step=f"{dt:.2f}")  # fmt: skip
        self.board.steps(numbers, rnd.experts, rnd.losses, rnd.lrs, dt)
        if self.validator is not None and self.validator.due(first, prog.step):
            self._validate()  # before the save that is due with it, which keeps its figures
        self._save_due(first, rnd.stop)
        if self.renderer is not None and self.renderer.due(prog.step):
            self.renderer.render(prog.step, self.models, self.experts)
        if rnd.stop:
            raise KeyboardInterrupt(f"stopped after step {prog.step} (resumable state written)")
        if on_step is not None:
            for step, name, loss, lr in zip(numbers, rnd.experts, rnd.losses, rnd.lrs):
                on_step(StepInfo(step, self.cfg.train.steps, name, loss, lr, dt))

    def train(
        self, on_step: Callable[[StepInfo], None] | None, progress_bar: bool = True, stop_file: Path | None = None
    ) -> TrainResult:
        """Run the rounds up to ``train.steps``; on any interruption keep a resumable state (see
        :meth:`_save_on_the_way_out`) and re-raise."""
        cfg, prog = self.cfg, self.prog
        self.board = open_event_log(cfg, self.run.path, self.placement.ctx.is_main, prog.step)
        bar = tqdm(total=cfg.train.steps, initial=prog.step, dynamic_ncols=True,
                   disable=not (progress_bar and self.placement.ctx.is_main))  # fmt: skip
        with self.placement.stop_requests(stop_file) as stop_requested:
            start_pos = None  # the position before the step in flight, while one is
            try:
                if prog.step == 0:
                    self._before_first_step()
                while prog.step < cfg.train.steps:
                    t0, start_pos = time.perf_counter(), (prog.epoch, prog.batch_pos)
                    rnd = self._run_round(stop_requested)
                    start_pos = None
                    self._finish_round(rnd, time.perf_counter() - t0, bar, on_step)
            except TrainingDiverged:
                bar.close()
                raise
            except BaseException:
                bar.close()
                self._save_on_the_way_out(start_pos)
                raise
            finally:
                self.stream.close()
                self.board.close()
                self.memory.close()  # ordinary models again for whoever uses them next (offloaded ones in host memory)
        bar.close()
        self._log_totals()
        self.result.step, self.result.losses = prog.step, list(prog.losses)
        self.result.validation = list(prog.validation)
        return self.result

    def _before_first_step(self) -> None:
        """A fresh run's step 0: the validation loss's starting point, and previews if ``sample_at_start``."""
        if self.validator is not None:
            self._validate()
        if self.renderer is not None and self.renderer.due(0):
            self.renderer.render(0, self.models, self.experts)

    def _validate(self) -> None:
        """The validation loss of every trained expert now, kept with the progress (the next state and losses.csv
        hold it) and reported to TensorBoard."""
        step = self.prog.step
        order = sorted(self.experts, key=lambda n: n != self.memory.active)  # the expert on the GPU first: one swap
        values = self.validator.evaluate(step, {n: self.experts[n].model for n in order}, self.memory.activate)
        self.prog.validation.extend((step, n, v) for n, v in values.items())
        self.board.validation(step, values)

    def _on_sample(self, step: int, videos: list[torch.Tensor]) -> None:
        """A rendered preview: to TensorBoard, then to the caller's ``on_sample``."""
        self.board.previews(step, videos)
        if self.on_sample is not None:
            self.on_sample(step, videos)

    def _log_totals(self) -> None:
        if self.encoder.clips:
            log.info("VAE encoding: %d clip(s) in %.1f s", self.encoder.clips, self.encoder.seconds)
        if self.device.type == "cuda":
            # retries: allocations that first failed and freed cached blocks (a synchronizing slowdown near the limit)
            stats = torch.cuda.memory_stats(self.device)
            log.info("GPU memory: peak %.1f GiB allocated (planned %.1f GiB), %.1f GiB reserved, %d allocator retries",
                     stats.get("allocated_bytes.all.peak", 0) / 2**30, self.plan.peak_bytes / 2**30,
                     stats.get("reserved_bytes.all.peak", 0) / 2**30, stats.get("num_alloc_retries", 0))


def _diverged(step: int, expert: str, loss: float, run: RunFolder | None, cfg: JobConfig) -> TrainingDiverged:
    """The error for a non-finite loss (or gradient) at 0-based ``step``. Every state saved since ``expert`` last
    updated its weights holds the weights that produced it, and resuming one would replay the same step with the
    same batch and weights whatever the new lr: ``run`` (rank 0's) sets them aside, and the message names the last
    good state."""
    stages, every = cfg.multistage.stages, cfg.multistage.switch_every
    last_update = next((k + 1 for k in range(step - 1, -1, -1) if active_expert(k, stages, every) == expert), 0)
    if last_update == 0:
        return _diverged_before_any_update(step, expert, loss, cfg)
    moved = run.set_aside_states(last_update) if run is not None else []
    what = (f"the loss (or its gradient) became {loss} at step {step + 1} ({expert}-noise expert); nothing was "
            "saved for it")
    if moved:
        what += (f"; the state(s) holding the weights that led to it are set aside as "
                 f"{', '.join(p.name for p in moved)}")
    states = run.states() if run is not None else []
    if states:
        good_step, good = states[-1]
        return TrainingDiverged(f"{what} - the last good state is step {good_step} ({good}): lower optimizer.lr "
                                "(e.g. 5e-5) and resume with --resume latest (Train LoRA: resume = latest)")
    return TrainingDiverged(f"{what} - lower optimizer.lr (e.g. 5e-5) and resume from an earlier good state, or "
                            "start again")


def _diverged_before_any_update(step: int, expert: str, loss: float, cfg: JobConfig) -> TrainingDiverged:
    """The error for a non-finite loss at ``expert``'s first step: its LoRA has not been updated yet, so no learning
    rate caused it - the base model's prediction (or the starting LoRA, or the data) is not finite."""
    model = getattr(cfg.model, f"{expert}_noise") or cfg.model.source or "the base model"
    start = cfg.lora.init_high if expert == "high" else cfg.lora.init_low
    suspects = f"the {expert}-noise expert's weights ({model})" + (f" or its starting LoRA ({start})" if start else "")
    return TrainingDiverged(
        f"the loss (or its gradient) became {loss} at step {step + 1}, the {expert}-noise expert's first, before any "
        f"LoRA update, so no learning rate caused it: {suspects} or the clips give non-finite values - check that "
        "the model file is an unmodified download (its size and checksum against the source)"
    )


def losses_summary(losses: list[tuple[int, str, float]], buckets: int = 10) -> str:
    """A small text table of mean loss per expert over ``buckets`` equal step ranges (for the CLI)."""
    if not losses:
        return "(no steps)"
    last = max(s for s, _, _ in losses)
    width = max(1, math.ceil(last / buckets))
    lines = [f"{'steps':>13}  {'high':>8}  {'low':>8}"]
    for b in range(math.ceil(last / width)):
        lo, hi = b * width + 1, (b + 1) * width
        row = []
        for expert in EXPERTS:
            vals = [v for s, e, v in losses if e == expert and lo <= s <= hi]
            row.append(f"{sum(vals) / len(vals):8.4f}" if vals else f"{'-':>8}")
        lines.append(f"{lo:>6}-{hi:<6}  {row[0]}  {row[1]}")
    return "\n".join(lines)
