"""Config validation: every bad setting is refused with a message naming it, before anything loads."""

import re

import pytest

from trainer_core.config import DEFAULT_LORA_TARGETS, JobConfig, job_from_dict, load_yaml
from trainer_core.errors import ConfigError


def _job(**over):
    base = {"model": {"source": "tiny"}, "datasets": [{"folder": "clips"}]}
    for dotted, value in over.items():
        node = base
        *path, leaf = dotted.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return base


def test_defaults_match_wan22_recipe():
    cfg = job_from_dict(_job())
    assert cfg.multistage.boundary == 0.875
    assert cfg.multistage.stages == ["high", "low"]
    assert cfg.lora.rank == 16 and cfg.lora.effective_alpha == 16.0
    assert tuple(cfg.lora.target_modules) == DEFAULT_LORA_TARGETS


def test_speed_settings_default_to_auto_and_accept_the_old_boolean():
    cfg = job_from_dict(_job())
    assert (cfg.train.gradient_checkpointing, cfg.train.compile, cfg.quant.fp8_backward) == ("auto", "auto", True)
    # gradient_checkpointing was a boolean: true/false still mean checkpoint every block / none
    assert job_from_dict(_job(train__gradient_checkpointing=True)).train.gradient_checkpointing == "full"
    assert job_from_dict(_job(train__gradient_checkpointing=False)).train.gradient_checkpointing == "off"
    for policy in ("auto", "full", "selective", "off"):
        assert job_from_dict(_job(train__gradient_checkpointing=policy)).train.gradient_checkpointing == policy


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"multistage__boundary": 1.0}, "multistage.boundary"),
        ({"multistage__boundary": 0.0}, "strictly between 0 and 1"),
        ({"multistage__boundary": -0.2}, "multistage.boundary"),
        ({"multistage__train_high_noise": False, "multistage__train_low_noise": False}, "both off"),
        ({"lora__rank": 0}, "lora.rank"),
        ({"lora__rank": -4}, "positive integer"),
        ({"lora__target_modules": ["self_attn.qq"]}, "unknown LoRA target"),
        ({"multistage__switch_every": 0}, "switch_every"),
        ({"optimizer__name": "lion"}, "optimizer.name"),
        ({"train__timestep_type": "cubic"}, "train.timestep_type"),
        ({"name": "my job/1"}, "file names"),
        ({"train__gradient_checkpointing": "partial"}, "train.gradient_checkpointing"),
        ({"train__compile": "yes"}, "train.compile"),
        ({"quant__fp8_backward": "sometimes"}, "quant.fp8_backward"),
    ],
)
def test_bad_settings_name_the_setting(override, needle):
    with pytest.raises(ConfigError) as exc:
        job_from_dict(_job(**override))
    assert needle in str(exc.value)


def test_unknown_keys_are_named():
    data = _job()
    data["train"] = {"stepz": 10}
    data["colour"] = "red"
    with pytest.raises(ConfigError) as exc:
        job_from_dict(data, source="job.yaml")
    msg = str(exc.value)
    assert "unknown setting 'train.stepz'" in msg
    assert "unknown setting 'colour'" in msg
    assert msg.startswith("job.yaml")


def test_num_frames_error_names_nearest_valid_values():
    data = _job()
    data["datasets"][0]["num_frames"] = 35
    with pytest.raises(ConfigError, match=r"use 33 or 37"):
        job_from_dict(data)


def test_model_without_any_source_is_refused():
    with pytest.raises(ConfigError, match="no model given"):
        job_from_dict({"model": {}})


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_yaml(empty)


def test_run_dir():
    cfg = JobConfig.model_validate({"name": "abc", "model": {"source": "tiny"}, "save": {"output_dir": "/tmp/o"}})
    assert str(cfg.run_dir) == "/tmp/o/abc"


@pytest.mark.parametrize(
    "over,named",
    [
        ({"quant": {"transformer": "float8"}}, "quant.transformer: float8"),
        ({"memory": {"low_vram": True}}, "memory.low_vram"),
        ({"memory": {"offload_blocks": 4}}, "memory.offload_blocks"),
        ({"sample": {"prompts": ["a cat"], "sample_every": 50}}, "previews"),
    ],
)
def test_sharding_refuses_settings_it_cannot_serve(over, named):
    raw = {"model": {"source": "tiny"}, "distributed": {"shard_experts": True}, **over}
    with pytest.raises(ConfigError, match=f"distributed.shard_experts cannot be combined with .*{re.escape(named)}"):
        job_from_dict(raw)
    assert not job_from_dict({**raw, "distributed": {"shard_experts": False}}).distributed.shard_experts


@pytest.mark.parametrize(
    "over,named",
    [
        ({"multistage": {"train_low_noise": False, "switch_every": 1}}, "training one expert only"),
        ({"multistage": {"switch_every": 10}}, "multistage.switch_every: 10"),
        ({"distributed": {"expert_groups": True, "shard_experts": True}}, "distributed.shard_experts"),
        ({"memory": {"low_vram": True}}, "memory.low_vram"),
        ({"sample": {"prompts": ["a cat"], "sample_every": 50}}, "previews"),
    ],
)
def test_expert_groups_refuse_settings_they_cannot_serve(over, named):
    raw = {"model": {"source": "tiny"}, "multistage": {"switch_every": 1}, **over}
    raw["distributed"] = {"expert_groups": True, **over.get("distributed", {})}
    with pytest.raises(ConfigError, match=f"distributed.expert_groups cannot be combined with .*{re.escape(named)}"):
        job_from_dict(raw)
    ok = {"model": {"source": "tiny"}, "multistage": {"switch_every": 1}, "distributed": {"expert_groups": True}}
    assert job_from_dict(ok).distributed.expert_groups
