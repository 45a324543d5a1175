"""Read an ai-toolkit Wan 2.2 job (``job`` / ``config: {name, process: [...]}`` / ``meta``) as this trainer's job.

The mapping follows ai-toolkit's own code (``toolkit/config_modules.py``, ``jobs/process/BaseSDTrainProcess.py``,
``extensions_built_in/sd_trainer/SDTrainer.py``, ``toolkit/optimizer.py``, ``toolkit/scheduler.py``,
``toolkit/models/wan21/wan21.py``, ``extensions_built_in/diffusion_models/wan22``):

* A setting this trainer has is mapped; where the file leaves it out, ai-toolkit's default is written instead of
  ours, so the job trains as ai-toolkit would have run it (e.g. ``switch_boundary_every`` 1, ``train.dtype`` fp32).
* A value this trainer cannot reproduce (another optimizer, timestep type, LR schedule, model family...) raises
  :class:`ConfigError` naming the key and the accepted values.
* A setting that is applied, but not exactly as ai-toolkit would, gets a warning ``<key> is changed: <how>``.
* Every other key is ignored with a warning ``<key> is ignored: <why>``, unless it asks for nothing: an off or
  empty value (``false``, ``null``, ``0``, ``""``, ``[]``, ``{}``) or ai-toolkit's default, a setting that only
  matters while another one (left off) is on, or a setting with no effect on a Wan 2.2 LoRA in ai-toolkit itself.
* A key ai-toolkit does not have either is a typo or another trainer's name. When it is a misspelling or a known
  alias (``learning_rate``) of a key this trainer applies, and that key is not given, it raises
  :class:`ConfigError` with "did you mean ...?": ai-toolkit ignores unknown keys, so the job would silently train
  with the default of the key meant. Other unknown keys stay warnings, with the closest ai-toolkit key if any.

Previews (``sample``) render as ai-toolkit's Wan 2.2 pipeline does: its flow-matching Euler scheduler with shift 5
whatever ``sampler`` says, the expert boundary at 0.875, ``guidance_scale`` on both experts (the pipeline's
``guidance_scale_2`` defaults to it; a scale <= 1 turns guidance off there, as 1 does here), width and height
rounded down to multiples of 16 and frame counts to 4n+1 as the pipeline rounds them, ``neg: ''`` as the empty
negative prompt (guidance against the encoded empty text, not Wan's default negative prompt), previews before the
first step unless ``train.skip_first_sample``. Inline prompt flags (``--n``, ``--w``, ``--h``, ``--seed``/``--d``,
``--cfg``/``--l``, ``--steps``/``--s``, ``--m``, ``--frames``, ``--fps``) and per-prompt ``samples[]`` settings are
parsed as ai-toolkit parses them; one value shared by every prompt becomes the section's value, a value that
differs between prompts is ignored by name (previews here have one setting for all prompts).

Datasets: ``is_reg`` data trains as ai-toolkit trains it, as ordinary samples without the trigger word; ai-toolkit
draws a regularization batch on every other step, so those datasets get a fixed ``share`` of one half of every epoch
here (``reg_weight`` w makes it w/(1+w), see :func:`_map_regularization`). ``prior_reg`` (the base model's own
prediction as the target) is this trainer's ``is_regularization``. A prepended trigger word is joined with a space
(``trigger_separator: " "``), as ai-toolkit joins it.

Resuming: ai-toolkit continues a job run again from the newest save in ``<training_folder>/<name>/``. A job this
trainer has run continues from its newest training state, as ``resume: latest`` would (:func:`continue_from_latest`);
when the folder holds this job's ai-toolkit LoRA pair instead (9-digit steps; this trainer writes 6), the newest pair
becomes ``lora.init_high`` / ``lora.init_low`` and ``train.steps`` the steps left (see :func:`_map_resume`).

Text embeddings: ``cache_text_embeddings`` on or off both map to ``text_encoder.mode: cache`` (the cache restores
the encoder's output exactly, so training sees the embeddings ai-toolkit's live encoding gives, with the encoder
freed); ``unload_text_encoder`` maps to ``unload``.

Speed settings: ``train.gradient_checkpointing`` on (ai-toolkit's default) maps to ``auto`` (the VRAM planner
checkpoints as many blocks as the card needs), off to ``off``; how activations are kept does not change what is
learned, so there is no warning. ``model.compile`` is not read: ``train.compile`` (default ``auto``) decides here.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError, safe_open

from .config import (
    AdvancedConfig,
    JobConfig,
    MemoryConfig,
    ModelConfig,
    QuantConfig,
    SampleConfig,
    closest_key,
    field_default,
    format_validation_error,
)
from .errors import ConfigError, LoraFileError
from .names import DTYPES, EXPERTS

_PROCESS = "config.process[0]"
_TRAINER_TYPES = ("sd_trainer", "diffusion_trainer", "ui_trainer")
_ARCH = "wan22_14b"

#: ai-toolkit's dtype spellings (toolkit/train_tools.get_torch_dtype) -> ours: our names, torch's (float32, ...) and
#: its aliases.
_DTYPES = {
    **{name: name for name in DTYPES},
    **{str(dtype).removeprefix("torch."): name for name, dtype in DTYPES.items()},
    "float": "fp32", "single": "fp32", "half": "fp16",
}  # fmt: skip
_OPTIMIZERS = ("adamw8bit", "adamw")
#: 'ddpm' is TrainConfig's default; for Wan 2.2 it only picks the timestep grid (see _other_scheduler_timesteps).
_NOISE_SCHEDULERS = ("flowmatch", "ddpm")
#: flux_shift / lumina2_shift run the same code as shift when the scheduler has no dynamic shifting (Wan's has none).
_TIMESTEP_TYPES = {
    "linear": "linear", "sigmoid": "sigmoid", "weighted": "weighted",
    "shift": "shift", "flux_shift": "shift", "lumina2_shift": "shift",
}  # fmt: skip
#: ai-toolkit's UI labels these "Balanced", "High Noise", "Low Noise": content draws u^3 toward high t, style 1-u^3.
_TIMESTEP_BIAS = {"balanced": "balanced", "content": "high_noise", "style": "low_noise"}
_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
#: The shift of ai-toolkit's Wan 2.2 14B scheduler, for training and sampling alike: wan22_14b_model.py imports
#: ``scheduler_config`` (shift 5.0) from wan22_5b_model.py (Wan 2.1's own config in wan21.py has 3.0).
_WAN22_SHIFT = 5.0
#: ai-toolkit builds AdamW / AdamW8bit with eps=1e-6; torch and bitsandbytes default weight_decay to 0.01.
_ADAMW_EPS = 1e-6
_ADAMW_WEIGHT_DECAY = 0.01
#: ai-toolkit's defaults (toolkit/config_modules.py: TrainConfig, NetworkConfig, SaveConfig, DatasetConfig) of the
#: settings mapped from keys a file may leave out, by this trainer's setting (``datasets.<key>`` for every entry);
#: refusals of these settings quote them instead of this trainer's own defaults.
_AITK_DEFAULTS: dict[str, Any] = {
    "multistage.switch_every": 1,  # switch_boundary_every
    "train.steps": 1000,
    "lora.rank": 4,  # linear / rank
    "save.save_every": 1000,
    "save.keep_last": 5,  # max_step_saves_to_keep
    "optimizer.lr": 1e-6,
    "datasets.caption_dropout": 0.0,  # caption_dropout_rate
    "datasets.num_frames": 1,
}
#: ai-toolkit qtypes that store float8 e4m3 weights with per-output-row scales (quanto's qfloat8 is e4m3fn).
_FLOAT8_QTYPES = ("qfloat8", "qfloat8_e4m3fn", "float8")
#: The 4-bit qtype ai-toolkit's accuracy recovery adapters are made for.
_UINT4 = "uint4"
#: A Hugging Face Hub file as ai-toolkit names an adapter: 'user/repo/file' (repo ids: letters, digits, '-', '_', '.').
_HUB_FILE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*/[^/\\]+")
_QTYPES_ACCEPTED = "'qfloat8' or 'float8' (float8 weights), 'uint4' or 'uint4|<adapter .safetensors>' (4-bit + ARA)"
#: ai-toolkit's TrainConfig / EMAConfig defaults of the regularizers.
_DOP_MULTIPLIER = 1.0
_DIFF_GUIDANCE_SCALE = 3.0
_EMA_DECAY = 0.999
#: TrainConfig.reg_weight: the loss multiplier of regularization (is_reg) batches.
_REG_WEIGHT = 1.0
#: The images ai-toolkit reads from a dataset folder when num_frames is 1 (toolkit/data_loader.py image_extensions).
_AITK_IMAGE_EXTS = ".jpg .jpeg .png .webp"

#: ai-toolkit's SampleConfig defaults (its ``neg`` default, False, is not a prompt: it is read as the empty one).
_SAMPLE_DEFAULTS: dict[str, Any] = {
    "width": 512, "height": 512, "num_frames": 1, "fps": 16, "sample_steps": 20, "guidance_scale": 7.0, "neg": "",
    "network_multiplier": 1.0, "seed": 0, "walk_seed": False, "sample_every": 100, "sample_start_step": 0,
}  # fmt: skip
#: Settings a prompt may override (``samples[i].<key>`` or an inline flag) -> this trainer's SampleConfig fields.
_PER_PROMPT: dict[str, tuple[str, ...]] = {
    "width": ("width",),
    "height": ("height",),
    "num_frames": ("num_frames",),
    "fps": ("fps",),
    "sample_steps": ("steps",),
    "guidance_scale": ("guidance_high", "guidance_low"),
    "neg": ("negative_prompt",),
    "network_multiplier": ("lora_strength_high", "lora_strength_low"),
}
#: Inline prompt flags with an effect on Wan 2.2 T2V (GenerateImageConfig._process_prompt_string) -> setting, type.
#: The others (--p2, --n2, --gr, --a, --ref, --ev, --ctrl_img...) and unknown flags are dropped there too.
_PROMPT_FLAGS: dict[str, tuple[str, type]] = {
    "n": ("neg", str),
    "w": ("width", int), "h": ("height", int),
    "d": ("seed", int), "seed": ("seed", int),
    "l": ("guidance_scale", float), "cfg": ("guidance_scale", float),
    "s": ("sample_steps", int), "steps": ("sample_steps", int),
    "m": ("network_multiplier", float), "network_multiplier": ("network_multiplier", float),
    "frames": ("num_frames", int), "num_frames": ("num_frames", int),
    "fps": ("fps", int),
}  # fmt: skip

_GENERIC = "this trainer has no such setting, so it is not applied"
_COMPILE_REASON = "train.compile decides here (auto: compiled on a CUDA GPU unless the base is 4-bit)"
_PER_PROMPT_REASON = "previews here use one {what} for every prompt: {value!r}"

#: Why a key is not applied, by "<section>.<key>" (or by "<section>" for all its keys).
_REASONS: dict[str, str] = {
    "top.meta": "ai-toolkit's job metadata is not written into the saved LoRAs",
    "process.first_sample": (
        "a separate preview set for the start of training is not supported (the sample section's prompts render "
        "before the first step unless train.skip_first_sample is on)"
    ),
    "process.sqlite_db_path": "it is ai-toolkit UI bookkeeping",
    "process.performance_log_every": "per-stage timing reports are not available",
    "process.log_dir": "TensorBoard logging is not available; progress goes to the console",
    "logging.use_wandb": "Weights & Biases logging is not available; progress goes to the console",
    "logging.use_ui_logger": "ai-toolkit's UI logger is not available; progress goes to the console",
    "network.transformer_only": "LoRAs always go on the Linear layers of the transformer blocks only",
    "network.split_multistage_loras": "one LoRA file per expert is always written",
    "save.push_to_hub": "uploading to the Hugging Face Hub is not supported",
    "save.hf_repo_id": "uploading to the Hugging Face Hub is not supported",
    "save.hf_private": "uploading to the Hugging Face Hub is not supported",
    "model.compile": _COMPILE_REASON,
    "model.block_compile": _COMPILE_REASON,
    "model.dtype": "ai-toolkit replaces it with train.dtype, which sets the base-weight dtype here",
    "train.train_text_encoder": "text-encoder LoRAs are not supported; only the two transformer experts train",
    "train.blank_prompt_preservation": "blank-prompt preservation is not supported",
    "train.blank_prompt_preservation_multiplier": "blank-prompt preservation is not supported",
    "train.ema_config": "only use_ema and ema_decay are read",
    "train.force_first_sample": "the previews before the first step render on a fresh start only, not on resume",
    "train.optimizer_params": "only weight_decay and betas are passed to the optimizer",
    "train.lr_scheduler_params": (
        "only num_warmup_steps (constant_with_warmup) and start_factor/end_factor (linear) are read"
    ),
    "sample.format": "previews are written as videos in sample.format (mp4 or webm)",
    "datasets.trigger_word": f"per-dataset trigger words are not supported; set {_PROCESS}.trigger_word",
    "datasets.network_weight": (
        "a per-dataset LoRA strength during training is not supported (datasets[].weight is not the same thing)"
    ),
    "datasets.auto_frame_count": "clips are always cut to num_frames",
    "datasets.loss_multiplier": (
        "per-sample loss weights are not available here (datasets[].weight sets how often samples come, not their "
        "loss)"
    ),
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
        # Only used for full-model saves, not LoRA files.
        "save.save_format",
        # How often ai-toolkit writes its logs; the LoRA does not depend on it (the console here shows every step).
        "logging.log_every",
        # Wan's loader quantizes the text encoder with model.qtype; qtype_te is never read for Wan.
        "model.qtype_te",
        # The text encoder is freed once the captions are encoded, so there is nothing of it to offload.
        "model.layer_offloading_text_encoder_percent",
        # Not passed to Wan's pipeline, or for adapters / refiners / other models only.
        "sample.guidance_rescale",
        "sample.adapter_conditioning_scale",
        "sample.refiner_start_at",
        "sample.extra_values",
        "sample.do_cfg_norm",
        "sample.samples.ctrl_img",
        "sample.samples.ctrl_img_1",
        "sample.samples.ctrl_img_2",
        "sample.samples.ctrl_img_3",
        "sample.samples.ctrl_idx",
        "sample.samples.do_cfg_norm",
    }
)

#: Keys that only matter while another key of the same section is on.
_ONLY_WITH: dict[str, str] = {
    "model.compile_mode": "compile",
    "model.compile_fullgraph": "compile",
    "model.compile_dynamic": "compile",
    "model.cache_size_limit": "compile",
    "train.blank_prompt_preservation_multiplier": "blank_prompt_preservation",
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
    # dataloader_mixins.py: the first keep_tokens tokens are spared by token dropout only (shuffling ignores it).
    "datasets.keep_tokens": "token_dropout_rate",
}

#: Keys whose ai-toolkit default is not an "off" value: silent only at that default.
_DEFAULTS: dict[str, Any] = {
    "network.transformer_only": True,
    "network.split_multistage_loras": True,
    "train.reg_weight": 1.0,
    "train.max_denoising_steps": 999,
    "train.ema_config.param_multiplier": 1.0,
    "sample.format": "jpg",
    "datasets.type": "image",
    "datasets.network_weight": 1.0,
    "datasets.loss_multiplier": 1.0,
    "datasets.buckets": True,
    "datasets.bucket_tolerance": 64,
}


def _keys(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: Every key ai-toolkit reads, by section: toolkit/config_modules.py (SaveConfig, LoggingConfig, SampleConfig,
#: SampleItem, NetworkConfig, TrainConfig, ModelConfig, EMAConfig, DatasetConfig), the process keys of
#: jobs/process/Base*Process.py and the Wan 2.2 model_kwargs; optimizer / scheduler keyword arguments of torch's and
#: bitsandbytes' AdamW and of toolkit/scheduler.py. A key outside its section's set is unknown to ai-toolkit too.
_AITOOLKIT_KEYS: dict[str, frozenset[str]] = {
    "top": _keys("job config meta"),
    "config": _keys("name process"),
    "process": _keys(
        "type name device trigger_word training_folder training_seed network save model train logging datasets "
        "sample first_sample adapter decorator do_lorm embedding guidance log_dir lorm_extract_mode "
        "lorm_extract_mode_param performance_log_every sqlite_db_path torch_profiler"
    ),
    "save": _keys("dtype hf_private hf_repo_id max_step_saves_to_keep push_to_hub save_every save_format"),
    "logging": _keys("log_every project_name run_name use_ui_logger use_wandb verbose"),
    "network": _keys(
        "all_layers alpha conv conv_alpha dropout layer_offloading linear linear_alpha lokr_factor lokr_full_rank "
        "lorm network_kwargs old_lokr_format pretrained_lora_path rank split_multistage_loras transformer_only type"
    ),
    "model": _keys(
        "accuracy_recovery_adapter arch assistant_lora_path attn_masking auto_memory block_compile cache_size_limit "
        "compile compile_dynamic compile_fullgraph compile_mode dtype experimental_xl extras_name_or_path "
        "ignore_if_contains in_context inference_lora_path is_auraflow is_flux is_lumina2 is_pixart "
        "is_pixart_sigma is_ssd is_v2 is_v3 is_v_pred is_vega is_xl latent_space_version layer_offloading "
        "layer_offloading_text_encoder_percent layer_offloading_transformer_percent lora_path low_vram "
        "model_kwargs model_paths name_or_path only_if_contains qtype qtype_te quantize quantize_kwargs "
        "quantize_te refiner_name_or_path refiner_start_at split_model_other_module_param_count_scale "
        "split_model_over_gpus te_device te_dtype te_name_or_path text_encoder_bits unconditional_lora_path "
        "unet_path unet_sample_size use_flux_cfg use_text_encoder_1 use_text_encoder_2 vae_device vae_dtype vae_path"
    ),
    "model.model_kwargs": _keys("train_high_noise train_low_noise vae_tiling"),
    "train": _keys(
        "adapter_assist_name_or_path adapter_assist_type adapter_lr adaptive_scaling_factor attention_backend "
        "audio_loss_multiplier batch_noise_correction_scale batch_size blank_prompt_preservation "
        "blank_prompt_preservation_multiplier blended_blur_noise bypass_guidance_embedding cache_text_embeddings "
        "cfg_rescale cfg_scale content_or_style correct_pred_norm correct_pred_norm_multiplier "
        "diff_output_preservation diff_output_preservation_class diff_output_preservation_multiplier "
        "differential_guidance_scale diffusion_feature_extractor_path diffusion_feature_extractor_weight "
        "disable_sampling do_batch_noise_correction do_blank_stabilization do_cfg do_differential_guidance "
        "do_fft_loss do_fft_velocity_equiv_weight do_guidance_loss do_guidance_loss_cfg_zero do_paramiter_swapping "
        "do_prior_divergence do_random_cfg do_signal_amplification do_signal_correction_noise dtype "
        "dynamic_noise_offset ema_config embedding_lr force_consistent_noise force_first_sample free_u "
        "gradient_accumulation gradient_accumulation_steps gradient_checkpointing guidance_loss_schedule "
        "guidance_loss_target img_multiplier inverted_mask_prior inverted_mask_prior_multiplier "
        "latent_feature_extractor_path latent_feature_loss_weight latent_multiplier learnable_snr_gos "
        "linear_timesteps linear_timesteps2 loss_target loss_type lr lr_scheduler lr_scheduler_params "
        "match_adapter_assist match_adapter_chance match_noise_norm max_cfg_scale max_denoising_steps max_grad_norm "
        "max_loss max_loss_debug max_negative_prompts merge_network_on_save merge_network_on_save_strength "
        "min_denoising_steps min_snr_gamma negative_prompt next_sample_timesteps noise_multiplier noise_offset "
        "noise_scheduler noisy_latent_multiplier num_train_timesteps optimal_noise_pairing_samples optimizer "
        "optimizer_params paramiter_swapping_factor pred_scaler prompt_dropout_prob prompt_saturation_chance "
        "random_noise_multiplier random_noise_shift refiner_lr reg_weight sdp short_and_long_captions "
        "short_and_long_captions_encoder_split show_turbo_outputs signal_amplification_strength "
        "signal_correction_noise_scale single_item_batching skip_first_sample snr_gamma standardize_images "
        "standardize_latents start_step steps switch_boundary_every t0_loss_target t0_velocity_equiv_weight "
        "target_noise_multiplier target_norm_std target_norm_std_value text_encoder_lr timestep_type train_refiner "
        "train_text_encoder train_turbo train_unet unconditional_prompt unet_lr unload_text_encoder "
        "validation_config weight_jitter xformers"
    ),
    "train.ema_config": _keys("ema_decay param_multiplier use_ema use_feedback"),
    "train.optimizer_params": _keys(
        "lr betas eps weight_decay amsgrad maximize foreach capturable differentiable fused optim_bits args "
        "min_8bit_size percentile_clipping block_wise is_paged"
    ),
    "train.lr_scheduler_params": _keys(
        "total_iters T_max T_0 T_mult eta_min factor start_factor end_factor num_warmup_steps num_training_steps "
        "num_cycles power lr_end last_epoch verbose milestones gamma step_size"
    ),
    "datasets": _keys(
        "alpha_mask audio_normalize audio_preserve_pitch augmentations augments auto_frame_count batch_size "
        "bucket_tolerance buckets cache_clip_vision_to_disk cache_latents cache_latents_num_workers "
        "cache_latents_to_disk cache_tensors_to_disk cache_text_embeddings caption_dropout_rate caption_ext "
        "caption_type clip_image_augmentations clip_image_from_same_folder clip_image_path "
        "clip_image_shuffle_augmentations control_from_same_folder control_path control_path_1 control_path_2 "
        "control_path_3 control_transparent_color controls dataset_path debug default_caption "
        "diff_output_preservation diff_output_preservation_class do_audio do_i2v extra_values fast_image_size "
        "flip_x flip_y folder_path fps full_size_control_images guidance_type inpaint_path invert_mask is_reg "
        "keep_tokens load_image_when_caching_latents loss_multiplier mask_min_value mask_path network_weight "
        "num_controls_from_same_folder num_frames num_repeats num_workers poi prefetch_factor prior_reg "
        "random_crop random_scale random_triggers random_triggers_max replacements replay_transforms resolution "
        "scale shrink_video_to_frames shuffle_augmentations shuffle_tokens square_crop standardize_images "
        "token_dropout_rate trigger_word trim_auto_frame_count_tail type unconditional_path use_short_captions"
    ),
    "sample": _keys(
        "adapter_conditioning_scale do_cfg_norm extra_values format fps guidance_rescale guidance_scale height neg "
        "network_multiplier num_frames prompts refiner_start_at sample_every sample_start_step sample_steps "
        "sampler samples seed walk_seed width"
    ),
    "sample.samples": _keys(
        "ctrl_idx ctrl_img ctrl_img_1 ctrl_img_2 ctrl_img_3 do_cfg_norm fps guidance_scale height neg "
        "network_multiplier num_frames prompt sample_steps seed width"
    ),
}

#: The keys this trainer reads and applies, by section (a subset of ai-toolkit's): a misspelling of one of these
#: that is not given itself would silently train with its default, so it is an error.
_APPLIED_KEYS: dict[str, frozenset[str]] = {
    "top": _keys("job config"),
    "config": _keys("name process"),
    "process": _keys(
        "type name device trigger_word training_folder training_seed network save model train datasets sample"
    ),
    "save": _keys("dtype save_every max_step_saves_to_keep"),
    "logging": frozenset(),
    "network": _keys("type linear rank alpha linear_alpha dropout"),
    "model": _keys(
        "name_or_path arch quantize quantize_te qtype accuracy_recovery_adapter low_vram layer_offloading "
        "layer_offloading_transformer_percent model_kwargs"
    ),
    "model.model_kwargs": _keys("train_high_noise train_low_noise vae_tiling"),
    "train": _keys(
        "noise_scheduler loss_type train_unet timestep_type content_or_style dtype switch_boundary_every steps "
        "batch_size gradient_accumulation gradient_checkpointing diff_output_preservation "
        "diff_output_preservation_multiplier diff_output_preservation_class do_differential_guidance "
        "differential_guidance_scale ema_config optimizer optimizer_params lr max_grad_norm lr_scheduler "
        "lr_scheduler_params skip_first_sample disable_sampling cache_text_embeddings unload_text_encoder reg_weight"
    ),
    "train.ema_config": _keys("use_ema ema_decay"),
    "train.optimizer_params": _keys("weight_decay betas"),
    "train.lr_scheduler_params": _keys("num_warmup_steps start_factor end_factor"),
    "datasets": _keys(
        "folder_path caption_ext caption_type resolution is_reg prior_reg shrink_video_to_frames "
        "caption_dropout_rate num_frames flip_x flip_y num_repeats cache_latents cache_latents_to_disk fps "
        "default_caption cache_text_embeddings"
    ),
    "sample": _keys(
        "samples prompts width height num_frames fps sample_steps guidance_scale neg network_multiplier seed "
        "walk_seed sample_every"
    ),
    "sample.samples": _keys(
        "prompt seed width height num_frames fps sample_steps guidance_scale neg network_multiplier"
    ),
}

#: Other trainers' names (kohya, diffusers scripts, this trainer's own schema) -> ai-toolkit's key, by section.
_ALIASES: dict[str, dict[str, str]] = {
    "process": {"seed": "training_seed", "output_dir": "training_folder", "output_folder": "training_folder"},
    "train": {
        "learning_rate": "lr", "learningrate": "lr", "max_train_steps": "steps", "max_steps": "steps",
        "num_steps": "steps", "train_steps": "steps", "train_batch_size": "batch_size",
        "grad_accum": "gradient_accumulation", "optimizer_type": "optimizer", "optim": "optimizer",
        "scheduler": "lr_scheduler", "clip_grad_norm": "max_grad_norm", "grad_clip": "max_grad_norm",
        "gradient_clipping": "max_grad_norm", "mixed_precision": "dtype", "timestep_sampling": "timestep_type",
    },
    "network": {
        "network_dim": "linear", "dim": "linear", "lora_rank": "linear", "network_alpha": "linear_alpha",
        "lora_alpha": "linear_alpha", "lora_dropout": "dropout",
    },
    "save": {
        "save_every_n_steps": "save_every", "save_dtype": "dtype", "keep_last": "max_step_saves_to_keep",
        "max_saves": "max_step_saves_to_keep",
    },
    "model": {
        "path": "name_or_path", "model_path": "name_or_path", "pretrained_model_name_or_path": "name_or_path",
        "source": "name_or_path", "architecture": "arch",
    },
    "datasets": {
        "folder": "folder_path", "path": "folder_path", "image_dir": "folder_path", "train_data_dir": "folder_path",
        "caption_extension": "caption_ext", "repeats": "num_repeats", "caption_dropout": "caption_dropout_rate",
        "resolutions": "resolution", "frames": "num_frames",
    },
    "sample": {
        "steps": "sample_steps", "cfg": "guidance_scale", "negative_prompt": "neg", "walk_seeds": "walk_seed",
    },
    "sample.samples": {"steps": "sample_steps", "cfg": "guidance_scale", "negative_prompt": "neg", "text": "prompt"},
    "train.optimizer_params": {"wd": "weight_decay"},
    "train.ema_config": {"decay": "ema_decay", "ema": "use_ema", "enabled": "use_ema"},
}  # fmt: skip


#: The sections of a process that :func:`_misplaced` looks through, and the words that tell where one is.
_SECTIONS = ("process", "network", "save", "model", "model.model_kwargs", "train", "logging", "sample", "datasets")
#: Each ai-toolkit key -> the sections of a process that read it.
_HOMES: dict[str, tuple[str, ...]] = {}
for _kind in _SECTIONS:
    for _key in _AITOOLKIT_KEYS[_kind]:
        _HOMES[_key] = (*_HOMES.get(_key, ()), _kind)


def _section_path(kind: str) -> str:
    """Where a section lives in the file, as the user writes it."""
    if kind == "process":
        return _PROCESS
    return f"{_PROCESS}.datasets[] (each dataset entry)" if kind == "datasets" else f"{_PROCESS}.{kind}"


def _process_sections(proc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, key path, settings) of every section of ``proc`` written as a mapping."""
    found = [("process", _PROCESS, proc)]
    for kind in _SECTIONS[1:-1]:
        node: Any = proc
        for part in kind.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            found.append((kind, f"{_PROCESS}.{kind}", node))
    datasets = proc.get("datasets")
    for i, ds in enumerate(datasets if isinstance(datasets, list) else []):
        if isinstance(ds, dict):
            found.append(("datasets", f"{_PROCESS}.datasets[{i}]", ds))
    return found


def _given_in(proc: dict[str, Any], kind: str, key: str) -> bool:
    """Whether ``key`` is given in the section ``kind`` of ``proc`` (in any dataset entry for datasets)."""
    return any(key in node for k, _, node in _process_sections(proc) if k == kind)


def _misplaced(proc: dict[str, Any], notes: list[str]) -> None:
    """Name every key written in a section that does not read it but another one does, whatever its value (ai-toolkit
    ignores it there), and remove it from the section. Refuses one that stands for a key this trainer applies and
    that section does not give: the job would silently train with that key's default."""
    for kind, where, section in _process_sections(proc):
        for key in [k for k in section if isinstance(k, str) and k not in _AITOOLKIT_KEYS[kind]]:
            _move_hint(key, kind, where, section, proc, notes)


def _move_hint(key: str, kind: str, where: str, section: dict[str, Any], proc: dict[str, Any], notes: list[str]) -> None:
    """:func:`_misplaced` for one key of ``section`` (of the kind ``kind``, at ``where``; ``config`` for the job's
    own section, where ai-toolkit reads only name and process)."""
    homes = [h for h in _HOMES.get(key, ()) if h != kind]
    if not homes:
        return
    path, places = f"{where}.{key}", " or ".join(f"`{_section_path(h)}`" for h in homes)
    missing = [h for h in homes if key in _APPLIED_KEYS[h] and not _given_in(proc, h, key)]
    if missing:
        raise ConfigError(
            f"{path} is in the wrong section: ai-toolkit reads {key} under {places} and ignores it here, so "
            f"the job would silently train with its default - move it under `{_section_path(missing[0])}`"
        )
    given = " (it is given there too, and that one is read)" if any(_given_in(proc, h, key) for h in homes) else ""
    notes.append(f"{path} is ignored: ai-toolkit reads {key} under {places}, not here{given} - move it there")
    del section[key]


#: ai-toolkit's switches (read by truthiness, so any non-empty text is on) and the words that look like a boolean.
_BOOL_KEYS = _keys(
    "quantize quantize_te low_vram layer_offloading vae_tiling train_high_noise train_low_noise train_unet "
    "gradient_checkpointing skip_first_sample force_first_sample disable_sampling cache_text_embeddings "
    "unload_text_encoder diff_output_preservation do_differential_guidance do_guidance_loss use_ema is_reg prior_reg "
    "shrink_video_to_frames cache_latents cache_latents_to_disk flip_x flip_y walk_seed buckets linear_timesteps "
    "linear_timesteps2 split_multistage_loras transformer_only push_to_hub use_wandb compile auto_frame_count"
)
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
#: Keys whose values are free text, where a word like 'no' is meant as written.
_TEXT_KEYS = _keys(
    "name trigger_word default_caption prompt prompts neg diff_output_preservation_class folder_path dataset_path "
    "training_folder name_or_path caption_ext caption_type"
)


def _quoted_bools(node: Any, where: str) -> None:
    """Refuse a switch written as text ('false', "no"): ai-toolkit tests it for truth, and any non-empty text is
    true there, while YAML's own false/no are not - so the quotes silently turn the switch on."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}"
        if isinstance(value, (dict, list)):
            _quoted_bools(value, path)
        elif isinstance(value, str) and isinstance(key, str) and key not in _TEXT_KEYS:
            meant = _BOOL_WORDS.get(value.strip().lower())
            if key in _BOOL_KEYS or meant is not None:
                word = "true" if meant or (meant is None and value) else "false"
                raise ConfigError(
                    f"{path} is the text {value!r}: write {word} without quotes - ai-toolkit reads the text "
                    f"{value!r} as {str(bool(value)).lower()}"
                )


def is_aitoolkit_config(data: Any) -> bool:
    """True when ``data`` has ai-toolkit's job shape (top-level ``job`` and ``config`` keys, which it requires).

    This trainer's own schema has neither key, so the two cannot be confused.
    """
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        return False
    # A file with ai-toolkit's config.process but no job line is ai-toolkit's too: from_aitoolkit names the gap.
    return "job" in data or "process" in data["config"]


def from_aitoolkit(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Map an ai-toolkit Wan 2.2 T2V 14B LoRA job onto this trainer's settings.

    Returns a plain dict for :func:`trainer_core.config.job_from_dict` (which still validates every value) and one
    warning per ignored key, naming it by its dotted path (e.g. ``config.process[0].train.ema_config``) and saying
    why. Raises :class:`ConfigError` for a job this trainer cannot run as written.
    """
    if not is_aitoolkit_config(data):
        raise ConfigError("not an ai-toolkit job: expected top-level 'job' and 'config' sections")
    if "job" not in data:
        raise ConfigError(
            "job is missing: the file looks like an ai-toolkit job (config.process) without its first line - add "
            "job: extension at the top"
        )
    if data["job"] != "extension":
        raise ConfigError(f"job is {data['job']!r}: only ai-toolkit training jobs ('job: extension') can be read")
    data = _expand_env(data)
    name = data["config"].get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(
            f"config.name is {name!r}, not text: ai-toolkit names the output folder and files after it - write it "
            f"in quotes, e.g. name: '{name}'"
        )
    if not name:
        raise ConfigError(
            "config.name is missing: ai-toolkit names the output folder and files after it - add e.g. name: my_lora "
            "under config"
        )
    data = _expand_name(data, name)
    _quoted_bools(data["config"], "config")
    processes = data["config"].get("process")
    if isinstance(processes, dict):
        raise ConfigError(
            "config.process is a mapping, but ai-toolkit lists its processes - write it as a list: put '- ' before "
            "its first key (process:, then '- type: sd_trainer' with the other keys indented below it)"
        )
    if not isinstance(processes, list) or not processes:
        raise ConfigError(
            "config.process is missing or empty: it must list one training process - add one, as in ai-toolkit's "
            "config/examples/train_lora_wan22_14b_24gb.yaml (process:, then '- type: sd_trainer' and its settings)"
        )
    if len(processes) > 1:
        raise ConfigError(
            f"config.process lists {len(processes)} processes: this trainer runs one job at a time - "
            "split them into one file each"
        )
    notes: list[str] = []
    proc = _take_item(processes, 0, "config.process")
    config_rest = {k: v for k, v in data["config"].items() if k not in ("name", "process")}
    for key in [k for k in config_rest if isinstance(k, str)]:
        _move_hint(key, "config", "config", config_rest, proc, notes)
    job = _map_process(proc, name, notes)
    _leftovers(config_rest, "config", "config", data["config"], notes)
    _leftovers({k: v for k, v in data.items() if k not in ("job", "config")}, "top", "", data, notes)
    return job, notes


def job_from_aitoolkit(data: dict[str, Any], source: str) -> tuple[JobConfig, list[str]]:
    """Read an ai-toolkit job (:func:`from_aitoolkit`) into a validated :class:`JobConfig`, with its warnings.

    Every refusal names the file ``source`` and the key as the file spells it, also where only this trainer's
    schema refuses the value: ``job.yaml: config.process[0].train.switch_boundary_every: switch_boundary_every must
    be >= 1 ...``, not the setting it maps to (``multistage.switch_every``).
    """
    try:
        job, notes = from_aitoolkit(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        return JobConfig.model_validate(job), notes
    except ValidationError as exc:
        message = format_validation_error(exc, source)
        proc = data["config"]["process"][0]
        for err in exc.errors():
            message = _aitoolkit_default(_in_aitoolkit_terms(message, err["loc"], proc), err["loc"])
        raise ConfigError(message) from None


def _aitoolkit_default(message: str, loc: tuple[Any, ...]) -> str:
    """``message`` quoting ai-toolkit's default of the setting at ``loc`` where it quotes this trainer's ('use e.g.
    the default 2000', '10 (the default)'): the file is read with ai-toolkit's defaults (:data:`_AITK_DEFAULTS`)."""
    names = [str(p) for p in loc if not isinstance(p, int)]
    theirs = _AITK_DEFAULTS.get(".".join(names))
    if theirs is None:
        return message
    ours = field_default(tuple(names))
    for said, meant in (("the default is {!r}", "ai-toolkit's default is {!r}"), ("the default {!r}",
                        "ai-toolkit's default {!r}"), ("{!r} (the default)", "{!r} (ai-toolkit's default)")):
        message = message.replace(said.format(ours), meant.format(theirs))
    return message


def aitoolkit_terms(data: dict[str, Any]) -> Callable[[str], str]:
    """For the ai-toolkit job ``data`` (as :func:`from_aitoolkit` read it): a function that rewrites a message of
    this trainer, raised after the mapping (the job's cross-checks, the pre-flight, the dataset scan, the run), so
    that it names the file's keys: ``train.device`` -> ``config.process[0].device``, ``datasets[0].folder`` ->
    ``config.process[0].datasets[0].folder_path``. A setting no key of the file gives keeps its name."""
    proc = data["config"]["process"][0]
    paths = {path: _source_key(tuple(path.split(".")), proc) for path in _SOURCES if "." in path}
    datasets = proc.get("datasets")
    for i in range(len(datasets) if isinstance(datasets, list) else 0):
        paths.update({f"datasets[{i}].{key}": _source_key(("datasets", i, key), proc) for key in _DATASET_SOURCES})
    net = proc.get("network") if isinstance(proc.get("network"), dict) else {}
    if not _is_off(net.get("pretrained_lora_path")):
        paths.update({f"lora.init_{e}": f"{_PROCESS}.network.pretrained_lora_path" for e in EXPERTS})
    model = proc.get("model") if isinstance(proc.get("model"), dict) else {}
    if model.get("layer_offloading"):
        paths["memory.offload_blocks"] = f"{_PROCESS}.model.layer_offloading_transformer_percent (as a block count)"
    paths = {ours: theirs for ours, theirs in paths.items() if theirs}
    # Longest first, and never inside a longer key path: 'train.steps' in 'config.process[0].train.steps' stays.
    pattern = re.compile(
        r"(?<![\w.\]])(" + "|".join(map(re.escape, sorted(paths, key=len, reverse=True))) + r")(?![\w\[]|\.\w)"
    )
    return lambda message: pattern.sub(lambda m: paths[m.group(1)], message)


#: This trainer's settings that :func:`from_aitoolkit` passes on unchecked -> the keys of ``config.process[0]`` they
#: come from; of several, the first the file gives is the one read (ai-toolkit's precedence), else the last.
_SOURCES: dict[str, tuple[str, ...]] = {
    "trigger_word": ("trigger_word",),
    "save.output_dir": ("training_folder",),
    "lora.init_high": ("training_folder",),
    "lora.init_low": ("training_folder",),
    "train.device": ("device",),
    "train.seed": ("training_seed",),
    "lora.rank": ("network.rank", "network.linear"),
    "lora.dropout": ("network.dropout",),
    "save.dtype": ("save.dtype",),
    "save.save_every": ("save.save_every",),
    "save.keep_last": ("save.max_step_saves_to_keep",),
    "model.source": ("model.name_or_path",),
    "model.dtype": ("train.dtype",),
    "multistage": ("model.model_kwargs",),  # its own rule: at least one expert trains
    "multistage.train_high_noise": ("model.model_kwargs.train_high_noise",),
    "multistage.train_low_noise": ("model.model_kwargs.train_low_noise",),
    "multistage.switch_every": ("train.switch_boundary_every",),
    "train.steps": ("train.steps",),
    "train.batch_size": ("train.batch_size",),
    "train.gradient_accumulation": ("train.gradient_accumulation",),
    "train.compute_dtype": ("train.dtype",),
    "optimizer.name": ("train.optimizer",),
    "optimizer.lr": ("train.lr",),
    "optimizer.weight_decay": ("train.optimizer_params.weight_decay",),
    "optimizer.betas": ("train.optimizer_params.betas",),
    "optimizer.max_grad_norm": ("train.max_grad_norm",),
    "optimizer.warmup_steps": ("train.lr_scheduler_params.num_warmup_steps",),
    "optimizer.lr_scheduler": ("train.lr_scheduler",),
}
#: The same for each ``datasets[i]`` setting -> the keys of that dataset entry.
_DATASET_SOURCES: dict[str, tuple[str, ...]] = {
    "folder": ("folder_path", "dataset_path"),
    "caption_ext": ("caption_type", "caption_ext"),
    "caption_dropout": ("caption_dropout_rate",),
    "resolutions": ("resolution",),
    "num_frames": ("num_frames",),
    "fps": ("fps",),
    "flip_x": ("flip_x",),
    "flip_y": ("flip_y",),
    "repeats": ("num_repeats",),
    "default_caption": ("default_caption",),
    "is_regularization": ("prior_reg",),
    "cache_latents": ("cache_latents", "cache_latents_to_disk"),
}


def _source_key(loc: tuple[Any, ...], proc: dict[str, Any]) -> str | None:
    """The ai-toolkit key (``config.process[0]....``) that the mapped setting at ``loc`` (a pydantic error location,
    or a dotted path split) was read from, as ``proc`` (the file's process) spells it; None when no key holds it."""
    if loc == ("name",):
        return f"{_PROCESS}.name" if proc.get("name") else "config.name"
    if loc[:1] == ("datasets",) and len(loc) > 1 and isinstance(loc[1], int):
        where = f"{_PROCESS}.datasets[{loc[1]}]"
        if len(loc) == 2:
            return where
        keys = _DATASET_SOURCES.get(str(loc[2]))
        return f"{where}.{_given(proc['datasets'][loc[1]], keys)}" if keys else None
    for path in (".".join(map(str, loc)), ".".join(map(str, loc[:2]))):  # betas[0] is named by betas
        if path in _SOURCES:
            return f"{_PROCESS}.{_given(proc, _SOURCES[path])}"
    return None


def _given(section: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The first of ``keys`` (dotted, inside ``section``) that is given, else the last."""
    for key in keys[:-1]:
        node: Any = section
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return key
    return keys[-1]


def _in_aitoolkit_terms(message: str, loc: tuple[Any, ...], proc: dict[str, Any]) -> str:
    """``message`` with the setting at ``loc`` ('lora.rank', quoted as :func:`format_validation_error` writes it)
    replaced by its ai-toolkit key, and its name where the explanation starts with it ('rank must be ...')."""
    key = _source_key(loc, proc)
    if key is None:
        return message
    ours, theirs = ".".join(map(str, loc)), key.rsplit(".", 1)[-1]
    leaf = next((str(p) for p in reversed(loc) if isinstance(p, str)), "")
    return message.replace(f"'{ours}': {leaf} ", f"{key}: {theirs} ").replace(f"'{ours}'", key)


def _map_process(proc: dict[str, Any], job_name: str, notes: list[str]) -> dict[str, Any]:
    rest = dict(proc)
    ptype = rest.pop("type", None)
    if ptype not in _TRAINER_TYPES:
        raise ConfigError(
            f"{_PROCESS}.type is {ptype!r}: only ai-toolkit's LoRA trainer process can be read "
            f"({', '.join(map(repr, _TRAINER_TYPES))})"
        )
    if rest.get("network") is None:
        typo = closest_key("network", [str(k) for k in rest if k != "network"])
        hint = f" ('{typo}' is given - did you mean 'network'? rename it)" if typo else ""
        raise ConfigError(
            f"{_PROCESS}.network is missing{hint}: ai-toolkit would fine-tune the whole model; this trainer trains "
            "LoRAs - add network: {type: lora, linear: 16, linear_alpha: 16}"
        )
    _misplaced(rest, notes)
    job: dict[str, Any] = {
        "name": rest.pop("name", None) or job_name,  # a process may override the job's name, as in ai-toolkit
        "model": {},
        "lora": {},
        "multistage": {},
        "optimizer": {},
        "train": {},
        "save": {},
        "sample": {},
    }
    trigger = rest.pop("trigger_word", None)
    if isinstance(trigger, (list, tuple, dict)):
        raise ConfigError(
            f"{_PROCESS}.trigger_word is a {type(trigger).__name__}: ai-toolkit takes one trigger word as text - "
            "write one, e.g. trigger_word: sks"
        )
    if trigger is not None:
        job["trigger_word"] = str(trigger)
    if rest.get("training_folder") is not None:
        job["save"]["output_dir"] = os.path.expanduser(str(rest.pop("training_folder")))
    if rest.get("device") is not None:
        job["train"]["device"] = str(rest.pop("device"))
    if rest.get("training_seed") is not None:
        job["train"]["seed"] = rest.pop("training_seed")

    _map_network(_take(rest, "network", _PROCESS), job, notes)
    _map_save(_take(rest, "save", _PROCESS), job, notes)
    _map_model(_take(rest, "model", _PROCESS), job, notes)
    flags = _map_train(_take(rest, "train", _PROCESS), job, notes)
    logging = _take(rest, "logging", _PROCESS)
    _leftovers(logging, "logging", f"{_PROCESS}.logging", logging, notes)

    raw = rest.pop("datasets", None) or []
    if not isinstance(raw, list):
        raise ConfigError(f"{_PROCESS}.datasets must be a list of dataset entries, got {type(raw).__name__}")
    if not raw:  # ai-toolkit builds no data loader then, and its training loop fails at the first step
        raise ConfigError(
            f"{_PROCESS}.datasets is missing or empty: there is nothing to train on - add a dataset entry, e.g. "
            "datasets: [{folder_path: /path/to/clips}]"
        )
    raw = [_take_item(raw, i, f"{_PROCESS}.datasets") for i in range(len(raw))]
    job["datasets"] = [_map_dataset(ds, i, job.get("trigger_word"), flags["cache_text_embeddings"], notes) for i, ds in enumerate(raw)]
    _map_regularization(raw, flags["reg_weight"], job, notes)
    _map_text_encoder(flags, raw, job, notes)
    _map_sample(_take(rest, "sample", _PROCESS), rest.pop("first_sample", None), flags, job, notes)
    _leftovers(rest, "process", _PROCESS, proc, notes)
    _map_resume(job, job_name, notes)
    if job["name"] != job_name:
        notes.append(
            f"{_PROCESS}.name is changed: ai-toolkit names the output folder after it and the LoRA files after "
            f"config.name ({job_name}_<step>_high_noise.safetensors); here the files are named after it too "
            f"({job['name']}_<step>_high_noise.safetensors, in the same folder) - rename them, or give config.name "
            "the process's name"
        )
    return job


def _map_network(net: dict[str, Any], job: dict[str, Any], notes: list[str]) -> None:
    where = f"{_PROCESS}.network"
    rest = dict(net)
    ntype = str(rest.pop("type", "lora")).lower()
    if ntype != "lora":
        raise ConfigError(f"{where}.type is {ntype!r}: this trainer trains plain LoRAs only - set type: lora")
    # ai-toolkit: rank wins over linear, neither means 4. Transformer LoRAs (Wan included) train in peft format with
    # alpha = rank, i.e. scale 1, whatever linear_alpha / alpha say (toolkit/lora_special.py, "no alpha for peft").
    linear = rest.pop("linear", None)
    rank = rest.pop("rank", None)
    lora = job["lora"]
    lora["rank"] = rank if rank is not None else linear if linear is not None else _AITK_DEFAULTS["lora.rank"]
    lora["alpha"] = None  # = rank: scale 1, as ai-toolkit trains it
    for key in ("linear_alpha", "alpha"):
        value = rest.pop(key, None)
        if value is not None and _float(value, f"{where}.{key}") != float(lora["rank"]):
            notes.append(f"{where}.{key} is ignored: ai-toolkit trains Wan LoRAs in peft format with alpha = rank "
                         f"(scale 1) whatever {key} says; so does this import (alpha {lora['rank']})")
    dropout = rest.pop("dropout", None)
    if dropout is not None:
        lora["dropout"] = _float(dropout, f"{where}.dropout")
    kwargs = _take(rest, "network_kwargs", where)
    for key in ("only_if_contains", "ignore_if_contains"):
        if not _is_off(kwargs.get(key)):
            # lora_special.py matches these words against the module's dotted name and lora name alike; this
            # trainer's lora.target_modules picks layers by another rule, so the job would train other layers.
            raise ConfigError(
                f"{where}.network_kwargs.{key} is not supported: ai-toolkit trains only the layers whose names "
                f"{'contain' if key == 'only_if_contains' else 'lack'} those words, and this import cannot choose "
                "layers that way - remove it to train every Linear layer of the blocks, or write this trainer's "
                "own job file with lora.target_modules"
            )
    kwargs = {k: v for k, v in kwargs.items() if k not in ("only_if_contains", "ignore_if_contains")}
    _map_pretrained(rest.pop("pretrained_lora_path", None), job)
    _leftovers(kwargs, "network.network_kwargs", f"{where}.network_kwargs", kwargs, notes)
    _leftovers(rest, "network", where, net, notes)


def _map_pretrained(path: Any, job: dict[str, Any]) -> None:
    """network.pretrained_lora_path as ai-toolkit's Wan22Model.load_lora reads it: the file named and its partner
    (``_high_noise`` <-> ``_low_noise``), each loaded when it exists (experts that do not train are skipped later
    by the multistage settings, as there)."""
    key = f"{_PROCESS}.network.pretrained_lora_path"
    if _is_off(path):
        return
    path = os.path.expanduser(str(path))
    pair = {
        "high": path.replace("_low_noise.safetensors", "_high_noise.safetensors"),
        "low": path.replace("_high_noise.safetensors", "_low_noise.safetensors"),
    }
    if pair["high"] == pair["low"]:
        raise ConfigError(
            f"{key} is {path!r}: a combined LoRA of both experts is not supported here - give one file of a "
            "<name>_high_noise.safetensors / <name>_low_noise.safetensors pair"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: {path} does not exist - give the path of an existing LoRA file")
    for expert, file in pair.items():
        if os.path.isfile(file):
            job["lora"][f"init_{expert}"] = file


def _map_save(save: dict[str, Any], job: dict[str, Any], notes: list[str]) -> None:
    where = f"{_PROCESS}.save"
    rest = dict(save)
    job["save"].update(
        dtype=_dtype(rest.pop("dtype", "float16"), f"{where}.dtype"),
        save_every=rest.pop("save_every", _AITK_DEFAULTS["save.save_every"]),
        keep_last=rest.pop("max_step_saves_to_keep", _AITK_DEFAULTS["save.keep_last"]),
    )
    _leftovers(rest, "save", where, save, notes)


def _map_model(model: dict[str, Any], job: dict[str, Any], notes: list[str]) -> None:
    where = f"{_PROCESS}.model"
    rest = dict(model)
    source = rest.pop("name_or_path", None)
    if not source:
        typo = closest_key("name_or_path", [str(k) for k in rest])
        hint = f" ('{typo}' is given: rename it to name_or_path)" if typo else ""
        raise ConfigError(
            f"{where}.name_or_path is missing{hint}: give the Wan 2.2 T2V A14B diffusers repo id or folder"
        )
    job["model"]["source"] = str(source)
    arch = rest.pop("arch", None)
    # ai-toolkit's UI writes a tag after ':' (e.g. 'wan22_14b:t2v') that ai-toolkit drops.
    if not isinstance(arch, str) or arch.split(":")[0] != _ARCH:
        raise ConfigError(f"{where}.arch is {arch!r}: this trainer trains Wan 2.2 T2V A14B only - set arch: '{_ARCH}'")
    _map_quant(rest, job, notes)
    low_vram = bool(rest.pop("low_vram", False))
    offload = 0
    if rest.pop("layer_offloading", False):
        pct = _float(
            rest.pop("layer_offloading_transformer_percent", 1.0), f"{where}.layer_offloading_transformer_percent"
        )
        # ai-toolkit offloads each Linear layer with probability pct (all from 1 up, none at 0 or below).
        offload = int(min(max(pct, 0.0), 1.0) * _block_count(str(source)) + 0.5)
    rest.pop("layer_offloading_transformer_percent", None)
    job["memory"] = _validated(
        MemoryConfig,
        {"low_vram": low_vram, "offload_blocks": offload},
        {"low_vram": f"{where}.low_vram", "offload_blocks": f"{where}.layer_offloading_transformer_percent"},
    )
    kwargs = _take(rest, "model_kwargs", where)
    kw_rest = dict(kwargs)
    for key in ("train_high_noise", "train_low_noise"):
        if key in kw_rest:
            job["multistage"][key] = kw_rest.pop(key)
    # ai-toolkit decodes previews in tiles in low-VRAM mode or when asked.
    if bool(kw_rest.pop("vae_tiling", False)) or low_vram:
        job["sample"]["vae_tiling"] = True
    _leftovers(kw_rest, "model.model_kwargs", f"{where}.model_kwargs", kwargs, notes)
    _leftovers(rest, "model", where, model, notes)


def _block_count(source: str) -> int:
    """Transformer blocks per expert of the model ``source`` names, as the VRAM planner reads them without loading a
    weight (the tiny preset's, a diffusers folder's config.json, else Wan 2.2 A14B's 40)."""
    # imported here: it needs diffusers, and only offloading asks
    from .memory.planner import model_arch

    return int(model_arch(ModelConfig.model_construct(source=source))["num_layers"])


def _map_quant(rest: dict[str, Any], job: dict[str, Any], notes: list[str]) -> None:
    """quantize / qtype / quantize_te / accuracy_recovery_adapter of the model section; pops the keys it reads.

    ai-toolkit's Wan loader quantizes the text encoder with ``model.qtype`` (it never reads ``qtype_te``).
    """
    where = f"{_PROCESS}.model"
    quantize = bool(rest.pop("quantize", False))
    quantize_te = bool(rest.pop("quantize_te", quantize))  # ai-toolkit: quantize_te defaults to quantize
    raw_qtype = rest.pop("qtype", "qfloat8")
    qtype, _, adapter = str(raw_qtype).partition("|")  # ai-toolkit: 'uint4|<adapter>', which wins over the key
    adapter_key = f"{where}.qtype"
    separate = rest.pop("accuracy_recovery_adapter", None)
    if not adapter and separate:
        adapter, adapter_key = str(separate), f"{where}.accuracy_recovery_adapter"
    quant: dict[str, Any] = {"transformer": "none", "text_encoder": "bf16"}
    if quantize:
        if qtype in _FLOAT8_QTYPES and not adapter:
            # ai-toolkit's qfloat8 (optimum-quanto) is weight-only; the input gradients here then use the dequantized
            # weight as there. The forward's float8 activations have no off switch: named below.
            quant.update(transformer="float8", fp8_backward=False)
            notes.append(
                f"{where}.qtype is changed: ai-toolkit's {qtype!r} (optimum-quanto) is weight-only - float8 weights, "
                "matmuls in the compute dtype; here, on GPUs with float8 matmul (compute capability 8.9 and up), the "
                "forward also rounds each layer's input to float8 with per-row scales (about 3% relative error per "
                "element); elsewhere the weights are dequantized as in ai-toolkit, and the input gradients always use "
                "the dequantized weights (quant.fp8_backward: false)"
            )
        elif qtype == _UINT4:
            quant.update(transformer="4bit_ara", quantizer="uint4")
            _map_adapter(adapter.strip(), adapter_key, quant, notes)
        elif qtype in _FLOAT8_QTYPES:
            raise ConfigError(
                f"{where}.qtype is {raw_qtype!r}: accuracy recovery adapters are made for the uint4 quantizer - "
                "use 'uint4|<adapter>' or plain 'qfloat8'"
            )
        else:
            raise ConfigError(f"{where}.qtype is {raw_qtype!r}: accepted values are {_QTYPES_ACCEPTED}")
    if quantize_te:
        if qtype == _UINT4:
            te_key = f"{where}.qtype_te" if "qtype_te" in rest else f"{where}.quantize_te"
            notes.append(
                f"{te_key} is changed: the text encoder is stored in float8; ai-toolkit's Wan loader quantizes it "
                f"with model.qtype ('{_UINT4}', qtype_te is not read there), a 4-bit format this trainer offers for "
                "the transformer only"
            )
        elif qtype not in _FLOAT8_QTYPES:
            raise ConfigError(
                f"{where}.qtype is {raw_qtype!r}: ai-toolkit's Wan loader quantizes the text encoder with it "
                f"(quantize_te is on); accepted values are {_QTYPES_ACCEPTED}"
            )
        quant["text_encoder"] = "float8"
    job["quant"] = _validated(
        QuantConfig,
        quant,
        {"ara_source": adapter_key, "transformer": f"{where}.qtype", "text_encoder": f"{where}.quantize_te"},
    )


def _map_adapter(adapter: str, key: str, quant: dict[str, Any], notes: list[str]) -> None:
    """The uint4 adapter: a local file is used; a Hub file cannot be fetched here, so adapters are computed."""
    if not adapter:
        notes.append(
            f"{key} is changed: ai-toolkit would quantize to plain uint4 without accuracy recovery adapters; here "
            "each 4-bit layer gets an adapter computed locally from the weights and calibrated on the training clips "
            "(quant.ara_source: compute)"
        )
    elif os.path.isfile(adapter):
        quant["ara_source"] = adapter
        if adapter.lower().endswith(".safetensors"):  # anything else is refused by QuantConfig, naming the key
            # ai-toolkit sizes its adapter from the file (toolkit/util/quantize.py: linear_dim = lora_A.shape[0]);
            # a file of another rank than the default 16 then works here too. Imported here: it needs torch.
            from .quant.ara_files import adapter_file_rank

            try:
                quant["ara_rank"] = adapter_file_rank(adapter, key)
            except LoraFileError as exc:
                raise ConfigError(str(exc)) from None
    elif os.path.isdir(adapter):
        raise ConfigError(
            f"{key}: the accuracy recovery adapter {adapter!r} is a folder - give the adapter .safetensors file "
            "inside it"
        )
    elif not _HUB_FILE.fullmatch(adapter):
        # ai-toolkit downloads a path that does not exist as parts[0]/parts[1] (repo) + parts[-1] (file): a local path
        # ('/data/ara.safetensors' is repo '/data') or one of other than three parts has no such repo - a missing file.
        raise ConfigError(
            f"{key}: the accuracy recovery adapter {adapter!r} is neither an existing file nor a Hugging Face Hub "
            "file 'user/repo/file.safetensors' - give the path of the adapter file"
        )
    else:
        notes.append(
            f"{key} is changed: the accuracy recovery adapter {adapter!r} is a Hugging Face Hub file, which is not "
            "downloaded here; adapters for the uint4 quantizer are computed locally from the weights and calibrated "
            "on the training clips instead (quant.ara_source: compute) - download the file and give its local path "
            "to use it"
        )


def _map_train(train: dict[str, Any], job: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The train section; returns what other sections need: its switches (sampling, text-encoder caching) and
    ``reg_weight`` (regularization datasets)."""
    where = f"{_PROCESS}.train"
    rest = dict(train)
    scheduler = rest.pop("noise_scheduler", "ddpm")  # TrainConfig's default
    _require(scheduler, _NOISE_SCHEDULERS, f"{where}.noise_scheduler")
    _require(rest.pop("loss_type", "mse"), ("mse",), f"{where}.loss_type")
    if rest.pop("train_unet", True) is not True:
        raise ConfigError(f"{where}.train_unet is off: nothing would train - remove it or set it true")
    accum_steps = rest.pop("gradient_accumulation_steps", 1)
    if accum_steps != 1:
        raise ConfigError(
            f"{where}.gradient_accumulation_steps is {accum_steps!r}: this legacy ai-toolkit setting counts every "
            "micro-batch as a step - use gradient_accumulation instead (steps then count optimizer steps)"
        )
    given_type = rest.pop("timestep_type", None)
    ttype = str(given_type or "sigmoid")
    if scheduler != "flowmatch":
        ttype = _other_scheduler_timesteps(given_type, scheduler, notes)
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
    job["multistage"]["switch_every"] = rest.pop("switch_boundary_every", _AITK_DEFAULTS["multistage.switch_every"])
    accumulation = rest.pop("gradient_accumulation", 1)
    if isinstance(accumulation, int) and not isinstance(accumulation, bool) and accumulation > 1:
        notes.append(
            f"{where}.gradient_accumulation is changed: ai-toolkit's switch_boundary_every counts micro-batches (with "
            "both experts one optimizer step can update both); here it counts optimizer steps, each of which "
            "updates one expert"
        )
    job["train"].update(
        steps=rest.pop("steps", _AITK_DEFAULTS["train.steps"]),
        batch_size=rest.pop("batch_size", 1),
        gradient_accumulation=accumulation,
        # ai-toolkit's switch (read as truthy, on by default) -> a policy: on lets the VRAM planner choose (full
        # checkpointing where memory is short); recomputing activations does not change what is learned.
        gradient_checkpointing="auto" if rest.pop("gradient_checkpointing", True) else "off",
        timestep_type=_TIMESTEP_TYPES[ttype],
        timestep_bias=_TIMESTEP_BIAS[bias],
        compute_dtype=dtype,
    )
    if _TIMESTEP_TYPES[ttype] == "shift":
        job["train"]["timestep_shift"] = _WAN22_SHIFT
    _map_advanced(rest, job, notes)
    _map_optimizer(rest, job, notes)
    flags: dict[str, Any] = {
        key: bool(rest.pop(key, False))
        for key in (
            "skip_first_sample", "force_first_sample", "disable_sampling",
            "cache_text_embeddings", "unload_text_encoder",
        )
    }  # fmt: skip
    flags["reg_weight"] = rest.pop("reg_weight", _REG_WEIGHT)
    _leftovers(rest, "train", where, train, notes)
    return flags


def _other_scheduler_timesteps(given: Any, scheduler: str, notes: list[str]) -> str:
    """The timestep type of a job whose noise_scheduler is not flowmatch: ai-toolkit then calls the Wan 2.2
    scheduler's plain ``set_timesteps(1000)`` (BaseSDTrainProcess, the branch after 'flowmatch'), whose grid is the
    shift-5 flow-matching schedule (wan22_5b_model.scheduler_config) whatever ``timestep_type`` says; 'weighted'
    still weights the loss there (SDTrainer), a mix this trainer cannot make."""
    where = f"{_PROCESS}.train"
    if given == "weighted":
        raise ConfigError(
            f"{where}.timestep_type is 'weighted' with noise_scheduler {scheduler!r}: ai-toolkit then draws Wan 2.2's "
            "timesteps from its shift-5 schedule but weights their loss by the 'weighted' table, a mix this trainer "
            "cannot make - add noise_scheduler: flowmatch to train 'weighted' as ai-toolkit does with it"
        )
    if given is not None and given not in ("shift", "flux_shift", "lumina2_shift"):
        notes.append(
            f"{where}.timestep_type is ignored: with noise_scheduler {scheduler!r} (ai-toolkit's default when it is "
            f"left out) ai-toolkit draws Wan 2.2's timesteps from its shift-5 schedule whatever timestep_type says, "
            f"and so does this job - add noise_scheduler: flowmatch to draw them as {given!r}"
        )
    return "shift"


def _map_advanced(rest: dict[str, Any], job: dict[str, Any], notes: list[str]) -> None:
    """DOP, differential guidance and EMA settings of the train section; pops the keys it reads from ``rest``."""
    where = f"{_PROCESS}.train"
    adv: dict[str, Any] = {}
    sources: dict[str, str] = {}
    dop_keys = ("diff_output_preservation", "diff_output_preservation_multiplier", "diff_output_preservation_class")
    dop, multiplier, dop_class = (rest.pop(k, None) for k in dop_keys)
    if dop:
        if not (job.get("trigger_word") or "").strip():
            raise ConfigError(
                f"{where}.diff_output_preservation is on but {_PROCESS}.trigger_word is not set: DOP replaces the "
                "trigger word in each caption with the class word - set trigger_word (per-dataset trigger words are "
                "not supported), or turn DOP off"
            )
        if not str(dop_class or "").strip():
            raise ConfigError(
                f"{where}.diff_output_preservation_class is empty: ai-toolkit would then delete the trigger word from "
                "the preservation prompt; this trainer replaces it with a class word - set one, e.g. person or scene"
            )
        mult = _float(_DOP_MULTIPLIER if multiplier is None else multiplier, f"{where}.{dop_keys[1]}")
        adv.update(dop=True, dop_class=str(dop_class), dop_multiplier=mult)
        sources.update(dop_class=f"{where}.{dop_keys[2]}", dop_multiplier=f"{where}.{dop_keys[1]}")
    guidance = rest.pop("do_differential_guidance", False)
    scale = rest.pop("differential_guidance_scale", None)
    if guidance:
        key = f"{where}.differential_guidance_scale"
        scale = _float(_DIFF_GUIDANCE_SCALE if scale is None else scale, key)
        adv.update(diff_guidance=True, diff_guidance_scale=scale)
        sources["diff_guidance_scale"] = key
        if not rest.get("do_guidance_loss"):
            notes.append(
                f"{where}.do_differential_guidance is changed: in ai-toolkit it has no effect unless do_guidance_loss "
                "is on too (it is nested under that switch, ai-toolkit's open bug, PR #974); here it applies"
            )
    ema = rest.pop("ema_config", None)
    if ema is not None and not isinstance(ema, dict):
        raise ConfigError(
            f"{where}.ema_config is {ema!r}, not a mapping: ai-toolkit reads its settings from it - write "
            "ema_config: {use_ema: true} (or remove it)"
        )
    if isinstance(ema, dict) and ema.get("use_ema"):
        e_rest = dict(ema)
        e_rest.pop("use_ema")
        key = f"{where}.ema_config.ema_decay"
        adv.update(ema=True, ema_decay=_float(e_rest.pop("ema_decay", _EMA_DECAY), key))
        sources["ema_decay"] = key
        notes.append(
            f"{where}.ema_config is changed: each expert's EMA is saved beside its live LoRA as "
            "<name>_<step>_ema_<high|low>_noise.safetensors (ai-toolkit saves only the EMA weights, under the usual "
            "names), and it is updated on that expert's own steps (ai-toolkit updates both experts' EMA every step)"
        )
        _leftovers(e_rest, "train.ema_config", f"{where}.ema_config", ema, notes)
    if adv:
        job["advanced"] = _validated(AdvancedConfig, adv, sources)


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
        lr=_float(rest.pop("lr", _AITK_DEFAULTS["optimizer.lr"]), f"{where}.lr"),
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
        notes.append(
            f"{where}.lr_scheduler is changed: ai-toolkit's constant_with_warmup warms up once over the run's first "
            f"{opt['warmup_steps']} steps; here each expert warms up over its own first {opt['warmup_steps']} steps "
            "(with both experts, about twice as many steps of the run are in warm-up)"
        )
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


def _flag_given(section: dict[str, Any], key: str) -> bool:
    return not _is_off(section.get(key))


def _map_dataset(
    ds: dict[str, Any], index: int, trigger: str | None, cache_te: bool, notes: list[str]
) -> dict[str, Any]:
    """One dataset entry; ``cache_te``: train.cache_text_embeddings (which ai-toolkit copies into every dataset)."""
    where = f"{_PROCESS}.datasets[{index}]"
    rest = dict(ds)
    folder = _dataset_folder(rest, where)
    caption_ext = rest.pop("caption_type", None) or rest.pop("caption_ext", "txt")  # ai-toolkit's legacy name wins
    rest.pop("caption_ext", None)
    resolution = rest.pop("resolution", 512)
    # is_reg: trained like the others but without the trigger word (shares: _map_regularization); prior_reg: the
    # base model's prediction is the target, this trainer's is_regularization.
    is_reg = bool(rest.pop("is_reg", False))
    prior_reg = bool(rest.pop("prior_reg", False))
    shrink = rest.pop("shrink_video_to_frames", True)
    flips = [key for key in ("flip_x", "flip_y") if rest.get(key)]
    out: dict[str, Any] = {
        "folder": str(folder),
        "caption_ext": str(caption_ext).lstrip("."),
        "caption_dropout": _float(
            rest.pop("caption_dropout_rate", _AITK_DEFAULTS["datasets.caption_dropout"]), f"{where}.caption_dropout_rate"
        ),
        "resolutions": list(resolution) if isinstance(resolution, (list, tuple)) else [resolution],
        "num_frames": rest.pop("num_frames", _AITK_DEFAULTS["datasets.num_frames"]),
        # dataloader_mixins.py: num_frames spread over the whole clip (its float rounding), or (shrink off) every
        # round(clip fps / fps)-th frame from a random start; a clip too short for either is stretched evenly.
        "frame_sampling": "aitoolkit_uniform" if shrink else "stride",
        "short_clip": "stretch",
        "flip_x": rest.pop("flip_x", False),
        "flip_y": rest.pop("flip_y", False),
        "is_regularization": prior_reg,
        # data_loader.py adds a flipped copy of every file per flip axis: the dataset's share grows with them.
        "repeats": _repeats(rest.pop("num_repeats", 1), f"{where}.num_repeats") * 2 ** len(flips),
        # ai-toolkit caches in memory or on disk; this trainer's cache_latents covers both.
        "cache_latents": bool(rest.pop("cache_latents", False)) | bool(rest.pop("cache_latents_to_disk", False)),
        # ai-toolkit puts the trigger word in front of captions lacking it, except on regularization data, joined
        # by a space (toolkit/prompt_utils.py inject_trigger_into_prompt: replace_with + " " + output_prompt); a
        # caption lacks it when it does not occur at all, even inside a word (output_prompt.count(replace_with)).
        "prepend_trigger": bool(trigger) and not is_reg,
    }
    if out["prepend_trigger"]:  # how it joins and when a caption counts as holding it (unused without prepending)
        out.update(trigger_separator=" ", trigger_match="substring")
    fps = rest.pop("fps", None if shrink else 24)  # 24 is ai-toolkit's default, used only with shrink off
    if fps is not None:
        out["fps"] = _float(fps, f"{where}.fps")
    if not shrink:
        out["window_start"] = "random"
    for key in flips:
        notes.append(
            f"{where}.{key} is changed: ai-toolkit adds a flipped copy of every file, so this dataset comes "
            f"{2 ** len(flips)}x as often; here its repeats are multiplied by {2 ** len(flips)} to match, and each "
            "sample is flipped with probability 1/2 (ai-toolkit flips exactly the copies)"
        )
    default_caption = rest.pop("default_caption", None)
    if default_caption is not None:
        if "[trigger]" in str(default_caption) and not trigger:
            raise ConfigError(
                f"{where}.default_caption uses [trigger] but {_PROCESS}.trigger_word is not set: ai-toolkit would "
                "delete the placeholder; this trainer refuses it (a LoRA trained without its trigger word does not "
                "answer to it) - set trigger_word, or remove [trigger]"
            )
        out["default_caption"] = str(default_caption)
    if out["num_frames"] == 1:
        videos = _video_count(str(folder))
        if videos:
            notes.append(
                f"{where}.num_frames is changed: with num_frames 1 ai-toolkit reads only the folder's images "
                f"({_AITK_IMAGE_EXTS}) and skips its {videos} video file(s); here each video trains as its first "
                "frame - move the videos out to train as ai-toolkit would, or raise num_frames (e.g. 33) to train "
                "on their motion"
            )
    if rest.get("trigger_word") in (None, trigger):
        rest.pop("trigger_word", None)
    if _flag_given(ds, "cache_text_embeddings") or cache_te:
        # ai-toolkit drops tokens only from captions encoded live (dataloader_mixins.py: "... and not
        # self.dataset_config.cache_text_embeddings"); train.cache_text_embeddings turns it on for every dataset.
        rest.pop("token_dropout_rate", None)
    rest.pop("cache_text_embeddings", None)  # read by _map_text_encoder
    _leftovers(rest, "datasets", where, ds, notes)
    return out


def _dataset_folder(rest: dict[str, Any], where: str) -> str:
    """The folder of the dataset entry ``rest`` (at ``where``), popped: ai-toolkit reads dataset_path where
    folder_path is not given (DatasetConfig, AiToolkitDataset.__init__)."""
    key = "folder_path" if rest.get("folder_path") is not None else "dataset_path"
    folder = rest.pop("folder_path", None) or rest.pop("dataset_path", None)
    rest.pop("dataset_path", None)
    if not folder:
        raise ConfigError(f"{where}.folder_path is missing: give the folder of clips/images and their captions")
    if not isinstance(folder, str):
        raise ConfigError(
            f"{where}.{key} is a {type(folder).__name__}: ai-toolkit takes one folder per dataset entry - "
            "write one path, and add a dataset entry (- folder_path: ...) for each other folder"
        )
    return folder


def _repeats(value: Any, where: str) -> Any:
    """num_repeats as a whole number (anything else is passed on for DatasetConfig to refuse by this key)."""
    return _int(value, where) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _video_count(folder: str) -> int:
    """Video files under ``folder`` that this trainer reads (hidden ones skipped, as both trainers skip them); 0
    when the folder cannot be listed (the dataset build names that problem)."""
    from .data.media import VIDEO_EXTS  # imported here: the data package needs torch

    count = 0
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        count += sum(1 for f in files if not f.startswith(".") and os.path.splitext(f)[1].lower() in VIDEO_EXTS)
    return count


def _map_regularization(raw: list[dict[str, Any]], reg_weight: Any, job: dict[str, Any], notes: list[str]) -> None:
    """ai-toolkit's ``is_reg`` datasets as shares of every epoch, and its ``prior_reg`` next to DOP.

    ai-toolkit (jobs/process/BaseSDTrainProcess.py) puts is_reg datasets into a loader of their own and draws every
    micro-batch of an even step from it (not on save or sample steps), the others' on odd steps; SDTrainer multiplies
    a reg batch's loss by ``train.reg_weight``. The expected gradient per step is then (w·g_reg + g_main)/2. This
    trainer has no per-sample loss weight, so the reg datasets get the share w/(1+w) of every epoch's samples
    instead: (w·g_reg + g_main)/(1+w), the same direction and mix (one half at w = 1); the overall factor
    2/(1+w) is what Adam's per-parameter normalisation removes.
    """
    where = f"{_PROCESS}.datasets"
    reg = [i for i, ds in enumerate(raw) if ds.get("is_reg")]
    dop = (job.get("advanced") or {}).get("dop")
    prior = [i for i, ds in enumerate(raw) if ds.get("prior_reg")]
    if dop and prior:
        raise ConfigError(
            f"{where}[{prior[0]}].prior_reg is on with {_PROCESS}.train.diff_output_preservation: both hold the LoRA "
            "to the base model's predictions (in ai-toolkit the preservation prompt's prediction then becomes the "
            "prior target too) - turn one of them off"
        )
    if prior and len(prior) == len(raw):
        raise ConfigError(
            f"{where}: every dataset has prior_reg: their samples train toward the base model's own prediction, so "
            "the LoRA would learn nothing - set prior_reg: false on the data to learn"
        )
    batch = job["train"].get("batch_size")
    mixed = [i for i in prior if i not in reg and any(j not in reg and j not in prior for j in range(len(raw)))]
    if mixed and isinstance(batch, int) and batch > 1:
        notes.append(
            f"{where}[{mixed[0]}].prior_reg is changed: ai-toolkit makes the base model's prediction the target of "
            "every sample of a batch that holds one prior_reg sample (its own note: 'works for now as regs are not "
            f"in the same batch'); here only the prior_reg samples get it (batch_size {batch})"
        )
    if not reg:
        return
    if len(reg) == len(raw):
        raise ConfigError(
            f"{where}: every dataset has is_reg: ai-toolkit draws the steps between its regularization steps from "
            "the datasets without is_reg, and there are none - set is_reg: false on the training data"
        )
    weight = _float(reg_weight, f"{_PROCESS}.train.reg_weight")
    if weight <= 0:
        raise ConfigError(
            f"{_PROCESS}.train.reg_weight is {reg_weight!r}: the regularization batches would train nothing (or "
            "against their data) while ai-toolkit spends every other step on them - give a weight > 0 (1.0 is "
            "ai-toolkit's default), or remove is_reg"
        )
    total = weight / (1.0 + weight)
    for i in reg:
        job["datasets"][i]["share"] = total / len(reg)
    if weight != _REG_WEIGHT:
        notes.append(
            f"{_PROCESS}.train.reg_weight is changed: there is no per-sample loss weight here, so the regularization "
            f"data gets {total:.3g} of every epoch's samples instead of ai-toolkit's every other step with its loss "
            f"x {weight:g} - the same expected gradient up to one overall factor, which Adam's normalisation removes"
        )
    if len(reg) > 1:
        for i in reg:
            notes.append(
                f"{where}[{i}].is_reg is changed: the {len(reg)} regularization datasets split their {total:.3g} of "
                f"every epoch equally here ({total / len(reg):.3g} each, datasets[].share); ai-toolkit pools them and "
                "draws from each in proportion to its files x num_repeats"
            )
    stages = job["multistage"]
    both = stages.get("train_high_noise", True) is not False and stages.get("train_low_noise", True) is not False
    if both and stages.get("switch_every") == 1 and job["train"].get("gradient_accumulation") == 1:
        notes.append(
            f"{where}[{reg[0]}].is_reg is changed: ai-toolkit draws regularization batches on even steps, which with "
            "switch_boundary_every 1 are all high-noise steps (its bug: the low-noise expert never trains on them); "
            "here both experts train on them"
        )


def _map_text_encoder(
    flags: dict[str, Any], raw: list[dict[str, Any]], job: dict[str, Any], notes: list[str]
) -> None:
    """text_encoder.mode from train.cache_text_embeddings / unload_text_encoder and the datasets' caching flags."""
    where = f"{_PROCESS}.train"
    cached = [bool(ds.get("cache_text_embeddings", False)) for ds in raw]
    if not flags["cache_text_embeddings"] and any(cached) and not all(cached):
        off = [f"{_PROCESS}.datasets[{i}].cache_text_embeddings" for i, c in enumerate(cached) if not c]
        raise ConfigError(
            f"{', '.join(off)} off while other datasets cache their text embeddings: ai-toolkit refuses this mix - "
            f"turn it on for every dataset, or set {where}.cache_text_embeddings"
        )
    trigger = job.get("trigger_word")
    # ai-toolkit's unload mode trains on one fixed embedding; with caching on it uses the cached captions instead.
    if flags["unload_text_encoder"] and not (flags["cache_text_embeddings"] or any(cached)):
        if not (trigger or "").strip():
            raise ConfigError(
                f"{where}.unload_text_encoder is on but {_PROCESS}.trigger_word is not set: ai-toolkit would train "
                "every sample on the empty prompt; this trainer trains on the trigger word alone in that mode - set "
                f"trigger_word, or turn unload_text_encoder off to train on the captions"
            )
        job["text_encoder"] = {"mode": "unload"}
        for i, ds in enumerate(job["datasets"]):
            ds["caption_dropout"] = 0.0  # the fixed embedding is used whatever the caption (dropped or not)
            if raw[i].get("is_reg"):
                notes.append(
                    f"{_PROCESS}.datasets[{i}].is_reg is changed: with unload_text_encoder, ai-toolkit trains "
                    f"regularization samples on the empty prompt; here they train on the trigger word {trigger!r} "
                    "like the others"
                )
        return
    job["text_encoder"] = {"mode": "cache"}
    for i, ds in enumerate(job["datasets"]):
        if ds["prepend_trigger"] and ds["caption_dropout"] > 0:
            notes.append(
                f"{_PROCESS}.datasets[{i}].caption_dropout_rate is changed: a dropped caption trains on the empty "
                f"prompt here; ai-toolkit puts the trigger word back in, so it trains on {trigger!r} alone"
            )


def _map_sample(
    sample: dict[str, Any], first: Any, flags: dict[str, bool], job: dict[str, Any], notes: list[str]
) -> None:
    """The sample section (previews during training), resolved per prompt as ai-toolkit's sampler resolves it."""
    where = f"{_PROCESS}.sample"
    rest = dict(sample)
    prompts = _sample_items(rest, where)
    if flags["disable_sampling"] or not prompts:
        job.pop("sample")  # ai-toolkit renders nothing: every sampling setting is moot, but a misspelt key is not
        _leftovers(rest, "sample", where, sample, notes, moot=True)
        return
    if isinstance(first, dict) and _sample_items(dict(first), f"{_PROCESS}.first_sample"):
        notes.append(f"{_PROCESS}.first_sample is ignored: {_REASONS['process.first_sample']}")
    rest.pop("sampler", None)  # Wan 2.2's pipeline always uses its flow-matching Euler scheduler
    section = {key: rest.pop(key, default) for key, default in _SAMPLE_DEFAULTS.items()}
    if section["neg"] is None or section["neg"] is False:
        section["neg"] = ""
    trigger = job.get("trigger_word")
    section["seed"] = _int(section["seed"], f"{where}.seed")
    rows = []
    # ai-toolkit walks the seed from the section's; a sample's own seed replaces it, and without walking it stays
    # in force for the prompts after it too. Inline --seed flags override a single preview.
    carried = (section["seed"], f"{where}.seed")
    for i, (text, item, key) in enumerate(prompts):
        if section["walk_seed"]:
            carried = (section["seed"] + i, f"{where}.seed")
        if item.get("seed") is not None:
            carried = (_int(item["seed"], f"{where}.samples[{i}].seed"), f"{where}.samples[{i}].seed")
        rows.append(_sample_prompt(text, item, key, i, carried, section, trigger, where, notes))

    out: dict[str, Any] = {"prompts": [row["prompt"][0] for row in rows]}
    sources: dict[str, str] = {"prompts": f"{where}.samples" if "samples" in sample else f"{where}.prompts"}
    for key, fields in _PER_PROMPT.items():
        value, source = _shared_value(key, [row[key] for row in rows], section, where, notes)
        for field in fields:
            out[field], sources[field] = value, source
    out.update(_shared_seed([row["seed"] for row in rows], section, where, notes))
    sources["seed"] = f"{where}.seed"

    steps = job["train"]["steps"]
    every = _int(section["sample_every"], f"{where}.sample_every")
    if every and _int(section["sample_start_step"], f"{where}.sample_start_step") > 0:
        notes.append(
            f"{where}.sample_start_step is ignored: previews render every sample_every steps from the first one on"
        )
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        if every == 0:
            every = steps  # ai-toolkit still renders once after the last step
        elif every > 0 and steps % every:
            last = steps // every * every
            notes.append(
                f"{where}.sample_every is changed: ai-toolkit also renders after the last step ({steps}); here "
                f"previews render every {every} steps only, "
                + (f"the last ones at step {last}" if last else f"which never comes within {steps} steps")
            )
    out.update(
        sampler="euler",
        shift=_WAN22_SHIFT,
        sample_every=every,
        sample_at_start=not flags["skip_first_sample"],
    )
    sources["sample_every"] = f"{where}.sample_every"
    if flags["force_first_sample"] and not flags["skip_first_sample"]:
        notes.append(f"{_PROCESS}.train.force_first_sample is ignored: {_REASONS['train.force_first_sample']}")
    job["sample"] = _validated(SampleConfig, {**job["sample"], **out}, sources)
    _leftovers(rest, "sample", where, sample, notes)


#: ai-toolkit's LoRA files of a Wan 2.2 job in ``<training_folder>/<process name>``: ``<name>_<step, 9 digits>`` at a
#: save step or ``<name>`` at the end, ``<name>`` being config.name (BaseSDTrainProcess.save names them after the
#: job, BaseTrainProcess the folder after the process), split per expert by Wan22Model.save_lora. This trainer's
#: own pairs (6-digit steps) never match: its runs continue from their training states (:func:`continue_from_latest`).
_AITK_LORA = r"^{name}(?:_(?P<step>\d{{9}}))?_(?P<expert>high|low)_noise\.safetensors$"


def _map_resume(job: dict[str, Any], job_name: str, notes: list[str]) -> None:
    """Continue from ai-toolkit's newest LoRA pair in the job's output folder, as ai-toolkit itself would.

    ai-toolkit (BaseSDTrainProcess.get_latest_save_path / load_training_state_from_metadata) loads the newest
    ``<config.name>*.safetensors`` (``job_name``) of ``<training_folder>/<process name, else config.name>``
    (Wan22Model.load_lora loads both experts' files), takes the step from its metadata (``training_info.step``) and
    trains on from there to ``train.steps``, with ``optimizer.pt`` when present. Here the pair becomes ``lora.init_high`` / ``lora.init_low`` (weights only) and
    ``train.steps`` the steps left; the newest pair is the one of the highest step (ai-toolkit's newest file by time
    is the same pair unless files were copied around).
    """
    folder = Path(str(job["save"].get("output_dir", "output"))) / str(job["name"])
    pattern = re.compile(_AITK_LORA.format(name=re.escape(job_name)))
    pairs: dict[str | None, dict[str, Path]] = {}
    try:
        entries = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        entries = []  # an unreadable folder is named when the run tries to write there
    for path in entries:
        m = pattern.match(path.name)
        if m and path.is_file():
            pairs.setdefault(m.group("step"), {})[m.group("expert")] = path
    stages = job["multistage"]
    trained = [e for e in EXPERTS if stages.get(f"train_{e}_noise", True) is not False]
    found = {key: {e: p for e, p in pair.items() if e in trained} for key, pair in pairs.items()}
    found = {key: pair for key, pair in found.items() if pair}
    if not found:
        return
    steps = {key: _saved_step(pair) for key, pair in found.items()}
    newest = max(found, key=lambda k: (steps[k] if steps[k] is not None else int(k or 0),
                                       max(p.stat().st_mtime for p in found[k].values())))
    pair, saved = found[newest], steps[newest] or 0  # no training_info: ai-toolkit starts again at step 0
    files = ", ".join(str(pair[e]) for e in trained if e in pair)
    total = job["train"].get("steps")
    counted = isinstance(total, int) and not isinstance(total, bool)  # anything else is refused by TrainConfig
    where = f"{_PROCESS}.training_folder"
    if counted and total - saved < 1:
        raise ConfigError(
            f"{where}: {folder} already holds this job's LoRA pair of step {saved} ({files}) and train.steps is "
            f"{total}: ai-toolkit would resume there and train no further - raise {_PROCESS}.train.steps above "
            f"{saved} to train on, or use those files as they are"
        )
    for expert, path in pair.items():
        job["lora"][f"init_{expert}"] = str(path)
    left = f"the {total - saved} steps left of train.steps {total}" if counted else "train.steps"
    if counted:
        job["train"]["steps"] = total - saved
    schedule = job["optimizer"].get("lr_scheduler") != "constant" or job["optimizer"].get("warmup_steps")
    fresh = [e for e in trained if e not in pair]
    notes.append(
        f"{where} is changed: resuming from {files} (LoRA weights only; optimizer state and step count start "
        f"fresh): ai-toolkit continues that run at step {saved} (from the files' metadata) with its optimizer.pt "
        f"if there is one; here a new run trains {left} from these weights with a fresh optimizer"
        + (f", its learning-rate schedule starting over (ai-toolkit's continues at step {saved})" if schedule else "")
        + (f"; the {' and '.join(fresh)}-noise LoRA starts fresh (no file of it), as in ai-toolkit" if fresh else "")
        + " - give the job another name to train from scratch"
    )


_FRESH = "give the job another name (config.name) to train from scratch"


def continue_from_latest(cfg: JobConfig, data: dict[str, Any], source: str) -> str | None:
    """The line saying that this ai-toolkit job, run again, continues from its newest training state; None when it
    starts fresh.

    ai-toolkit continues a job whenever it is run again, from the newest save (by time) in ``<training_folder>/
    <name>`` (BaseSDTrainProcess.get_latest_save_path, load_training_state_from_metadata). Here that save is the
    newest readable training state of the job's runs, as ``resume: latest`` finds it, unless the ai-toolkit pair
    that :func:`_map_resume` starts from is newer. A state the job as now written cannot continue is refused by the
    keys of ``data`` (the job file, ``source``), before any work.
    """
    from .train.resume import resume_changes  # imported here: they need torch
    from .train.runs import resolve_resume, state_config

    try:
        step, state = resolve_resume(cfg.model_copy(update={"resume": "latest"}))
    except ConfigError:  # no readable state of this job: nothing to continue, as in ai-toolkit
        return None
    pair = [Path(p) for p in (cfg.lora.init_high, cfg.lora.init_low) if p]
    if pair and max(p.stat().st_mtime for p in pair) > state.stat().st_mtime:
        return None  # ai-toolkit's own pair is the newer save
    how = (f"this job continues from {state} (step {step}), as ai-toolkit continues a job from the newest save in its "
           "training folder")
    refused, _ = resume_changes(state_config(state), cfg)
    if refused:
        proc = data["config"]["process"][0]
        named = []
        for line in refused:  # '<setting> was <old> in the state, now <new> (why)'
            setting, rest = line.split(" ", 1)
            named.append(f"{_source_key(tuple(setting.split('.')), proc) or setting} {rest}")
        raise ConfigError(f"{source}: {_PROCESS}.training_folder: {how}, but that state cannot go on with these "
                          f"settings: {'; '.join(named)} - set them back to continue it, or {_FRESH}")
    if step > cfg.train.steps:
        raise ConfigError(f"{source}: {_PROCESS}.train.steps: {how}, and that state is past the steps this job "
                          f"trains - raise train.steps to train on, or {_FRESH}")
    return (f"resume: continuing from {state} (step {step}), the newest training state of job '{cfg.name}', as "
            f"ai-toolkit continues a job from the newest save in its training folder - {_FRESH}")


def _saved_step(pair: dict[str, Path]) -> int | None:
    """The step ai-toolkit recorded in a pair's metadata (``training_info``: {"step": ...}), if any."""
    for path in pair.values():
        try:
            with safe_open(str(path), framework="pt") as fh:
                info = json.loads((fh.metadata() or {}).get("training_info", "null"))
        except (SafetensorError, OSError, ValueError):
            continue
        if isinstance(info, dict) and isinstance(info.get("step"), int) and info["step"] >= 0:
            return info["step"]
    return None


def _sample_items(rest: dict[str, Any], where: str) -> list[tuple[str, dict[str, Any], str]]:
    """(prompt, its own settings, key of the prompt) from ``samples`` (which wins, as in ai-toolkit) or the legacy
    ``prompts``; pops both keys."""
    samples, legacy = rest.pop("samples", None), rest.pop("prompts", None)
    if samples is not None:
        if not isinstance(samples, list):
            raise ConfigError(
                f"{where}.samples must be a list of {{prompt: ...}} entries, got {type(samples).__name__}"
            )
        items = [_take_item(samples, i, f"{where}.samples") for i in range(len(samples))]
        for i, item in enumerate(items):
            if not isinstance(item.get("prompt"), str):
                raise ConfigError(
                    f"{where}.samples[{i}].prompt must be the text of the prompt, got {item.get('prompt')!r}"
                )
        return [
            (item["prompt"], {k: v for k, v in item.items() if k != "prompt"}, f"{where}.samples[{i}].prompt")
            for i, item in enumerate(items)
        ]
    legacy = legacy or []
    if not isinstance(legacy, list) or not all(isinstance(p, str) for p in legacy):
        raise ConfigError(f"{where}.prompts must be a list of prompt texts, got {legacy!r}")
    return [(p, {}, f"{where}.prompts[{i}]") for i, p in enumerate(legacy)]


def _sample_prompt(
    prompt: str,
    item: dict[str, Any],
    prompt_key: str,
    index: int,
    seed: tuple[int, str],
    section: dict[str, Any],
    trigger: str | None,
    where: str,
    notes: list[str],
) -> dict[str, tuple[Any, str]]:
    """One prompt's text and settings as ai-toolkit renders them, each with the key it came from; ``seed`` is the
    seed ai-toolkit's sampler hands this prompt before its inline flags."""
    row: dict[str, tuple[Any, str]] = {}
    rest = dict(item)
    for key in _PER_PROMPT:
        if key in rest:
            row[key] = (rest.pop(key), f"{where}.samples[{index}].{key}")
        else:
            row[key] = (section[key], f"{where}.{key}")
    rest.pop("seed", None)  # resolved by the caller into ``seed``
    row["seed"] = seed
    if trigger is not None:
        prompt = prompt.replace("[trigger]", trigger)  # ai-toolkit's sampler fills [trigger] in, adds nothing
    text, flags = _parse_prompt_flags(prompt, prompt_key)
    for key, value in flags.items():
        row[key] = value
    if not text.strip():
        raise ConfigError(
            f"{prompt_key} is blank{' once its --flags are removed' if flags else ''}: previews need a prompt - "
            "write one or remove the entry"
        )
    row["prompt"] = (text, prompt_key)
    for key, (value, source) in row.items():
        row[key] = (_sample_value(key, value, source), source)
    _leftovers(rest, "sample.samples", f"{where}.samples[{index}]", item, notes)
    return row


#: A usual value of each numeric prompt flag's setting, for the error that shows how to write the flag.
_FLAG_EXAMPLES = {"width": 832, "height": 480, "seed": 42, "guidance_scale": 4, "sample_steps": 30,
                  "network_multiplier": 1.0, "num_frames": 33, "fps": 16}  # fmt: skip


def _parse_prompt_flags(prompt: str, key: str) -> tuple[str, dict[str, tuple[Any, str]]]:
    """ai-toolkit's inline prompt flags (GenerateImageConfig._process_prompt_string): the text before the first
    '--', and the settings of the flags with an effect on Wan 2.2 T2V."""
    parts = prompt.strip().split("--")
    found: dict[str, tuple[Any, str]] = {}
    for part in parts[1:]:
        flag = part.split(" ")[0].strip()
        if flag not in _PROMPT_FLAGS:
            continue
        setting, kind = _PROMPT_FLAGS[flag]
        content = part[len(flag) :].strip()
        try:
            value = content if kind is str else kind(content)
        except ValueError:
            raise ConfigError(f"{key}: --{flag} needs a number, got {content!r} - write e.g. --{flag} "
                              f"{_FLAG_EXAMPLES[setting]}") from None
        found[setting] = (value, f"{key} --{flag}")
    return parts[0].strip(), found


def _sample_value(key: str, value: Any, source: str) -> Any:
    """A preview setting as ai-toolkit's Wan 2.2 pipeline applies it (sizes and frame counts rounded as it rounds)."""
    if key in ("width", "height"):
        v = _int(value, source)
        v = max(64, v - v % 8)  # GenerateImageConfig
        return v // 16 * 16  # Wan22Pipeline: multiples of 2 x the VAE's spatial factor
    if key == "num_frames":
        n = _int(value, source)
        return max(n if n % 4 == 1 else n // 4 * 4 + 1, 1)  # Wan22Pipeline
    if key in ("sample_steps", "seed"):
        return _int(value, source)
    if key == "guidance_scale":
        return max(_float(value, source), 1.0)  # the pipeline guides only above 1, as this trainer does
    if key == "network_multiplier":
        return _float(value, source)
    if key == "neg":
        if not isinstance(value, str):
            raise ConfigError(f"{source} must be the text of the negative prompt, got {value!r}")
        return value
    return value


def _shared_value(
    key: str, per_prompt: list[tuple[Any, str]], section: dict[str, Any], where: str, notes: list[str]
) -> tuple[Any, str]:
    """The one value of ``key`` for all previews: the prompts' own when they all agree, else the section's (and a
    warning for each prompt that asked for another)."""
    values = [v for v, _ in per_prompt]
    if all(v == values[0] for v in values):
        source = next((s for _, s in per_prompt if s != f"{where}.{key}"), f"{where}.{key}")
        return values[0], source
    own = (_sample_value(key, section[key], f"{where}.{key}"), f"{where}.{key}")
    what = {
        "neg": "negative prompt", "sample_steps": "step count", "guidance_scale": "guidance scale",
        "network_multiplier": "LoRA strength", "num_frames": "frame count",
    }.get(key, key)  # fmt: skip
    for value, source in per_prompt:
        if value != own[0]:
            notes.append(f"{source} is ignored: {_PER_PROMPT_REASON.format(what=what, value=own[0])}")
    return own


def _shared_seed(per_prompt: list[tuple[int, str]], section: dict[str, Any], where: str, notes: list[str]) -> dict:
    """seed and walk_seeds reproducing the prompts' seeds (seed + index, or one seed for all) where possible."""
    for seed, source in per_prompt:
        if seed < 0:
            raise ConfigError(
                f"{source} gives seed {seed}: ai-toolkit draws a random seed for such a preview; previews here "
                "render from fixed seeds - set a seed >= 0"
            )
    seeds = [s for s, _ in per_prompt]
    walk = bool(section["walk_seed"])
    if len(seeds) > 1 and len(set(seeds)) == 1:
        return {"seed": seeds[0], "walk_seeds": False}
    if all(s == seeds[0] + i for i, s in enumerate(seeds)):
        return {"seed": seeds[0], "walk_seeds": walk if len(seeds) == 1 else True}
    base = section["seed"]
    rule = f"{base} + prompt index" if walk else f"{base}"
    for i, (seed, source) in enumerate(per_prompt):
        if seed != (base + i if walk else base):
            note = f"{source} is ignored: previews here use seed {rule} for every prompt"
            if note not in notes:
                notes.append(note)
    return {"seed": base, "walk_seeds": walk}


def _leftovers(
    rest: dict[str, Any], kind: str, where: str, section: dict[str, Any], notes: list[str], moot: bool = False
) -> None:
    """Warn about each key of ``rest`` (``section`` minus what was mapped) that asks for something not applied;
    refuse a misspelling of a key that this trainer applies (see :func:`_unknown_key`). ``moot``: the section has no
    effect as written (sampling off), so only unknown keys are named."""
    for key, value in rest.items():
        path = f"{where}.{key}" if where else key
        unknown = _unknown_key(str(key), kind, path, section)
        if unknown is not None:
            if not _is_off(value):
                notes.append(f"{path} is ignored: {unknown}")
            continue
        if moot:
            continue
        name = f"{kind}.{key}"
        if name in _NO_EFFECT:
            continue
        switch = _ONLY_WITH.get(name)
        if switch is not None and not _switch_on(section, switch):
            continue
        if (value == _DEFAULTS[name]) if name in _DEFAULTS else _is_off(value):
            continue
        notes.append(f"{path} is ignored: {_REASONS.get(name) or _REASONS.get(kind, _GENERIC)}")


def _unknown_key(key: str, kind: str, path: str, section: dict[str, Any]) -> str | None:
    """None for a key ai-toolkit has (or a section whose keys are not known here); else why it is ignored, with the
    closest ai-toolkit key. Raises :class:`ConfigError` when the key stands for one this trainer applies that the
    section does not give: ai-toolkit would silently ignore the typo too and train with that key's default."""
    known = _AITOOLKIT_KEYS.get(kind)
    if known is None or key in known:
        return None
    near = closest_key(key, known, _ALIASES.get(kind))
    if near is None:
        return "ai-toolkit has no such setting either (it ignores it too) - check its spelling or remove it"
    if near in _APPLIED_KEYS.get(kind, ()) and near not in section:
        raise ConfigError(
            f"{path} is not an ai-toolkit setting - did you mean '{near}'? ai-toolkit ignores unknown keys, so as "
            f"written the job would silently train with the default value of '{near}' - rename the key to '{near}'"
        )
    if near in section:
        return f"ai-toolkit has no such setting (did you mean '{near}'? it is given too, and that one is applied)"
    return f"ai-toolkit has no such setting (did you mean '{near}'? which is not applied here either)"


def _switch_on(section: dict[str, Any], switch: str) -> bool:
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
        raise ConfigError(
            f"{where}.{key} must be a mapping of settings, got {type(value).__name__} - write its settings as "
            "'key: value' lines indented under it"
        )
    return value


def _take_item(items: list[Any], index: int, where: str) -> dict[str, Any]:
    value = items[index]
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where}[{index}] must be a mapping of settings, got {type(value).__name__} - write the entry's settings "
            "as 'key: value' lines after its '- '"
        )
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
        raise ConfigError(f"{where} must be a number, got {value!r} - write a number there (e.g. 1e-4)")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got {value!r} - write a number there (e.g. 1e-4)") from None
    if not math.isfinite(number):
        raise ConfigError(
            f"{where} must be a finite number, got {value!r} - .inf, .nan and numbers too large for a float are not "
            "settings; give an ordinary number"
        )
    return number


def _int(value: Any, where: str) -> int:
    """A whole number (a float with no fraction too, as YAML may write it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"{where} must be a whole number, got {value!r} - write digits only there (e.g. 250)")
    return int(value)


def _validated(model: type[BaseModel], values: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """``values`` checked against this trainer's ``model``; a refused value raises :class:`ConfigError` naming the
    ai-toolkit key it came from (``sources``: field -> key)."""
    try:
        model.model_validate(values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{sources.get(field, field)} gives {err.get('input')!r}, which this trainer refuses: {msg}")
        raise ConfigError("\n".join(lines)) from None
    return values


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
