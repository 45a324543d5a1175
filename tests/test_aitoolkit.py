"""ai-toolkit Wan 2.2 job files: detection, value-by-value mapping, warnings for ignored keys, refused values.

Expected values come from ai-toolkit's source (ostris/ai-toolkit, commit 27a03a91): the example
config/examples/train_lora_wan22_14b_24gb.yaml, the UI's default job, and the defaults/semantics in
toolkit/config_modules.py (SampleConfig, SampleItem, GenerateImageConfig._process_prompt_string, ModelConfig,
TrainConfig, EMAConfig), toolkit/optimizer.py, toolkit/scheduler.py, toolkit/models/wan21/wan21.py,
extensions_built_in/diffusion_models/wan22 (wan22_14b_model.py, wan22_pipeline.py), toolkit/dataloader_mixins.py,
extensions_built_in/sd_trainer/SDTrainer.py and jobs/process/BaseSDTrainProcess.py.
"""

import copy
import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from trainer_core.aitoolkit import (
    from_aitoolkit,
    is_aitoolkit_config,
    job_from_aitoolkit,
)
from trainer_core.cli import demo_config, load_job
from trainer_core.cli import main as cli_main
from trainer_core.config import QuantConfig, job_from_dict, load_yaml
from trainer_core.data import build_dataset, make_synthetic_dataset
from trainer_core.data.media import write_video
from trainer_core.errors import ConfigError
from trainer_core.models.tiny import TINY_TRANSFORMER_CONFIG
from trainer_core.quant import check_ara_source
from trainer_core.train import loop

DATA = Path(__file__).parent / "data" / "aitoolkit"
EXAMPLE = DATA / "train_lora_wan22_14b_24gb.yaml"
UI_JOB = DATA / "ui_wan22_14b_job.yaml"
P = "config.process[0]"


def _minimal(**process_over):
    """The smallest job ai-toolkit itself accepts for Wan 2.2 T2V 14B LoRA training."""
    process = {
        "type": "sd_trainer",
        "training_folder": "out",
        "network": {"type": "lora"},
        "datasets": [{"folder_path": "clips"}],
        "model": {"name_or_path": "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "arch": "wan22_14b"},
    }
    for dotted, value in process_over.items():
        node = process
        *path, leaf = dotted.split("__")
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[leaf] = value
    return {"job": "extension", "config": {"name": "run1", "process": [process]}}


def _named(notes, kind):
    """The key paths that the warnings of one kind name (text before ' is ignored: ' / ' is changed: ')."""
    assert all(" is ignored: " in n or " is changed: " in n for n in notes), notes
    return sorted(n.split(f" is {kind}: ")[0] for n in notes if f" is {kind}: " in n)


def _ignored(notes):
    return _named(notes, "ignored")


def _changed(notes):
    return _named(notes, "changed")


def _map(data):
    mapped, notes = from_aitoolkit(data)
    return job_from_dict(mapped, source="test"), notes


def test_detection():
    assert is_aitoolkit_config(load_yaml(EXAMPLE))
    assert is_aitoolkit_config(load_yaml(UI_JOB))
    assert not is_aitoolkit_config(demo_config("out"))  # this trainer's own schema
    assert not is_aitoolkit_config({"model": {"source": "tiny"}, "datasets": [{"folder": "x"}]})
    assert not is_aitoolkit_config({"job": "extension"})  # ai-toolkit requires a config section too
    assert not is_aitoolkit_config(["job", "config"])
    assert not is_aitoolkit_config(None)


def test_official_example_maps_value_by_value():
    cfg, notes = _map(load_yaml(EXAMPLE))
    assert cfg.name == "my_first_wan22_14b_lora_v1"
    assert cfg.trigger_word is None
    assert cfg.save.output_dir == "output"
    assert cfg.run_dir == Path("output") / "my_first_wan22_14b_lora_v1"  # ai-toolkit's save_root
    assert cfg.train.device == "cuda:0"
    assert cfg.model.source == "ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16"
    assert cfg.model.dtype == "bf16"  # ai-toolkit loads the base weights in train.dtype
    assert cfg.lora.rank == 32 and cfg.lora.effective_alpha == 32.0  # scale 1, as ai-toolkit trains Wan LoRAs
    assert cfg.save.dtype == "fp16" and cfg.save.save_every == 250 and cfg.save.keep_last == 4
    assert cfg.train.batch_size == 1 and cfg.train.steps == 2000 and cfg.train.gradient_accumulation == 1
    assert cfg.train.gradient_checkpointing == "auto"  # on: the VRAM planner picks how many blocks recompute
    assert cfg.train.compile == "auto"
    assert cfg.train.timestep_type == "linear" and cfg.train.timestep_bias == "balanced"
    assert cfg.train.compute_dtype == "bf16"
    assert cfg.optimizer.name == "adamw8bit"
    assert cfg.optimizer.lr == 1e-4  # '1e-4' is a string to PyYAML, a float to ai-toolkit's loader
    assert cfg.optimizer.weight_decay == 1e-4
    assert cfg.optimizer.eps == 1e-6  # ai-toolkit builds AdamW8bit with eps=1e-6
    assert cfg.optimizer.betas == (0.9, 0.999)
    assert cfg.optimizer.lr_scheduler == "constant" and cfg.optimizer.warmup_steps == 0
    assert cfg.optimizer.max_grad_norm == 1.0
    assert cfg.multistage.stages == ["high", "low"]
    assert cfg.multistage.switch_every == 10
    assert cfg.multistage.boundary == 0.875
    [ds] = cfg.datasets
    assert ds.folder == "/path/to/images/or/video/folder"
    assert ds.caption_ext == "txt" and ds.caption_dropout == 0.05
    assert ds.num_frames == 1 and ds.resolutions == [512, 768, 1024]
    # shrink_video_to_frames defaults to on: spread over the clip, short clips stretched (dataloader_mixins.py)
    assert (ds.frame_sampling, ds.short_clip) == ("aitoolkit_uniform", "stretch")
    assert (ds.flip_x, ds.flip_y, ds.is_regularization, ds.repeats) == (False, False, False, 1)
    assert ds.cache_latents is False and ds.prepend_trigger is False
    # quantize: uint4 with an adapter named on the Hub -> 4-bit + ARA for the uint4 quantizer, computed locally.
    assert (cfg.quant.transformer, cfg.quant.quantizer, cfg.quant.ara_source) == ("4bit_ara", "uint4", "compute")
    assert cfg.quant.text_encoder == "float8"
    assert cfg.memory.low_vram is True and cfg.memory.offload_blocks == 0
    assert cfg.text_encoder.mode == "cache"  # train.cache_text_embeddings: true
    assert cfg.advanced.dop is False and cfg.advanced.diff_guidance is False and cfg.advanced.ema is False
    s = cfg.sample
    assert len(s.prompts) == 10 and s.prompts[0].startswith("woman with red hair, playing chess")
    assert s.negative_prompt == ""  # neg: '' is the encoded empty text, not Wan's default negative prompt
    assert (s.width, s.height, s.num_frames, s.fps, s.steps) == (1024, 1024, 1, 16, 25)
    assert (s.sampler, s.shift) == ("euler", 5.0)  # ai-toolkit's Wan 2.2 14B flow-match Euler scheduler, shift 5
    assert s.guidance_high == s.guidance_low == 3.5  # the pipeline's guidance_scale_2 defaults to guidance_scale
    assert (s.seed, s.walk_seeds) == (42, True)
    assert s.lora_strength_high == s.lora_strength_low == 1.0
    assert s.sample_every == 250 and s.sample_at_start is True  # ai-toolkit renders a baseline before training
    assert s.vae_tiling is True  # ai-toolkit tiles the VAE decode in low-VRAM mode
    assert _ignored(notes) == ["meta"]
    assert _changed(notes) == sorted([f"{P}.model.qtype", f"{P}.model.qtype_te"])
    qtype_note = next(n for n in notes if n.startswith(f"{P}.model.qtype "))
    assert "ostris/accuracy_recovery_adapters/wan22_14b_t2i_torchao_uint4.safetensors" in qtype_note
    assert "Hugging Face Hub" in qtype_note and "computed locally" in qtype_note
    te_note = next(n for n in notes if n.startswith(f"{P}.model.qtype_te "))
    assert "float8" in te_note and "'uint4'" in te_note


def test_ui_job_maps_and_stays_quiet_about_settings_that_ask_for_nothing():
    cfg, notes = _map(load_yaml(UI_JOB))
    assert cfg.name == "my_first_lora_v1" and cfg.trigger_word == "sqz"
    assert cfg.save.output_dir == "/data/ai-toolkit/output" and cfg.save.dtype == "bf16"
    assert cfg.train.device == "cuda" and cfg.train.steps == 3000
    assert cfg.multistage.switch_every == 1
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    [ds] = cfg.datasets
    assert ds.num_frames == 33 and ds.fps == 16.0 and ds.resolutions == [512]
    assert ds.default_caption == "" and ds.prepend_trigger is True and ds.caption_dropout == 0.05
    assert (cfg.quant.transformer, cfg.quant.quantizer, cfg.quant.ara_source) == ("4bit_ara", "uint4", "compute")
    assert cfg.quant.text_encoder == "float8" and cfg.memory.low_vram is True
    # cache_text_embeddings / unload_text_encoder off: ai-toolkit encodes live; the cache gives the same embeddings.
    assert cfg.text_encoder.mode == "cache"
    assert cfg.advanced.dop is False and cfg.advanced.ema is False  # both switched off in the file
    s = cfg.sample
    assert s.prompts == ["sqz woman with red hair, playing chess at the park"]  # from samples[0].prompt
    assert (s.width, s.height, s.num_frames, s.fps, s.steps) == (1024, 1024, 41, 16, 25)
    assert s.guidance_high == s.guidance_low == 4.0 and s.negative_prompt == ""
    assert (s.seed, s.walk_seeds, s.sample_every, s.sample_at_start) == (42, True, 250, True)
    # conv/LoKr/save_format/bypass_guidance_embedding/qtype_te have no effect on a Wan LoRA in ai-toolkit; the DOP
    # class and multiplier, ema_decay and mask_min_value only matter while their (off) switch is on; log_every is
    # logging cadence; the rest are off/empty.
    assert _ignored(notes) == sorted(
        [
            f"{P}.logging.use_ui_logger",
            f"{P}.sqlite_db_path",
            f"{P}.performance_log_every",
            "meta",
        ]
    )
    assert _changed(notes) == sorted(
        [f"{P}.model.qtype", f"{P}.model.qtype_te", f"{P}.datasets[0].caption_dropout_rate"]
    )
    dropout_note = next(n for n in notes if "caption_dropout_rate" in n)
    assert "'sqz'" in dropout_note and "empty prompt" in dropout_note


def test_absent_settings_take_ai_toolkit_defaults():
    cfg, notes = _map(_minimal())
    assert notes == []
    # NetworkConfig: linear 4, alpha 1.0, but transformer LoRAs train in peft format with alpha = rank (scale 1)
    assert cfg.lora.rank == 4 and cfg.lora.effective_alpha == 4.0
    assert cfg.multistage.switch_every == 1 and cfg.multistage.stages == ["high", "low"]
    # TrainConfig.noise_scheduler defaults to 'ddpm': on Wan 2.2 that is the model's shift-5 grid (set_timesteps)
    assert cfg.train.timestep_type == "shift" and cfg.train.timestep_shift == 5.0
    assert cfg.train.timestep_bias == "balanced"
    assert cfg.train.steps == 1000 and cfg.train.batch_size == 1 and cfg.train.gradient_checkpointing == "auto"
    assert cfg.train.compute_dtype == "fp32" and cfg.model.dtype == "fp32"
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 1e-6
    assert cfg.optimizer.weight_decay == 0.01  # torch.optim.AdamW's default; ai-toolkit passes none
    assert cfg.save.dtype == "fp16" and cfg.save.save_every == 1000 and cfg.save.keep_last == 5
    [ds] = cfg.datasets
    assert ds.caption_ext == "txt" and ds.caption_dropout == 0.0
    assert ds.num_frames == 1 and ds.resolutions == [512]
    # No sample section: ai-toolkit has no prompts to render. No quantization, offloading or regularizers.
    assert cfg.sample.prompts == [] and cfg.sample.sample_every == 0 and cfg.sample.sample_at_start is False
    assert cfg.quant.transformer == "none" and cfg.quant.text_encoder == "bf16"
    assert cfg.memory.low_vram is False and cfg.memory.offload_blocks == 0
    assert cfg.text_encoder.mode == "cache"
    assert (cfg.advanced.dop, cfg.advanced.diff_guidance, cfg.advanced.ema) == (False, False, False)


def test_network_rank_precedence_and_scale_one_as_ai_toolkit_trains_wan():
    # ai-toolkit 27a03a91, toolkit/lora_special.py: transformer LoRAs use peft format, "no alpha for peft":
    # self.alpha = self.lora_dim, so the scale is 1 whatever linear_alpha says (a missing one included)
    cfg, notes = _map(_minimal(network={"type": "lora", "linear": 16}))
    assert cfg.lora.rank == 16 and cfg.lora.effective_alpha / cfg.lora.rank == 1.0 and not notes
    cfg, notes = _map(_minimal(network={"type": "lora", "rank": 8, "linear": 16, "alpha": 4, "dropout": 0.1}))
    assert cfg.lora.rank == 8 and cfg.lora.effective_alpha == 8.0 and cfg.lora.dropout == 0.1
    assert any("network.alpha is ignored" in n and "scale 1" in n for n in notes)
    cfg, notes = _map(_minimal(network={"type": "lora", "linear": 32, "linear_alpha": 32}))
    assert cfg.lora.effective_alpha == 32.0 and not notes  # equal to the rank: nothing to warn about


@pytest.mark.parametrize(
    "content_or_style, bias", [("balanced", "balanced"), ("content", "high_noise"), ("style", "low_noise")]
)
def test_timestep_bias_follows_ai_toolkit_ui_labels(content_or_style, bias):
    cfg, _ = _map(_minimal(train__content_or_style=content_or_style))
    assert cfg.train.timestep_bias == bias


@pytest.mark.parametrize("ttype", ["shift", "flux_shift", "lumina2_shift"])
def test_shift_timesteps_use_wan22_training_shift(ttype):
    # wan22_14b_model.py trains with scheduler_config imported from wan22_5b_model.py: shift 5.0 (Wan 2.1's is 3.0).
    cfg, _ = _map(_minimal(train__timestep_type=ttype))
    assert cfg.train.timestep_type == "shift" and cfg.train.timestep_shift == 5.0


@pytest.mark.parametrize("ttype", ["linear", "sigmoid", "weighted"])
def test_direct_timestep_types(ttype):
    cfg, _ = _map(_minimal(train__timestep_type=ttype, train__noise_scheduler="flowmatch"))
    assert cfg.train.timestep_type == ttype


@pytest.mark.parametrize(
    "sched, params, expected",
    [
        ("constant", {}, ("constant", 0)),
        ("cosine", {}, ("cosine", 0)),
        ("constant_with_warmup", {}, ("constant", 1000)),
        ("constant_with_warmup", {"num_warmup_steps": 50}, ("constant", 50)),
        ("linear", {"start_factor": 1.0, "end_factor": 0.0}, ("linear", 0)),
    ],
)
def test_lr_schedulers(sched, params, expected):
    cfg, notes = _map(_minimal(train__lr_scheduler=sched, train__lr_scheduler_params=params))
    assert (cfg.optimizer.lr_scheduler, cfg.optimizer.warmup_steps) == expected
    # a global warm-up there, one per expert here: named
    assert _changed(notes) == ([f"{P}.train.lr_scheduler"] if sched == "constant_with_warmup" else [])


def test_optimizer_name_case_and_betas():
    cfg, notes = _map(
        _minimal(train__optimizer="AdamW", train__optimizer_params={"betas": [0.9, 0.99], "amsgrad": True})
    )
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.betas == (0.9, 0.99)
    assert _ignored(notes) == [f"{P}.train.optimizer_params.amsgrad"]
    assert "only weight_decay and betas" in notes[0]


@pytest.mark.parametrize(
    "over, needles",
    [
        ({"train__optimizer": "prodigy"}, [f"{P}.train.optimizer", "'prodigy'", "'adamw8bit'", "'adamw'"]),
        ({"train__optimizer": "adamw8"}, [f"{P}.train.optimizer", "'adamw8'"]),
        ({"train__timestep_type": "lognorm_blend", "train__noise_scheduler": "flowmatch"}, [f"{P}.train.timestep_type", "'lognorm_blend'", "'linear'"]),
        ({"train__timestep_type": "next_sample", "train__noise_scheduler": "flowmatch"}, [f"{P}.train.timestep_type", "'next_sample'"]),
        ({"train__timestep_type": "one_step", "train__noise_scheduler": "flowmatch"}, [f"{P}.train.timestep_type", "'one_step'"]),
        ({"train__content_or_style": "high_noise"}, [f"{P}.train.content_or_style", "'content'", "'style'"]),
        ({"train__lr_scheduler": "cosine_with_restarts"}, [f"{P}.train.lr_scheduler", "'cosine_with_restarts'"]),
        ({"train__lr_scheduler": "linear"}, [f"{P}.train.lr_scheduler", "0.333333*lr to 1*lr"]),
        ({"train__noise_scheduler": "lcm"}, [f"{P}.train.noise_scheduler", "'lcm'", "'flowmatch'", "'ddpm'"]),
        ({"train__timestep_type": "weighted"}, [f"{P}.train.timestep_type", "'weighted'", "noise_scheduler"]),
        ({"train__loss_type": "mae"}, [f"{P}.train.loss_type", "'mae'"]),
        ({"train__train_unet": False}, [f"{P}.train.train_unet"]),
        ({"train__gradient_accumulation_steps": 4}, [f"{P}.train.gradient_accumulation_steps", "gradient_accumulation"]),
        ({"train__dtype": "float8"}, [f"{P}.train.dtype", "'float8'"]),
        ({"save__dtype": "e4m3fn"}, [f"{P}.save.dtype", "'e4m3fn'"]),
        ({"network": {"type": "lokr"}}, [f"{P}.network.type", "'lokr'"]),
        ({"network": None}, [f"{P}.network", "fine-tune"]),
        ({"model__arch": "wan22_5b"}, [f"{P}.model.arch", "'wan22_5b'", "wan22_14b"]),
        ({"model__arch": "wan22_14b_i2v"}, [f"{P}.model.arch", "'wan22_14b_i2v'"]),
        ({"model": {"name_or_path": "x"}}, [f"{P}.model.arch", "None"]),
        ({"model__name_or_path": None}, [f"{P}.model.name_or_path"]),
        ({"type": "concept_slider"}, [f"{P}.type", "'concept_slider'"]),
        ({"datasets": [{"caption_ext": "txt"}]}, [f"{P}.datasets[0].folder_path"]),
        ({"datasets": "clips"}, [f"{P}.datasets", "list"]),
        ({"train": ["steps", 10]}, [f"{P}.train", "mapping"]),
        ({"train__lr": "fast"}, [f"{P}.train.lr", "'fast'"]),
    ],
)
def test_unreproducible_values_are_refused_by_name(over, needles):
    with pytest.raises(ConfigError) as exc:
        from_aitoolkit(_minimal(**over))
    for needle in needles:
        assert needle in str(exc.value)


def test_whole_job_errors():
    two = _minimal()
    two["config"]["process"].append(copy.deepcopy(two["config"]["process"][0]))
    with pytest.raises(ConfigError, match=r"config\.process lists 2 processes"):
        from_aitoolkit(two)
    with pytest.raises(ConfigError, match=r"job is 'extract'"):
        from_aitoolkit({**_minimal(), "job": "extract"})
    with pytest.raises(ConfigError, match=r"config\.process is missing"):
        from_aitoolkit({"job": "extension", "config": {"name": "a", "process": []}})
    with pytest.raises(ConfigError, match=r"config\.name is missing"):
        from_aitoolkit({"job": "extension", "config": {"process": _minimal()["config"]["process"]}})


@pytest.mark.parametrize(
    "over, line",
    [
        ({"train__switch_boundary_every": 0}, f"{P}.train.switch_boundary_every: switch_boundary_every must be >= 1"),
        ({"network": {"type": "lora", "linear": 0}}, f"{P}.network.linear: linear must be a positive integer"),
        ({"network": {"type": "lora", "linear": 16, "rank": 0}}, f"{P}.network.rank: rank must be a positive"),
        ({"datasets__0__caption_dropout_rate": 2.0}, f"{P}.datasets[0].caption_dropout_rate must be <= 1.0, got 2.0"),
        ({"train__batch_size": 0}, f"{P}.train.batch_size must be >= 1, got 0"),
        ({"train__batch_size": "two"}, f"{P}.train.batch_size must be a whole number, got 'two'"),
        ({"datasets__0__resolution": [60]}, f"{P}.datasets[0].resolution: resolution must be multiples of 16"),
        ({"datasets__0__resolution": 500}, f"{P}.datasets[0].resolution: resolution must be multiples of 16"),
        ({"datasets__0__num_frames": 32}, f"{P}.datasets[0].num_frames: num_frames must be"),
        ({"save__max_step_saves_to_keep": -1}, f"{P}.save.max_step_saves_to_keep must be >= "),
        ({"model__model_kwargs": {"train_high_noise": False, "train_low_noise": False}},
         f"{P}.model.model_kwargs: train_high_noise and train_low_noise are both off"),
        ({"name": "my lora"}, f"{P}.name: name 'my lora' must start with a letter or digit"),
        ({"datasets": [{"folder_path": "clips", "prior_reg": True}]}, f"{P}.datasets: every dataset has prior_reg"),
    ],
)
def test_values_our_config_refuses_name_the_ai_toolkit_key(tmp_path, over, line):
    """The refusal names the key as the user's file spells it, not the setting of this trainer it maps to."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_minimal(**over)))
    with pytest.raises(ConfigError) as exc:
        load_job(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: {line}"), message
    assert "\n" not in message
    ours = ("multistage.", "lora.", "'train.", "datasets.0", "save.keep_last", "'name'")
    assert not any(key in message for key in ours), message


def test_the_job_name_is_named_where_the_file_gives_it(tmp_path):
    data = _minimal()
    data["config"]["name"] = "my lora"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: config\.name: name 'my lora' must start"):
        load_job(path)


def test_single_expert_from_model_kwargs():
    cfg, _ = _map(_minimal(model__model_kwargs={"train_high_noise": False, "train_low_noise": True}))
    assert cfg.multistage.stages == ["low"]


def test_dataset_mapping():
    cfg, notes = _map(
        _minimal(
            trigger_word="sqz",
            datasets=[
                {
                    "folder_path": "clips",
                    "caption_ext": ".caption",
                    "resolution": 768,
                    "num_frames": 41,
                    "shrink_video_to_frames": False,
                    "flip_x": True,
                    "num_repeats": 3,
                    "cache_latents_to_disk": True,
                },
                {"folder_path": "reg", "is_reg": True, "caption_type": "txt", "fps": 12},
            ],
        )
    )
    main, reg = cfg.datasets
    assert main.caption_ext == "caption" and main.resolutions == [768] and main.num_frames == 41
    assert main.frame_sampling == "stride" and main.fps == 24.0 and main.window_start == "random"
    # data_loader.py adds a flipped copy of each file: the dataset's part of every epoch doubles
    assert main.flip_x is True and main.repeats == 6 and main.cache_latents is True
    assert main.prepend_trigger is True and main.is_regularization is False and main.share is None
    assert main.trigger_separator == " "  # ai-toolkit joins "sqz caption"
    # ai-toolkit does not add the trigger word to regularization captions; is_reg is not a prior target.
    assert reg.is_regularization is False and reg.prepend_trigger is False and reg.share == 0.5
    assert reg.frame_sampling == "aitoolkit_uniform" and reg.fps == 12.0
    # switch_boundary_every defaults to 1: ai-toolkit's even (regularization) steps are all high-noise steps.
    assert _changed(notes) == [f"{P}.datasets[0].flip_x", f"{P}.datasets[1].is_reg"]
    assert "its bug" in next(n for n in notes if "is_reg" in n)


def test_dataset_settings_not_applied_are_named():
    _, notes = _map(
        _minimal(
            trigger_word="sqz",
            datasets=[
                {"folder_path": "a", "trigger_word": "sqz", "network_weight": 1.0},
                {"folder_path": "b", "trigger_word": "other", "network_weight": -1, "mask_path": "m"},
            ],
        )
    )
    assert _ignored(notes) == sorted(
        [f"{P}.datasets[1].trigger_word", f"{P}.datasets[1].network_weight", f"{P}.datasets[1].mask_path"]
    )


def test_dependent_settings_are_silent_while_their_switch_is_off():
    off = {
        "model__quantize": False,
        "model__qtype": "uint4|some/hub/adapter.safetensors",
        "model__qtype_te": "qint4",
        "model__layer_offloading": False,
        "model__layer_offloading_transformer_percent": 0.5,
        "train__diff_output_preservation": False,
        "train__diff_output_preservation_class": "",
        "train__diff_output_preservation_multiplier": 0,
        "train__do_differential_guidance": False,
        "train__differential_guidance_scale": 0,
        "train__ema_config": {"use_ema": False, "ema_decay": 2.0, "use_feedback": True},
        "train__blank_prompt_preservation": False,
        "train__blank_prompt_preservation_multiplier": 2.0,
    }
    mapped, notes = from_aitoolkit(_minimal(**off))
    assert notes == []
    cfg = job_from_dict(mapped)
    assert cfg.quant.transformer == "none" and cfg.quant.text_encoder == "bf16" and cfg.memory.offload_blocks == 0
    assert (cfg.advanced.dop, cfg.advanced.diff_guidance, cfg.advanced.ema) == (False, False, False)
    on = {**off, "train__blank_prompt_preservation": True}
    assert _ignored(from_aitoolkit(_minimal(**on))[1]) == sorted(
        [f"{P}.train.blank_prompt_preservation", f"{P}.train.blank_prompt_preservation_multiplier"]
    )


@pytest.mark.parametrize("value, policy", [(True, "auto"), (False, "off"), (None, "off")])
def test_gradient_checkpointing_switch_becomes_a_policy(value, policy):
    """ai-toolkit reads the switch as truthy (on by default); on leaves the split to the VRAM planner. Keeping or
    recomputing activations does not change what is learned, so neither value is warned about."""
    cfg, notes = _map(_minimal(train__gradient_checkpointing=value))
    assert cfg.train.gradient_checkpointing == policy and notes == []


def test_compile_is_left_to_train_compile():
    cfg, notes = _map(_minimal(model__compile=False, model__compile_mode="max-autotune"))
    assert notes == [] and cfg.train.compile == "auto"
    cfg, notes = _map(_minimal(model__compile=True, model__block_compile=True))
    assert cfg.train.compile == "auto"
    assert _ignored(notes) == [f"{P}.model.block_compile", f"{P}.model.compile"]
    assert all("train.compile decides" in n for n in notes)


def test_unknown_and_default_valued_keys():
    _, notes = from_aitoolkit(
        _minimal(
            train__noise_offset=0.1,
            train__made_up_setting=3,
            train__reg_weight=1.0,
            network__transformer_only=False,
            extra_section={"a": 1},
        )
    )
    assert _ignored(notes) == sorted(
        [
            f"{P}.train.noise_offset",
            f"{P}.train.made_up_setting",
            f"{P}.network.transformer_only",
            f"{P}.extra_section",
        ]
    )


def test_name_and_environment_substitution(monkeypatch):
    monkeypatch.setenv("AITK_DATA", "/mnt/data")
    data = _minimal(training_folder="${AITK_DATA}/runs", datasets=[{"folder_path": "${AITK_DATA}/[name]_clips"}])
    cfg, _ = _map(data)
    assert cfg.save.output_dir == "/mnt/data/runs"
    assert cfg.datasets[0].folder == "/mnt/data/run1_clips"
    monkeypatch.delenv("AITK_DATA")
    with pytest.raises(ConfigError, match=r"config\.process\[0\]\.training_folder uses \$\{AITK_DATA\}"):
        from_aitoolkit(data)


def test_cli_loader_reads_ai_toolkit_files():
    cfg, notes = load_job(EXAMPLE)
    assert cfg.lora.rank == 32 and cfg.multistage.switch_every == 10
    assert cfg.sample.sample_every == 250 and cfg.quant.transformer == "4bit_ara"
    assert len(notes) == 3


# --- previews (sample section) -------------------------------------------------------------------------------------


def test_sample_section_defaults_are_ai_toolkits():
    # SampleConfig: 512x512, 1 frame at 16 fps, 20 steps, guidance 7, seed 0 without walking, every 100 steps.
    cfg, notes = _map(_minimal(sample={"prompts": ["a red fox"]}))
    s = cfg.sample
    assert notes == []
    assert s.prompts == ["a red fox"] and s.negative_prompt == ""
    assert (s.width, s.height, s.num_frames, s.fps, s.steps) == (512, 512, 1, 16, 20)
    assert s.guidance_high == s.guidance_low == 7.0
    assert (s.seed, s.walk_seeds, s.sample_every, s.sample_at_start) == (0, False, 100, True)
    assert (s.sampler, s.shift, s.vae_tiling) == ("euler", 5.0, False)


@pytest.mark.parametrize("sampler", ["flowmatch", "ddpm", "euler_a"])
def test_wan22_previews_always_use_flow_match_euler(sampler):
    # Wan2214bModel.get_generation_pipeline ignores the sampler: its scheduler is the training one (shift 5).
    cfg, notes = _map(_minimal(sample={"prompts": ["a"], "sampler": sampler}))
    assert (cfg.sample.sampler, cfg.sample.shift) == ("euler", 5.0) and notes == []


@pytest.mark.parametrize(
    "over, sample_every, at_start",
    [
        ({}, 250, True),
        ({"train__skip_first_sample": True}, 250, False),
        ({"sample__sample_every": 0}, 1000, True),  # ai-toolkit still renders after the last step (steps: 1000)
    ],
)
def test_sampling_schedule(over, sample_every, at_start):
    cfg, notes = _map(_minimal(sample={"prompts": ["a"], "sample_every": 250}, **over))
    assert (cfg.sample.sample_every, cfg.sample.sample_at_start) == (sample_every, at_start)
    assert notes == []


@pytest.mark.parametrize("over", [{"train__disable_sampling": True}, {"sample__prompts": []}, {"sample__samples": []}])
def test_no_previews_when_ai_toolkit_renders_none(over):
    data = _minimal(sample={"prompts": ["a"], "width": 999, "seed": -1, "format": "png"}, **over)
    cfg, notes = _map(data)
    assert cfg.sample.prompts == [] and cfg.sample.sample_every == 0 and not cfg.sample.sample_at_start
    assert notes == []  # every sample setting only matters while previews render


def test_sampling_settings_not_reproduced_are_named():
    _, notes = from_aitoolkit(
        _minimal(
            sample={"prompts": ["a"], "sample_every": 300, "sample_start_step": 500, "format": "png"},
            first_sample={"prompts": ["b"]},
            train={"force_first_sample": True},
        )
    )
    assert _ignored(notes) == sorted(
        [f"{P}.sample.sample_start_step", f"{P}.sample.format", f"{P}.first_sample", f"{P}.train.force_first_sample"]
    )
    # 1000 steps is no multiple of 300: ai-toolkit's render after the last step has no counterpart here.
    assert _changed(notes) == [f"{P}.sample.sample_every"]
    assert "step 900" in next(n for n in notes if n.startswith(f"{P}.sample.sample_every "))
    _, notes = from_aitoolkit(_minimal(sample={"prompts": ["a"], "sample_every": 2000}))
    assert "never comes within 1000 steps" in notes[0]


@pytest.mark.parametrize(
    "key, value, field, expected",
    [
        # GenerateImageConfig floors to a multiple of 8 (at least 64), Wan22Pipeline to a multiple of 16.
        ("width", 1000, "width", 992),
        ("width", 1010, "width", 1008),
        ("height", 40, "height", 64),
        # Wan22Pipeline: frames n with n % 4 != 1 become n // 4 * 4 + 1.
        ("num_frames", 32, "num_frames", 33),
        ("num_frames", 40, "num_frames", 41),
        ("num_frames", 0, "num_frames", 1),
        # The pipeline guides only when guidance_scale > 1; 1 turns guidance off here too.
        ("guidance_scale", 0.5, "guidance_high", 1.0),
        ("guidance_scale", 0.5, "guidance_low", 1.0),
        ("network_multiplier", 0.75, "lora_strength_high", 0.75),
        ("network_multiplier", 0.75, "lora_strength_low", 0.75),
        ("neg", "blurry, static", "negative_prompt", "blurry, static"),
        ("neg", None, "negative_prompt", ""),
        ("seed", 9, "seed", 9),
        ("walk_seed", True, "walk_seeds", True),
        ("fps", 24, "fps", 24),
        ("sample_steps", 30, "steps", 30),
    ],
)
def test_sample_values_as_ai_toolkits_pipeline_renders_them(key, value, field, expected):
    cfg, notes = _map(_minimal(sample={"prompts": ["a"], key: value}))
    assert getattr(cfg.sample, field) == expected and notes == []


def test_inline_prompt_flags_are_parsed_like_ai_toolkit():
    prompt = "a cat on a sofa --n blurry, dark --w 640 --h 384 --seed 7 --cfg 5 --steps 30 --m 0.8 --frames 17 --fps 24"
    cfg, notes = _map(_minimal(sample={"prompts": [prompt + " --p2 ignored --unknown x"]}))
    s = cfg.sample
    assert s.prompts == ["a cat on a sofa"] and s.negative_prompt == "blurry, dark"
    assert (s.width, s.height, s.num_frames, s.fps, s.steps, s.seed) == (640, 384, 17, 24, 30, 7)
    assert s.guidance_high == s.guidance_low == 5.0 and s.lora_strength_high == s.lora_strength_low == 0.8
    assert notes == []  # --p2 and unknown flags do nothing on Wan 2.2 in ai-toolkit either
    # The short aliases of sd-scripts: --d seed, --l guidance, --s steps.
    cfg, _ = _map(_minimal(sample={"prompts": ["a --d 3 --l 2.5 --s 12"]}))
    assert (cfg.sample.seed, cfg.sample.guidance_high, cfg.sample.steps) == (3, 2.5, 12)


def test_per_prompt_values_shared_by_all_prompts_become_the_sections():
    samples = [{"prompt": "a", "num_frames": 17, "neg": "x"}, {"prompt": "b --n x --frames 17"}]
    cfg, notes = _map(_minimal(sample={"samples": samples, "num_frames": 41}))
    assert cfg.sample.num_frames == 17 and cfg.sample.negative_prompt == "x" and notes == []


def test_per_prompt_values_that_differ_are_named():
    samples = [
        {"prompt": "a --n x --w 640", "ctrl_img": "c.png", "made_up": 1},
        {"prompt": "b", "guidance_scale": 2.0, "sample_steps": 10},
        {"prompt": "c", "num_frames": 17, "network_multiplier": 0.5, "fps": 8},
    ]
    cfg, notes = _map(_minimal(sample={"samples": samples, "neg": "y", "num_frames": 41, "guidance_scale": 4}))
    s = cfg.sample
    assert (s.negative_prompt, s.width, s.num_frames, s.guidance_high, s.steps) == ("y", 512, 41, 4.0, 20)
    assert (s.lora_strength_low, s.fps) == (1.0, 16)
    q = f"{P}.sample.samples"
    assert _ignored(notes) == sorted(
        [
            f"{q}[0].prompt --n",
            f"{q}[0].prompt --w",
            f"{q}[0].made_up",  # ctrl_img has no effect on T2V in ai-toolkit: silent
            f"{q}[1].guidance_scale",
            f"{q}[1].sample_steps",
            f"{q}[2].num_frames",
            f"{q}[2].network_multiplier",
            f"{q}[2].fps",
        ]
    )
    assert any(n.startswith(f"{q}[0].prompt --n is ignored") and "'y'" in n for n in notes)


@pytest.mark.parametrize(
    "sample, seed, walk, ignored",
    [
        ({"prompts": ["a", "b", "c"], "seed": 10, "walk_seed": True}, 10, True, []),
        ({"prompts": ["a", "b", "c"], "seed": 10}, 10, False, []),
        ({"prompts": ["a --seed 3", "b --seed 3"], "walk_seed": True}, 3, False, []),
        # Walking from 5: the second prompt's own seed 6 fits seed + index.
        ({"samples": [{"prompt": "a"}, {"prompt": "b", "seed": 6}], "seed": 5, "walk_seed": True}, 5, True, []),
        # Not walking, a sample's own seed stays in force for the prompts after it: seeds 1, 5, 5.
        (
            {"samples": [{"prompt": "a"}, {"prompt": "b", "seed": 5}, {"prompt": "c"}], "seed": 1},
            1,
            False,
            [f"{P}.sample.samples[1].seed"],
        ),
        ({"prompts": ["a", "b --seed 9"], "seed": 1, "walk_seed": True}, 1, True, [f"{P}.sample.prompts[1] --seed"]),
    ],
)
def test_preview_seeds(sample, seed, walk, ignored):
    cfg, notes = _map(_minimal(sample=sample))
    assert (cfg.sample.seed, cfg.sample.walk_seeds) == (seed, walk)
    assert _ignored(notes) == ignored


def test_trigger_placeholder_in_sample_prompts():
    # ai-toolkit's sampler replaces [trigger] when a trigger word is set and adds it nowhere else.
    cfg, _ = _map(_minimal(trigger_word="sqz", sample={"prompts": ["[trigger] dancing", "a dog"]}))
    assert cfg.sample.prompts == ["sqz dancing", "a dog"]
    cfg, _ = _map(_minimal(sample={"prompts": ["[trigger] dancing"]}))
    assert cfg.sample.prompts == ["[trigger] dancing"]


@pytest.mark.parametrize(
    "sample, needles",
    [
        ({"prompts": ["a"], "seed": -1}, [f"{P}.sample.seed", "random"]),
        ({"samples": [{"prompt": "a", "seed": -1}]}, [f"{P}.sample.samples[0].seed", "random"]),
        ({"prompts": ["a --seed -1"]}, [f"{P}.sample.prompts[0] --seed", "random"]),
        ({"prompts": ["a", "  "]}, [f"{P}.sample.prompts[1] is blank"]),
        ({"prompts": ["--n ugly"]}, [f"{P}.sample.prompts[0] is blank once its --flags are removed"]),
        ({"prompts": ["a --w wide"]}, [f"{P}.sample.prompts[0]", "--w", "'wide'"]),
        ({"samples": [{"width": 64}]}, [f"{P}.sample.samples[0].prompt"]),
        ({"prompts": "a"}, [f"{P}.sample.prompts", "list"]),
        ({"prompts": ["a"], "sample_steps": 0}, [f"{P}.sample.sample_steps", "greater than or equal to 1"]),
        ({"prompts": ["a"], "fps": 0}, [f"{P}.sample.fps"]),
        ({"prompts": ["a"], "sample_every": -5}, [f"{P}.sample.sample_every"]),
        ({"prompts": ["a"], "network_multiplier": float("inf")}, [f"{P}.sample.network_multiplier"]),
        ({"samples": [{"prompt": "a", "sample_steps": 0}]}, [f"{P}.sample.samples[0].sample_steps"]),
        ({"prompts": ["a"], "width": "wide"}, [f"{P}.sample.width", "whole number"]),
        ({"prompts": ["a"], "neg": 3}, [f"{P}.sample.neg", "negative prompt"]),
    ],
)
def test_sample_values_this_trainer_refuses_name_the_ai_toolkit_key(sample, needles):
    with pytest.raises(ConfigError) as exc:
        from_aitoolkit(_minimal(sample=sample))
    for needle in needles:
        assert needle in str(exc.value)


# --- quantization and memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["qfloat8", "float8", "qfloat8_e4m3fn"])
def test_float8_quantization(qtype):
    # quantize_te defaults to quantize, and Wan's loader quantizes the text encoder with model.qtype.
    cfg, notes = _map(_minimal(model__quantize=True, model__qtype=qtype, model__qtype_te="qint4"))
    assert (cfg.quant.transformer, cfg.quant.text_encoder) == ("float8", "float8")
    # ai-toolkit's qfloat8 is optimum-quanto's weight-only float8 (qtype -> quanto qfloat8 weights, activations left
    # alone): the gradients go through the dequantized weight as there; the fp8 forward is named.
    assert cfg.quant.fp8_backward is False
    assert _changed(notes) == [f"{P}.model.qtype"] and "weight-only" in notes[0] and "float8 matmul" in notes[0]
    cfg, _ = _map(_minimal(model__quantize=True, model__qtype=qtype, model__quantize_te=False))
    assert (cfg.quant.transformer, cfg.quant.text_encoder) == ("float8", "bf16")


def test_uint4_with_a_local_adapter_file(tmp_path):
    ara = _adapter_file(tmp_path / "wan22_14b_t2i_torchao_uint4.safetensors", rank=16)
    for model in ({"qtype": f"uint4|{ara}"}, {"qtype": "uint4", "accuracy_recovery_adapter": str(ara)}):
        cfg, notes = _map(_minimal(model={**_minimal()["config"]["process"][0]["model"], "quantize": True, **model}))
        assert (cfg.quant.transformer, cfg.quant.quantizer, cfg.quant.ara_source) == ("4bit_ara", "uint4", str(ara))
        assert _changed(notes) == [f"{P}.model.quantize_te"]  # the text encoder: float8 here, uint4 in ai-toolkit


def test_uint4_without_an_adapter_gets_computed_ones():
    cfg, notes = _map(_minimal(model__quantize=True, model__qtype="uint4", model__quantize_te=False))
    assert (cfg.quant.transformer, cfg.quant.quantizer, cfg.quant.ara_source) == ("4bit_ara", "uint4", "compute")
    assert _changed(notes) == [f"{P}.model.qtype"] and "plain uint4" in notes[0]


def test_text_encoder_alone_quantized_with_model_qtype():
    cfg, notes = _map(_minimal(model__quantize_te=True, model__qtype="uint4"))
    assert (cfg.quant.transformer, cfg.quant.text_encoder) == ("none", "float8")
    assert _changed(notes) == [f"{P}.model.quantize_te"]


@pytest.mark.parametrize(
    "model, needles",
    [
        ({"quantize": True, "qtype": "qint8"}, [f"{P}.model.qtype", "'qint8'", "'qfloat8'", "'uint4'"]),
        ({"quantize": True, "qtype": "uint3"}, [f"{P}.model.qtype", "'uint3'"]),
        ({"quantize": True, "qtype": "qfloat8|a/b/c.safetensors"}, [f"{P}.model.qtype", "uint4 quantizer"]),
        ({"quantize": True, "qtype": "uint4|/no/such/dir/ara.safetensors"}, [f"{P}.model.qtype", "neither"]),
        ({"quantize_te": True, "qtype": "qint4"}, [f"{P}.model.qtype", "text encoder"]),
        ({"layer_offloading": True, "layer_offloading_transformer_percent": "most"}, ["transformer_percent"]),
    ],
)
def test_quantization_refusals(model, needles):
    data = _minimal()
    data["config"]["process"][0]["model"].update(model)
    with pytest.raises(ConfigError) as exc:
        from_aitoolkit(data)
    for needle in needles:
        assert needle in str(exc.value)


@pytest.mark.parametrize("adapter", ["/nonexist/ara.safetensors", "./ara.safetensors", "../a/ara.safetensors",
                                     "~/ara.safetensors", "C:\\loras\\ara.safetensors", "ara.safetensors"])
def test_a_missing_local_adapter_is_refused_not_taken_for_a_hub_file(adapter):
    """ai-toolkit (toolkit/util/quantize.py) downloads a path that does not exist as 'user/repo/file' from the Hub:
    repo_id = parts[0]/parts[1], which for a local path is no repo id (hf_hub_download refuses it when the model
    loads). A path that is not 'user/repo/file' is a local file that is missing: refused when the job is read."""
    with pytest.raises(ConfigError) as exc:
        from_aitoolkit(_minimal(model__quantize=True, model__qtype=f"uint4|{adapter}"))
    assert str(exc.value) == (
        f"{P}.model.qtype: the accuracy recovery adapter {adapter!r} is neither an existing file nor a Hugging Face "
        "Hub file 'user/repo/file.safetensors' - give the path of the adapter file")


def test_a_folder_given_as_adapter_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{re.escape(P)}\.model\.qtype: the accuracy recovery adapter .* is a "
                                          "folder - give the adapter .safetensors file inside it"):
        from_aitoolkit(_minimal(model__quantize=True, model__qtype=f"uint4|{tmp_path}"))


def test_a_hub_adapter_is_named_and_computed_locally():
    hub = "ostris/accuracy_recovery_adapters/wan22_14b_t2i_torchao_uint4.safetensors"
    cfg, notes = _map(_minimal(model__quantize=True, model__qtype=f"uint4|{hub}", model__quantize_te=False))
    assert cfg.quant.ara_source == "compute"
    assert _changed(notes) == [f"{P}.model.qtype"] and "is a Hugging Face Hub file" in notes[0]


def test_adapter_that_is_not_safetensors_names_the_key(tmp_path):
    ara = tmp_path / "ara.bin"
    ara.write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"{re.escape(P)}\.model\.qtype .*\.safetensors"):
        from_aitoolkit(_minimal(model__quantize=True, model__qtype=f"uint4|{ara}"))


@pytest.mark.parametrize(
    "model, low_vram, offload, tiling",
    [
        ({"low_vram": True}, True, 0, True),
        ({"layer_offloading": True}, False, 40, False),  # layer_offloading_transformer_percent defaults to 1.0
        ({"layer_offloading": True, "layer_offloading_transformer_percent": 0.5}, False, 20, False),
        ({"layer_offloading": True, "layer_offloading_transformer_percent": 0.3125}, False, 13, False),  # 12.5 up
        ({"layer_offloading": True, "layer_offloading_transformer_percent": 0}, False, 0, False),
        ({"layer_offloading": True, "layer_offloading_transformer_percent": 1.5}, False, 40, False),
        ({"model_kwargs": {"vae_tiling": True}}, False, 0, True),
    ],
)
def test_memory_settings(model, low_vram, offload, tiling):
    data = _minimal(sample={"prompts": ["a"]})
    data["config"]["process"][0]["model"].update(model, layer_offloading_text_encoder_percent=0.5)
    cfg, notes = _map(data)
    assert (cfg.memory.low_vram, cfg.memory.offload_blocks, cfg.sample.vae_tiling) == (low_vram, offload, tiling)
    assert notes == []  # the text encoder is freed after caching, so its offloading percent changes nothing


# --- text encoder --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over, mode",
    [
        ({"train__cache_text_embeddings": True}, "cache"),
        ({"train__cache_text_embeddings": False}, "cache"),
        ({"datasets": [{"folder_path": "a", "cache_text_embeddings": True}]}, "cache"),
        ({"train__unload_text_encoder": True}, "unload"),
        # With caching on, ai-toolkit trains on the cached captions, not on the fixed unload embedding.
        ({"train__unload_text_encoder": True, "train__cache_text_embeddings": True}, "cache"),
    ],
)
def test_text_encoder_modes(over, mode):
    cfg, _ = _map(_minimal(trigger_word="sqz", **over))
    assert cfg.text_encoder.mode == mode


def test_unload_mode_matches_ai_toolkits_fixed_embedding():
    datasets = [{"folder_path": "a", "caption_dropout_rate": 0.1}, {"folder_path": "r", "is_reg": True}]
    cfg, notes = _map(_minimal(trigger_word="sqz", train__unload_text_encoder=True, train__switch_boundary_every=2,
                               datasets=datasets))
    # The fixed trigger-word embedding is used whatever the caption, so dropping captions changes nothing there.
    assert [d.caption_dropout for d in cfg.datasets] == [0.0, 0.0]
    assert _changed(notes) == [f"{P}.datasets[1].is_reg"]


def test_caption_dropout_with_a_trigger_word_is_flagged():
    # ai-toolkit's dropped caption becomes the trigger word (get_dropout_caption), except on regularization data.
    datasets = [
        {"folder_path": "a", "caption_dropout_rate": 0.1},
        {"folder_path": "r", "is_reg": True, "caption_dropout_rate": 0.1},
        {"folder_path": "b"},
    ]
    _, notes = from_aitoolkit(_minimal(trigger_word="sqz", datasets=datasets, train__switch_boundary_every=2))
    assert _changed(notes) == [f"{P}.datasets[0].caption_dropout_rate"]
    _, notes = from_aitoolkit(_minimal(datasets=datasets, train__switch_boundary_every=2))
    assert notes == []


def test_text_encoder_refusals():
    with pytest.raises(ConfigError, match=rf"{re.escape(P)}\.train\.unload_text_encoder .*trigger_word"):
        from_aitoolkit(_minimal(train__unload_text_encoder=True))
    mixed = [{"folder_path": "a", "cache_text_embeddings": True}, {"folder_path": "b"}]
    with pytest.raises(ConfigError, match=rf"{re.escape(P)}\.datasets\[1\]\.cache_text_embeddings"):
        from_aitoolkit(_minimal(datasets=mixed))
    cfg, _ = _map(_minimal(datasets=mixed, train__cache_text_embeddings=True))  # the train switch covers them all
    assert cfg.text_encoder.mode == "cache"


# --- DOP, differential guidance, EMA -------------------------------------------------------------------------------


def test_dop():
    cfg, notes = _map(
        _minimal(
            trigger_word="sqz",
            train__diff_output_preservation=True,
            train__diff_output_preservation_class="woman",
            train__diff_output_preservation_multiplier=0.5,
        )
    )
    assert (cfg.advanced.dop, cfg.advanced.dop_class, cfg.advanced.dop_multiplier) == (True, "woman", 0.5)
    assert notes == []
    cfg, _ = _map(
        _minimal(trigger_word="sqz", train__diff_output_preservation=True, train__diff_output_preservation_class="man")
    )
    assert cfg.advanced.dop_multiplier == 1.0  # TrainConfig default


def test_differential_guidance():
    cfg, notes = _map(_minimal(train__do_differential_guidance=True))
    assert (cfg.advanced.diff_guidance, cfg.advanced.diff_guidance_scale) == (True, 3.0)
    assert _changed(notes) == [f"{P}.train.do_differential_guidance"]  # inert in ai-toolkit without do_guidance_loss
    cfg, _ = _map(_minimal(train__do_differential_guidance=True, train__differential_guidance_scale=2))
    assert cfg.advanced.diff_guidance_scale == 2.0


def test_ema():
    cfg, notes = _map(_minimal(train__ema_config={"use_ema": True}))
    assert (cfg.advanced.ema, cfg.advanced.ema_decay) == (True, 0.999)  # EMAConfig default
    assert _changed(notes) == [f"{P}.train.ema_config"] and "_ema_" in notes[0]
    cfg, notes = _map(
        _minimal(train__ema_config={"use_ema": True, "ema_decay": 0.99, "use_feedback": True, "param_multiplier": 1})
    )
    assert cfg.advanced.ema_decay == 0.99
    assert _ignored(notes) == [f"{P}.train.ema_config.use_feedback"]


@pytest.mark.parametrize(
    "over, needles",
    [
        ({"train__diff_output_preservation": True, "train__diff_output_preservation_class": "x"}, ["trigger_word"]),
        (
            {"trigger_word": "sqz", "train__diff_output_preservation": True},
            [f"{P}.train.diff_output_preservation_class is empty"],
        ),
        (
            {
                "trigger_word": "sqz",
                "train__diff_output_preservation": True,
                "train__diff_output_preservation_class": "man",
                "train__diff_output_preservation_multiplier": 0,
            },
            [f"{P}.train.diff_output_preservation_multiplier", "dop_multiplier"],
        ),
        (
            {"train__do_differential_guidance": True, "train__differential_guidance_scale": -1},
            [f"{P}.train.differential_guidance_scale"],
        ),
        ({"train__ema_config": {"use_ema": True, "ema_decay": 1.0}}, [f"{P}.train.ema_config.ema_decay"]),
    ],
)
def test_regularizer_values_this_trainer_refuses_name_the_ai_toolkit_key(over, needles):
    with pytest.raises(ConfigError) as exc:
        from_aitoolkit(_minimal(**over))
    for needle in needles:
        assert needle in str(exc.value)


@pytest.mark.parametrize("train, said", [
    ({"gradient_accumulation": 2}, "gradient_accumulation is changed: ai-toolkit's switch_boundary_every counts "
                                   "micro-batches"),
    ({"lr_scheduler": "constant_with_warmup", "lr_scheduler_params": {"num_warmup_steps": 50}},
     "each expert warms up over its own first 50 steps"),
    ({"do_differential_guidance": True}, "no effect unless do_guidance_loss"),
])
def test_semantics_that_differ_from_ai_toolkit_are_named(train, said):
    _, notes = _map(_minimal(train=train))
    assert any(said in n for n in notes), notes
    assert all(said not in n for n in _map(_minimal())[1])  # not said when the job does not ask for it


# --- issue #16 part 2: regularization data, resuming, qfloat8, stills, trigger joining, ARA rank, [trigger] -------


def _adapter_file(path: Path, rank: int, ranks: dict[str, int] | None = None) -> Path:
    """A small adapter laid out as ai-toolkit saves its Wan 2.2 ARA (both experts, lora_A [r, in], lora_B [out, r])."""
    sd = {}
    for group in ("transformer_1", "transformer_2"):
        for module in ("self_attn.q", "ffn.0"):
            r = (ranks or {}).get(module, rank)
            key = f"diffusion_model.{group}.blocks.0.{module}"
            sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = torch.zeros(r, 8), torch.zeros(8, r)
    save_file(sd, str(path))
    return path


def _still(path: Path, value: int) -> Path:
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)
    return path


def test_is_reg_data_trains_as_ordinary_samples_without_the_trigger_on_half_the_samples(tmp_path):
    """ai-toolkit (jobs/process/BaseSDTrainProcess.py): `if dataset.is_reg: ... self.datasets_reg.append(dataset)`;
    each step `if batch_step % 2 == 0 and dataloader_reg is not None and not is_save_step and not is_sample_step:`
    draws the batch from the regularization loader, whatever the datasets' sizes; the prompt gets the trigger word
    only with `add_if_not_present=not is_reg`, joined by `replace_with + " " + output_prompt`
    (toolkit/prompt_utils.py). The loss is the ordinary one, weighted (SDTrainer: `loss_multiplier[idx] =
    loss_multiplier[idx] * self.train_config.reg_weight`); the base-model prior target is the separate `prior_reg`
    (`do_reg_prior = True` -> calculate_loss: `elif prior_pred is not None ...: target = prior_pred`)."""
    main, reg = tmp_path / "main", tmp_path / "reg"
    main.mkdir()
    reg.mkdir()
    for i in range(2):
        _still(main / f"m{i}.png", 40 + i)
        (main / f"m{i}.txt").write_text("a red square")
    for i in range(6):
        _still(reg / f"r{i}.png", 90 + i)
        (reg / f"r{i}.txt").write_text("a square")
    datasets = [{"folder_path": str(main), "resolution": 32}, {"folder_path": str(reg), "resolution": 32, "is_reg": 1}]
    cfg, notes = _map(_minimal(trigger_word="sqz", datasets=datasets, train__switch_boundary_every=2))
    assert notes == []
    m, r = cfg.datasets
    assert (r.is_regularization, r.prepend_trigger, r.share) == (False, False, 0.5)
    assert (m.is_regularization, m.prepend_trigger, m.share) == (False, True, None)
    data = build_dataset(cfg.datasets, cfg.trigger_word, 0)
    assert data.counts == [4, 4]  # 2 training images + 6 regularization images: half the epoch each
    captions = {it.caption for it in data.items}
    assert captions == {"sqz a red square", "a square"}


def test_reg_weight_becomes_the_regularization_share():
    # Expected gradient per ai-toolkit step: (w g_reg + g_main) / 2; here share p = w/(1+w): (w g_reg + g_main)/(1+w).
    datasets = [{"folder_path": "a"}, {"folder_path": "r1", "is_reg": True}, {"folder_path": "r2", "is_reg": True}]
    cfg, notes = _map(_minimal(datasets=datasets, train__reg_weight=0.5, train__switch_boundary_every=2))
    assert [d.share for d in cfg.datasets] == [None, pytest.approx(1 / 6), pytest.approx(1 / 6)]
    reg = sum(d.share for d in cfg.datasets[1:])
    assert reg / (1 - reg) == pytest.approx(0.5)  # reg : main samples = ai-toolkit's loss weights w : 1
    assert _changed(notes) == sorted([f"{P}.train.reg_weight", f"{P}.datasets[1].is_reg", f"{P}.datasets[2].is_reg"])
    assert "0.333 of every epoch" in next(n for n in notes if "reg_weight" in n)
    cfg, notes = _map(_minimal(datasets=datasets[:2], train__reg_weight=1.0, train__switch_boundary_every=2))
    assert cfg.datasets[1].share == 0.5 and notes == []
    # reg_weight without regularization data asks for nothing, as in ai-toolkit
    assert _map(_minimal(train__reg_weight=0.3))[1] == []


@pytest.mark.parametrize("over, needles", [
    ({"train__reg_weight": 0, "datasets": [{"folder_path": "a"}, {"folder_path": "r", "is_reg": True}]},
     [f"{P}.train.reg_weight is 0", "weight > 0"]),
    ({"datasets": [{"folder_path": "r", "is_reg": True}]}, [f"{P}.datasets: every dataset has is_reg"]),
    ({"trigger_word": "sqz", "train__diff_output_preservation": True, "train__diff_output_preservation_class": "man",
      "datasets": [{"folder_path": "a"}, {"folder_path": "p", "prior_reg": True}]},
     [f"{P}.datasets[1].prior_reg", "diff_output_preservation"]),
])
def test_regularization_settings_that_cannot_train_are_refused(over, needles):
    with pytest.raises(ConfigError) as exc:
        from_aitoolkit(_minimal(**over))
    assert all(n in str(exc.value) for n in needles) and "\n" not in str(exc.value)


def test_ai_toolkits_reg_steps_all_on_the_high_expert_with_switch_every_1_is_not_copied():
    # Step 0 is a save step (not reg); SDTrainer.hook_train_loop switches expert every micro-batch with
    # switch_boundary_every 1: high on even steps, low on odd ones - every reg batch lands on the high expert.
    datasets = [{"folder_path": "a"}, {"folder_path": "r", "is_reg": True}]
    _, notes = from_aitoolkit(_minimal(datasets=datasets))
    assert _changed(notes) == [f"{P}.datasets[1].is_reg"] and "low-noise expert never trains on them" in notes[0]
    for over in ({"train__switch_boundary_every": 2}, {"train__gradient_accumulation": 2},
                 {"model__model_kwargs": {"train_low_noise": False}}):
        _, notes = from_aitoolkit(_minimal(datasets=datasets, **over))
        assert not any("its bug" in n for n in notes), over


def test_prior_reg_is_the_base_model_prior_target():
    datasets = [{"folder_path": "a"}, {"folder_path": "p", "prior_reg": True}]
    cfg, notes = _map(_minimal(trigger_word="sqz", datasets=datasets))
    p = cfg.datasets[1]
    assert (p.is_regularization, p.prepend_trigger, p.share) == (True, True, None) and notes == []
    # SDTrainer: `if any([batch.file_items[idx].prior_reg ...]): do_reg_prior = True` -> the whole batch's target
    _, notes = from_aitoolkit(_minimal(trigger_word="sqz", datasets=datasets, train__batch_size=2))
    assert _changed(notes) == [f"{P}.datasets[1].prior_reg"] and "only the prior_reg samples" in notes[0]


def _aitk_lora(folder: Path, name: str, step: int | None, experts=("high", "low"), saved_step: int | None = -1,
               tensors: dict | None = None) -> list[Path]:
    """Files as ai-toolkit's BaseSDTrainProcess.save + Wan22Model.save_lora write them: `_{str(step).zfill(9)}` then
    `_high_noise` / `_low_noise`, metadata `training_info` = json {"step": step, "epoch": ...}."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = name if step is None else f"{name}_{str(step).zfill(9)}"
    meta = {} if saved_step is None else {"training_info": json.dumps(
        {"step": step if saved_step == -1 else saved_step, "epoch": 0}), "format": "pt"}
    paths = []
    for e in experts:
        path = folder / f"{stem}_{e}_noise.safetensors"
        save_file(tensors[e] if tensors else {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(1, 1)},
                  str(path), metadata=meta)
        paths.append(path)
    return paths


def test_an_output_folder_with_ai_toolkits_pair_resumes_from_the_newest(tmp_path):
    out = tmp_path / "out"
    _aitk_lora(out / "run1", "run1", 250)
    newest = _aitk_lora(out / "run1", "run1", 500)
    _aitk_lora(out / "run1", "run10", 900)  # another job whose name starts with this one's
    (out / "run1" / "run1_000700_high_noise.safetensors").write_bytes(b"this trainer's 6-digit naming")
    data = _minimal(train__steps=2000)
    data["config"]["process"][0]["training_folder"] = str(out)
    cfg, notes = _map(data)
    assert (cfg.lora.init_high, cfg.lora.init_low) == tuple(map(str, newest))
    # ai-toolkit reads step 500 from the metadata and trains range(500, 2000): 1500 steps are left.
    assert cfg.train.steps == 1500
    assert _changed(notes) == [f"{P}.training_folder"]
    assert (f"resuming from {newest[0]}, {newest[1]} (LoRA weights only; optimizer state and step count start "
            "fresh)") in notes[0] and "at step 500" in notes[0]


def test_resume_step_count_and_a_finished_ai_toolkit_run(tmp_path):
    out = tmp_path / "out"
    final = _aitk_lora(out / "run1", "run1", None, saved_step=1000)  # the pair saved after the loop
    _aitk_lora(out / "run1", "run1", 750)
    data = _minimal(train__steps=1000, training_folder=str(out))
    with pytest.raises(ConfigError) as exc:  # ai-toolkit: range(1000, 1000) trains nothing
        from_aitoolkit(data)
    assert f"{P}.training_folder" in str(exc.value) and "train.steps above 1000" in str(exc.value)
    cfg, notes = _map(_minimal(train__steps=1500, training_folder=str(out), train__lr_scheduler="cosine"))
    assert (cfg.lora.init_high, cfg.lora.init_low, cfg.train.steps) == (str(final[0]), str(final[1]), 500)
    assert "schedule starting over" in notes[0]
    # Without training_info ai-toolkit keeps step 0: the whole run again, from the files' weights.
    bare = tmp_path / "bare"
    files = _aitk_lora(bare / "run1", "run1", 300, experts=("high",), saved_step=None)
    cfg, notes = _map(_minimal(train__steps=800, training_folder=str(bare)))
    assert (cfg.lora.init_high, cfg.lora.init_low, cfg.train.steps) == (str(files[0]), None, 800)
    assert "low-noise LoRA starts fresh" in notes[0]
    # One expert trained: ai-toolkit's load_lora loads only that expert's file.
    cfg, _ = _map(_minimal(train__steps=1500, training_folder=str(out),
                           model__model_kwargs={"train_high_noise": False}))
    assert (cfg.lora.init_high, cfg.lora.init_low) == (None, str(final[1]))


@pytest.mark.slow
def test_a_run_from_ai_toolkits_folder_starts_from_its_pair_and_never_touches_its_files(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    from lora_fixtures import _modules, lora_state_dict

    clips = make_synthetic_dataset(tmp_path / "clips", n_clips=2, num_frames=5, size=(32, 32), seed=1)
    out = tmp_path / "out"
    tensors = {e: lora_state_dict("aitoolkit", _modules("aitoolkit", TINY_TRANSFORMER_CONFIG, seed))
               for e, seed in (("high", 1), ("low", 2))}
    foreign = [*_aitk_lora(out / "job", "job", 1, tensors=tensors), *_aitk_lora(out / "job", "job", 0)]
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in foreign}
    job = {"job": "extension", "config": {"name": "job", "process": [{
        "type": "sd_trainer", "training_folder": str(out), "device": "cpu",
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "save": {"save_every": 1, "max_step_saves_to_keep": 1},
        "datasets": [{"folder_path": str(clips), "resolution": [32], "num_frames": 5, "caption_dropout_rate": 0}],
        "train": {"steps": 3, "batch_size": 1, "dtype": "fp32", "gradient_checkpointing": False, "lr": 1e-3,
                  "switch_boundary_every": 1},
        "model": {"name_or_path": "tiny", "arch": "wan22_14b"},
    }]}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert cli_main(["train", str(path)]) == 0
    printed = capsys.readouterr()
    assert f"resuming from {foreign[0]}, {foreign[1]}" in printed.err
    pair = [Path(line.split(": ", 1)[1]) for line in printed.out.splitlines() if "-noise LoRA: " in line]
    # A folder holding another tool's files is not this run's: it writes into job_run2; 2 steps were left (1 of 3).
    assert {p.parent.name for p in pair} == {"job_run2"} and all("_000002_" in p.name for p in pair)
    resolved = yaml.safe_load((out / "job_run2" / "config.yaml").read_text())
    assert (resolved["lora"]["init_high"], resolved["lora"]["init_low"]) == (str(foreign[0]), str(foreign[1]))
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in foreign} == before  # keep_last pruned none
    assert sorted(p.name for p in (out / "job").iterdir()) == sorted(p.name for p in foreign)


def _state_header(run: Path, step: int, cfg) -> Path:
    """A training state as resume reads it before any model loads (runs.state_unreadable / state_config: the
    metadata only), saved with job ``cfg``, in ``run`` (a folder named after the job is one of its runs)."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / f"training_state_{step:06d}.safetensors"
    meta = {"state_skeleton": "{}", "step": str(step), "training_config": json.dumps(cfg.model_dump(mode="json"))}
    save_file({"step": torch.zeros(1)}, str(path), metadata=meta)
    return path


def _job_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_job_run_again_continues_from_its_newest_training_state(tmp_path, caplog):
    """ai-toolkit (BaseSDTrainProcess.get_latest_save_path / load_training_state_from_metadata) continues a job
    from the newest save in <training_folder>/<name> whenever the job is run again; here from the newest training
    state of the job's runs, as resume: latest finds it."""
    from trainer_core.train.runs import resolve_resume

    out = tmp_path / "out"
    path = _job_file(tmp_path, _minimal(training_folder=str(out), train__steps=30))
    cfg, _ = load_job(path, continue_run=True)
    assert cfg.resume is None  # nothing saved yet: a fresh run
    _state_header(out / "run1", 4, cfg)
    newest = _state_header(out / "run1", 9, cfg)
    for e in ("high", "low"):  # this trainer's own pair beside its state (6-digit steps): not an ai-toolkit save
        (out / "run1" / f"run1_000009_{e}_noise.safetensors").write_bytes(b"this trainer's pair")
    with caplog.at_level(logging.INFO, logger="trainer_core.cli"):
        cfg, notes = load_job(path, continue_run=True)
    assert cfg.resume == "latest" and resolve_resume(cfg) == (9, newest)
    assert (cfg.lora.init_high, cfg.lora.init_low, cfg.train.steps) == (None, None, 30) and notes == []
    assert [r.getMessage() for r in caplog.records] == [(
        f"resume: continuing from {newest} (step 9), the newest training state of job 'run1', as ai-toolkit "
        "continues a job from the newest save in its training folder - give the job another name (config.name) "
        "to train from scratch")]
    assert load_job(path)[0].resume is None  # `sample` renders; it continues nothing
    explicit = str(out / "run1" / "training_state_000004.safetensors")
    assert load_job(path, explicit, continue_run=True)[0].resume == explicit  # --resume wins


def test_a_state_the_changed_job_cannot_continue_names_the_ai_toolkit_keys(tmp_path):
    out = tmp_path / "out"
    path = _job_file(tmp_path, _minimal(training_folder=str(out), train__steps=30))
    state = _state_header(out / "run1", 9, load_job(path)[0])
    path = _job_file(tmp_path, _minimal(training_folder=str(out), train__steps=30, train__batch_size=2,
                                        network={"type": "lora", "linear": 8}))
    with pytest.raises(ConfigError) as exc:
        load_job(path, continue_run=True)
    assert str(exc.value) == (
        f"{path}: {P}.training_folder: this job continues from {state} (step 9), as ai-toolkit continues a job "
        "from the newest save in its training folder, but that state cannot go on with these settings: "
        f"{P}.network.linear was 4 in the state, now 8 (the saved LoRA has that shape); {P}.train.batch_size was 1 "
        "in the state, now 2 (the saved data position counts batches) - set them back to continue it, or give "
        "the job another name (config.name) to train from scratch")
    path = _job_file(tmp_path, _minimal(training_folder=str(out), train__steps=5))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {re.escape(P)}\.train\.steps: this job "
                                          rf"continues from {re.escape(str(state))} \(step 9\), .* past the steps "
                                          "this job trains - raise train.steps"):
        load_job(path, continue_run=True)
    assert load_job(path, str(state), continue_run=True)[0].resume == str(state)  # explicit: checked when training


def test_an_ai_toolkit_save_newer_than_the_state_is_the_one_continued(tmp_path):
    """ai-toolkit takes the newest save by time; a pair it wrote after this trainer's state wins over the state."""
    out = tmp_path / "out"
    older = _aitk_lora(out / "run1", "run1", 500)
    path = _job_file(tmp_path, _minimal(training_folder=str(out), train__steps=2000))
    cfg, _ = load_job(path, continue_run=True)
    assert (cfg.lora.init_high, cfg.train.steps, cfg.resume) == (str(older[0]), 1500, None)
    state = _state_header(out / "run1", 20, cfg)  # the run that continued it, 20 steps in
    assert load_job(path, continue_run=True)[0].resume == "latest"
    newer = _aitk_lora(out / "run1", "run1", 750)
    later = state.stat().st_mtime + 10
    for f in newer:
        os.utime(f, (later, later))
    cfg, notes = load_job(path, continue_run=True)
    assert (cfg.lora.init_high, cfg.train.steps, cfg.resume) == (str(newer[0]), 1250, None)
    assert _changed(notes) == [f"{P}.training_folder"]


@pytest.mark.slow
def test_an_interrupted_ai_toolkit_job_run_again_continues_in_its_folder(tmp_path, capsys, caplog):
    clips = make_synthetic_dataset(tmp_path / "clips", n_clips=2, num_frames=5, size=(32, 32), seed=1)
    out = tmp_path / "out"
    job = _minimal(training_folder=str(out), device="cpu", network={"type": "lora", "linear": 4},
                   save={"save_every": 1, "max_step_saves_to_keep": 2},
                   datasets=[{"folder_path": str(clips), "resolution": [32], "num_frames": 5}],
                   train={"steps": 2, "dtype": "fp32", "gradient_checkpointing": False, "lr": 1e-3})
    job["config"]["process"][0]["model"]["name_or_path"] = "tiny"
    path = _job_file(tmp_path, job)
    assert cli_main(["train", str(path)]) == 0
    capsys.readouterr()
    job["config"]["process"][0]["train"]["steps"] = 3  # as if the first run had been stopped at step 2 of 3
    path = _job_file(tmp_path, job)
    with caplog.at_level(logging.INFO):
        assert cli_main(["train", str(path)]) == 0
    pair = [Path(line.split(": ", 1)[1]) for line in capsys.readouterr().out.splitlines() if "-noise LoRA: " in line]
    assert {p.parent for p in pair} == {out / "run1"} and all("_000003_" in p.name for p in pair)
    assert [p.name for p in out.iterdir() if p.name.startswith("run1")] == ["run1"]  # it went on in its folder
    state = out / "run1" / "training_state_000002.safetensors"
    assert json.loads((out / "run1" / "run.json").read_text())["resumed_from"] == [str(state)]
    assert any(r.getMessage().startswith(f"resume: continuing from {state} (step 2)") for r in caplog.records)
    losses = (out / "run1" / "losses.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in losses] == [1, 2, 3]  # steps 1-2 from the first run, 3 from this one


def test_stills_with_videos_in_the_folder_are_named(tmp_path):
    """ai-toolkit (toolkit/data_loader.py): `self.is_video = dataset_config.num_frames > 1 or ...auto_frame_count`;
    `extensions = image_extensions` (.jpg .jpeg .png .webp) unless is_video - videos are not even listed."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    _still(folder / "a.png", 10)
    write_video(folder / "b.mp4", np.zeros((5, 32, 32, 3), np.uint8), 16)
    (folder / ".hidden.mp4").write_bytes(b"")
    _, notes = from_aitoolkit(_minimal(datasets=[{"folder_path": str(folder), "num_frames": 1}]))
    assert _changed(notes) == [f"{P}.datasets[0].num_frames"] and "skips its 1 video file(s)" in notes[0]
    assert from_aitoolkit(_minimal(datasets=[{"folder_path": str(folder), "num_frames": 5}]))[1] == []
    (folder / "b.mp4").unlink()
    assert from_aitoolkit(_minimal(datasets=[{"folder_path": str(folder)}]))[1] == []  # num_frames defaults to 1


def test_adapter_rank_is_read_from_the_file(tmp_path):
    """ai-toolkit (toolkit/util/quantize.py) sizes the adapter from the file: `if "lora_A" in key: linear_dim =
    int(value.shape[0])`."""
    ara = _adapter_file(tmp_path / "wan22_14b_t2i_torchao_uint4.safetensors", rank=32)
    cfg, _ = _map(_minimal(model__quantize=True, model__qtype=f"uint4|{ara}", model__quantize_te=False))
    assert (cfg.quant.ara_source, cfg.quant.ara_rank) == (str(ara), 32)
    check_ara_source(cfg.quant)  # the header check before any model loads agrees
    # This trainer's own jobs: a rank that differs from quant.ara_rank is refused from the header, in one line.
    with pytest.raises(ConfigError) as exc:
        check_ara_source(QuantConfig(transformer="4bit_ara", quantizer="uint4", ara_source=str(ara)))
    assert "has rank 32 but quant.ara_rank is 16 - set quant.ara_rank: 32" in str(exc.value)
    mixed = _adapter_file(tmp_path / "m_torchao_uint4.safetensors", rank=16, ranks={"ffn.0": 8})
    with pytest.raises(ConfigError, match=rf"^{re.escape(P)}\.model\.qtype: .*mixes adapter ranks \[8, 16\]"):
        from_aitoolkit(_minimal(model__quantize=True, model__qtype=f"uint4|{mixed}"))


def test_trigger_placeholder_without_a_trigger_word_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """ai-toolkit deletes [trigger] when there is no trigger word (inject_trigger_into_prompt: `if trigger is None:
    trigger = ''`); here it is refused, when the job is read (default_caption) or the dataset is built (caption
    files) - before any model loads, in one line."""
    with pytest.raises(ConfigError, match=rf"{re.escape(P)}\.datasets\[0\]\.default_caption uses \[trigger\]"):
        from_aitoolkit(_minimal(datasets=[{"folder_path": "a", "default_caption": "[trigger] walks"}]))
    clips = tmp_path / "clips"
    clips.mkdir()
    _still(clips / "a.png", 10)
    (clips / "a.txt").write_text("[trigger] a dark square")
    job = _minimal(training_folder=str(tmp_path / "out"), device="cpu",
                   datasets=[{"folder_path": str(clips), "resolution": 32}])
    job["config"]["process"][0]["model"]["name_or_path"] = "tiny"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the dataset was checked")

    for loader in ("load_components", "load_expert"):
        monkeypatch.setattr(loop, loader, no_model, raising=False)
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: caption file {clips / 'a.txt'} uses [trigger] but no trigger word is set - set the "
                       "job's trigger_word or remove [trigger]")
    assert not any("Traceback" in line for line in err)


# --- audit C: keys ai-toolkit reads differently from how they look ---------------------------------------------


@pytest.mark.parametrize("train", [{}, {"noise_scheduler": "ddpm"}, {"noise_scheduler": "ddpm", "timestep_type": "shift"}])
def test_ddpm_or_no_noise_scheduler_trains_on_wan22s_shift_5_grid(train):
    # BaseSDTrainProcess: a noise_scheduler other than flowmatch calls the Wan 2.2 scheduler's set_timesteps(1000),
    # the shift-5 flow-matching grid (wan22_5b_model.scheduler_config), whatever timestep_type says.
    cfg, notes = _map(_minimal(train=train))
    assert (cfg.train.timestep_type, cfg.train.timestep_shift) == ("shift", 5.0) and notes == []


def test_timestep_type_without_flowmatch_is_named_as_having_no_effect():
    cfg, notes = _map(_minimal(train__timestep_type="sigmoid"))
    assert cfg.train.timestep_type == "shift"
    assert _ignored(notes) == [f"{P}.train.timestep_type"] and "noise_scheduler: flowmatch" in notes[0]


@pytest.mark.parametrize("dotted, value", [
    ("model__model_kwargs__train_high_noise", "false"), ("datasets", [{"folder_path": "clips", "flip_x": "false"}]),
    ("train__gradient_checkpointing", "no"), ("model__quantize", "False"), ("datasets", [{"folder_path": "c", "is_reg": "true"}]),
])
def test_quoted_booleans_are_refused_in_one_line(dotted, value):
    # ai-toolkit tests switches for truth: the text 'false' is true there.
    with pytest.raises(ConfigError) as exc:
        from_aitoolkit(_minimal(**{dotted: value}))
    msg = str(exc.value)
    assert "\n" not in msg and "without quotes" in msg and "as true" in msg


def test_a_list_of_trigger_words_is_refused():
    with pytest.raises(ConfigError, match=r"config\.process\[0\]\.trigger_word is a list"):
        from_aitoolkit(_minimal(trigger_word=["a", "b"]))


@pytest.mark.parametrize("dotted, value, home", [
    ("model__train_low_noise", False, "model.model_kwargs"), ("train__train_low_noise", False, "model.model_kwargs"),
    ("model__gradient_checkpointing", False, "train"), ("train__shrink_video_to_frames", False, "datasets[]"),
    ("lr", 1e-4, "train"), ("steps", 10, "train"), ("train__trigger_word", "sks", "config.process[0]`"),
])
def test_a_key_in_the_wrong_section_says_where_it_belongs(dotted, value, home):
    # ai-toolkit reads each key in its own section only; elsewhere it is ignored, whatever its value.
    with pytest.raises(ConfigError) as exc:
        from_aitoolkit(_minimal(**{dotted: value}))
    assert "move it under" in str(exc.value) and home in str(exc.value)


def test_a_misplaced_key_also_given_in_its_section_is_named():
    _, notes = from_aitoolkit(_minimal(train__lr=1e-4, lr=0))
    assert _ignored(notes) == [f"{P}.lr"] and "`config.process[0].train`" in notes[0]


def test_sample_typos_are_caught_without_prompts():
    with pytest.raises(ConfigError, match="did you mean 'prompts'"):
        from_aitoolkit(_minimal(sample={"prompt": ["a cat"], "sample_every": 10}))


def test_pretrained_lora_path_loads_both_experts_of_the_pair(tmp_path):
    high, low = tmp_path / "x_high_noise.safetensors", tmp_path / "x_low_noise.safetensors"
    for f in (high, low):
        f.write_bytes(b"")
    job, _ = from_aitoolkit(_minimal(network__pretrained_lora_path=str(low)))
    assert (job["lora"]["init_high"], job["lora"]["init_low"]) == (str(high), str(low))
    with pytest.raises(ConfigError, match="does not exist"):
        from_aitoolkit(_minimal(network__pretrained_lora_path=str(tmp_path / "y_high_noise.safetensors")))


@pytest.mark.parametrize("key", ["only_if_contains", "ignore_if_contains"])
def test_layer_filters_are_refused_not_dropped(key):
    with pytest.raises(ConfigError, match=f"network_kwargs.{key} is not supported"):
        from_aitoolkit(_minimal(network__network_kwargs={key: ["attn1"]}))


def test_ema_config_must_be_a_mapping():
    with pytest.raises(ConfigError, match="ema_config is True, not a mapping"):
        from_aitoolkit(_minimal(train__ema_config=True))


def test_dataset_path_is_the_folder_as_in_ai_toolkit():
    job, notes = from_aitoolkit(_minimal(datasets=[{"dataset_path": "clips"}]))
    assert job["datasets"][0]["folder"] == "clips" and notes == []


def test_a_list_folder_path_is_refused():
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.folder_path is a list"):
        from_aitoolkit(_minimal(datasets=[{"folder_path": ["a", "b"]}]))


def test_job_shape_errors():
    data = _minimal()
    del data["job"]
    assert is_aitoolkit_config(data)
    with pytest.raises(ConfigError, match="job: extension"):
        from_aitoolkit(data)
    data = _minimal()
    data["config"]["name"] = 123
    with pytest.raises(ConfigError, match="not text"):
        from_aitoolkit(data)
    data = _minimal()
    data["config"]["process"][0]["netwrok"] = data["config"]["process"][0].pop("network")
    with pytest.raises(ConfigError, match="did you mean 'network'"):
        from_aitoolkit(data)


@pytest.mark.parametrize("over", [
    {"train__max_denoising_steps": 999},
    {"datasets": [{"folder_path": "clips", "keep_tokens": 2}]},
    {"datasets": [{"folder_path": "clips", "token_dropout_rate": 0.2, "cache_text_embeddings": True}]},
    {"datasets": [{"folder_path": "clips", "token_dropout_rate": 0.2}], "train__cache_text_embeddings": True},
])
def test_values_without_effect_in_ai_toolkit_get_no_warning(over):
    _, notes = from_aitoolkit(_minimal(**over))
    assert notes == []


def test_tilde_in_training_folder_is_expanded():
    job, _ = from_aitoolkit(_minimal(training_folder="~/runs"))
    assert job["save"]["output_dir"] == os.path.expanduser("~/runs")


# --- audit C leftovers: later errors in the file's own keys, ai-toolkit's defaults, config-level keys -----------


def _check_errors(tmp_path: Path, data: dict, capsys) -> list[str]:
    """The ``error:`` lines of ``check`` on the job ``data`` (no decoding; a tiny model where none is given)."""
    path = _job_file(tmp_path, data)
    assert cli_main(["check", "--no-decode", str(path)]) == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


def _tiny(tmp_path: Path | None = None, **over):
    """:func:`_minimal` on the tiny preset, on the CPU, writing under ``tmp_path``."""
    data = _minimal(**{"training_folder": str(tmp_path or "out"), "device": "cpu", **over})
    data["config"]["process"][0]["model"]["name_or_path"] = "tiny"
    return data


def test_check_names_a_missing_folder_by_the_files_key(tmp_path, capsys):
    errors = _check_errors(tmp_path, _tiny(tmp_path / "out", datasets=[{"dataset_path": str(tmp_path / "nope")}]), capsys)
    assert errors == [f"error: {P}.datasets[0].dataset_path: {tmp_path / 'nope'} does not exist - check the path"]


def test_a_device_error_names_the_process_device_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    clips = make_synthetic_dataset(tmp_path / "clips", n_clips=1, num_frames=5, size=(32, 32), seed=1)
    data = _tiny(tmp_path / "out", device="cuda:1", datasets=[{"folder_path": str(clips), "resolution": [32], "num_frames": 5}])
    errors = _check_errors(tmp_path, data, capsys)
    assert errors and all(f"{P}.device is 'cuda:1'" in e and "train.device" not in e for e in errors)


def test_train_names_the_files_keys_in_a_later_error(tmp_path, capsys):
    path = _job_file(tmp_path, _tiny(tmp_path / "out", datasets=[{"folder_path": str(tmp_path / "nope")}]))
    assert cli_main(["train", str(path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {P}.datasets[0].folder_path: {tmp_path / 'nope'} does not exist - check the path")


def test_layer_offloading_percent_counts_the_models_own_blocks():
    # ai-toolkit offloads that share of the model's layers: the tiny preset has 2 blocks, not Wan 2.2's 40.
    cfg, _ = _map(_tiny(model__layer_offloading=True, model__layer_offloading_transformer_percent=0.5))
    assert cfg.memory.offload_blocks == TINY_TRANSFORMER_CONFIG["num_layers"] // 2
    cfg, _ = _map(_minimal(model__layer_offloading=True, model__layer_offloading_transformer_percent=0.5))
    assert cfg.memory.offload_blocks == 20


def test_later_messages_are_translated_in_one_place():
    from trainer_core.aitoolkit import aitoolkit_terms

    terms = aitoolkit_terms(_minimal(model__layer_offloading=True, train__steps=5))
    assert terms("memory.offload_blocks is 20 but the experts have 2 blocks") == (
        f"{P}.model.layer_offloading_transformer_percent (as a block count) is 20 but the experts have 2 blocks")
    # a key path already in the file's terms is left as it is; so is a setting no key gives
    assert terms(f"{P}.train.steps and train.steps, 'lora.rank'.") == (
        f"{P}.train.steps and {P}.train.steps, '{P}.network.linear'.")
    assert terms("advanced.dop is on") == "advanced.dop is on"


@pytest.mark.parametrize("datasets", [[], None])
def test_no_dataset_is_one_line_naming_the_key(tmp_path, capsys, datasets):
    data = _tiny(tmp_path / "out")
    data["config"]["process"][0]["datasets"] = datasets
    errors = _check_errors(tmp_path, data, capsys)
    assert len(errors) == 1 and f"{P}.datasets is missing or empty" in errors[0]


@pytest.mark.parametrize("dotted, value, said", [
    ("train__switch_boundary_every", 0, "use e.g. 1 (ai-toolkit's default)"),
    ("train__steps", -5, "use e.g. ai-toolkit's default 1000"),
    ("network__linear", 4.5, "such as ai-toolkit's default 4"),
    ("save__max_step_saves_to_keep", -1, "use e.g. ai-toolkit's default 5"),
    ("datasets", [{"folder_path": "clips", "caption_dropout_rate": 2.0}], "use e.g. ai-toolkit's default 0.0"),
    ("datasets", [{"folder_path": "clips", "num_frames": True}], "such as ai-toolkit's default 1"),
    ("train__steps", float("inf"), "(ai-toolkit's default is 1000)"),
])
def test_refusals_quote_ai_toolkits_defaults(dotted, value, said):
    # toolkit/config_modules.py: switch_boundary_every 1, steps 1000, linear 4, max_step_saves_to_keep 5,
    # caption_dropout_rate 0.0, DatasetConfig num_frames 1
    with pytest.raises(ConfigError) as exc:
        job_from_aitoolkit(_minimal(**{dotted: value}), "job.yaml")
    assert said in str(exc.value) and "(the default)" not in str(exc.value)


@pytest.mark.parametrize("key, value, home", [
    ("train", {"steps": 5}, "`config.process[0]`"), ("datasets", [{"folder_path": "x"}], "`config.process[0]`"),
    ("steps", 5, "`config.process[0].train`"),
])
def test_a_key_directly_under_config_says_where_it_belongs(key, value, home):
    data = _minimal()
    data["config"]["process"][0].pop("datasets")
    data["config"][key] = value
    with pytest.raises(ConfigError) as exc:
        from_aitoolkit(data)
    assert str(exc.value).startswith(f"config.{key} is in the wrong section") and f"move it under {home}" in str(exc.value)


def test_a_key_under_config_also_given_in_the_process_is_named():
    data = _minimal()
    data["config"]["datasets"] = [{"folder_path": "x"}]
    _, notes = from_aitoolkit(data)
    assert _ignored(notes) == ["config.datasets"] and "given there too" in notes[0]


def test_the_trigger_is_not_prepended_where_it_occurs_inside_a_word(tmp_path):
    """toolkit/prompt_utils.py inject_trigger_into_prompt: `num_instances = output_prompt.count(replace_with)`;
    `if num_instances == 0 and add_if_not_present: output_prompt = replace_with + " " + output_prompt` - the
    trigger anywhere in the caption, even inside a longer word, keeps it from being prepended. This trainer's own
    default stays the whole-word rule; the captions differ, so the text cache (keyed on them) sees it."""
    clips = tmp_path / "clips"
    clips.mkdir()
    for name, caption, value in (("a", "sqzy dog runs", 40), ("b", "a dog runs", 60)):
        _still(clips / f"{name}.png", value)
        (clips / f"{name}.txt").write_text(caption)
    cfg, _ = _map(_minimal(trigger_word="sqz", datasets=[{"folder_path": str(clips), "resolution": 32}]))
    assert cfg.datasets[0].trigger_match == "substring"
    assert build_dataset(cfg.datasets, "sqz", 0).captions() == {"sqzy dog runs", "sqz a dog runs"}
    own = cfg.datasets[0].model_copy(update={"trigger_match": "word"})
    assert build_dataset([own], "sqz", 0).captions() == {"sqz sqzy dog runs", "sqz a dog runs"}


def test_ai_toolkits_pair_is_found_where_a_process_name_differs_from_the_jobs(tmp_path):
    """ai-toolkit: BaseTrainProcess `self.save_root = os.path.join(self.training_folder, self.name)` (the process's
    name, else the job's: BaseProcess `self.get_conf('name', self.job.name)`); BaseSDTrainProcess.save
    `filename = f'{self.job.name}{step_num}.safetensors'` and get_latest_save_path `name = self.job.name`."""
    out = tmp_path / "out"
    theirs = _aitk_lora(out / "procname", "base_lora", 2)
    _aitk_lora(out / "procname", "procname", 3)  # not this job's files: ai-toolkit looks for base_lora*
    data = _minimal(training_folder=str(out), name="procname", train__steps=10)
    data["config"]["name"] = "base_lora"
    job, notes = from_aitoolkit(data)
    assert (job["lora"]["init_high"], job["lora"]["init_low"]) == tuple(map(str, theirs))
    assert job["train"]["steps"] == 8 and job["name"] == "procname"
    assert _changed(notes) == [f"{P}.name", f"{P}.training_folder"]
    assert "LoRA files after config.name (base_lora_<step>_high_noise.safetensors)" in notes[-1]
