"""ai-toolkit Wan 2.2 job files: detection, value-by-value mapping, warnings for ignored keys, refused values.

Expected values come from ai-toolkit's source (ostris/ai-toolkit, commit 27a03a91): the example
config/examples/train_lora_wan22_14b_24gb.yaml, the UI's default job, and the defaults/semantics in
toolkit/config_modules.py, toolkit/optimizer.py, toolkit/scheduler.py, toolkit/models/wan21/wan21.py and
jobs/process/BaseSDTrainProcess.py.
"""

import copy
from pathlib import Path

import pytest

from trainer_core.aitoolkit import from_aitoolkit, is_aitoolkit_config
from trainer_core.cli import demo_config, load_job
from trainer_core.config import job_from_dict, load_yaml
from trainer_core.errors import ConfigError

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


def _ignored(notes):
    """The dotted key paths named by the warnings (text before ' is ignored: ')."""
    assert all(" is ignored: " in n for n in notes), notes
    return sorted(n.split(" is ignored: ")[0] for n in notes)


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
    assert cfg.lora.rank == 32 and cfg.lora.alpha == 32.0
    assert cfg.save.dtype == "fp16" and cfg.save.save_every == 250 and cfg.save.keep_last == 4
    assert cfg.train.batch_size == 1 and cfg.train.steps == 2000 and cfg.train.gradient_accumulation == 1
    assert cfg.train.gradient_checkpointing is True
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
    assert ds.frame_sampling == "uniform"  # shrink_video_to_frames defaults to on
    assert (ds.flip_x, ds.flip_y, ds.is_regularization, ds.repeats) == (False, False, False, 1)
    assert ds.cache_latents is False and ds.prepend_trigger is False
    assert _ignored(notes) == sorted(
        [
            f"{P}.model.quantize",
            f"{P}.model.qtype",
            f"{P}.model.quantize_te",
            f"{P}.model.qtype_te",
            f"{P}.model.low_vram",
            f"{P}.train.cache_text_embeddings",
            f"{P}.sample",
            "meta",
        ]
    )
    sample_note = next(n for n in notes if n.startswith(f"{P}.sample "))
    assert "sampling" in sample_note and "not supported" in sample_note


def test_ui_job_maps_and_stays_quiet_about_settings_that_ask_for_nothing():
    cfg, notes = _map(load_yaml(UI_JOB))
    assert cfg.name == "my_first_lora_v1" and cfg.trigger_word == "sqz"
    assert cfg.save.output_dir == "/data/ai-toolkit/output" and cfg.save.dtype == "bf16"
    assert cfg.train.device == "cuda" and cfg.train.steps == 3000 and cfg.train.log_every == 1
    assert cfg.multistage.switch_every == 1
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    [ds] = cfg.datasets
    assert ds.num_frames == 33 and ds.fps == 16.0 and ds.resolutions == [512]
    assert ds.default_caption == "" and ds.prepend_trigger is True
    # conv/LoKr/save_format/bypass_guidance_embedding have no effect on a Wan LoRA in ai-toolkit; the DOP class and
    # multiplier, ema_decay and mask_min_value only matter while their (off) switch is on; the rest are off/empty.
    assert _ignored(notes) == sorted(
        [
            f"{P}.model.quantize",
            f"{P}.model.qtype",
            f"{P}.model.quantize_te",
            f"{P}.model.qtype_te",
            f"{P}.model.low_vram",
            f"{P}.logging.use_ui_logger",
            f"{P}.sqlite_db_path",
            f"{P}.performance_log_every",
            f"{P}.sample",
            "meta",
        ]
    )


def test_absent_settings_take_ai_toolkit_defaults():
    cfg, notes = _map(_minimal())
    assert notes == []
    assert cfg.lora.rank == 4 and cfg.lora.alpha == 1.0  # NetworkConfig: linear 4, alpha 1.0
    assert cfg.multistage.switch_every == 1 and cfg.multistage.stages == ["high", "low"]
    assert cfg.train.timestep_type == "sigmoid" and cfg.train.timestep_bias == "balanced"
    assert cfg.train.steps == 1000 and cfg.train.batch_size == 1 and cfg.train.gradient_checkpointing is True
    assert cfg.train.compute_dtype == "fp32" and cfg.model.dtype == "fp32"
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 1e-6
    assert cfg.optimizer.weight_decay == 0.01  # torch.optim.AdamW's default; ai-toolkit passes none
    assert cfg.save.dtype == "fp16" and cfg.save.save_every == 1000 and cfg.save.keep_last == 5
    [ds] = cfg.datasets
    assert ds.caption_ext == "txt" and ds.caption_dropout == 0.0
    assert ds.num_frames == 1 and ds.resolutions == [512]


def test_network_alpha_and_rank_precedence():
    cfg, _ = _map(_minimal(network={"type": "lora", "linear": 16}))
    assert cfg.lora.rank == 16 and cfg.lora.alpha == 1.0  # linear_alpha falls back to alpha's default, 1.0
    cfg, _ = _map(_minimal(network={"type": "lora", "rank": 8, "linear": 16, "alpha": 4, "dropout": 0.1}))
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 4.0 and cfg.lora.dropout == 0.1


@pytest.mark.parametrize(
    "content_or_style, bias", [("balanced", "balanced"), ("content", "high_noise"), ("style", "low_noise")]
)
def test_timestep_bias_follows_ai_toolkit_ui_labels(content_or_style, bias):
    cfg, _ = _map(_minimal(train__content_or_style=content_or_style))
    assert cfg.train.timestep_bias == bias


@pytest.mark.parametrize("ttype", ["shift", "flux_shift", "lumina2_shift"])
def test_shift_timesteps_use_wan_training_shift(ttype):
    cfg, _ = _map(_minimal(train__timestep_type=ttype))
    assert cfg.train.timestep_type == "shift" and cfg.train.timestep_shift == 3.0


@pytest.mark.parametrize("ttype", ["linear", "sigmoid", "weighted"])
def test_direct_timestep_types(ttype):
    cfg, _ = _map(_minimal(train__timestep_type=ttype))
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
    assert notes == []


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
        ({"train__timestep_type": "lognorm_blend"}, [f"{P}.train.timestep_type", "'lognorm_blend'", "'linear'"]),
        ({"train__timestep_type": "next_sample"}, [f"{P}.train.timestep_type", "'next_sample'"]),
        ({"train__timestep_type": "one_step"}, [f"{P}.train.timestep_type", "'one_step'"]),
        ({"train__content_or_style": "high_noise"}, [f"{P}.train.content_or_style", "'content'", "'style'"]),
        ({"train__lr_scheduler": "cosine_with_restarts"}, [f"{P}.train.lr_scheduler", "'cosine_with_restarts'"]),
        ({"train__lr_scheduler": "linear"}, [f"{P}.train.lr_scheduler", "0.333333*lr to 1*lr"]),
        ({"train__noise_scheduler": "ddpm"}, [f"{P}.train.noise_scheduler", "'ddpm'"]),
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
    "over, needle",
    [
        ({"datasets__0__num_frames": 32}, "datasets.0.num_frames"),
        ({"datasets__0__resolution": 500}, "datasets.0.resolutions"),
        ({"train__switch_boundary_every": 0}, "multistage.switch_every"),
        ({"model__model_kwargs": {"train_high_noise": False, "train_low_noise": False}}, "both off"),
        ({"network": {"type": "lora", "linear": 0}}, "lora.rank"),
    ],
)
def test_values_our_config_refuses_surface_as_config_error(over, needle):
    mapped, _ = from_aitoolkit(_minimal(**over))
    with pytest.raises(ConfigError, match=needle):
        job_from_dict(mapped)


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
    assert main.frame_sampling == "fps" and main.fps == 24.0 and main.window_start == "random"
    assert main.flip_x is True and main.repeats == 3 and main.cache_latents is True
    assert main.prepend_trigger is True and main.is_regularization is False
    # ai-toolkit does not add the trigger word to regularization captions.
    assert reg.is_regularization is True and reg.prepend_trigger is False
    assert reg.frame_sampling == "uniform" and reg.fps == 12.0
    assert notes == []


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


def test_dependent_settings_warn_only_while_their_switch_is_on():
    off = {
        "model__quantize": False,
        "model__qtype": "qfloat8",
        "train__diff_output_preservation": False,
        "train__diff_output_preservation_class": "person",
        "train__ema_config": {"use_ema": False, "ema_decay": 0.99},
    }
    assert from_aitoolkit(_minimal(**off))[1] == []
    on = {**off, "model__quantize": True, "train__diff_output_preservation": True, "train__ema_config": {"use_ema": True}}
    assert _ignored(from_aitoolkit(_minimal(**on))[1]) == sorted(
        [
            f"{P}.model.quantize",
            f"{P}.model.qtype",
            f"{P}.train.diff_output_preservation",
            f"{P}.train.diff_output_preservation_class",
            f"{P}.train.ema_config",
        ]
    )
    # ai-toolkit's quantize_te defaults to quantize, so qtype_te matters once quantize is on.
    _, notes = from_aitoolkit(_minimal(model__quantize=True, model__qtype_te="qfloat8"))
    assert _ignored(notes) == sorted([f"{P}.model.quantize", f"{P}.model.qtype_te"])


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
    assert len(notes) == 8
