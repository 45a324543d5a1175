"""``quant.transformer: auto``: float8 on cards with fp8 matmuls, 4bit_ara on other GPUs, none on the CPU."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import trainer_core.quant.choice as choice
from trainer_core.config import JobConfig, QuantConfig
from trainer_core.memory.planner import GIB, WAN22_A14B_ARCH, estimate_peak_vram
from trainer_core.quant import quantize_expert
from trainer_core.quant.choice import auto_transformer_quant, resolve_transformer_quant, resolved_quant


def _job(quant: str) -> JobConfig:
    return JobConfig.model_validate({
        "model": {"source": "x"}, "quant": {"transformer": quant}, "memory": {"low_vram": True},
        "multistage": {"train_low_noise": True},
        "datasets": [{"folder": "x", "resolutions": [512], "num_frames": 33}]})


@pytest.mark.parametrize("capability,expected", [((8, 6), "4bit_ara"), ((8, 9), "float8"), ((9, 0), "float8"),
                                                 ((12, 0), "float8"), ((7, 5), "4bit_ara")],
                         ids=["ampere-3090", "ada-4090", "hopper", "blackwell-5090", "turing"])
def test_auto_picks_by_compute_capability(monkeypatch, caplog, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cfg = _job("auto")
    with caplog.at_level(logging.INFO, logger="trainer_core.quant.choice"):
        resolved = resolve_transformer_quant(cfg, torch.device("cuda", 0))
    assert resolved.quant.transformer == expected and cfg.quant.transformer == "auto"
    assert f"quant.transformer: auto -> {expected} on cuda:0" in caplog.text
    assert resolved.model_dump(exclude={"quant"}) == cfg.model_dump(exclude={"quant"})


def test_auto_is_none_on_the_cpu_and_explicit_settings_stay():
    assert resolve_transformer_quant(_job("auto"), torch.device("cpu")).quant.transformer == "none"
    for quant in ("none", "float8", "4bit_ara"):
        cfg = _job(quant)
        assert resolve_transformer_quant(cfg, torch.device("cpu")) is cfg
    assert auto_transformer_quant("cuda", True) == "float8" and auto_transformer_quant("cuda", False) == "4bit_ara"


def test_the_planner_plans_auto_as_what_it_becomes_on_the_card():
    card = int(22 * GIB)
    for fp8, as_ in ((True, "float8"), (False, "4bit_ara")):
        auto = estimate_peak_vram(_job("auto"), WAN22_A14B_ARCH, card, fp8_matmul=fp8)
        same = estimate_peak_vram(_job(as_), WAN22_A14B_ARCH, card, fp8_matmul=fp8)
        assert auto.summary() == same.summary() and auto.peak_bytes == same.peak_bytes
    assert estimate_peak_vram(_job("auto"), WAN22_A14B_ARCH, None, device_type="cpu").summary() == \
        estimate_peak_vram(_job("none"), WAN22_A14B_ARCH, None, device_type="cpu").summary()


def test_an_adapter_file_still_needs_4bit_ara():
    with pytest.raises(ValueError, match="4bit_ara"):
        QuantConfig(transformer="auto", ara_source="adapters.safetensors")


def test_quantize_expert_resolves_auto_for_its_device():
    from trainer_core.config import ModelConfig
    from trainer_core.models import load_components

    model = load_components(ModelConfig(source="tiny", dtype="fp32"), low=False, vae=False, text_encoder=False).high
    before = copy.deepcopy(model.state_dict())
    report = quantize_expert(model, QuantConfig(transformer="auto"), expert="high", cache_key="t", device="cpu")
    assert report.mode == "none" and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert resolved_quant(QuantConfig(transformer="auto"), torch.device("cpu")).transformer == "none"
    assert choice.supports_fp8_matmul("cpu") is False
