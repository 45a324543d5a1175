"""The final pair's copies in a shared folder (ComfyUI's models/loras): never replacing another run's or a foreign
file (trainer_core.publish)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trainer_core import __version__
from trainer_core.errors import ConfigError
from trainer_core.publish import check_fixed_name, publish_pair, written_by_this_trainer

OURS = {"trainer": f"wan22-lora-trainer {__version__}"}


def _pair(folder, value: float, metadata=OURS):
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for expert in ("high", "low"):
        files[expert] = folder / f"run_000004_{expert}_noise.safetensors"
        save_file({"diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.full((4, 2), value)}, files[expert],
                  metadata=metadata)
    return files


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_derived_name_moves_on_past_other_runs_copies_and_reuses_its_own(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    first, second = _pair(tmp_path / "a", 1.0), _pair(tmp_path / "b", 2.0)
    assert publish_pair(first, loras, "job", fixed=False)[0] == "job"
    before = _snapshot(loras)
    name, copies = publish_pair(second, loras, "job", fixed=False)  # same job name, another output folder
    assert name == "job_2" and copies["low"] == loras / "job_2_low_noise.safetensors"
    assert copies["high"].read_bytes() == second["high"].read_bytes()
    assert {k: v for k, v in _snapshot(loras).items() if k in before} == before  # the first copies untouched
    # queued again (a finished run's result): no third copy, each pair keeps its name
    assert publish_pair(first, loras, "job", fixed=False)[0] == "job"
    assert publish_pair(second, loras, "job", fixed=False)[0] == "job_2"
    assert len(list(loras.iterdir())) == 4


def test_a_half_taken_derived_name_is_not_mixed_with(tmp_path):
    loras = tmp_path / "loras"
    foreign = _pair(tmp_path / "x", 5.0, metadata={})
    loras.mkdir()
    (loras / "job_high_noise.safetensors").write_bytes(foreign["high"].read_bytes())
    name, _ = publish_pair(_pair(tmp_path / "a", 1.0), loras, "job", fixed=False)
    assert name == "job_2" and not (loras / "job_low_noise.safetensors").exists()


def test_a_fixed_name_replaces_only_this_trainers_copy(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    publish_pair(_pair(tmp_path / "a", 1.0), loras, "my_style", fixed=True)
    newer = _pair(tmp_path / "b", 2.0)
    name, copies = publish_pair(newer, loras, "my_style", fixed=True)
    assert name == "my_style" and copies["high"].read_bytes() == newer["high"].read_bytes()

    theirs = _pair(tmp_path / "c", 3.0, metadata={"ss_network_dim": "16"})  # a LoRA from elsewhere
    (loras / "downloaded_low_noise.safetensors").write_bytes(theirs["low"].read_bytes())
    (loras / "notes_high_noise.safetensors").write_text("not even safetensors")
    before = _snapshot(loras)
    for name in ("downloaded", "notes"):
        with pytest.raises(ConfigError, match=f"lora_name: .*{name}_.*was not written by this trainer"):
            publish_pair(newer, loras, name, fixed=True)
    assert _snapshot(loras) == before
    check_fixed_name(loras, "downloaded", ["high"], "lora_name")  # only the experts trained count
    assert not written_by_this_trainer(loras / "notes_high_noise.safetensors")
