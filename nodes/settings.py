"""Configure Optimizer, Configure Regularizers, Configure Hardware: the settings of Train LoRA that most runs leave
at their defaults, each node an optional input of Train LoRA (not connected: the defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import ValidationError

from trainer_core.config import JobConfig, format_validation_error
from trainer_core.errors import ConfigError

from . import host
from .bundle import CATEGORY, HARDWARE, OPTIMIZER, REGULARIZERS
from .widgets import inputs, partial_config

_T = "tooltip"
#: Configure Hardware's gpu_placement choices -> JobConfig.distributed.
PLACEMENTS = {
    "data parallel": {},
    "expert groups": {"expert_groups": True},
    "shard experts": {"shard_experts": True},
}


@dataclass(frozen=True)
class JobSettings:
    """What a settings node hands Train LoRA: its settings as part of a job config (section -> settings, checked by
    the node) and, from Configure Hardware, the number of GPUs to train on."""

    job: dict[str, dict[str, Any]]
    gpus: int = 1


def _checked(job: dict[str, dict[str, Any]], source: str) -> dict[str, dict[str, Any]]:
    """``job`` with each section validated on its own (its other settings at their defaults) and normalized as the
    config does (a device in lower case, a pair as a tuple); a bad value raises ConfigError naming ``source``."""
    out = {}
    for section, values in job.items():
        try:
            parsed = JobConfig.model_fields[section].annotation.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None
        out[section] = {key: getattr(parsed, key) for key in values}
    return out


class _SettingsNode:
    """A settings node: ``FIELDS`` (widget -> setting path) are its widgets, read from the config, and its output is
    their values as one checked :class:`JobSettings`. ``UI`` holds per-widget extras for :func:`widgets.widget`."""

    FIELDS: ClassVar[dict[str, str]] = {}
    UI: ClassVar[dict[str, dict[str, Any]]] = {}
    TITLE: ClassVar[str] = ""
    FUNCTION = "configure"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": inputs(cls.FIELDS, cls.UI)}

    def configure(self, **values: Any) -> tuple[JobSettings]:
        """Check the settings now (an error names this node) and hand them to Train LoRA."""
        return (JobSettings(_checked(partial_config(self.FIELDS, values, self.UI, self.TITLE), self.TITLE)),)


class ConfigureOptimizer(_SettingsNode):
    """AdamW's details; the optimizer, learning rate, schedule and warm-up are on Train LoRA."""

    FIELDS = {
        "weight_decay": "optimizer.weight_decay",
        "max_grad_norm": "optimizer.max_grad_norm",
        "adam_beta1": "optimizer.betas.0",
        "adam_beta2": "optimizer.betas.1",
        "adam_eps": "optimizer.eps",
    }
    TITLE = "Configure Optimizer"
    #: What OptimizerConfig's errors call Adam's betas -> these widgets (:mod:`.messages`).
    WORDS = {"'betas': betas[0]": "adam_beta1", "'betas': betas[1]": "adam_beta2", "betas[0]": "adam_beta1",
             "betas[1]": "adam_beta2", "'betas'": "adam_beta1 / adam_beta2"}  # fmt: skip
    RETURN_TYPES = (OPTIMIZER,)
    RETURN_NAMES = ("optimizer_settings",)
    OUTPUT_TOOLTIPS = ("AdamW settings for Train LoRA's optimizer_settings input.",)
    DESCRIPTION = (
        "Weight decay, gradient clipping and Adam's betas and epsilon for Train LoRA; the defaults suit LoRAs."
    )


class ConfigureRegularizers(_SettingsNode):
    """Differential Output Preservation, differential guidance and an EMA of the LoRA."""

    FIELDS = {
        "dop": "advanced.dop",
        "dop_multiplier": "advanced.dop_multiplier",
        "dop_class": "advanced.dop_class",
        "diff_guidance": "advanced.diff_guidance",
        "diff_guidance_scale": "advanced.diff_guidance_scale",
        "ema": "advanced.ema",
        "ema_decay": "advanced.ema_decay",
    }
    TITLE = "Configure Regularizers"
    RETURN_TYPES = (REGULARIZERS,)
    RETURN_NAMES = ("regularizers",)
    OUTPUT_TOOLTIPS = ("Regularizer settings for Train LoRA's regularizers input.",)
    DESCRIPTION = (
        "DOP (keeps the base model's look where the trigger word is absent: characters and styles), differential "
        "guidance and an EMA of the LoRA, for Train LoRA. All off when not connected."
    )


class ConfigureHardware(_SettingsNode):
    """Where and how Train LoRA runs: GPUs and their placement, device, precision, checkpointing, compile, data
    workers, and where cached caption embeddings are kept."""

    FIELDS = {
        "device": "train.device",
        "compute_dtype": "train.compute_dtype",
        "gradient_checkpointing": "train.gradient_checkpointing",
        "compile": "train.compile",
        "num_workers": "train.num_workers",
        "text_cache_dir": "text_encoder.cache_dir",
    }
    TITLE = "Configure Hardware"
    RETURN_TYPES = (HARDWARE,)
    RETURN_NAMES = ("hardware",)
    OUTPUT_TOOLTIPS = ("Hardware settings for Train LoRA's hardware input.",)
    DESCRIPTION = (
        "Several GPUs (torchrun) and how the experts are placed on them, the device, compute dtype, gradient "
        "checkpointing, torch.compile, data workers and the caption-embedding cache folder, for Train LoRA."
    )

    @classmethod
    def INPUT_TYPES(cls):
        # gpus and gpu_placement are this node's: the GPU count launches torchrun, the placement is a choice of
        # the distributed settings' flags.
        return {"required": {
            "gpus": ("INT", {"default": 1, "min": 1, "max": 16, _T: (
                "GPUs to train on: above 1 the job runs under torchrun as a child process (placed as gpu_placement "
                "says; the experts load there from their files), with progress and cancel as usual")}),
            "gpu_placement": (list(PLACEMENTS), {"default": "data parallel", _T: (
                "With several GPUs: data parallel = every GPU holds the experts and takes a share of each batch; "
                "expert groups = half the GPUs train the high-noise expert, half the low-noise one, at once (even "
                "GPU count, switch every 1: no swapping); shard experts = FSDP2 splits the bf16 weights over the "
                "GPUs (when they do not fit one)")}),
            **inputs(cls.FIELDS, cls.UI),
        }}

    def configure(self, gpus: int, gpu_placement: str, **values: Any) -> tuple[JobSettings]:
        """Check the settings; a blank device means auto, and the cache folder is resolved against ComfyUI's
        output folder."""
        _check_placement(gpus, gpu_placement)
        cache_dir = values["text_cache_dir"].strip()
        if cache_dir:
            cache_dir = str(host.output_path(cache_dir, f"{self.TITLE}: text_cache_dir"))
        values = {**values, "device": values["device"].strip() or "auto", "text_cache_dir": cache_dir}
        job = {**partial_config(self.FIELDS, values, self.UI, self.TITLE), "distributed": PLACEMENTS[gpu_placement]}
        return (JobSettings(_checked(job, self.TITLE), gpus),)


def _check_placement(gpus: int, placement: str) -> None:
    """Refuse a GPU placement the GPU count cannot form, naming this node's widgets (the placement choice arrives
    unchecked from an API prompt, which ComfyUI's combo check covers only for queued graphs)."""
    title = ConfigureHardware.TITLE
    if placement not in PLACEMENTS:
        raise ConfigError(f"{title}: gpu_placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    if placement != "data parallel" and gpus < 2:
        raise ConfigError(f"{title}: gpu_placement '{placement}' needs gpus of 2 or more - raise gpus or set "
                          "gpu_placement to 'data parallel'")
    if placement == "expert groups" and gpus % 2:
        raise ConfigError(f"{title}: gpu_placement 'expert groups' splits the GPUs in two halves, but gpus is {gpus} "
                          "- use an even number of GPUs")


#: Train LoRA's optional input of each settings node.
SETTINGS_NODES: dict[str, type[_SettingsNode]] = {
    "optimizer_settings": ConfigureOptimizer,
    "regularizers": ConfigureRegularizers,
    "hardware": ConfigureHardware,
}
