"""Issue #15, found by a sweep of bad inputs against the CLI: each case below was a traceback, a late failure, a
silent wrong result or a message that did not say what to do, and is now one line before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from trainer_core.aitoolkit import from_aitoolkit
from trainer_core.cli import load_job, main
from trainer_core.config import JobConfig, ModelConfig, job_from_dict, job_warnings, load_yaml
from trainer_core.data import build_dataset, make_synthetic_dataset
from trainer_core.errors import ConfigError, DatasetError, ModelLoadError
from trainer_core.models import check_model_files, load_components, loading


def _job(**sections) -> dict:
    job = {"model": {"source": "tiny"}, "datasets": [{"folder": "clips"}]}
    for key, value in sections.items():
        section, _, field = key.partition("__")
        if field:
            job.setdefault(section, {})[field] = value
        else:
            job[section] = value
    return job


def _refused(**sections) -> str:
    with pytest.raises(ConfigError) as exc:
        job_from_dict(_job(**sections), source="job.yaml")
    return str(exc.value)


def _lora_file(path: Path) -> Path:
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 32),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(32, 4)}, str(path))
    return path


# ------------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("key", ["lora__rank", "memory__offload_blocks", "optimizer__lr", "train__steps"])
def test_true_or_false_is_not_a_number(key):
    # YAML reads yes/no/on/off as booleans, which pydantic took as 1/0: `rank: yes` trained a rank-1 LoRA
    msg = _refused(**{key: True})
    assert f"'{key.replace('__', '.')}'" in msg and "not true/false" in msg and "write a number" in msg


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda1", "tpu"])
def test_a_device_torch_cannot_parse_is_refused_by_name(device):
    # was a RuntimeError traceback from torch.device() once training started
    msg = _refused(train__device=device)
    assert "'train.device'" in msg and "'cuda:N'" in msg and "use 'auto'" in msg


def test_device_spelling_is_normalized():
    assert job_from_dict(_job(train__device=" CUDA:1 ")).train.device == "cuda:1"


@pytest.mark.parametrize("seed", [-1, 2**70])
def test_a_seed_numpy_or_torch_cannot_take_is_refused(seed):
    # was a ValueError / RuntimeError traceback when the first expert was set up, after the dataset scan
    msg = _refused(train__seed=seed)
    assert "'train.seed'" in msg and "use e.g. the default 42" in msg


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("lora__rank", 100000, "at most 1024"),  # was killed by the OOM killer after two minutes
        ("train__batch_size", 10**9, "<= 1024"),  # trained silently with batches of the 4 clips there were
        ("sample__width", 100000, "at most 2048"),
        ("sample__num_frames", 100001, "at most 257"),
    ],
)
def test_sizes_no_machine_can_hold_are_refused(key, value, needle):
    msg = _refused(**{key: value})
    assert f"'{key.replace('__', '.')}'" in msg and needle in msg


@pytest.mark.parametrize("field, value, needle", [("num_frames", 100001, "at most 257"),
                                                  ("resolutions", [100000], "at most 2048")])
def test_dataset_sizes_no_machine_can_hold_are_refused(field, value, needle):
    # num_frames 100001 ran past 5 minutes; resolution 100000 failed after the VRAM plan blaming a good clip
    msg = _refused(datasets=[{"folder": "clips", field: value}])
    assert f"'datasets.0.{field}'" in msg and needle in msg and "use" in msg


def test_a_single_resolution_is_a_list_of_one():
    assert job_from_dict(_job(datasets=[{"folder": "clips", "resolutions": 512}])).datasets[0].resolutions == [512]


def test_a_blank_trigger_word_is_no_trigger_word():
    # '   ' was stored in the LoRA metadata while captions and DOP treated it as none
    assert job_from_dict(_job(trigger_word="   ")).trigger_word is None
    assert job_from_dict(_job(trigger_word=" sqz ")).trigger_word == "sqz"


def test_name_says_how_to_fix_it():
    assert "rename it, e.g. my_lora" in _refused(name="a/b")
    msg = _refused(name="n" * 300)  # was "save.output_dir: cannot create ... (File name too long)"
    assert "'name'" in msg and "shorten it to at most 100" in msg and "..." in msg  # the value is cut


@pytest.mark.parametrize("given", ["LATEST", "latest ", " Latest"])
def test_resume_latest_in_any_case_or_with_spaces_is_the_keyword(given):
    # was "resume: LATEST does not exist"
    assert job_from_dict(_job(resume=given)).resume == "latest"
    cfg = job_from_dict(_job())
    cfg.resume = given  # the CLI's --resume
    assert cfg.resume == "latest"
    cfg.resume = "  "
    assert cfg.resume is None


@pytest.mark.parametrize(
    "sections, needles",
    [
        ({"train": [1, 2]}, ["'train' must be a section of settings", "write its settings under it"]),
        ({"sample": None}, ["'sample' must be a section", "remove the line to use the defaults"]),
        ({"name": 2024}, ["'name' must be a text, got the number 2024", "write it in quotes ('2024')"]),
        ({"train__steps": "many"}, ["'train.steps' must be a whole number", "such as the default 2000"]),
        ({"train__steps": 0}, ["'train.steps' must be >= 1, got 0", "use e.g. the default 2000"]),
        ({"optimizer__betas": 0.9}, ["'optimizer.betas' must be a list", "write it as a list"]),
        ({"lora__rank": 0}, ["'lora.rank'", "use 16 or 32"]),
    ],
)
def test_a_value_of_the_wrong_kind_says_what_to_write(sections, needles):
    msg = _refused(**sections)
    for needle in needles:
        assert needle in msg
    assert "Input should be" not in msg and "\n" not in msg


def test_a_missing_required_section_says_what_to_add():
    data = _job()
    del data["model"]
    with pytest.raises(ConfigError) as exc:
        job_from_dict(data, source="job.yaml")
    assert "required setting 'model' is missing - add it" in str(exc.value) and "source: tiny" in str(exc.value)
    with pytest.raises(ConfigError, match=r"'datasets.0.folder' is missing - add it: the folder of clips"):
        job_from_dict(_job(datasets=[{}]))


# ------------------------------------------------------------------------------------------------ the job file


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    # PyYAML keeps the last value: the run trained 5000 steps where the file said 2 a few lines up
    path = tmp_path / "job.yaml"
    path.write_text("model: {source: tiny}\ntrain:\n  steps: 2\n  seed: 1\n  steps: 5000\n")
    with pytest.raises(ConfigError) as exc:
        load_yaml(path)
    msg = str(exc.value)
    assert "'steps' is given twice at line 5" in msg and "first on line 3" in msg and "keep one of them" in msg
    path.write_text("base: &b {steps: 2}\ntrain:\n  <<: *b\n  steps: 3\n")  # a merge key may be overridden
    assert load_yaml(path)["train"] == {"steps": 3}


def test_a_list_at_the_top_level_says_what_to_write():
    with pytest.raises(ConfigError, match=r"got list - write the job as 'key: value' lines"):
        job_from_dict([_job()], source="job.yaml")  # type: ignore[arg-type]


def test_cli_refuses_a_bad_device_in_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    import trainer_core.train.loop as loop

    monkeypatch.setattr(loop, "run_training", lambda *a, **k: pytest.fail("training started"))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(train__device="gpu")))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and "'train.device'" in err


# ------------------------------------------------------------------------------------------------ warnings


def test_an_expert_that_gets_no_step_is_named():
    # 2 steps with switch_every 10: the low-noise LoRA was saved untrained and printed as a result
    cfg = job_from_dict(_job(train__steps=2, multistage__switch_every=10))
    [note] = job_warnings(cfg)
    assert "low-noise expert gets no step" in note and "multistage.train_low_noise: false" in note
    assert "its LoRA is saved untrained" in note
    # with a starting LoRA (e.g. an ai-toolkit pair resumed) it is saved as it started, not untrained
    cfg.lora.init_low = "/runs/x_000000500_low_noise.safetensors"
    assert "its LoRA is saved as it starts (lora.init_low: /runs/x_000000500_low_noise.safetensors)" in (
        job_warnings(cfg)[0])
    assert job_warnings(job_from_dict(_job(train__steps=2, multistage__switch_every=1))) == []
    one = job_from_dict(_job(train__steps=2, multistage={"switch_every": 10, "train_low_noise": False}))
    assert job_warnings(one) == []


def test_a_warmup_longer_than_an_experts_steps_is_named():
    cfg = job_from_dict(_job(train__steps=20, multistage__switch_every=1, optimizer__warmup_steps=10))
    notes = job_warnings(cfg)
    assert len(notes) == 2 and all("optimizer.warmup_steps (10) is not below the 10 step(s)" in n for n in notes)


def test_a_timestep_shift_its_timestep_type_does_not_use_is_named():
    cfg = job_from_dict(_job(train__steps=20, multistage__switch_every=1, train__timestep_shift=8.0))
    assert job_warnings(cfg) == [
        "train.timestep_shift is 8 but only timestep_type: shift uses it, and it is linear - set timestep_type to "
        "shift, or leave timestep_shift at 5"]
    cfg.train.timestep_type = "shift"
    assert job_warnings(cfg) == []


def test_a_setting_another_one_switches_off_is_named_once_changed():
    """A value changed from its default has no effect: almost surely the user meant to switch its owner on."""
    off = job_from_dict(_job(
        train__steps=20, multistage={"switch_every": 3, "train_high_noise": False},
        advanced={"ema_decay": 0.9, "dop_class": "woman", "diff_guidance_scale": 5.0},
        quant={"transformer": "float8", "ara_rank": 8},
        datasets=[{"folder": "clips", "trigger_separator": " ", "window_start": "start", "fps": 24}],
        sample={"steps": 3},  # no preview renders: kept for `trainer_core sample`, so not named
    ))
    assert job_warnings(off) == [
        "advanced.dop_class is 'woman' but only advanced.dop: true uses it, and dop is off - turn on advanced.dop, "
        "or leave dop_class at 'person'",
        "advanced.diff_guidance_scale is 5 but only advanced.diff_guidance: true uses it, and diff_guidance is off - "
        "turn on advanced.diff_guidance, or leave diff_guidance_scale at 3",
        "advanced.ema_decay is 0.9 but only advanced.ema: true uses it, and ema is off - turn on advanced.ema, or "
        "leave ema_decay at 0.99",
        "quant.ara_rank is 8 but only 4-bit experts use it, and quant.transformer is float8 - set quant.transformer "
        "to 4bit_ara, or leave ara_rank at 16",
        "multistage.switch_every is 3 but only the low-noise expert trains, so there is nothing to switch - train "
        "both experts, or leave switch_every at 10",
        "datasets[0].trigger_separator is ' ' but only prepend_trigger: true uses it, and it is off - turn on "
        "datasets[0].prepend_trigger, or leave trigger_separator at ', '",
        "datasets[0].window_start is 'start' but frame_sampling uniform spreads the frames over the whole clip (there "
        "is no window) - set datasets[0].frame_sampling to fps, or leave window_start at 'random'",
    ]
    on = job_from_dict(_job(
        train__steps=20, multistage={"switch_every": 3},
        advanced={"ema": True, "ema_decay": 0.9, "dop": True, "dop_class": "woman", "diff_guidance": True,
                  "diff_guidance_scale": 5.0},
        trigger_word="sqz", quant={"transformer": "4bit_ara", "ara_rank": 8},
        datasets=[{"folder": "clips", "prepend_trigger": True, "trigger_separator": " ", "frame_sampling": "fps",
                   "window_start": "start", "fps": 24}],
    ))
    assert job_warnings(on) == []


def test_dropping_every_caption_is_named():
    both = [{"folder": "clips", "caption_dropout": 0.1}, {"folder": "more", "caption_dropout": 1.0}]
    cfg = job_from_dict(_job(train__steps=20, multistage__switch_every=1, datasets=both))
    assert job_warnings(cfg) == [
        "datasets[1].caption_dropout is 1: every caption of more is dropped, so the LoRA learns that data without "
        "its text (a trigger word or prompt will not call it up) - lower caption_dropout (about 0.05 keeps prompts "
        "without the trigger working)"]
    cfg.datasets[1].caption_dropout = 0.5
    assert job_warnings(cfg) == []


def test_cli_prints_the_warnings(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(train__steps=2)))  # switch_every 10 by default
    _, notes = load_job(path)
    assert any("low-noise expert gets no step" in n for n in notes)


# ------------------------------------------------------------------------------------------------ datasets


def test_a_file_given_as_dataset_folder_says_which_folder_to_give(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    cfg = JobConfig.model_validate(_job(datasets=[{"folder": str(clip)}]))
    with pytest.raises(DatasetError, match=r"is a file, not a folder .* - give the folder that holds"):
        build_dataset(cfg.datasets, None, 0)


def test_the_same_dataset_twice_is_named(tmp_path):
    clips = make_synthetic_dataset(tmp_path / "clips", n_clips=2, num_frames=5, size=(32, 32), seed=0)
    entry = {"folder": str(clips), "num_frames": 5, "resolutions": [32]}
    cfg = JobConfig.model_validate(_job(datasets=[entry, {**entry, "folder": str(clips) + "/."}]))
    warnings = build_dataset(cfg.datasets, None, 0).warnings
    assert any("datasets[1] repeats datasets[0]" in w and "repeats or weight" in w for w in warnings)
    other = JobConfig.model_validate(_job(datasets=[entry, {**entry, "num_frames": 1}]))  # another sampling
    assert not any("repeats datasets" in w for w in build_dataset(other.datasets, None, 0).warnings)


# ------------------------------------------------------------------------------------------------ model files


@pytest.mark.parametrize("setting", ["text_encoder", "vae", "low_noise"])
def test_a_bad_file_is_refused_before_any_weight_loads(tmp_path, monkeypatch, setting):
    # a wrong text-encoder path failed only after both 14B experts had loaded (minutes)
    monkeypatch.setattr(loading, "_expert", lambda *a, **k: pytest.fail("an expert loaded before the check"))
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ModelLoadError) as exc:
        load_components(ModelConfig(source="tiny", **{setting: str(missing)}))
    assert f"model.{setting}" in str(exc.value) and str(missing) in str(exc.value)


def test_check_model_files_reads_headers_only(tmp_path):
    lora = _lora_file(tmp_path / "my_lora.safetensors")
    for setting, what in (("high_noise", "Wan 2.2 T2V transformer"), ("vae", "Wan 2.1 VAE"),
                          ("text_encoder", "UMT5 text encoder")):
        with pytest.raises(ModelLoadError) as exc:
            check_model_files(ModelConfig(source="tiny", **{setting: str(lora)}))
        assert f"model.{setting}" in str(exc.value) and what in str(exc.value)
    with pytest.raises(ModelLoadError, match="is a folder, not a file"):
        check_model_files(ModelConfig(source="tiny", high_noise=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="model.tokenizer: .* does not exist"):
        check_model_files(ModelConfig(source="tiny", tokenizer=str(tmp_path / "tok")))
    with pytest.raises(ModelLoadError, match="has no transformer_2/ subfolder"):
        check_model_files(ModelConfig(source=str(tmp_path)), high=False, vae=False, text_encoder=False)
    check_model_files(ModelConfig(source="tiny", low_noise=str(tmp_path / "unused.safetensors")), low=False)


# ------------------------------------------------------------------------------------------------ ai-toolkit files


def _ai(**process_over) -> dict:
    process = {"type": "sd_trainer", "training_folder": "out", "network": {"type": "lora"},
               "datasets": [{"folder_path": "clips"}],
               "model": {"name_or_path": "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "arch": "wan22_14b"}}
    process.update(process_over)
    return {"job": "extension", "config": {"name": "run1", "process": [process]}}


@pytest.mark.parametrize(
    "data, needles",
    [
        ({"job": "extension", "config": {"name": "a", "process": _ai()["config"]["process"][0]}},
         ["config.process is a mapping", "put '- ' before its first key"]),
        ({"job": "extension", "config": {"name": "a", "process": []}}, ["config.process is missing", "add one"]),
        ({"job": "extension", "config": {"process": _ai()["config"]["process"]}},
         ["config.name is missing", "add e.g. name: my_lora"]),
        (_ai(train={"lr": "fast"}), ["train.lr must be a number, got 'fast'", "write a number there"]),
        (_ai(sample={"prompts": ["a"], "seed": "x"}), ["sample.seed must be a whole number", "write digits only"]),
        (_ai(sample={"prompts": ["a cat --w abc"]}), ["--w needs a number, got 'abc'", "write e.g. --w 832"]),
        (_ai(train=[1]), ["train must be a mapping of settings, got list", "'key: value' lines"]),
        (_ai(model={"name_or_pth": "x", "arch": "wan22_14b"}),
         ["name_or_path is missing ('name_or_pth' is given: rename it to name_or_path)"]),
    ],
)
def test_ai_toolkit_refusals_say_what_to_do(data, needles):
    with pytest.raises(ConfigError) as exc:
        from_aitoolkit(data)
    for needle in needles:
        assert needle in str(exc.value)
