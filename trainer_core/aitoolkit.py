"""Read an ai-toolkit Wan 2.2 job (``job`` / ``config: {name, process: [...]}`` / ``meta``) as this trainer's job.

The mapping follows ai-toolkit's own code (``toolkit/config_modules.py``, ``jobs/process/BaseSDTrainProcess.py``,
``toolkit/optimizer.py``, ``toolkit/scheduler.py``, ``extensions_built_in/diffusion_models/wan22``):

* A setting this trainer has is mapped; where the file leaves it out, ai-toolkit's default is written instead of
  ours, so the job trains as ai-toolkit would have run it (e.g. ``switch_boundary_every`` 1, ``train.dtype`` fp32).
* A value this trainer cannot reproduce (another optimizer, timestep type, LR schedule, model family...) raises
  :class:`ConfigError` naming the key and the accepted values.
* Every other key is ignored with a warning naming it by its dotted path, unless it asks for nothing: an off or
  empty value (``false``, ``null``, ``0``, ``""``, ``[]``, ``{}``) or ai-toolkit's default, a setting that only
  matters while another one (left off) is on, or a setting with no effect on a Wan 2.2 LoRA in ai-toolkit itself.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .errors import ConfigError

_PROCESS = "config.process[0]"
_TRAINER_TYPES = ("sd_trainer", "diffusion_trainer", "ui_trainer")
_ARCH = "wan22_14b"

#: ai-toolkit's dtype spellings (toolkit/train_tools.get_torch_dtype) -> ours.
_DTYPES = {
    "float": "fp32", "fp32": "fp32", "single": "fp32", "float32": "fp32",
    "fp16": "fp16", "half": "fp16", "float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
}  # fmt: skip
_OPTIMIZERS = ("adamw8bit", "adamw")
#: flux_shift / lumina2_shift run the same code as shift when the scheduler has no dynamic shifting (Wan's has none).
_TIMESTEP_TYPES = {
    "linear": "linear", "sigmoid": "sigmoid", "weighted": "weighted",
    "shift": "shift", "flux_shift": "shift", "lumina2_shift": "shift",
}  # fmt: skip
#: ai-toolkit's UI labels these "Balanced", "High Noise", "Low Noise": content draws u^3 toward high t, style 1-u^3.
_TIMESTEP_BIAS = {"balanced": "balanced", "content": "high_noise", "style": "low_noise"}
_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
#: The shift of ai-toolkit's Wan training scheduler (toolkit/models/wan21/wan21.py scheduler_config).
_WAN_TRAIN_SHIFT = 3.0
#: ai-toolkit builds AdamW / AdamW8bit with eps=1e-6; torch and bitsandbytes default weight_decay to 0.01.
_ADAMW_EPS = 1e-6
_ADAMW_WEIGHT_DECAY = 0.01

_SAMPLING = "sampling during training is not supported yet; load the saved LoRAs in ComfyUI to preview them"
_GENERIC = "this trainer has no such setting, so it is not applied"

#: Why a key is not applied, by "<section>.<key>" (or by "<section>" for all its keys).
_REASONS: dict[str, str] = {
    "top.meta": "ai-toolkit's job metadata is not written into the saved LoRAs",
    "process.sample": _SAMPLING,
    "process.first_sample": _SAMPLING,
    "process.sqlite_db_path": "it is ai-toolkit UI bookkeeping",
    "process.performance_log_every": "per-stage timing reports are not available",
    "process.log_dir": "TensorBoard logging is not available; progress goes to the console",
    "logging.use_wandb": "Weights & Biases logging is not available; progress goes to the console",
    "logging.use_ui_logger": "ai-toolkit's UI logger is not available; progress goes to the console",
    "network.transformer_only": "LoRAs always go on the Linear layers of the transformer blocks only",
    "network.split_multistage_loras": "one LoRA file per expert is always written",
    "network.network_kwargs.ignore_if_contains": "use lora.target_modules to choose the layers",
    "network.network_kwargs.only_if_contains": "use lora.target_modules to choose the layers",
    "save.push_to_hub": "uploading to the Hugging Face Hub is not supported",
    "save.hf_repo_id": "uploading to the Hugging Face Hub is not supported",
    "save.hf_private": "uploading to the Hugging Face Hub is not supported",
    "model.quantize": "transformer quantization is not supported yet; the experts load unquantized in model.dtype",
    "model.qtype": "transformer quantization is not supported yet; the experts load unquantized in model.dtype",
    "model.quantize_te": "text-encoder quantization is not supported yet; it loads in model.text_encoder_dtype",
    "model.qtype_te": "text-encoder quantization is not supported yet; it loads in model.text_encoder_dtype",
    "model.low_vram": "low-VRAM offloading is not supported yet",
    "model.layer_offloading": "layer offloading is not supported yet",
    "model.compile": "torch.compile is not supported",
    "model.block_compile": "torch.compile is not supported",
    "model.dtype": "ai-toolkit replaces it with train.dtype, which sets the base-weight dtype here",
    "train.train_text_encoder": "text-encoder LoRAs are not supported; only the two transformer experts train",
    "train.cache_text_embeddings": "caching text embeddings is not supported yet",
    "train.unload_text_encoder": (
        "captions are still used (ai-toolkit would train every sample on the trigger word alone)"
    ),
    "train.diff_output_preservation": "Differential Output Preservation (DOP) is not supported yet",
    "train.diff_output_preservation_multiplier": "Differential Output Preservation (DOP) is not supported yet",
    "train.diff_output_preservation_class": "Differential Output Preservation (DOP) is not supported yet",
    "train.blank_prompt_preservation": "blank-prompt preservation is not supported yet",
    "train.blank_prompt_preservation_multiplier": "blank-prompt preservation is not supported yet",
    "train.ema_config": "an EMA of the LoRA weights is not supported yet",
    "train.do_differential_guidance": "differential guidance is not supported yet",
    "train.differential_guidance_scale": "differential guidance is not supported yet",
    "train.force_first_sample": _SAMPLING,
    "train.optimizer_params": "only weight_decay and betas are passed to the optimizer",
    "train.lr_scheduler_params": (
        "only num_warmup_steps (constant_with_warmup) and start_factor/end_factor (linear) are read"
    ),
    "datasets.cache_text_embeddings": "caching text embeddings is not supported yet",
    "datasets.trigger_word": f"per-dataset trigger words are not supported; set {_PROCESS}.trigger_word",
    "datasets.network_weight": (
        "a per-dataset LoRA strength during training is not supported (datasets[].weight is not the same thing)"
    ),
    "datasets.auto_frame_count": "clips are always cut to num_frames",
}

#: Keys with no effect on a Wan 2.2 T2V LoRA in ai-toolkit itself, so nothing is lost by ignoring them silently.
_NO_EFFECT = frozenset(
    {
        # Wan's transformer blocks hold only Linear layers; conv LoRAs attach to Conv2d layers inside blocks.
        "network.conv",
        "network.conv_alpha",
        # LoKr only (network.type must be lora here).
        "network.lokr_full_rank",
        "network.lokr_factor",
        "network.old_lokr_format",
        # A LoRA network is trained with train.lr; these rates belong to other kinds of training.
        "train.unet_lr",
        "train.text_encoder_lr",
        "train.refiner_lr",
        "train.embedding_lr",
        "train.adapter_lr",
        "train.train_refiner",
        # Flux-family guidance embedding only.
        "train.bypass_guidance_embedding",
        # These only turn sampling down; this trainer never samples.
        "train.skip_first_sample",
        "train.disable_sampling",
        # Only used for full-model saves, not LoRA files.
        "save.save_format",
    }
)

#: Keys that only matter while another key of the same section is on.
_ONLY_WITH: dict[str, str] = {
    "model.qtype": "quantize",
    "model.qtype_te": "quantize_te",
    "model.layer_offloading_transformer_percent": "layer_offloading",
    "model.layer_offloading_text_encoder_percent": "layer_offloading",
    "model.compile_mode": "compile",
    "model.compile_fullgraph": "compile",
    "model.compile_dynamic": "compile",
    "model.cache_size_limit": "compile",
    "train.diff_output_preservation_multiplier": "diff_output_preservation",
    "train.diff_output_preservation_class": "diff_output_preservation",
    "train.blank_prompt_preservation_multiplier": "blank_prompt_preservation",
    "train.differential_guidance_scale": "do_differential_guidance",
    "train.inverted_mask_prior_multiplier": "inverted_mask_prior",
    "save.hf_repo_id": "push_to_hub",
    "save.hf_private": "push_to_hub",
    "logging.project_name": "use_wandb",
    "logging.run_name": "use_wandb",
    "datasets.mask_min_value": "mask_path",
    "datasets.invert_mask": "mask_path",
    "datasets.control_transparent_color": "control_path",
    "datasets.full_size_control_images": "control_path",
    "datasets.replay_transforms": "control_path",
    "datasets.num_controls_from_same_folder": "control_from_same_folder",
    "datasets.trim_auto_frame_count_tail": "auto_frame_count",
}

#: Keys whose ai-toolkit default is not an "off" value: silent only at that default.
_DEFAULTS: dict[str, Any] = {
    "network.transformer_only": True,
    "network.split_multistage_loras": True,
    "train.reg_weight": 1.0,
    "datasets.type": "image",
    "datasets.network_weight": 1.0,
    "datasets.buckets": True,
    "datasets.bucket_tolerance": 64,
}


def is_aitoolkit_config(data: Any) -> bool:
    """True when ``data`` has ai-toolkit's job shape (top-level ``job`` and ``config`` keys, which it requires).

    This trainer's own schema has neither key, so the two cannot be confused.
    """
    return isinstance(data, dict) and "job" in data and isinstance(data.get("config"), dict)


def from_aitoolkit(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Map an ai-toolkit Wan 2.2 T2V 14B LoRA job onto this trainer's settings.

    Returns a plain dict for :func:`trainer_core.config.job_from_dict` (which still validates every value) and one
    warning per ignored key, naming it by its dotted path (e.g. ``config.process[0].train.ema_config``) and saying
    why. Raises :class:`ConfigError` for a job this trainer cannot run as written.
    """
    if not is_aitoolkit_config(data):
        raise ConfigError("not an ai-toolkit job: expected top-level 'job' and 'config' sections")
    if data["job"] != "extension":
        raise ConfigError(f"job is {data['job']!r}: only ai-toolkit training jobs ('job: extension') can be read")
    data = _expand_env(data)
    name = data["config"].get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("config.name is missing: ai-toolkit names the output folder and files after it")
    data = _expand_name(data, name)
    processes = data["config"].get("process")
    if not isinstance(processes, list) or not processes:
        raise ConfigError("config.process is missing or empty: it must list one training process")
    if len(processes) > 1:
        raise ConfigError(
            f"config.process lists {len(processes)} processes: this trainer runs one job at a time - "
            "split them into one file each"
        )
    notes: list[str] = []
    job = _map_process(_take_item(processes, 0, "config.process"), name, notes)
    config_rest = {k: v for k, v in data["config"].items() if k not in ("name", "process")}
    _leftovers(config_rest, "config", "config", data["config"], notes)
    _leftovers({k: v for k, v in data.items() if k not in ("job", "config")}, "top", "", data, notes)
    return job, notes


def _map_process(proc: dict[str, Any], job_name: str, notes: list[str]) -> dict[str, Any]:
    rest = dict(proc)
    ptype = rest.pop("type", None)
    if ptype not in _TRAINER_TYPES:
        raise ConfigError(
            f"{_PROCESS}.type is {ptype!r}: only ai-toolkit's LoRA trainer process can be read "
            f"({', '.join(map(repr, _TRAINER_TYPES))})"
        )
    if rest.get("network") is None:
        raise ConfigError(
            f"{_PROCESS}.network is missing: ai-toolkit would fine-tune the whole model; this trainer trains LoRAs - "
            "add network: {type: lora, linear: 16, linear_alpha: 16}"
        )
    job: dict[str, Any] = {
        "name": rest.pop("name", None) or job_name,  # a process may override the job's name, as in ai-toolkit
        "model": {},
        "lora": {},
        "multistage": {},
        "optimizer": {},
        "train": {},
        "save": {},
    }
    trigger = rest.pop("trigger_word", None)
    if trigger is not None:
        job["trigger_word"] = str(trigger)
    if rest.get("training_folder") is not None:
        job["save"]["output_dir"] = str(rest.pop("training_folder"))
    if rest.get("device") is not None:
        job["train"]["device"] = str(rest.pop("device"))
    if rest.get("training_seed") is not None:
        job["train"]["seed"] = rest.pop("training_seed")

    _map_network(_take(rest, "network", _PROCESS), job, notes)
    _map_save(_take(rest, "save", _PROCESS), job, notes)
    _map_model(_take(rest, "model", _PROCESS), job, notes)
    _map_train(_take(rest, "train", _PROCESS), job, notes)
    logging = _take(rest, "logging", _PROCESS)
    log_rest = dict(logging)
    if log_rest.get("log_every") is not None:
        job["train"]["log_every"] = log_rest.pop("log_every")
    _leftovers(log_rest, "logging", f"{_PROCESS}.logging", logging, notes)

    raw = rest.pop("datasets", None) or []
    if not isinstance(raw, list):
        raise ConfigError(f"{_PROCESS}.datasets must be a list of dataset entries, got {type(raw).__name__}")
    job["datasets"] = [
        _map_dataset(_take_item(raw, i, f"{_PROCESS}.datasets"), i, job.get("trigger_word"), notes)
        for i in range(len(raw))
    ]
    _leftovers(rest, "process", _PROCESS, proc, notes)
    return job


def _map_network(net: dict[str, Any], job: dict[str, Any], notes: list[str]) -> None:
    where = f"{_PROCESS}.network"
    rest = dict(net)
    ntype = str(rest.pop("type", "lora")).lower()
    if ntype != "lora":
        raise ConfigError(f"{where}.type is {ntype!r}: this trainer trains plain LoRAs only - set type: lora")
    # ai-toolkit: rank wins over linear, neither means 4; linear_alpha falls back to alpha, then to 1.0.
    linear = rest.pop("linear", None)
    rank = rest.pop("rank", None)
    alpha = rest.pop("alpha", None)
    linear_alpha = rest.pop("linear_alpha", None)
    lora = job["lora"]
    lora["rank"] = rank if rank is not None else linear if linear is not None else 4
    alpha_key, alpha = ("linear_alpha", linear_alpha) if linear_alpha is not None else ("alpha", alpha)
    lora["alpha"] = _float(alpha if alpha is not None else 1.0, f"{where}.{alpha_key}")
    dropout = rest.pop("dropout", None)
    if dropout is not None:
        lora["dropout"] = _float(dropout, f"{where}.dropout")
    kwargs = _take(rest, "network_kwargs", where)
    _leftovers(kwargs, "network.network_kwargs", f"{where}.network_kwargs", kwargs, notes)
    _leftovers(rest, "network", where, net, notes)


def _map_save(save: dict[str, Any], job: dict[str, Any], notes: list[str]) -> None:
    where = f"{_PROCESS}.save"
    rest = dict(save)
    job["save"].update(
        dtype=_dtype(rest.pop("dtype", "float16"), f"{where}.dtype"),
        save_every=rest.pop("save_every", 1000),
        keep_last=rest.pop("max_step_saves_to_keep", 5),
    )
    _leftovers(rest, "save", where, save, notes)


def _map_model(model: dict[str, Any], job: dict[str, Any], notes: list[str]) -> None:
    where = f"{_PROCESS}.model"
    rest = dict(model)
    source = rest.pop("name_or_path", None)
    if not source:
        raise ConfigError(f"{where}.name_or_path is missing: give the Wan 2.2 T2V A14B diffusers repo id or folder")
    job["model"]["source"] = str(source)
    arch = rest.pop("arch", None)
    # ai-toolkit's UI writes a tag after ':' (e.g. 'wan22_14b:t2v') that ai-toolkit drops.
    if not isinstance(arch, str) or arch.split(":")[0] != _ARCH:
        raise ConfigError(f"{where}.arch is {arch!r}: this trainer trains Wan 2.2 T2V A14B only - set arch: '{_ARCH}'")
    kwargs = _take(rest, "model_kwargs", where)
    kw_rest = dict(kwargs)
    for key in ("train_high_noise", "train_low_noise"):
        if key in kw_rest:
            job["multistage"][key] = kw_rest.pop(key)
    _leftovers(kw_rest, "model.model_kwargs", f"{where}.model_kwargs", kwargs, notes)
    _leftovers(rest, "model", where, model, notes)


def _map_train(train: dict[str, Any], job: dict[str, Any], notes: list[str]) -> None:
    where = f"{_PROCESS}.train"
    rest = dict(train)
    _require(rest.pop("noise_scheduler", "flowmatch"), ("flowmatch",), f"{where}.noise_scheduler")
    _require(rest.pop("loss_type", "mse"), ("mse",), f"{where}.loss_type")
    if rest.pop("train_unet", True) is not True:
        raise ConfigError(f"{where}.train_unet is off: nothing would train - remove it or set it true")
    accum_steps = rest.pop("gradient_accumulation_steps", 1)
    if accum_steps != 1:
        raise ConfigError(
            f"{where}.gradient_accumulation_steps is {accum_steps!r}: this legacy ai-toolkit setting counts every "
            "micro-batch as a step - use gradient_accumulation instead (steps then count optimizer steps)"
        )
    ttype = str(rest.pop("timestep_type", "sigmoid"))
    if ttype not in _TIMESTEP_TYPES:
        raise ConfigError(
            f"{where}.timestep_type is {ttype!r}: accepted values are {', '.join(map(repr, _TIMESTEP_TYPES))}"
        )
    bias = str(rest.pop("content_or_style", "balanced"))
    if bias not in _TIMESTEP_BIAS:
        raise ConfigError(
            f"{where}.content_or_style is {bias!r}: accepted values are 'balanced', 'content' (high noise) "
            "and 'style' (low noise)"
        )
    # ai-toolkit loads the base weights in train.dtype too (it overwrites model.dtype with it).
    dtype = _dtype(rest.pop("dtype", "fp32"), f"{where}.dtype")
    job["model"]["dtype"] = dtype
    job["multistage"]["switch_every"] = rest.pop("switch_boundary_every", 1)
    job["train"].update(
        steps=rest.pop("steps", 1000),
        batch_size=rest.pop("batch_size", 1),
        gradient_accumulation=rest.pop("gradient_accumulation", 1),
        gradient_checkpointing=rest.pop("gradient_checkpointing", True),
        timestep_type=_TIMESTEP_TYPES[ttype],
        timestep_bias=_TIMESTEP_BIAS[bias],
        compute_dtype=dtype,
    )
    if _TIMESTEP_TYPES[ttype] == "shift":
        job["train"]["timestep_shift"] = _WAN_TRAIN_SHIFT
    ema = rest.pop("ema_config", None)
    if isinstance(ema, dict) and ema.get("use_ema"):
        notes.append(f"{where}.ema_config is ignored: {_REASONS['train.ema_config']}")
    _map_optimizer(rest, job, notes)
    _leftovers(rest, "train", where, train, notes)


def _map_optimizer(rest: dict[str, Any], job: dict[str, Any], notes: list[str]) -> None:
    """Optimizer and LR-schedule settings of the train section; pops the keys it reads from ``rest``."""
    where = f"{_PROCESS}.train"
    name = str(rest.pop("optimizer", "adamw")).lower()  # ai-toolkit lower-cases the name too
    if name not in _OPTIMIZERS:
        raise ConfigError(
            f"{where}.optimizer is {name!r}: this trainer supports {' and '.join(map(repr, _OPTIMIZERS))} - "
            "set one of them"
        )
    params = _take(rest, "optimizer_params", where)
    p_rest = dict(params)
    opt = job["optimizer"]
    opt.update(
        name=name,
        lr=_float(rest.pop("lr", 1e-6), f"{where}.lr"),
        weight_decay=_float(
            p_rest.pop("weight_decay", _ADAMW_WEIGHT_DECAY), f"{where}.optimizer_params.weight_decay"
        ),
        eps=_ADAMW_EPS,
        max_grad_norm=_float(rest.pop("max_grad_norm", 1.0), f"{where}.max_grad_norm"),
    )
    if "betas" in p_rest:
        opt["betas"] = p_rest.pop("betas")
    _leftovers(p_rest, "train.optimizer_params", f"{where}.optimizer_params", params, notes)

    sched = str(rest.pop("lr_scheduler", "constant"))
    if sched not in _SCHEDULERS:
        raise ConfigError(f"{where}.lr_scheduler is {sched!r}: accepted values are {', '.join(map(repr, _SCHEDULERS))}")
    s_params = _take(rest, "lr_scheduler_params", where)
    s_rest = dict(s_params)
    if sched == "constant_with_warmup":
        sched = "constant"
        opt["warmup_steps"] = s_rest.pop("num_warmup_steps", 1000)  # ai-toolkit's fallback
    elif sched == "linear":
        # ai-toolkit's 'linear' is torch's LinearLR: start_factor*lr -> end_factor*lr, by default lr/3 -> lr (a ramp).
        start = _float(s_rest.pop("start_factor", 1.0 / 3.0), f"{where}.lr_scheduler_params.start_factor")
        end = _float(s_rest.pop("end_factor", 1.0), f"{where}.lr_scheduler_params.end_factor")
        if (start, end) != (1.0, 0.0):
            raise ConfigError(
                f"{where}.lr_scheduler 'linear' goes from {start:g}*lr to {end:g}*lr in ai-toolkit, but this "
                "trainer's 'linear' decays lr to 0 - set lr_scheduler_params {start_factor: 1.0, end_factor: 0.0} "
                "for that, or use 'constant' or 'cosine'"
            )
    opt["lr_scheduler"] = sched
    _leftovers(s_rest, "train.lr_scheduler_params", f"{where}.lr_scheduler_params", s_params, notes)


def _map_dataset(ds: dict[str, Any], index: int, trigger: str | None, notes: list[str]) -> dict[str, Any]:
    where = f"{_PROCESS}.datasets[{index}]"
    rest = dict(ds)
    folder = rest.pop("folder_path", None)
    if not folder:
        raise ConfigError(f"{where}.folder_path is missing: give the folder of clips/images and their captions")
    caption_ext = rest.pop("caption_ext", "txt")
    legacy_ext = rest.pop("caption_type", None)  # ai-toolkit's legacy name wins when given
    if legacy_ext:
        caption_ext = legacy_ext
    resolution = rest.pop("resolution", 512)
    is_reg = bool(rest.pop("is_reg", False))
    shrink = rest.pop("shrink_video_to_frames", True)
    out: dict[str, Any] = {
        "folder": str(folder),
        "caption_ext": str(caption_ext).lstrip("."),
        "caption_dropout": _float(rest.pop("caption_dropout_rate", 0.0), f"{where}.caption_dropout_rate"),
        "resolutions": list(resolution) if isinstance(resolution, (list, tuple)) else [resolution],
        "num_frames": rest.pop("num_frames", 1),
        # ai-toolkit spreads num_frames over the whole clip, or (shrink off) takes them at fps from a random start.
        "frame_sampling": "uniform" if shrink else "fps",
        "flip_x": rest.pop("flip_x", False),
        "flip_y": rest.pop("flip_y", False),
        "is_regularization": is_reg,
        "repeats": rest.pop("num_repeats", 1),
        # ai-toolkit caches in memory or on disk; this trainer's cache_latents covers both.
        "cache_latents": bool(rest.pop("cache_latents", False)) | bool(rest.pop("cache_latents_to_disk", False)),
        # ai-toolkit puts the trigger word in front of captions lacking it, except on regularization data.
        "prepend_trigger": bool(trigger) and not is_reg,
    }
    fps = rest.pop("fps", None if shrink else 24)  # 24 is ai-toolkit's default, used only with shrink off
    if fps is not None:
        out["fps"] = _float(fps, f"{where}.fps")
    if not shrink:
        out["window_start"] = "random"
    default_caption = rest.pop("default_caption", None)
    if default_caption is not None:
        out["default_caption"] = str(default_caption)
    if rest.get("trigger_word") in (None, trigger):
        rest.pop("trigger_word", None)
    _leftovers(rest, "datasets", where, ds, notes)
    return out


def _leftovers(rest: dict[str, Any], kind: str, where: str, section: dict[str, Any], notes: list[str]) -> None:
    """Warn about each key of ``rest`` (``section`` minus what was mapped) that asks for something not applied."""
    for key, value in rest.items():
        name = f"{kind}.{key}"
        if name in _NO_EFFECT:
            continue
        switch = _ONLY_WITH.get(name)
        if switch is not None and not _switch_on(section, switch):
            continue
        if (value == _DEFAULTS[name]) if name in _DEFAULTS else _is_off(value):
            continue
        path = f"{where}.{key}" if where else key
        notes.append(f"{path} is ignored: {_REASONS.get(name) or _REASONS.get(kind, _GENERIC)}")


def _switch_on(section: dict[str, Any], switch: str) -> bool:
    if switch == "quantize_te" and "quantize_te" not in section:
        switch = "quantize"  # ai-toolkit: quantize_te defaults to quantize
    return not _is_off(section.get(switch))


def _is_off(value: Any) -> bool:
    if value is None or value is False:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    return isinstance(value, (str, list, tuple, dict)) and len(value) == 0


def _take(rest: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """Pop ``rest[key]`` as a dict ({} when absent or null), with a clear error when it is not a mapping."""
    value = rest.pop(key, None)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{key} must be a mapping of settings, got {type(value).__name__}")
    return value


def _take_item(items: list[Any], index: int, where: str) -> dict[str, Any]:
    value = items[index]
    if not isinstance(value, dict):
        raise ConfigError(f"{where}[{index}] must be a mapping of settings, got {type(value).__name__}")
    return value


def _require(value: Any, accepted: tuple[str, ...], where: str) -> None:
    if value not in accepted:
        raise ConfigError(f"{where} is {value!r}: this trainer supports only {', '.join(map(repr, accepted))}")


def _dtype(value: Any, where: str) -> str:
    key = str(value).lower()
    if key not in _DTYPES:
        raise ConfigError(f"{where} is {value!r}: accepted values are bf16, fp16 (float16) and fp32 (float32)")
    return _DTYPES[key]


def _float(value: Any, where: str) -> float:
    """A number; numeric strings too, because PyYAML reads '1e-4' (no dot) as a string where ai-toolkit's loader
    reads a float."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got {value!r}") from None


_ENV_VAR = re.compile(r"\$\{([^}]+)\}")


def _expand_env(value: Any, where: str = "") -> Any:
    """Replace every '${VAR}' in string values with the environment variable, as ai-toolkit does on load."""
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def env(match: re.Match[str]) -> str:
        var = match.group(1)
        if var not in os.environ:
            raise ConfigError(f"{where} uses ${{{var}}} but the environment variable {var} is not set")
        return os.environ[var]

    return _ENV_VAR.sub(env, value)


def _expand_name(value: Any, name: str) -> Any:
    """Replace '[name]' in every string value with the job name, as ai-toolkit does on load."""
    if isinstance(value, dict):
        return {k: _expand_name(v, name) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_name(v, name) for v in value]
    return value.replace("[name]", name) if isinstance(value, str) else value
