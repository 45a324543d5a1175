"""ai-toolkit Wan 2.2 job files: detection, value-by-value mapping, warnings for ignored keys, refused values.

Expected values come from ai-toolkit's source (ostris/ai-toolkit, commit 27a03a91): the example
config/examples/train_lora_wan22_14b_24gb.yaml, the UI's default job, and the defaults/semantics in
toolkit/config_modules.py (SampleConfig, SampleItem, GenerateImageConfig._process_prompt_string, ModelConfig,
TrainConfig, EMAConfig), toolkit/optimizer.py, toolkit/scheduler.py, toolkit/models/wan21/wan21.py,
extensions_built_in/diffusion_models/wan22 (wan22_14b_model.py, wan22_pipeline.py), toolkit/dataloader_mixins.py,
extensions_built_in/sd_trainer/SDTrainer.py and jobs/process/BaseSDTrainProcess.py.
"""

import copy
import re
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
    assert ds.frame_sampling == "uniform"  # shrink_video_to_frames defaults to on
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
    assert cfg.train.timestep_type == "sigmoid" and cfg.train.timestep_bias == "balanced"
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
    assert (cfg.quant.transformer, cfg.quant.text_encoder) == ("float8", "float8") and notes == []
    cfg, _ = _map(_minimal(model__quantize=True, model__qtype=qtype, model__quantize_te=False))
    assert (cfg.quant.transformer, cfg.quant.text_encoder) == ("float8", "bf16")


def test_uint4_with_a_local_adapter_file(tmp_path):
    ara = tmp_path / "wan22_14b_t2i_torchao_uint4.safetensors"
    ara.write_bytes(b"")
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
    cfg, notes = _map(_minimal(trigger_word="sqz", train__unload_text_encoder=True, datasets=datasets))
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
    _, notes = from_aitoolkit(_minimal(trigger_word="sqz", datasets=datasets))
    assert _changed(notes) == [f"{P}.datasets[0].caption_dropout_rate"]
    _, notes = from_aitoolkit(_minimal(datasets=datasets))
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
