"""Train LoRA (JOB, TARGET, TRAINING and ADVANCED panels): trains both experts' LoRAs inside ComfyUI."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from trainer_core.api import (
    ExpertsBundle,
    LoraPair,
    StepInfo,
    final_pair,
    finished_result,
    has_quantized_layers,
    job_dataset,
    job_warnings,
    preflight,
    release_expert,
    resolve_device,
    run_training,
)
from trainer_core.config import (
    DEFAULT_LORA_TARGETS,
    DatasetConfig,
    JobConfig,
    MultiStageConfig,
    SampleConfig,
    job_from_dict,
)
from trainer_core.data import VideoDataset
from trainer_core.errors import ConfigError
from trainer_core.fileio import atomic_write, check_writable
from trainer_core.launch import LaunchCancelled, run_torchrun
from trainer_core.memory import plan_job
from trainer_core.names import EXPERT_SUFFIX
from trainer_core.sample import native_recipe
from trainer_core.train.previews import previews_enabled
from trainer_core.train.runs import Manifest, RunFolder, read_losses

from . import host
from .bundle import CATEGORY, DATASET, EXPERTS, LORA, MULTISTAGE, SAVE
from .loss_plot import loss_curve, to_image_tensor
from .sample import SAMPLE
from .save import SaveCheckpoint, SaveSettings

_T = "tooltip"
#: The gpu_placement widget's choices -> JobConfig.distributed.
PLACEMENTS = {
    "data parallel": {},
    "expert groups": {"expert_groups": True},
    "shard experts": {"shard_experts": True},
}
PREVIEW_SIZE = 512


class TrainWan22LoRA:
    """Widgets -> :class:`JobConfig` -> ``run_training``; outputs the pair, the loss curve and the run folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "experts": (EXPERTS, {_T: "Base model from Load Wan22 Experts"}),
                "dataset": (DATASET, {_T: "Dataset(s) from Build Video Dataset"}),
                # JOB
                "job_name": ("STRING", {"default": "wan22_lora", _T: (
                    "Run folder and file-name prefix (letters, digits, _ - .); a new run of a used name gets its "
                    "own folder (<name>_run2, ...); resume = latest continues this name's newest run")}),
                "trigger_word": ("STRING", {"default": "", _T: (
                    "Word that calls the LoRA (e.g. sqz); replaces [trigger] in captions; empty = none")}),
                # TARGET
                "rank": ("INT", {"default": 16, "min": 1, "max": 256, _T: (
                    "LoRA rank: 16 for most LoRAs, 32 for large or detailed datasets (H100/H200)")}),
                "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 1.0, _T: (
                    "LoRA alpha (scale = alpha / rank); 0 = same as rank (scale 1), the usual choice")}),
                "lora_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.9, "step": 0.01, _T: (
                    "Dropout inside the LoRA; 0 is standard, 0.05-0.1 against overfitting tiny datasets")}),
                "target_modules": ("STRING", {"default": ", ".join(DEFAULT_LORA_TARGETS), _T: (
                    "Layers inside each block that get a LoRA (ComfyUI names); the default list is all attention "
                    "and feed-forward layers")}),
                # TRAINING
                "steps": ("INT", {"default": 2000, "min": 1, "max": 1000000, _T: (
                    "Total optimizer steps, shared by the trained experts. Motion 1500-2500, character/style "
                    "2000-3000")}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1e-2, "step": 1e-6, _T: (
                    "1e-4 is the usual choice; 5e-5 if the loss jumps or samples fall apart")}),
                "optimizer": (("adamw8bit", "adamw"), {"default": "adamw8bit", _T: (
                    "adamw8bit keeps optimizer state in 8 bit (less memory, same results); adamw is full precision")}),
                "lr_scheduler": (("constant", "cosine", "linear"), {"default": "constant", _T: (
                    "Learning-rate schedule per expert; constant is standard for LoRAs")}),
                "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000, _T: (
                    "Steps of linear LR warm-up per expert; 0-100")}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, _T: (
                    "Clips per step: 1 on 24 GB, 1-2 on H100/H200")}),
                "gradient_accumulation": ("INT", {"default": 1, "min": 1, "max": 256, _T: (
                    "Micro-batches summed per step: a larger effective batch without more memory")}),
                "timestep_type": (("linear", "sigmoid", "shift", "weighted"), {"default": "linear", _T: (
                    "Noise-level sampling within each expert's range: motion linear; style linear or shift; "
                    "character sigmoid or linear")}),
                "timestep_bias": (("balanced", "high_noise", "low_noise"), {"default": "balanced", _T: (
                    "Favour noisier (composition, motion) or cleaner (detail) levels; balanced for most, "
                    "high_noise for pure camera moves or style")}),
                "seed": ("INT", {"default": 42, "min": 0, "max": 2**63 - 1, "control_after_generate": False, _T: (
                    "Seed for noise, timesteps and data order; a given seed and settings train identically")}),
                "resume": ("STRING", {"default": "", _T: (
                    "Continue a run: 'latest' (this job's newest training state), a training_state_*.safetensors "
                    "path or a run folder; empty starts fresh")}),
                # ADVANCED
                "gradient_checkpointing": (("auto", "full", "selective", "off"), {"default": "auto", _T: (
                    "Recompute activations in the backward pass: auto picks the fastest mix that fits the card "
                    "(full on the CPU); full recomputes each block (least memory); selective keeps self-attention "
                    "outputs and recomputes the rest; off keeps everything (fastest, most memory)")}),
                "timestep_shift": ("FLOAT", {"default": 5.0, "min": 0.1, "max": 100.0, "step": 0.1, _T: (
                    "Shift s for timestep_type = shift (higher pushes toward noisier levels); 5 is usual")}),
                "weight_decay": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 1.0, "step": 1e-5, _T: (
                    "AdamW weight decay on the LoRA weights; 1e-4 is usual")}),
                "max_grad_norm": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, _T: (
                    "Gradient clipping norm; 1.0 is usual, 0 disables")}),
                "adam_beta1": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 0.9999, "step": 0.001, _T: (
                    "AdamW beta1 (momentum); leave at 0.9")}),
                "adam_beta2": ("FLOAT", {"default": 0.999, "min": 0.0, "max": 0.99999, "step": 0.0001, _T: (
                    "AdamW beta2; leave at 0.999")}),
                "adam_eps": ("FLOAT", {"default": 1e-8, "min": 1e-12, "max": 1e-3, "step": 1e-9, _T: (
                    "AdamW epsilon; leave at 1e-8")}),
                "compute_dtype": (("bf16", "fp16", "fp32"), {"default": "bf16", _T: (
                    "Autocast dtype on the GPU: bf16 on H100/H200 and RTX 30xx or newer")}),
                "device": ("STRING", {"default": "auto", _T: (
                    "auto (first GPU, else CPU), cuda, cuda:1, cpu")}),
                "num_workers": ("INT", {"default": 2, "min": 0, "max": 32, _T: (
                    "Processes decoding clips while the GPU trains; 2 is plenty, 0 decodes in ComfyUI's process")}),
                "text_encoder_mode": (("cache", "unload", "live"), {"default": "cache", _T: (
                    "cache: encode every caption once, then free UMT5 (24-32 GB); unload: train on the trigger word "
                    "alone; live: keep UMT5 loaded and encode each step (big cards)")}),
                "text_cache_dir": ("STRING", {"default": "", _T: (
                    "Folder of cached caption embeddings (relative = ComfyUI output); empty = <save output_dir>/"
                    "text_cache, shared by runs")}),
                "dop": ("BOOLEAN", {"default": False, _T: (
                    "DOP keeps the base model's look for the class word: character/style on, motion off; needs a "
                    "trigger word (~3 passes per step)")}),
                "dop_multiplier": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0, "step": 0.05, _T: (
                    "Weight of DOP's preservation loss: 1 is usual; lower if the LoRA learns too weakly")}),
                "dop_class": ("STRING", {"default": "person", _T: (
                    "Word that replaces the trigger in DOP's prompt: person, woman, man for characters; scene or "
                    "style for styles")}),
                "diff_guidance": ("BOOLEAN", {"default": False, _T: (
                    "Differential guidance: aim past the target; with AdamW it changes almost nothing - usually off")}),
                "diff_guidance_scale": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.1, _T: (
                    "Differential guidance strength: 3 is typical, 1 = off")}),
                "ema": ("BOOLEAN", {"default": False, _T: (
                    "Keep a moving average of the LoRA: smoother results; the output pair and the models/loras copy "
                    "are the EMA weights")}),
                "ema_decay": ("FLOAT", {"default": 0.99, "min": 0.5, "max": 0.9999, "step": 0.0005, _T: (
                    "EMA decay per step of an expert: 0.99 for short runs, 0.999 for 3000+ steps")}),
                "compile": (("auto", "on", "off"), {"default": "auto", _T: (
                    "torch.compile the transformer blocks (faster steps after a slow first one): auto = on for a "
                    "CUDA GPU with Triton, without block offloading or a 4-bit base, eager if compiling fails; on "
                    "forces it; off never")}),
                "gpus": ("INT", {"default": 1, "min": 1, "max": 16, _T: (
                    "GPUs to train on: above 1 the job runs under torchrun as a child process (placed as "
                    "gpu_placement says; the experts load there from their files), with progress and cancel as "
                    "usual")}),
                "gpu_placement": (tuple(PLACEMENTS), {"default": "data parallel", _T: (
                    "With several GPUs: data parallel = every GPU holds the experts and takes a share of each batch; "
                    "expert groups = half the GPUs train the high-noise expert, half the low-noise one, at once "
                    "(even GPU count, switch every 1: no swapping); shard experts = FSDP2 splits the bf16 weights "
                    "over the GPUs (when they do not fit one)")}),
            },
            "optional": {
                "multistage": (MULTISTAGE, {_T: "From Configure MultiStage; default: both experts, switch every 10"}),
                "save": (SAVE, {_T: "From Save Checkpoint; default: its default settings"}),
                "previews": (SAMPLE, {_T: "From Configure Training Previews: sample videos while training"}),
                "init_lora": (LORA, {_T: (
                    "Continue training from this pair (Load Wan22 LoRA Pair, or an earlier Train LoRA): each trained "
                    "expert's LoRA starts from its file; rank and targets must cover the file's")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (LORA, "IMAGE", "STRING")
    RETURN_NAMES = ("lora", "loss_curve", "run_dir")
    OUTPUT_TOOLTIPS = (
        "The trained pair in memory (plus its file paths; the EMA weights with ema on) for Preview Sample or Apply "
        "Wan22 LoRA Pair.",
        "Loss per step for both experts, raw and smoothed.",
        "Run folder with checkpoints, training states, losses.csv and config.yaml.",
    )
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Train LoRAs for both Wan 2.2 experts. Cancelling stops after the current step and keeps a resumable "
        "state: queue again with resume = latest to continue."
    )

    def train(
        self,
        experts: ExpertsBundle,
        dataset: tuple[DatasetConfig, ...],
        multistage: MultiStageConfig | None = None,
        save: SaveSettings | None = None,
        previews: SampleConfig | None = None,
        init_lora: LoraPair | None = None,
        unique_id: str | None = None,
        gpus: int = 1,
        **widgets: Any,
    ) -> tuple[LoraPair, torch.Tensor, str]:
        """Train, then copy the final pair into models/loras if the save settings ask for it."""
        save = save or SaveCheckpoint().configure(**_defaults(SaveCheckpoint))[0]
        cfg = build_job(experts, dataset, multistage, save, previews, init_lora=init_lora, **widgets)
        _preflight(cfg, gpus, save)
        progress = host.Progress(cfg.train.steps, unique_id)
        for warning in job_warnings(cfg):  # valid, but almost surely not what was meant: say so before training
            host.log.warning("Train LoRA: %s", warning)
            progress.text(f"warning: {warning}")
        data = job_dataset(cfg)
        # ComfyUI keeps only the last prompt's outputs: an unchanged job that already finished is not trained again
        done = finished_result(cfg, data)
        if done is not None:
            progress.text(f"unchanged since {done.run_dir} finished ({done.step} steps): returned its LoRA pair "
                          "without training (change a setting or a clip to train anew)")
            run_dir, losses, pair = done.run_dir, done.losses, final_pair(cfg, done.run_dir, done.step)
        else:
            with torch.inference_mode(False):
                host.free_host_models()
                if gpus > 1:
                    run_dir, losses, pair = _train_torchrun(cfg, gpus, progress)
                else:
                    run_dir, losses, pair = _train(cfg, experts, data, progress)
        if save.copy_to_loras:
            _copy_to_loras(pair.files, save.lora_name or run_dir.name)
        return (pair, to_image_tensor(loss_curve(losses)), str(run_dir))


def _defaults(node: type) -> dict[str, Any]:
    return {k: opts["default"] for k, (_, opts) in node.INPUT_TYPES()["required"].items()}


def build_job(
    experts: ExpertsBundle,
    dataset: tuple[DatasetConfig, ...],
    multistage: MultiStageConfig | None,
    save: SaveSettings,
    previews: SampleConfig | None,
    *,
    # JOB, TARGET
    job_name: str, trigger_word: str, rank: int, alpha: float, lora_dropout: float, target_modules: str,
    # TRAINING
    steps: int, learning_rate: float, optimizer: str, lr_scheduler: str, warmup_steps: int, batch_size: int,
    gradient_accumulation: int, timestep_type: str, timestep_bias: str, seed: int, resume: str,
    # ADVANCED
    gradient_checkpointing: str, timestep_shift: float, weight_decay: float, max_grad_norm: float,
    adam_beta1: float, adam_beta2: float, adam_eps: float, compute_dtype: str, device: str, num_workers: int,
    text_encoder_mode: str, text_cache_dir: str, dop: bool, dop_multiplier: float, dop_class: str,
    diff_guidance: bool, diff_guidance_scale: float, ema: bool, ema_decay: float, compile: str,
    gpu_placement: str = "data parallel",
    init_lora: LoraPair | None = None,
) -> JobConfig:
    """The node's inputs as one validated :class:`JobConfig` (errors name the node and the setting)."""
    if not dataset:
        raise ConfigError("Train LoRA: no dataset connected - connect a Build Video Dataset node")
    multistage = multistage or MultiStageConfig()
    targets = [t.strip() for t in target_modules.replace(";", ",").split(",") if t.strip()]
    cache_dir = text_cache_dir.strip()
    data = {
        "name": job_name.strip(),
        "trigger_word": trigger_word.strip() or None,
        "model": experts.model.model_dump(),
        "lora": {"rank": rank, "alpha": alpha or None, "dropout": lora_dropout, "target_modules": targets,
                 **_init_files(init_lora, multistage.stages)},
        "multistage": multistage.model_dump(),
        "optimizer": {"name": optimizer, "lr": learning_rate, "weight_decay": weight_decay,
                      "betas": (adam_beta1, adam_beta2), "eps": adam_eps, "lr_scheduler": lr_scheduler,
                      "warmup_steps": warmup_steps, "max_grad_norm": max_grad_norm},
        "train": {"steps": steps, "batch_size": batch_size, "gradient_accumulation": gradient_accumulation,
                  "gradient_checkpointing": gradient_checkpointing, "compile": compile,
                  "timestep_type": timestep_type, "timestep_shift": timestep_shift, "timestep_bias": timestep_bias,
                  "compute_dtype": compute_dtype, "seed": seed, "device": device.strip() or "auto",
                  "num_workers": num_workers},
        "save": save.config.model_dump(),
        "datasets": [d.model_dump() for d in dataset],
        "text_encoder": {"mode": text_encoder_mode,
                         "cache_dir": str(host.output_path(cache_dir)) if cache_dir else None},
        "quant": experts.quant.model_dump(),
        "memory": experts.memory.model_dump(),
        "advanced": {"dop": dop, "dop_multiplier": dop_multiplier, "dop_class": dop_class,
                     "diff_guidance": diff_guidance, "diff_guidance_scale": diff_guidance_scale, "ema": ema,
                     "ema_decay": ema_decay},
        "resume": resume.strip() or None,
        "distributed": PLACEMENTS[gpu_placement],
    }
    if previews is not None:
        data["sample"] = previews.model_dump()
    return job_from_dict(data, source="Train LoRA")


def _init_files(pair: LoraPair | None, stages: list[str]) -> dict[str, str]:
    """``lora.init_high`` / ``init_low`` from the pair's files of the trained experts (training starts from a
    file's weights as saved)."""
    if pair is None:
        return {}
    scaled = {e: s for e, s in pair.strength.items() if s != 1.0 and e in stages}
    if scaled:
        raise ConfigError(f"Train LoRA: init_lora was loaded with strength {scaled} - training continues from the "
                          "files' weights as saved: set Load Wan22 LoRA Pair's strengths to 1")
    return {f"init_{e}": str(path) for e, path in pair.files.items() if e in stages}


def _preflight(cfg: JobConfig, gpus: int = 1, save: SaveSettings | None = None) -> None:
    """The core's pre-flight (the one the CLI and the training loop run), before the bundle loads its weights
    (minutes for the real experts), plus what only this node decides: the models/loras copy, the GPU count and
    placement of ``gpus``, and the VRAM plan on that many GPUs."""
    preflight(cfg, model_files=gpus > 1)  # the torchrun child loads the experts from their files: check them here
    if save is not None and save.copy_to_loras:
        check_writable(host.loras_dir(), "Save Checkpoint copy_to_loras (ComfyUI's models/loras)")
    device = resolve_device(cfg.train.device)
    if gpus > 1 and device.type == "cuda" and torch.cuda.device_count() < gpus:
        raise ConfigError(
            f"Train LoRA: gpus is {gpus} but this machine has {torch.cuda.device_count()} CUDA GPU(s) - lower gpus"
        )
    placed = cfg.distributed.expert_groups or cfg.distributed.shard_experts
    if placed and gpus == 1:
        raise ConfigError("Train LoRA: gpu_placement other than 'data parallel' needs gpus of 2 or more - raise gpus "
                          "or set gpu_placement to 'data parallel'")
    if cfg.distributed.expert_groups and gpus % 2:
        raise ConfigError(f"Train LoRA: gpu_placement 'expert groups' splits the GPUs in two halves, but gpus is "
                          f"{gpus} - use an even number of GPUs")
    plan_job(cfg, device, gpus, quiet=True)  # refuses what cannot fit; the run logs the plan once


class _StepReporter:
    """``on_step`` / ``on_sample`` for the core loop: progress bar with a preview, node text, cancel check."""

    def __init__(self, progress: host.Progress, cfg: JobConfig):
        self.progress, self.cfg = progress, cfg
        self.losses: list[tuple[int, str, float]] = []
        self.sample_frame = None

    def on_step(self, info: StepInfo) -> None:
        host.check_interrupt()
        self.show(info)

    def show(self, info: StepInfo) -> None:
        """Record the step's loss and update the progress bar and the node text."""
        self.losses.append((info.step, info.expert, info.loss))
        preview = self.sample_frame or loss_curve(self.losses, 512, 256)
        self.progress.text(
            f"step {info.step}/{info.total_steps} | {info.expert}-noise expert | loss {info.loss:.4f} | "
            f"lr {info.lr:.2e} | {info.seconds:.2f} s/step"
        )
        self.progress.update(info.step, info.total_steps, ("JPEG", preview, PREVIEW_SIZE))

    def on_sample(self, step: int, videos: list[torch.Tensor]) -> None:
        from PIL import Image

        frames = videos[0]
        middle = (frames[frames.shape[0] // 2].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        self.sample_frame = Image.fromarray(middle)
        recipe = native_recipe(self.cfg.sample, self.cfg.multistage.boundary)
        self.progress.text(f"preview rendered at step {step} | ComfyUI: {recipe}")


def _train(
    cfg: JobConfig, experts: ExpertsBundle, dataset: VideoDataset, progress: host.Progress
) -> tuple[Path, list[tuple[int, str, float]], LoraPair]:
    stages = cfg.multistage.stages
    with_previews = previews_enabled(cfg)  # previews render with both experts, trained or not
    # As loaded: the core quantizes the trained experts itself, in place, before attaching the LoRA.
    comps = experts.components(high=with_previews or "high" in stages, low=with_previews or "low" in stages)
    # The run moves the text encoder to the GPU, encodes the captions and frees it (quantizing it first with
    # float8); the bundle must not keep it. It reloads when a Preview Sample needs it.
    experts.forget("text_encoder")
    reporter = _StepReporter(progress, cfg)
    runs: list[RunFolder] = []
    if cfg.quant.transformer != "none":
        progress.text(f"quantizing the trained experts ({cfg.quant.transformer}) before the first step")
    try:
        result = run_training(cfg, components=comps, dataset=dataset, on_run=runs.append, on_step=reporter.on_step,
                              on_sample=reporter.on_sample, progress_bar=False)
    except BaseException:
        # An expert the run quantized (wholly or, if it failed midway, partly) cannot serve as loaded again.
        experts.forget(*(n for n in stages if has_quantized_layers(getattr(comps, n))))
        progress.text(_stop_message(runs))
        raise
    finally:
        release_expert(comps.high)
        release_expert(comps.low)
        comps.vae.to("cpu")
    if result.trained:
        experts.trained(stages, cfg.quant)
    progress.text(f"done: {result.step} steps; LoRA pair in {result.run_dir}")
    return result.run_dir, result.losses, final_pair(cfg, result.run_dir, result.step)


def _train_torchrun(
    cfg: JobConfig, gpus: int, progress: host.Progress
) -> tuple[Path, list[tuple[int, str, float]], LoraPair]:
    """Run ``cfg`` on ``gpus`` GPUs under torchrun (a child process that loads the experts from their files) with
    the same progress display; a cancel stops the child after it wrote its resumable state."""
    reporter = _StepReporter(progress, cfg)
    interrupt: list[BaseException] = []
    runs: list[RunFolder] = []

    def should_stop() -> bool:
        if not interrupt and (exc := host.pending_interrupt()) is not None:
            interrupt.append(exc)
            progress.text("cancelling: the workers write a resumable state")
        return bool(interrupt)

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "run":
            runs.append(RunFolder(Path(event["run_dir"]), Manifest.read(Path(event["run_dir"]))))
            return
        info = StepInfo(event["step"], event["total"], event["expert"], event["loss"], event["lr"], event["seconds"])
        reporter.show(info)

    progress.text(f"starting torchrun with {gpus} processes; the experts load in each")
    try:
        done = run_torchrun(cfg, gpus, on_event, should_stop)
    except LaunchCancelled:
        progress.text(_stop_message(runs))
        raise interrupt[0] from None
    except BaseException:  # e.g. ComfyUI's progress hook raising its interrupt: the child was stopped the same way
        progress.text(_stop_message(runs))
        raise
    run_dir = Path(done["run_dir"])
    progress.text(f"done: {done['step']} steps on {gpus} GPUs; LoRA pair in {run_dir}")
    losses = reporter.losses or read_losses(run_dir)
    return run_dir, losses, final_pair(cfg, run_dir, done["step"])


def _stop_message(runs: list[RunFolder]) -> str:
    if not runs:
        return "training stopped before its run folder was set up; nothing to resume from"
    run = runs[-1]
    run.manifest = Manifest.read(run.path) or run.manifest  # what the run recorded until it stopped
    return f"training stopped; {run.stop_message()}"


def _copy_to_loras(files: dict[str, Path], name: str) -> list[Path]:
    """Copy the final pair to ``models/loras/<name>_high_noise.safetensors`` / ``_low_noise`` (atomically)."""
    copies = []
    for expert, src in files.items():
        dest = host.loras_dir() / f"{name}_{EXPERT_SUFFIX[expert]}.safetensors"
        copies.append(atomic_write(dest, lambda tmp, src=src: shutil.copyfile(src, tmp)))
        host.log.info("copied %s to %s", src, dest)
    return copies
