"""Train LoRA (JOB, TARGET and TRAINING panels): trains both experts' LoRAs inside ComfyUI."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer_core.config import (
    DatasetConfig,
    JobConfig,
    MultiStageConfig,
    SampleConfig,
    job_from_dict,
)
from trainer_core.errors import ConfigError
from trainer_core.fileio import check_writable
from trainer_core.launch import LaunchCancelled, run_torchrun
from trainer_core.publish import check_fixed_name, publish_pair
from trainer_core.sample import native_recipe

if TYPE_CHECKING:
    from trainer_core.api import ExpertsBundle, LoraPair, Plan, RunFolder, StepInfo
    from trainer_core.data import VideoDataset

from . import host
from .bundle import (
    CATEGORY,
    DATASET,
    EXPERTS,
    HARDWARE,
    LORA,
    MULTISTAGE,
    OPTIMIZER,
    REGULARIZERS,
    SAVE,
)
from .loss_plot import loss_curve, to_image_tensor
from .messages import LABELS, in_widget_terms
from .sample import SAMPLE
from .save import SaveCheckpoint, SaveSettings
from .settings import SETTINGS_NODES, JobSettings
from .widgets import inputs, partial_config

_T = "tooltip"
PREVIEW_SIZE = 512
#: The values an older UI workflow puts in text_encoder_mode: its gradient_checkpointing's (saved values map to
#: widgets by position, and text_encoder_mode took that place).
_OLD_CHECKPOINTING = ("auto", "full", "selective", "off", True, False)


def _api():
    """The training core, imported when Train LoRA first runs: it pulls in the models' libraries (seconds), which
    ComfyUI's start must not wait for."""
    from trainer_core import api

    return api


class TrainWan22LoRA:
    """Widgets and settings nodes -> :class:`JobConfig` -> ``run_training``; outputs the pair, the loss curve and the
    run folder."""

    #: The widgets -> the settings they set, in widget order. The first 17 are the node's widgets from before the
    #: settings nodes, in their order: ComfyUI maps a saved UI workflow's values to widgets by position, so an
    #: older workflow keeps them (VALIDATE_INPUTS says what else to do).
    FIELDS = {
        # JOB, TARGET
        "job_name": "name",
        "trigger_word": "trigger_word",
        "rank": "lora.rank",
        "alpha": "lora.alpha",
        "lora_dropout": "lora.dropout",
        "target_modules": "lora.target_modules",
        # TRAINING
        "steps": "train.steps",
        "learning_rate": "optimizer.lr",
        "optimizer": "optimizer.name",
        "lr_scheduler": "optimizer.lr_scheduler",
        "warmup_steps": "optimizer.warmup_steps",
        "batch_size": "train.batch_size",
        "gradient_accumulation": "train.gradient_accumulation",
        "timestep_type": "train.timestep_type",
        "timestep_bias": "train.timestep_bias",
        "seed": "train.seed",
        "resume": "resume",
        "text_encoder_mode": "text_encoder.mode",
        "timestep_shift": "train.timestep_shift",
    }
    #: alpha 0 stands for unset (the rank); a training seed never randomizes after a queue (that would retrain).
    UI = {"alpha": {"none": 0.0}, "seed": {"control_after_generate": False}}
    #: The widgets that moved to a settings node -> its input here. An API-format prompt (inputs by name) written
    #: for the older node still sends them: ComfyUI passes hidden inputs through unchecked, and train() applies them
    #: through the node that owns them now.
    LEGACY = {name: link for link, node in SETTINGS_NODES.items() for name in node.INPUT_TYPES()["required"]}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "experts": (EXPERTS, {_T: "Base model from Load Wan22 Experts"}),
                "dataset": (DATASET, {_T: "Dataset(s) from Build Video Dataset"}),
                **inputs(cls.FIELDS, cls.UI),
            },
            "optional": {
                "multistage": (MULTISTAGE, {_T: "From Configure MultiStage; default: both experts, switch every 10"}),
                "save": (SAVE, {_T: "From Save Checkpoint; default: its default settings"}),
                "previews": (SAMPLE, {_T: "From Configure Training Previews: sample videos while training"}),
                "init_lora": (LORA, {_T: (
                    "Continue training from this pair (Load Wan22 LoRA Pair, or an earlier Train LoRA): each trained "
                    "expert's LoRA starts from its file; rank and targets must cover the file's")}),
                "optimizer_settings": (OPTIMIZER, {_T: (
                    "From Configure Optimizer: weight decay, gradient clipping, Adam's betas and epsilon; default: "
                    "theirs")}),
                "regularizers": (REGULARIZERS, {_T: (
                    "From Configure Regularizers: DOP, differential guidance, EMA; default: all off")}),
                "hardware": (HARDWARE, {_T: (
                    "From Configure Hardware: GPUs and placement, device, compute dtype, gradient checkpointing, "
                    "compile, data workers, caption cache folder; default: one GPU (or the CPU), chosen "
                    "automatically")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", **dict.fromkeys(cls.LEGACY, "WAN22_LEGACY_INPUT")},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, text_encoder_mode: Any) -> bool | str:
        """text_encoder_mode checked here instead of by ComfyUI's "Value not in list" (skipped for the inputs named
        here), to say what happened when a UI workflow saved before the settings nodes put its
        gradient_checkpointing value there."""
        choices = cls.INPUT_TYPES()["required"]["text_encoder_mode"][0]
        if text_encoder_mode in choices:
            return True
        if text_encoder_mode in _OLD_CHECKPOINTING:
            return (
                "this Train LoRA was saved before its advanced settings moved to Configure Optimizer, Configure "
                "Regularizers and Configure Hardware: its job, target and training settings loaded as saved, the "
                "advanced ones are at their defaults now. Set text_encoder_mode again (cache is usual) and connect "
                "those nodes for any advanced setting the workflow had changed (README: workflows saved before the "
                "settings nodes)"
            )
        return f"text_encoder_mode {text_encoder_mode!r} is not one of {', '.join(choices)}"

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
        "Train LoRAs for both Wan 2.2 experts. Less common settings come from Configure Optimizer, Configure "
        "Regularizers and Configure Hardware (optional inputs). Cancelling stops after the current step and keeps a "
        "resumable state: queue again with resume = latest to continue."
    )

    def train(
        self,
        experts: ExpertsBundle,
        dataset: tuple[DatasetConfig, ...],
        multistage: MultiStageConfig | None = None,
        save: SaveSettings | None = None,
        previews: SampleConfig | None = None,
        init_lora: LoraPair | None = None,
        optimizer_settings: JobSettings | None = None,
        regularizers: JobSettings | None = None,
        hardware: JobSettings | None = None,
        unique_id: str | None = None,
        **widgets: Any,
    ) -> tuple[LoraPair, torch.Tensor, str]:
        """Train, then copy the final pair into models/loras if the save settings ask for it."""
        api = _api()
        links = {"optimizer_settings": optimizer_settings, "regularizers": regularizers, "hardware": hardware}
        old = {name: widgets.pop(name) for name in list(widgets) if name in self.LEGACY}
        note = _apply_legacy(old, links) if old else None
        save = save or SaveCheckpoint().configure(**_defaults(SaveCheckpoint))[0]
        cfg = build_job(experts, dataset, widgets, multistage=multistage, save=save, previews=previews,
                        init_lora=init_lora, settings=[s for s in links.values() if s is not None])
        gpus = links["hardware"].gpus if links["hardware"] is not None else 1
        if cfg.train.device == "auto" and host.compute_device().type == "cpu":
            cfg.train.device = "cpu"  # ComfyUI runs with --cpu (or has no GPU): train where it computes
        if cfg.quant.transformer == "auto":  # float8 or 4bit_ara: this card decides
            cfg = api.resolve_transformer_quant(cfg, api.resolve_device(cfg.train.device))
        plan = _preflight(cfg, gpus, save)
        progress = host.Progress(cfg.train.steps, unique_id)
        # what `python -m trainer_core check` prints, shown before any weight moves: the GPU plan and the host memory
        host_ram = api.estimate_host_memory(cfg, plan)
        ram_warning = api.host_memory_warning(host_ram)  # the run logs it; the node shows it beside the plan
        shown = [plan.summary(), host_ram.summary(), *([f"warning: {ram_warning}"] if ram_warning else [])]
        progress.text("\n".join(shown), logged=False)
        if note:
            progress.text(f"note: {note}")
        for warning in api.job_warnings(cfg):  # valid, but almost surely not what was meant: say so before training
            progress.text(f"warning: {in_widget_terms(warning, LABELS, 'Train LoRA')}")  # shown and logged once
        data = api.job_dataset(cfg)
        # ComfyUI keeps only the last prompt's outputs: an unchanged job that already finished is not trained again
        done = api.finished_result(cfg, data)
        if done is not None:
            progress.text(f"unchanged since {done.run_dir} finished ({done.step} steps): returned its LoRA pair "
                          "without training (change a setting or a clip to train anew)")
            run_dir, losses, pair = done.run_dir, done.losses, api.final_pair(cfg, done.run_dir, done.step)
        else:
            with torch.inference_mode(False):
                host.free_host_models()
                if gpus > 1:
                    run_dir, losses, pair = _train_torchrun(cfg, gpus, progress)
                else:
                    run_dir, losses, pair = _train(cfg, experts, data, progress)
        if save.copy_to_loras:
            _copy_to_loras(pair.files, save.lora_name or run_dir.name, fixed=bool(save.lora_name), progress=progress)
        return (pair, to_image_tensor(loss_curve(losses, validation=api.read_validation(run_dir))), str(run_dir))


def _defaults(node: type) -> dict[str, Any]:
    return {k: opts["default"] for k, (_, opts) in node.INPUT_TYPES()["required"].items()}


def _apply_legacy(old: dict[str, Any], links: dict[str, JobSettings | None]) -> str:
    """Fill ``links`` with the settings an older prompt gave Train LoRA by name, made through the nodes that own them
    now (each group over that node's defaults); returns the note that says so (also logged)."""
    for link, node in SETTINGS_NODES.items():
        given = {name: value for name, value in old.items() if TrainWan22LoRA.LEGACY[name] == link}
        if not given:
            continue
        if links[link] is not None:
            raise ConfigError(f"Train LoRA: {', '.join(given)} come both as Train LoRA inputs of an older prompt "
                              f"and from {node.TITLE} - remove them from Train LoRA's inputs")
        links[link] = node().configure(**{**_defaults(node), **given})[0]
    note = (f"this prompt gives {', '.join(old)} to Train LoRA as before the settings nodes: applied as "
            "Configure Optimizer / Regularizers / Hardware would (connect those nodes instead)")
    host.log.warning("Train LoRA: %s", note)
    return note


def build_job(
    experts: ExpertsBundle,
    dataset: tuple[DatasetConfig, ...],
    widgets: dict[str, Any],
    *,
    multistage: MultiStageConfig | None = None,
    save: SaveSettings,
    previews: SampleConfig | None = None,
    init_lora: LoraPair | None = None,
    settings: Sequence[JobSettings] = (),
) -> JobConfig:
    """Train LoRA's inputs as one validated :class:`JobConfig`: its widgets (``widgets``, by name, exactly
    ``TrainWan22LoRA.FIELDS``), the sections its links carry and the settings nodes' parts (errors name the node
    and the setting)."""
    if not dataset:
        raise ConfigError("Train LoRA: no dataset connected - connect a Build Video Dataset node")
    if set(widgets) != set(TrainWan22LoRA.FIELDS):  # as a signature refuses a missing or an unknown argument
        raise TypeError(f"build_job: {sorted(set(widgets) ^ set(TrainWan22LoRA.FIELDS))} are not Train LoRA's widgets")
    multistage = multistage or MultiStageConfig()
    data: dict[str, Any] = {
        "model": experts.model.model_dump(),
        "quant": experts.quant.model_dump(),
        "memory": experts.memory.model_dump(),
        "datasets": [d.model_dump() for d in dataset],
        "multistage": multistage.model_dump(),
        "save": save.config.model_dump(),
    }
    if previews is not None:
        data["sample"] = previews.model_dump()
    node = TrainWan22LoRA
    own = partial_config(node.FIELDS, {**widgets, "job_name": widgets["job_name"].strip()}, node.UI, "Train LoRA")
    for part in (own, *(s.job for s in settings)):
        for section, values in part.items():
            data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    data["lora"].update(_init_files(init_lora, multistage.stages))
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


def _preflight(cfg: JobConfig, gpus: int = 1, save: SaveSettings | None = None) -> Plan:
    """The core's pre-flight (the one the CLI and the training loop run), before the bundle loads its weights
    (minutes for the real experts), plus what only this node decides: the models/loras copy, the GPU count of
    ``gpus`` (Configure Hardware checks its placement), and the VRAM plan on that many GPUs, which it returns."""
    api = _api()
    api.preflight(cfg, model_files=gpus > 1)  # the torchrun child loads the experts from their files: check them here
    if save is not None and save.copy_to_loras:
        check_writable(host.loras_dir(), "Save Checkpoint copy_to_loras (ComfyUI's models/loras)")
        if save.lora_name:
            check_fixed_name(host.loras_dir(), save.lora_name, cfg.multistage.stages, "Save Checkpoint lora_name")
    device = api.resolve_device(cfg.train.device)
    if gpus > 1 and device.type == "cuda" and torch.cuda.device_count() < gpus:
        raise ConfigError(f"Train LoRA: gpus (Configure Hardware) is {gpus} but this machine has "
                          f"{torch.cuda.device_count()} CUDA GPU(s) - lower gpus")
    return api.plan_job(cfg, device, gpus, quiet=True)  # refuses what cannot fit; the run logs the plan once


class _StepReporter:
    """``on_step`` / ``on_sample`` for the core loop: progress bar with a preview, node text, cancel check."""

    def __init__(
        self, progress: host.Progress, cfg: JobConfig, quantized: dict[str, str] | None = None,
        prompt_notes: Sequence[str] = (),
    ):
        # for each preview's recipe (previews rendered here): which experts it runs quantized, what CLIPTextEncode
        # must be given
        self.progress, self.cfg, self.quantized, self.prompt_notes = progress, cfg, quantized, prompt_notes
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

    def on_preview_step(self, step: int, done: int, total: int) -> None:
        """A denoising step of the preview at training step ``step``: Cancel answers here too, not after it."""
        host.check_interrupt()
        self.progress.text(f"rendering the preview of step {step}: {done}/{total} sampling steps")

    def on_sample(self, step: int, videos: list[torch.Tensor]) -> None:
        from PIL import Image

        frames = videos[0]
        middle = (frames[frames.shape[0] // 2].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        self.sample_frame = Image.fromarray(middle)
        recipe = native_recipe(self.cfg.sample, self.cfg.multistage.boundary, quantized=self.quantized)
        self.progress.text("\n".join([f"preview rendered at step {step} | ComfyUI: {recipe}", *self.prompt_notes]))


def _train(
    cfg: JobConfig, experts: ExpertsBundle, dataset: VideoDataset, progress: host.Progress
) -> tuple[Path, list[tuple[int, str, float]], LoraPair]:
    # the sampler's libraries load at run time, not at import
    from trainer_core.sample import comfy_prompt_notes

    api = _api()
    stages = cfg.multistage.stages
    with_previews = api.previews_enabled(cfg)  # previews render with both experts, trained or not
    # As loaded: the core quantizes the trained experts itself, in place, before attaching the LoRA; experts not
    # stored yet are loaded by the run, one at a time.
    comps = experts.training_components(high=with_previews or "high" in stages, low=with_previews or "low" in stages)
    # The run moves the text encoder to the GPU, encodes the captions and frees it (quantizing it first with
    # float8); the bundle must not keep it. It reloads when a Preview Sample needs it.
    experts.forget("text_encoder")
    notes = comfy_prompt_notes(comps.tokenizer, cfg.sample) if with_previews else []
    reporter = _StepReporter(progress, cfg, api.preview_quantization(cfg), notes)
    runs: list[RunFolder] = []
    if cfg.quant.transformer != "none":
        progress.text(f"quantizing the trained experts ({cfg.quant.transformer}) before the first step")
    try:
        result = api.run_training(cfg, components=comps, dataset=dataset, on_run=runs.append, on_step=reporter.on_step,
                              on_sample=reporter.on_sample, on_preview_step=reporter.on_preview_step,
                              progress_bar=False)
    except BaseException:
        # An expert the run quantized (wholly or, if it failed midway, partly) cannot serve as loaded again.
        experts.forget(*(n for n in stages if api.has_quantized_layers(getattr(comps, n))))
        experts.keep(comps, quantized=False)
        progress.text(_stop_message(runs))
        raise
    finally:
        api.release_expert(comps.high)
        api.release_expert(comps.low)
        comps.vae.to("cpu")
    experts.keep(comps, quantized=result.trained)  # trained() below records the form of what the run quantized
    if result.trained:
        experts.trained(stages, cfg.quant)
    progress.text(f"done: {result.step} steps; LoRA pair in {result.run_dir}")
    return result.run_dir, result.losses, api.final_pair(cfg, result.run_dir, result.step)


def _train_torchrun(
    cfg: JobConfig, gpus: int, progress: host.Progress
) -> tuple[Path, list[tuple[int, str, float]], LoraPair]:
    """Run ``cfg`` on ``gpus`` GPUs under torchrun (a child process that loads the experts from their files) with
    the same progress display; a cancel stops the child after it wrote its resumable state."""
    api = _api()
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
            runs.append(api.RunFolder(Path(event["run_dir"]), api.Manifest.read(Path(event["run_dir"]))))
            return
        info = api.StepInfo(event["step"], event["total"], event["expert"], event["loss"], event["lr"],
                            event["seconds"])
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
    where = f"{gpus} GPUs" if api.resolve_device(cfg.train.device).type == "cuda" else f"{gpus} CPU processes"
    progress.text(f"done: {done['step']} steps on {where}; LoRA pair in {run_dir}")
    # losses.csv holds the whole run, the steps before a resume too; the child streamed only the steps it trained
    losses = [row for row in api.read_losses(run_dir) if row[0] <= done["step"]] or reporter.losses
    return run_dir, losses, api.final_pair(cfg, run_dir, done["step"])


def _stop_message(runs: list[RunFolder]) -> str:
    api = _api()
    if not runs:
        return "training stopped before its run folder was set up; nothing to resume from"
    run = runs[-1]
    run.manifest = api.Manifest.read(run.path) or run.manifest  # what the run recorded until it stopped
    return f"training stopped; {run.stop_message()}"


def _copy_to_loras(files: dict[str, Path], name: str, fixed: bool, progress: host.Progress) -> None:
    """The final pair in ``models/loras`` as ``<name>_high_noise`` / ``_low_noise`` (or, for a name derived from the
    run that another file holds, ``<name>_2``, ...: :func:`trainer_core.publish.publish_pair`)."""
    used, copies = publish_pair(files, host.loras_dir(), name, fixed)
    for expert, dest in copies.items():
        host.log.info("copied %s to %s", files[expert], dest)
    taken = "" if used == name else f" ({name} holds another run's LoRA)"
    progress.text(f"LoRA pair in models/loras: {used}_high_noise / _low_noise{taken}")
