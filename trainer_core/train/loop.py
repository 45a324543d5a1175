"""The training loop: both Wan 2.2 experts, one LoRA each, multi-stage switching, flow matching.

Reads top to bottom: set up -> (resume) -> for each round of optimizer steps (one step; with expert groups one step
per expert, run by the two GPU groups at once): pick the active expert, accumulate micro-batches, step its optimizer,
log, save. Every random draw of a step comes from a generator seeded by (seed, step, micro-batch) and the data order
from (seed, epoch), so a resumed run reproduces the uninterrupted one exactly, and any number of ranks, in any
placement, computes what one process would.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from ..config import JobConfig
from ..data import BatchRef, LatentCache, VideoDataset, batch_refs, build_dataset
from ..data.text_cache import unload_caption
from ..errors import ConfigError, TrainerError, TrainingDiverged
from ..fileio import atomic_write, check_writable
from ..lora import check_lora_init, lora_file_name, lora_parameters
from ..memory import ExpertMemory, plan_job
from ..memory.planner import experts_load_on_device
from ..timing import logged_seconds
from ..memory.allocator import use_expandable_segments
from ..models import WanComponents, check_model_files, encode_video, load_components, load_expert
from ..quant import check_ara_source, quantize_text_encoder
from ..regularizers import check_regularizers
from ..schedule import active_expert, expert_step_counts, round_steps, sample_sigmas
from .checkpoints import expert_snapshot, load_checkpoint, save_checkpoint
from .conditioning import setup_conditioning
from .distributed import DistContext, expert_groups, init_distributed, shard_frozen_weights
from .experts import block_plan_for, prepare_expert
from .objective import Objective
from .previews import PreviewRenderer, previews_enabled
from .quantization import quantize_experts
from .resume import check_resume_compatible
from .runs import RunFolder, find_finished_run, open_run, read_losses, resolve_resume, state_config
from .stop import stop_at_round_end

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    """Where a run left its files, and its loss history as (step, expert, loss)."""

    run_dir: Path
    step: int
    lora_files: dict[str, Path] = field(default_factory=dict)
    state_file: Path | None = None
    losses: list[tuple[int, str, float]] = field(default_factory=list)
    trained: bool = True  # False: an earlier run's result, returned without training (see finished_result)


@dataclass
class _Progress:
    """Mutable loop position; everything needed (besides weights/optimizers) to resume exactly."""

    step: int = 0
    epoch: int = 0
    batch_pos: int = 0
    losses: list[tuple[int, str, float]] = field(default_factory=list)
    dataset: str = ""


def resolve_device(setting: str) -> torch.device:
    """'auto' -> first CUDA device if present, else CPU; otherwise the named device."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {setting!r} but no CUDA GPU is visible - use 'auto' or 'cpu'")
    return device


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """A CPU generator private to one micro-batch of one step (makes resume exact by construction)."""
    derived = int(np.random.SeedSequence([seed, step, micro]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device="cpu").manual_seed(derived)


def expert_seed(seed: int, expert: str) -> int:
    """The seed of one expert's set-up draws (LoRA initialisation, calibration batches)."""
    entropy = [seed, 1 + ("high", "low").index(expert)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def job_dataset(cfg: JobConfig) -> VideoDataset:
    """The job's dataset (scanned and probed; nothing decoded), as training reads it."""
    if not cfg.datasets:
        raise ConfigError("datasets: no dataset configured - add at least one folder under 'datasets'")
    caption_override = unload_caption(cfg.text_encoder.mode, cfg.trigger_word)
    return build_dataset(cfg.datasets, cfg.trigger_word, cfg.train.seed, caption_override)


def check_output_folders(cfg: JobConfig) -> None:
    """Refuse an output or cache folder the run could not write, before the text encoder runs (minutes on real
    weights) rather than when its first file is written."""
    out = Path(cfg.save.output_dir)
    check_writable(out, "save.output_dir")
    if cfg.text_encoder.cache_dir:
        check_writable(cfg.text_encoder.cache_dir, "text_encoder.cache_dir")
    if cfg.quant.ara_cache_dir and cfg.quant.transformer == "4bit_ara":
        check_writable(cfg.quant.ara_cache_dir, "quant.ara_cache_dir")


def run_warnings(cfg: JobConfig, dataset: VideoDataset, ctx: DistContext) -> list[str]:
    """Settings that run, but not as written: a batch larger than the dataset, placements without torchrun."""
    warnings = []
    if cfg.train.batch_size > dataset.samples_per_epoch:
        warnings.append(f"train.batch_size is {cfg.train.batch_size} but an epoch has {dataset.samples_per_epoch} "
                        "sample(s): every batch holds the whole epoch - lower batch_size or add clips / repeats")
    placed = [k for k in ("expert_groups", "shard_experts") if getattr(cfg.distributed, k)]
    if placed and not ctx.active:
        warnings.append(f"distributed.{placed[0]} is on but this is one process: it trains as a single GPU - launch "
                        "with torchrun (or Train LoRA's gpus) on 2 or more GPUs, or turn it off")
    return warnings


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


def run_training(
    cfg: JobConfig,
    *,
    components: WanComponents | None = None,
    dataset: VideoDataset | None = None,
    on_run: Callable[[RunFolder], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_sample: Callable[[int, list[torch.Tensor]], None] | None = None,
    progress_bar: bool = True,
    stop_file: Path | None = None,
) -> TrainResult:
    """Train the configured experts' LoRAs and write them (and resumable states) into the run's own folder.

    Everything that needs no model is checked first; then the run claims its folder (``<output_dir>/<name>``,
    ``<name>_run2``, ...; with ``resume`` the resumed run's) and tells ``on_run``. ``on_step`` is called after each
    optimizer step; an exception raised there (e.g. a user interrupt) stops training after writing the LoRA pair and
    resumable state of the last completed step.
    ``on_sample(step, videos)`` receives each preview's frames ([F, H, W, 3] in 0..1) when ``cfg.sample`` renders
    previews. With expert groups, a ``stop_file`` that appears (or a first SIGINT/SIGTERM) stops every rank at the
    end of the round in flight, with a resumable state. A resume of a state at ``train.steps`` loads no model and
    returns that run's pair.
    """
    ctx = init_distributed(cfg.train.device)
    resolve_device(cfg.train.device)
    check_regularizers(cfg)
    check_ara_source(cfg.quant)
    check_lora_init(cfg)
    check_output_folders(cfg)
    previews = previews_enabled(cfg)
    if components is None:  # the files' headers: a wrong path or model fails before minutes of loading
        stages = cfg.multistage.stages
        check_model_files(cfg.model, high=previews or "high" in stages, low=previews or "low" in stages)
    dataset = dataset or job_dataset(cfg)
    if ctx.is_main:
        log.info("%s", dataset.report())
        for warning in run_warnings(cfg, dataset, ctx):
            log.warning("warning: %s", warning)
    if cfg.resume and (done := finished_result(cfg)) is not None:
        return done
    with open_run_on_ranks(cfg, dataset, ctx) as run:
        if on_run is not None:
            on_run(run)
        try:
            result = _train(cfg, ctx, run, dataset, components, on_step, on_sample, progress_bar, stop_file)
        except TrainingDiverged:
            run.status = "diverged"
            raise
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM, a stop request: one line on what is kept and how to go on
            if ctx.is_main:
                log.warning("training stopped: %s", run.stop_message())
            raise
        run.status = "finished"
        return result


def finished_result(cfg: JobConfig, dataset: VideoDataset | None = None) -> TrainResult | None:
    """A result that needs no training (and no model): with ``dataset``, the newest finished run of this job with
    the same settings and data; with ``resume``, a state at ``train.steps`` (the pair saved beside it)."""
    if dataset is not None and (run := find_finished_run(cfg, dataset)) is not None:
        step = run.manifest.step
        return TrainResult(run.path, step, run.pair(step), None, read_losses(run.path), trained=False)
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
    return TrainResult(state.parent, step, {n: p for n, p in files.items() if p.is_file()}, state, losses,
                       trained=False)


def _train(
    cfg: JobConfig,
    ctx: DistContext,
    run: RunFolder,
    dataset: VideoDataset,
    components: WanComponents | None,
    on_step: Callable[[StepInfo], None] | None,
    on_sample: Callable[[int, list[torch.Tensor]], None] | None,
    progress_bar: bool,
    stop_file: Path | None,
) -> TrainResult:
    device = resolve_device(cfg.train.device)
    if ctx.active and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    stages = cfg.multistage.stages
    # With expert groups each rank holds one expert and trains its steps, data-parallel within its group.
    groups = expert_groups(ctx, stages) if ctx.active and cfg.distributed.expert_groups else None
    data_ctx = groups.data if groups is not None else ctx
    local_stages = [groups.expert] if groups is not None else stages
    # Autocast only on CUDA: on CPU the weights' own dtype is used (bf16 autocast on CPU is slow and inexact).
    autocast_dtype = _DTYPES[cfg.train.compute_dtype] if device.type == "cuda" else None
    sharded = ctx.active and cfg.distributed.shard_experts
    objective = Objective(cfg, None if autocast_dtype == torch.float32 else autocast_dtype, collective=sharded)
    resume_path = run.resume_path
    run_dir = run.path

    # --- memory plan before anything loads: refuses settings that cannot fit the GPU ---
    plan = plan_job(cfg, device, ctx.world)
    if device.type == "cuda":
        use_expandable_segments()
    memory = ExpertMemory.for_plan(cfg.memory, plan, device)
    blocks = block_plan_for(cfg, plan, device, sharded)
    shard = (lambda model: shard_frozen_weights(model, ctx, device)) if sharded else None
    log.info("transformer blocks: %s", blocks.describe())

    # --- models: previews need both experts; one that is not trained stays on the CPU between previews ---
    previews = previews_enabled(cfg)
    wanted = [n for n in ("high", "low") if previews or n in local_stages]
    # Straight to the GPU only experts that stay there: a preview-only expert waits on the CPU.
    on_gpu = set(wanted) <= set(local_stages) and experts_load_on_device(cfg, plan, len(wanted), sharded)
    # The experts come later, one at a time, each just before it is quantized and placed: one unquantized 14B
    # expert in memory at a time, and the text encoder gone (cached captions) before they arrive.
    components = components or load_components(cfg.model, high=False, low=False)
    torch.manual_seed(cfg.train.seed)
    if components.text_encoder is not None and cfg.quant.text_encoder != "bf16":
        log.info("%s", quantize_text_encoder(components.text_encoder, cfg.quant, device).summary())
    renderer = None
    if previews and ctx.is_main:
        renderer = PreviewRenderer(cfg, components, device, run_dir / "samples", on_sample)
    with logged_seconds(log, "caption embeddings ready"):
        condition = setup_conditioning(cfg, components, dataset, objective.extra_captions(dataset.captions()), device)
    vae = components.vae.to(device).eval()
    latent_cache = LatentCache(Path(cfg.save.output_dir) / "latent_cache", f"{components.base_model}|{vae.dtype}")

    encoded = [0, 0.0]  # clips VAE-encoded in this run, seconds spent

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = encode_video(vae, pixels.to(device, vae.dtype))
        encoded[0], encoded[1] = encoded[0] + len(pixels), encoded[1] + time.perf_counter() - t0
        return out

    def latents(ids: list[int], epoch: int) -> torch.Tensor:
        return latent_cache.get_or_encode(dataset, ids, epoch, encode).to(device, torch.float32)

    def trains(step: int) -> bool:
        """Whether this rank computes optimizer step ``step`` (with expert groups: the other group's steps not)."""
        return groups is None or groups.trains(active_expert(step, stages, cfg.multistage.switch_every))

    global_sizes: deque[int] = deque()
    stand_ins: deque[bool] = deque()

    def rank_batches(epoch: int, position: int, first_step: int) -> Iterator[BatchRef]:
        """The global batch sequence from a saved position (the first one belongs to ``first_step``), each reduced
        to this rank's slice (with sharded weights an empty slice becomes a stand-in sample, trained with weight 0;
        the other expert group's batches become empty, so nothing is loaded for them)."""
        refs = batch_refs(dataset, cfg.train.batch_size, epoch, position)
        for k, ref in enumerate(refs):
            global_sizes.append(len(ref.sample_ids))
            ids = data_ctx.shard(ref.sample_ids) if trains(first_step + k // cfg.train.gradient_accumulation) else []
            stand_ins.append(sharded and not ids)
            if stand_ins[-1]:
                ids = [ref.sample_ids[ctx.rank % len(ref.sample_ids)]]
            yield BatchRef(ref.epoch, ref.position, tuple(ids))

    counts = expert_step_counts(cfg.train.steps, stages, cfg.multistage.switch_every)
    experts = {}
    for n in local_stages:  # one at a time, so a quantized expert can leave the GPU before the next one arrives
        model = getattr(components, n) or load_expert(cfg.model, n, components, device if on_gpu else "cpu")
        # Each expert's random draws (LoRA init, calibration) from its own seed: the same in every placement.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(expert_seed(cfg.train.seed, n))
            with logged_seconds(log, f"{n}-noise expert ready (quantization: {cfg.quant.transformer})"):
                quantize_experts(cfg, {n: model}, dataset, latents, condition, device)
                experts[n] = prepare_expert(n, model, cfg, counts[n], memory, blocks, shard)
        if cfg.memory.low_vram and len(local_stages) > 1:
            memory.offload(n)
    for n in wanted:  # a preview-only expert (not trained here) waits on the CPU
        if getattr(components, n) is None:
            load_expert(cfg.model, n, components)
    models = {"high": components.high, "low": components.low}
    if ctx.is_main:
        atomic_write(run_dir / "config.yaml", lambda p: p.write_text(yaml.safe_dump(cfg.model_dump(mode="json"))))

    prog = _Progress(dataset=dataset.fingerprint())
    if resume_path is not None:
        saved = load_checkpoint(resume_path, cfg, experts)
        if saved.get("dataset") != prog.dataset:
            log.warning("resume: the dataset changed since %s was saved; the data order will differ", resume_path)
        prog = _Progress(saved["step"], saved["epoch"], saved["batch_pos"], saved["losses"], prog.dataset)
    stream = latent_cache.prefetch(dataset, rank_batches(prog.epoch, prog.batch_pos, prog.step), cfg.train.num_workers)
    if renderer is not None and prog.step == 0 and renderer.due(0):
        renderer.render(0, models, experts)
    result = TrainResult(run_dir=run_dir, step=prog.step)
    bar = tqdm(total=cfg.train.steps, initial=prog.step, disable=not (progress_bar and ctx.is_main), dynamic_ncols=True)
    saved_step, failed_save = (prog.step if resume_path else -1), -1
    start_pos, mid_step = (prog.epoch, prog.batch_pos), False

    def checkpoint() -> None:
        """Write LoRAs and state on rank 0; with expert groups the other group's leader sends its expert there."""
        if groups is None:
            if ctx.is_main:
                snaps = {n: expert_snapshot(ex, cfg) for n, ex in experts.items()}
                with logged_seconds(log, f"checkpoint of step {prog.step} written"):
                    result.lora_files, result.state_file = save_checkpoint(
                        cfg, components.base_model, snaps, vars(prog), run
                    )
            return
        mine = expert_snapshot(experts[groups.expert], cfg, cpu=True) if data_ctx.is_main else None
        collected = groups.collect_on_main(mine)  # both group leaders' snapshots, on rank 0
        if collected is not None:
            result.lora_files, result.state_file = save_checkpoint(
                cfg, components.base_model, dict(zip(stages, collected)), vars(prog), run
            )

    def consume_batches() -> list[tuple[BatchRef, Any, int, bool]]:
        """The next step's micro-batches from the stream (advancing the saved position)."""
        batches = []
        for _ in range(cfg.train.gradient_accumulation):
            ref, loaded = next(stream)
            batches.append((ref, loaded, global_sizes.popleft(), stand_ins.popleft()))
            prog.epoch, prog.batch_pos = ref.epoch, ref.position + 1
        return batches

    def train_step(step: int, name: str) -> float:
        """One optimizer step of expert ``name`` on this rank's slices of the step's global batches; returns the
        step's loss (mean over the global batch). A non-finite loss skips the update (the caller stops training)."""
        ex = experts[name]
        step_loss = 0.0
        for micro, (ref, loaded, n_global, stand_in) in enumerate(consume_batches()):
            contribution = 0.0
            if ref.sample_ids:  # a rank can get no sample from a bucket's short last batch
                x0 = latent_cache.finish(loaded, encode).to(device, torch.float32)
                # Noise levels and noise are drawn for the whole global batch, then sliced: N ranks see exactly
                # what one process would.
                gen = step_generator(cfg.train.seed, step, micro)
                sigmas = sample_sigmas(
                    n_global,
                    expert=name,
                    boundary=cfg.multistage.boundary,
                    timestep_type=cfg.train.timestep_type,
                    timestep_bias=cfg.train.timestep_bias,
                    shift=cfg.train.timestep_shift,
                    generator=gen,
                )
                noise = torch.randn((n_global, *x0.shape[1:]), generator=gen, dtype=torch.float32)
                # LoRA dropout draws from the global generator: seed it per micro-batch too, so that a resume (and
                # data workers, which consume global draws in the parent) cannot shift its masks
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
                mine = [data_ctx.rank % n_global] if stand_in else data_ctx.shard(range(n_global))
                share = 0.0 if stand_in else len(mine) / n_global
                captions = [p.caption for p in loaded.plans]
                regularization = [p.is_regularization for p in loaded.plans]
                _, logged = objective(
                    ex.model, x0, noise[mine].to(device), sigmas[mine].to(device), captions, condition, share,
                    regularization,
                )
                contribution = logged * share
            step_loss += data_ctx.sum(contribution) / cfg.train.gradient_accumulation
        if not math.isfinite(step_loss):
            ex.optimizer.zero_grad(set_to_none=True)
            return step_loss
        data_ctx.all_reduce_grads(lora_parameters(ex.model))
        return step_loss if ex.optimizer_step(cfg.optimizer.max_grad_norm) else math.nan

    def share_round(
        steps: list[int], losses: list[float], lrs: list[float], stop: bool
    ) -> tuple[list[float], list[float], bool]:
        """With expert groups: every rank learns each step's loss and learning rate (from the group that ran it)
        and whether any rank asked to stop, in one small collective; otherwise the values as they are."""
        if groups is None:
            return losses, lrs, stop
        lead = data_ctx.is_main  # one rank per group contributes its group's figures
        values = [v if lead and trains(s) else 0.0 for s, v in zip(steps * 2, losses + lrs)]
        summed = ctx.sums([*values, float(stop)])
        n = len(steps)
        return summed[:n], summed[n : 2 * n], summed[-1] > 0

    with stop_at_round_end(stop_file) if groups is not None else nullcontext(lambda: False) as stop_requested:
        try:
            while prog.step < cfg.train.steps:
                t0 = time.perf_counter()
                start_pos, mid_step = (prog.epoch, prog.batch_pos), True
                steps = round_steps(
                    prog.step, cfg.train.steps, stages, cfg.multistage.switch_every, grouped=groups is not None
                )
                names = [active_expert(s, stages, cfg.multistage.switch_every) for s in steps]
                losses, lrs, switch = [], [], None
                for step, name in zip(steps, names):
                    if not trains(step):
                        consume_batches()
                        losses.append(0.0)
                        lrs.append(0.0)
                        continue
                    switch = memory.activate(name) or switch
                    upcoming = active_expert(step + 1, stages, cfg.multistage.switch_every)
                    if upcoming != name and plan.prefetch_next_expert:
                        memory.prefetch(upcoming)  # overlap the next switch's copy with this step
                    lrs.append(experts[name].scheduler.get_last_lr()[0])  # the lr this step trains with
                    losses.append(train_step(step, name))
                losses, lrs, stop = share_round(steps, losses, lrs, stop_requested())
                for step, name, loss in zip(steps, names, losses):
                    if not math.isfinite(loss):
                        raise _diverged(step, name, loss, run if ctx.is_main else None, cfg)
                first = prog.step
                prog.step += len(steps)
                prog.losses.extend(zip(range(first + 1, prog.step + 1), names, losses))
                mid_step = False

                dt = (time.perf_counter() - t0) / len(steps)
                if switch is not None:
                    log.info("switched to the %s-noise expert: %.1f GiB in %.2f s", names[-1],
                             switch.nbytes / 2**30, switch.copy_seconds())
                bar.update(len(steps))
                bar.set_postfix(expert=names[-1], loss=f"{losses[-1]:.4f}", lr=f"{lrs[-1]:.2e}", s_per_step=f"{dt:.2f}")
                every = cfg.save.save_every
                periodic = every and prog.step // every > first // every  # a save step fell into this round
                if periodic or prog.step == cfg.train.steps or stop:
                    failed_save = prog.step  # until it succeeds: a save that failed is not tried again on the way out
                    checkpoint()
                    saved_step, failed_save = prog.step, -1
                if renderer is not None and renderer.due(prog.step):
                    renderer.render(prog.step, models, experts)
                if stop:
                    raise KeyboardInterrupt(f"stopped after step {prog.step} (resumable state written)")
                if on_step is not None:
                    for step, name, loss, lr in zip(range(first + 1, prog.step + 1), names, losses, lrs):
                        on_step(StepInfo(step, cfg.train.steps, name, loss, lr, dt))
        except TrainingDiverged:
            bar.close()
            raise
        except BaseException:
            # Interrupted (Ctrl-C, a UI cancel raised from on_step, an error): keep a resumable state of the last
            # completed step, unless that step was just saved. Expert groups save only together, at a round's end
            # (above): a rank that fails alone cannot gather the other group's expert.
            bar.close()
            if mid_step:  # the half-accumulated step is discarded; its batches will be drawn again on resume
                prog.epoch, prog.batch_pos = start_pos
            if prog.step > 0 and prog.step not in (saved_step, failed_save):
                if groups is None:
                    checkpoint()  # the LoRA pair so far, and the state unless save_training_state is off
                elif ctx.is_main:
                    log.warning("expert groups: no state written for step %d; resume from the last saved one",
                                prog.step)
            raise
        finally:
            stream.close()
            memory.close()  # the experts are ordinary resident models again for whoever uses them next
    bar.close()
    if encoded[0]:
        log.info("VAE encoding: %d clip(s) in %.1f s", encoded[0], encoded[1])
    if device.type == "cuda":
        log.info("GPU memory: peak %.1f GiB allocated (planned %.1f GiB)",
                 torch.cuda.max_memory_allocated(device) / 2**30, plan.peak_bytes / 2**30)
    result.step = prog.step
    result.losses = list(prog.losses)
    return result


def _diverged(step: int, expert: str, loss: float, run: RunFolder | None, cfg: JobConfig) -> TrainingDiverged:
    """The error for a non-finite loss (or gradient) at 0-based ``step``. Every state saved since ``expert`` last
    updated its weights holds the weights that produced it, and resuming one would replay the same step with the
    same batch and weights whatever the new lr: ``run`` (rank 0's) sets them aside, and the message names the last
    good state."""
    stages, every = cfg.multistage.stages, cfg.multistage.switch_every
    last_update = next((k + 1 for k in range(step - 1, -1, -1) if active_expert(k, stages, every) == expert), 0)
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
        for expert in ("high", "low"):
            vals = [v for s, e, v in losses if e == expert and lo <= s <= hi]
            row.append(f"{sum(vals) / len(vals):8.4f}" if vals else f"{'-':>8}")
        lines.append(f"{lo:>6}-{hi:<6}  {row[0]}  {row[1]}")
    return "\n".join(lines)
