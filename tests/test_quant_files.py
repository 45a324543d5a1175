"""Accuracy recovery adapters loaded from files: ai-toolkit's layout, this trainer's own, and every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainer_core.config import QuantConfig
from trainer_core.errors import ConfigError, LoraFileError
from trainer_core.keys import diffusers_module_to_original
from trainer_core.models.tiny import tiny_transformer
from trainer_core.quant import UInt4Linear, check_ara_source, quant_targets, quantize_expert
from trainer_core.quant.ara_files import read_adapter_file

AITK_NAME = "wan22_14b_t2i_torchao_uint4.safetensors"


def batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([500.0]),
             encoder_hidden_states=torch.randn(1, 12, 64, generator=g), return_dict=False)
        for _ in range(n)
    ]


def layer_shapes() -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in quant_targets(tiny_transformer("high")).items()}


def aitoolkit_state(rank: int = 4, seed: int = 0, shapes: dict | None = None) -> dict[str, torch.Tensor]:
    """An adapter laid out as ai-toolkit saves its Wan 2.2 ARA: both experts in one file, original module names,
    peft lora_A / lora_B, no alpha (scale 1), bf16."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for group in ("transformer_1", "transformer_2"):
        for name, (out_f, in_f) in (shapes or layer_shapes()).items():
            key = f"diffusion_model.{group}.{diffusers_module_to_original(name)}"
            sd[f"{key}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * 0.01).bfloat16()
            sd[f"{key}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).bfloat16()
    return sd


def write(path: Path, sd: dict, metadata: dict | None = None) -> Path:
    save_file(sd, str(path), metadata=metadata)
    return path


def cfg_for(path: Path, **kw) -> QuantConfig:
    return QuantConfig(transformer="4bit_ara", ara_source=str(path), **{"quantizer": "uint4", "ara_rank": 4, **kw})


def run(cfg: QuantConfig, expert: str = "high", calibration=None):
    model = tiny_transformer(expert)
    report = quantize_expert(model, cfg, expert=expert, cache_key="k", device="cpu", calibration=calibration)
    return model, report


@pytest.mark.parametrize("expert, group", [("high", "transformer_1"), ("low", "transformer_2")])
def test_aitoolkit_adapter_is_installed_for_its_expert(tmp_path, expert, group):
    sd = aitoolkit_state()
    path = write(tmp_path / AITK_NAME, sd)
    check_ara_source(cfg_for(path))
    model, report = run(cfg_for(path), expert, calibration=batches(2))
    assert report.ara_source == "file" and report.error_metric == "activations" and report.calibration_samples == 2
    for name, layer in model.named_modules():
        if isinstance(layer, UInt4Linear):
            key = f"diffusion_model.{group}.{diffusers_module_to_original(name)}"
            assert torch.equal(layer.ara_down, sd[f"{key}.lora_A.weight"].float())
            assert torch.equal(layer.ara_up, sd[f"{key}.lora_B.weight"].float())
    _, no_calibration = run(cfg_for(path), expert)
    assert no_calibration.error_metric == "weights" and len(no_calibration.errors) == 20


def test_other_key_layouts_are_read(tmp_path):
    # Shared (no expert group), diffusers module names, transformer. prefix, lora_down/up with alpha 2 (scale 0.5).
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, (out_f, in_f) in layer_shapes().items():
        sd[f"transformer.{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g)
        sd[f"transformer.{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g)
        sd[f"transformer.{name}.alpha"] = torch.tensor(2.0)
    path = write(tmp_path / "custom_torchao_uint4.safetensors", sd)
    adapters = read_adapter_file(path, "low", cfg_for(path))
    down, up = adapters.adapters["blocks.1.ffn.net.2"]
    assert torch.equal(down, sd["transformer.blocks.1.ffn.net.2.lora_down.weight"])
    assert torch.allclose(up, 0.5 * sd["transformer.blocks.1.ffn.net.2.lora_up.weight"])


def test_own_cache_file_round_trips_as_ara_source(tmp_path):
    cfg = QuantConfig(transformer="4bit_ara", quantizer="nf4", ara_rank=4, ara_calibration_samples=2)
    first = tiny_transformer("high")
    report = quantize_expert(first, cfg, expert="high", cache_key="k", device="cpu", calibration=batches(2),
                             cache_dir=tmp_path)
    model, from_file = run(cfg.model_copy(update={"ara_source": str(report.cache_path)}))
    assert from_file.ara_source == "file"
    for name in report.errors:
        assert torch.equal(model.get_submodule(name).ara_up, first.get_submodule(name).ara_up)
    # The same file is refused for the quantizer it was not made for.
    with pytest.raises(ConfigError, match="made for the nf4 quantizer.*set quant.quantizer: nf4"):
        run(cfg_for(report.cache_path))


def test_adapter_for_another_quantizer_is_refused(tmp_path):
    path = write(tmp_path / AITK_NAME, aitoolkit_state())
    with pytest.raises(ConfigError, match="made for the uint4 quantizer.*set quant.quantizer: uint4"):
        run(cfg_for(path, quantizer="nf4"))
    with pytest.raises(ConfigError, match="uint4"):
        check_ara_source(cfg_for(path, quantizer="nf4"))
    uint3 = write(tmp_path / "wan22_14b_t2i_torchao_uint3.safetensors", aitoolkit_state())
    with pytest.raises(LoraFileError, match="torchao uint3; only the uint4 quantizer"):
        run(cfg_for(uint3))
    unnamed = write(tmp_path / "adapter.safetensors", aitoolkit_state())
    with pytest.raises(LoraFileError, match="cannot tell which quantizer"):
        run(cfg_for(unnamed))
    declared = write(tmp_path / "x.safetensors", aitoolkit_state(), {"ara_quantizer": "int3-hqq"})
    with pytest.raises(LoraFileError, match="'int3-hqq', which this trainer does not implement"):
        run(cfg_for(declared))


def test_wrong_rank_is_refused(tmp_path):
    path = write(tmp_path / AITK_NAME, aitoolkit_state(rank=8))
    with pytest.raises(ConfigError, match="has rank 8 but quant.ara_rank is 4 - set quant.ara_rank: 8"):
        run(cfg_for(path))
    mixed = aitoolkit_state(rank=4)
    mixed["diffusion_model.transformer_1.blocks.0.self_attn.q.lora_A.weight"] = torch.zeros(2, 256)
    with pytest.raises(LoraFileError, match="mixes adapter ranks"):
        run(cfg_for(write(tmp_path / f"m_{AITK_NAME}", mixed)))


def test_wrong_shapes_are_refused(tmp_path):
    bigger = {n: (o * 2, i * 2) for n, (o, i) in layer_shapes().items()}
    path = write(tmp_path / AITK_NAME, aitoolkit_state(shapes=bigger))
    with pytest.raises(LoraFileError, match="made for a model of another size"):
        run(cfg_for(path))


def test_incomplete_or_foreign_files_are_refused(tmp_path):
    sd = aitoolkit_state()
    one_block = {k: v for k, v in sd.items() if ".blocks.0." in k}
    with pytest.raises(LoraFileError, match=r"no adapter for 10 quantized layer\(s\)"):
        run(cfg_for(write(tmp_path / f"a_{AITK_NAME}", one_block)))
    extra = {**sd, **{k.replace(".blocks.1.", ".blocks.7."): v.clone() for k, v in sd.items() if ".blocks.1." in k}}
    with pytest.raises(LoraFileError, match="adapters for 10 layer\\(s\\) this model lacks"):
        run(cfg_for(write(tmp_path / f"b_{AITK_NAME}", extra)))
    foreign = {**sd, "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 256)}
    with pytest.raises(LoraFileError, match="name no quantized block Linear"):
        run(cfg_for(write(tmp_path / f"c_{AITK_NAME}", foreign)))
    head = {**sd, "diffusion_model.transformer_1.blocks.0.norm3.lora_A.weight": torch.zeros(4, 256)}
    with pytest.raises(LoraFileError, match="name no quantized block Linear"):
        run(cfg_for(write(tmp_path / f"d_{AITK_NAME}", head)))
    half = {k: v for k, v in sd.items() if not k.endswith("lora_B.weight") or ".ffn.2." not in k}
    with pytest.raises(LoraFileError, match="lacks lora_A or lora_B"):
        run(cfg_for(write(tmp_path / f"e_{AITK_NAME}", half)))
    high_only = {k: v for k, v in sd.items() if ".transformer_1." in k}
    with pytest.raises(LoraFileError, match="no adapters for the low-noise expert \\(only for: high\\)"):
        run(cfg_for(write(tmp_path / f"f_{AITK_NAME}", high_only)), expert="low")
    nan = dict(sd)
    nan["diffusion_model.transformer_1.blocks.0.ffn.0.lora_B.weight"] = torch.full((512, 4), float("nan"))
    with pytest.raises(LoraFileError, match="NaN/Inf"):
        run(cfg_for(write(tmp_path / f"g_{AITK_NAME}", nan)))


def test_missing_or_unreadable_file_is_refused(tmp_path):
    with pytest.raises(LoraFileError, match="does not exist"):
        check_ara_source(cfg_for(tmp_path / AITK_NAME))
    bad = tmp_path / AITK_NAME
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(LoraFileError, match="not a readable .safetensors"):
        run(cfg_for(bad))
