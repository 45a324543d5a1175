"""The training loop: both Wan 2.2 experts, one LoRA each, multi-stage switching, flow matching.

Reads top to bottom: set up -> (resume) -> for each optimizer step: pick the active expert, accumulate micro-batches,
step its optimizer, log, save. Every random draw of a step comes from a generator seeded by (seed, step, micro-batch)
and the data order from (seed, epoch), so a resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from ..config import JobConfig
from ..data import BatchRef, LatentCache, VideoDataset, batch_refs, build_dataset
from ..data.text_cache import unload_caption
from ..errors import ConfigError, TrainingDiverged
from ..fileio import atomic_write
from ..lora import lora_parameters
from ..memory import ExpertMemory, plan_job
from ..memory.allocator import use_expandable_segments
from ..models import WanComponents, encode_video, load_components
from ..quant import check_ara_source, quantize_text_encoder
from ..regularizers import check_regularizers
from ..schedule import active_expert, expert_step_counts, sample_sigmas
from .checkpoints import check_resume_compatible, load_checkpoint, resolve_resume, save_checkpoint
from .conditioning import setup_conditioning
from .distributed import init_distributed, shard_frozen_weights
from .experts import block_plan_for, prepare_expert
from .objective import Objective
from .previews import PreviewRenderer, previews_enabled
from .quantization import quantize_experts

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


def run_training(
    cfg: JobConfig,
    *,
    components: WanComponents | None = None,
    dataset: VideoDataset | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_sample: Callable[[int, list[torch.Tensor]], None] | None = None,
    progress_bar: bool = True,
) -> TrainResult:
    """Train the configured experts' LoRAs and write them (and resumable states) into ``cfg.run_dir``.

    ``on_step`` is called after each optimizer step; an exception raised there (e.g. a user interrupt) stops
    training after writing a resumable state for the last completed step. ``on_sample(step, videos)`` receives
    each preview's frames ([F, H, W, 3] in 0..1) when ``cfg.sample`` renders previews.
    """
    # --- checks that need no model: settings, resume file, dataset folders ---
    ctx = init_distributed(cfg.train.device)
    device = resolve_device(cfg.train.device)
    if ctx.active and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    stages = cfg.multistage.stages
    run_dir = cfg.run_dir
    check_regularizers(cfg)
    check_ara_source(cfg.quant)
    # Autocast only on CUDA: on CPU the weights' own dtype is used (bf16 autocast on CPU is slow and inexact).
    autocast_dtype = _DTYPES[cfg.train.compute_dtype] if device.type == "cuda" else None
    sharded = ctx.active and cfg.distributed.shard_experts
    objective = Objective(cfg, None if autocast_dtype == torch.float32 else autocast_dtype, collective=sharded)
    resume_path = resolve_resume(cfg.resume, run_dir) if cfg.resume else None
    if resume_path is not None:
        check_resume_compatible(resume_path, cfg)
    if not cfg.datasets and dataset is None:
        raise ConfigError("datasets: no dataset configured - add at least one folder under 'datasets'")
    caption_override = unload_caption(cfg.text_encoder.mode, cfg.trigger_word)
    dataset = dataset or build_dataset(cfg.datasets, cfg.trigger_word, cfg.train.seed, caption_override)
    if ctx.is_main:
        log.info("%s", dataset.report())

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
    components = components or load_components(
        cfg.model, high=previews or "high" in stages, low=previews or "low" in stages
    )
    torch.manual_seed(cfg.train.seed)
    if components.text_encoder is not None and cfg.quant.text_encoder != "bf16":
        log.info("%s", quantize_text_encoder(components.text_encoder, cfg.quant, device).summary())
    renderer = PreviewRenderer(cfg, components, device, on_sample) if previews and ctx.is_main else None
    condition = setup_conditioning(cfg, components, dataset, objective.extra_captions(dataset.captions()), device)
    vae = components.vae.to(device).eval()
    latent_cache = LatentCache(Path(cfg.save.output_dir) / "latent_cache", f"{components.base_model}|{vae.dtype}")

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return encode_video(vae, pixels.to(device, vae.dtype))

    def latents(ids: list[int], epoch: int) -> torch.Tensor:
        return latent_cache.get_or_encode(dataset, ids, epoch, encode).to(device, torch.float32)

    global_sizes: deque[int] = deque()
    stand_ins: deque[bool] = deque()

    def rank_batches(epoch: int, position: int) -> Iterator[BatchRef]:
        """The global batch sequence from a saved position, each reduced to this rank's slice (with sharded weights
        an empty slice becomes a stand-in sample, trained with weight 0)."""
        for ref in batch_refs(dataset, cfg.train.batch_size, epoch, position):
            global_sizes.append(len(ref.sample_ids))
            ids = ctx.shard(ref.sample_ids)
            stand_ins.append(sharded and not ids)
            if stand_ins[-1]:
                ids = [ref.sample_ids[ctx.rank % len(ref.sample_ids)]]
            yield BatchRef(ref.epoch, ref.position, tuple(ids))

    counts = expert_step_counts(cfg.train.steps, stages, cfg.multistage.switch_every)
    models = {"high": components.high, "low": components.low}
    experts = {}
    for n in stages:  # one at a time, so a quantized expert can leave the GPU before the next one arrives
        quantize_experts(cfg, {n: models[n]}, dataset, latents, condition, device)
        experts[n] = prepare_expert(n, models[n], cfg, counts[n], memory, blocks, shard)
        if cfg.memory.low_vram and len(stages) > 1:
            memory.offload(n)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", lambda p: p.write_text(yaml.safe_dump(cfg.model_dump(mode="json"))))

    prog = _Progress(dataset=dataset.fingerprint())
    if resume_path is not None:
        saved = load_checkpoint(resume_path, cfg, experts)
        if saved.get("dataset") != prog.dataset:
            log.warning("resume: the dataset changed since %s was saved; the data order will differ", resume_path)
        prog = _Progress(saved["step"], saved["epoch"], saved["batch_pos"], saved["losses"], prog.dataset)
    stream = latent_cache.prefetch(dataset, rank_batches(prog.epoch, prog.batch_pos), cfg.train.num_workers)
    if renderer is not None and prog.step == 0 and renderer.due(0):
        renderer.render(0, models, experts)
    result = TrainResult(run_dir=run_dir, step=prog.step)
    bar = tqdm(total=cfg.train.steps, initial=prog.step, disable=not (progress_bar and ctx.is_main), dynamic_ncols=True)
    saved_step = prog.step if resume_path else -1
    start_pos, mid_step = (prog.epoch, prog.batch_pos), False

    def checkpoint() -> None:
        if ctx.is_main:
            result.lora_files, result.state_file = save_checkpoint(
                cfg, components.base_model, experts, vars(prog), run_dir
            )

    try:
        while prog.step < cfg.train.steps:
            t0 = time.perf_counter()
            start_pos, mid_step = (prog.epoch, prog.batch_pos), True
            name = active_expert(prog.step, stages, cfg.multistage.switch_every)
            ex = experts[name]
            switch = memory.activate(name)
            upcoming = active_expert(prog.step + 1, stages, cfg.multistage.switch_every)
            if upcoming != name and plan.prefetch_next_expert:
                memory.prefetch(upcoming)  # overlap the next switch's copy with this step
            step_loss = 0.0
            for micro in range(cfg.train.gradient_accumulation):
                ref, loaded = next(stream)
                n_global, stand_in = global_sizes.popleft(), stand_ins.popleft()
                prog.epoch, prog.batch_pos = ref.epoch, ref.position + 1
                contribution = 0.0
                if ref.sample_ids:  # a rank can get no sample from a bucket's short last batch
                    x0 = latent_cache.finish(loaded, encode).to(device, torch.float32)
                    # Noise levels and noise are drawn for the whole global batch, then sliced: N ranks see exactly
                    # what one process would.
                    gen = step_generator(cfg.train.seed, prog.step, micro)
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
                    mine = [ctx.rank % n_global] if stand_in else ctx.shard(range(n_global))
                    share = 0.0 if stand_in else len(mine) / n_global
                    captions = [p.caption for p in loaded.plans]
                    regularization = [p.is_regularization for p in loaded.plans]
                    _, logged = objective(
                        ex.model, x0, noise[mine].to(device), sigmas[mine].to(device), captions, condition, share,
                        regularization,
                    )
                    contribution = logged * share
                micro_loss = ctx.sum(contribution)
                if not math.isfinite(micro_loss):
                    raise TrainingDiverged(
                        f"loss became {micro_loss} at step {prog.step} ({name}-noise expert); no checkpoint was "
                        "written for it and earlier ones are intact - lower optimizer.lr (e.g. 5e-5) or resume "
                        "from the last good training state"
                    )
                step_loss += micro_loss / cfg.train.gradient_accumulation

            ctx.all_reduce_grads(lora_parameters(ex.model))
            ex.optimizer_step(cfg.optimizer.max_grad_norm)
            prog.step += 1
            prog.losses.append((prog.step, name, step_loss))
            mid_step = False

            dt = time.perf_counter() - t0
            if switch is not None:
                log.info("switched to the %s-noise expert: %.1f GiB in %.2f s", name, switch.nbytes / 2**30,
                         switch.copy_seconds())
            lr = ex.scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(expert=name, loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", s_per_step=f"{dt:.2f}")
            periodic = cfg.save.save_every and prog.step % cfg.save.save_every == 0
            if periodic or prog.step == cfg.train.steps:
                checkpoint()
                saved_step = prog.step
            if renderer is not None and renderer.due(prog.step):
                renderer.render(prog.step, models, experts)
            if on_step is not None:
                on_step(StepInfo(prog.step, cfg.train.steps, name, step_loss, lr, dt))
    except TrainingDiverged:
        bar.close()
        raise
    except BaseException:
        # Interrupted (Ctrl-C, a UI cancel raised from on_step, an error): keep a resumable state of the last
        # completed step, unless that step was just saved.
        bar.close()
        if mid_step:  # the half-accumulated step is discarded; its batches will be drawn again on resume
            prog.epoch, prog.batch_pos = start_pos
        if prog.step > 0 and prog.step != saved_step and cfg.save.save_training_state:
            checkpoint()
        raise
    finally:
        stream.close()
        memory.close()  # the experts are ordinary resident models again for whoever uses them next
    bar.close()
    result.step = prog.step
    result.losses = list(prog.losses)
    return result


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
