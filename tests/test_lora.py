"""LoRA wiring and files, checked against diffusers' own converters and loaders on tiny Wan transformers."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import trainer_core.fileio
from trainer_core.config import DEFAULT_LORA_TARGETS, LoraConfig
from trainer_core.errors import LoraFileError
from trainer_core.fileio import ArtifactWriteError
from tests.lora_fixtures import with_random_lora
from trainer_core.keys import diffusers_state_dict_to_original
from trainer_core.lora import (
    attach_lora,
    detach_lora,
    load_lora_state,
    lora_file_name,
    lora_parameters,
    lora_state_dict_comfy,
    save_lora,
)

TINY = dict(num_attention_heads=2, attention_head_dim=128, text_dim=64, ffn_dim=512, num_layers=2)
CFG = LoraConfig(rank=4, alpha=6.0)  # scale 1.5: alpha != rank, so a lost alpha shows up


def _tiny(seed: int = 0, **overrides) -> diffusers.WanTransformer3DModel:
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(**{**TINY, **overrides}).eval()


@pytest.fixture(scope="module")
def base() -> diffusers.WanTransformer3DModel:
    return _tiny(0)


def _trained(base: torch.nn.Module, cfg: LoraConfig = CFG, seed: int = 1) -> torch.nn.Module:
    """A copy of ``base`` with an attached adapter whose A and B are random (as after some training)."""
    return with_random_lora(base, cfg, seed)


INPUTS = dict(
    hidden_states=torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(5)),
    timestep=torch.tensor([500.0]),
    encoder_hidden_states=torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(6)),
)


def _forward(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        inputs = {k: v.to(model.dtype) if k != "timestep" else v for k, v in INPUTS.items()}
        return model(**inputs, return_dict=False)[0].float()


def _lora_snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in lora_parameters(model)]


# ---------------------------------------------------------------- wiring


def test_attach_lora_trains_only_fp32_lora_on_block_linears(base):
    model = copy.deepcopy(base).to(torch.bfloat16)
    attach_lora(model, CFG)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = lora_parameters(model)
    assert len(lora) == 2 * TINY["num_layers"] * len(DEFAULT_LORA_TARGETS)
    assert {id(p) for p in lora} == {id(p) for n, p in model.named_parameters() if n in trainable}
    assert all(p.dtype == torch.float32 for p in lora)
    assert all(re.match(r"blocks\.\d+\.", n) for n in trainable)
    # lora_B starts at zero: the adapter is a no-op until trained.
    assert torch.equal(_forward(model), _forward(copy.deepcopy(base).to(torch.bfloat16)))
    # Gradients reach the LoRA weights only.
    out = model(**{k: v.to(torch.bfloat16) if k != "timestep" else v for k, v in INPUTS.items()}, return_dict=False)[0]
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in lora)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


# ---------------------------------------------------------------- file layout


def test_key_reference_diffusers_inverts_original_naming(base):
    """keys.diffusers_state_dict_to_original is exactly undone by diffusers' own single-file converter."""
    sd = base.state_dict()
    original = diffusers_state_dict_to_original(sd)
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("targets", [list(DEFAULT_LORA_TARGETS), ["self_attn.q", "cross_attn.o", "ffn.2"]])
def test_saved_keys_name_real_modules_in_original_naming(base, targets):
    cfg = LoraConfig(rank=4, alpha=6.0, target_modules=targets)
    original = diffusers_state_dict_to_original(base.state_dict())
    saved = lora_state_dict_comfy(_trained(base, cfg), cfg, torch.float32)

    modules = set()
    for key, tensor in saved.items():
        m = re.fullmatch(r"diffusion_model\.(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        assert m, key
        module, kind = m.groups()
        modules.add(module)
        weight = original[f"{module}.weight"]  # KeyError = ComfyUI would log "lora key not loaded"
        out_f, in_f = weight.shape
        if kind == "lora_down.weight":
            assert tensor.shape == (cfg.rank, in_f)
        elif kind == "lora_up.weight":
            assert tensor.shape == (out_f, cfg.rank)
        else:
            assert tensor.numel() == 1 and tensor.item() == 6.0
    expected = {f"blocks.{i}.{t}" for i in range(TINY["num_layers"]) for t in targets}
    assert modules == expected
    assert len(saved) == 3 * len(expected)


def test_file_name_pattern():
    assert lora_file_name("my_lora", 250, "high") == "my_lora_000250_high_noise.safetensors"
    assert lora_file_name("my_lora", 1234567, "low") == "my_lora_1234567_low_noise.safetensors"
    with pytest.raises(ValueError):
        lora_file_name("x", 1, "mid")


# ---------------------------------------------------------------- diffusers reads the files


def test_diffusers_pipeline_loads_both_files_and_matches_training_output(base, tmp_path):
    high, low = _trained(base, seed=1), _trained(base, seed=2)
    f_high = save_lora(tmp_path / lora_file_name("t", 10, "high"), high, CFG, torch.float32, {"expert": "high"})
    f_low = save_lora(tmp_path / lora_file_name("t", 10, "low"), low, CFG, torch.float32, {"expert": "low"})

    pipe = diffusers.WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=None,
        transformer=copy.deepcopy(base), transformer_2=copy.deepcopy(base), boundary_ratio=0.875,
    )  # fmt: skip
    pipe.load_lora_weights(str(f_high))
    pipe.load_lora_weights(str(f_low), load_into_transformer_2=True)

    want_high, want_low, plain = _forward(high), _forward(low), _forward(base)
    assert (want_high - plain).abs().max() > 0.05  # the LoRA changes the output materially
    torch.testing.assert_close(_forward(pipe.transformer), want_high, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_forward(pipe.transformer_2), want_low, rtol=1e-5, atol=1e-5)

    # The stored .alpha tensors are what diffusers scales by: drop them and the output no longer matches.
    no_alpha = {k: v for k, v in load_file(f_high).items() if not k.endswith(".alpha")}
    bare = diffusers.WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=copy.deepcopy(base)
    )
    bare.load_lora_weights(no_alpha)
    assert (_forward(bare.transformer) - want_high).abs().max() > 1e-2


# ---------------------------------------------------------------- dtypes, metadata, atomicity


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_save_dtypes_and_metadata(base, tmp_path, dtype):
    model = _trained(base)
    path = save_lora(tmp_path / "l.safetensors", model, CFG, dtype, {"trigger_word": "sks", "step": "10"})
    tensors = load_file(path)
    by_module = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    checked = 0
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):
            assert tensor.dtype == torch.float32 and tensor.item() == 6.0
            continue
        assert tensor.dtype == dtype
        checked += 1
    assert checked == 2 * len(by_module)
    down = tensors["diffusion_model.blocks.1.ffn.2.lora_down.weight"]
    assert torch.equal(down, by_module["blocks.1.ffn.net.2"].lora_A["default"].weight.detach().to(dtype))
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["trigger_word"] == "sks" and meta["step"] == "10"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "6"


def test_failed_write_leaves_no_file_and_keeps_previous(base, tmp_path, monkeypatch):
    model = _trained(base)
    final = tmp_path / "out.safetensors"

    def half_then_crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(trainer_core.fileio, "save_file", half_then_crash)
    with pytest.raises(ArtifactWriteError, match=f"could not write {final}: disk full"):
        save_lora(final, model, CFG, torch.bfloat16, {})
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    save_lora(final, model, CFG, torch.bfloat16, {})
    before = final.read_bytes()
    monkeypatch.setattr(trainer_core.fileio, "save_file", half_then_crash)
    with pytest.raises(ArtifactWriteError):
        save_lora(final, _trained(base, seed=9), CFG, torch.bfloat16, {})
    assert final.read_bytes() == before
    assert list(tmp_path.iterdir()) == [final]


def test_save_refuses_non_string_or_reserved_metadata(base, tmp_path):
    model = _trained(base)
    with pytest.raises(ValueError, match="step"):
        save_lora(tmp_path / "a.safetensors", model, CFG, torch.bfloat16, {"step": 10})
    with pytest.raises(ValueError, match="ss_network_dim"):
        save_lora(tmp_path / "a.safetensors", model, CFG, torch.bfloat16, {"ss_network_dim": "8"})
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_lora_state_roundtrip(base, tmp_path, dtype):
    src = _trained(base, seed=3)
    path = save_lora(tmp_path / "r.safetensors", src, CFG, dtype, {})
    dst = copy.deepcopy(base)
    attach_lora(dst, CFG)
    load_lora_state(dst, path, CFG)
    for got, want in zip(lora_parameters(dst), lora_parameters(src)):
        assert got.dtype == torch.float32
        assert torch.equal(got, want.detach().to(dtype).float())
    if dtype == torch.float32:
        torch.testing.assert_close(_forward(dst), _forward(src), rtol=0, atol=0)


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def _bad_files(base, tmp_path) -> dict[str, tuple[Path, str]]:
    """name -> (file, regex the error must contain besides the file name)."""
    good = lora_state_dict_comfy(_trained(base), CFG, torch.float32)
    small = _tiny(0, num_attention_heads=1)  # dim 128 instead of 256, like Wan 1.3B vs 14B
    nan = dict(good)
    nan["diffusion_model.blocks.0.self_attn.q.lora_up.weight"] = torch.full_like(
        good["diffusion_model.blocks.0.self_attn.q.lora_up.weight"], float("nan")
    )
    few = LoraConfig(rank=4, alpha=6.0, target_modules=["self_attn.q"])
    return {
        "flux": (
            _write(tmp_path / "flux.safetensors", {
                "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(4, 3072),
                "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(9216, 4),
            }),  # fmt: skip
            "double_blocks",
        ),
        "sdxl": (
            _write(tmp_path / "sdxl.safetensors", {
                "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 640),
                "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(4.0),
            }),  # fmt: skip
            "lora_unet_down_blocks",
        ),
        "diffusers_names": (
            _write(tmp_path / "diffusers_names.safetensors", {
                "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 256),
            }),  # fmt: skip
            "attn1",
        ),
        "smaller_dim": (
            _write(tmp_path / "smaller.safetensors", lora_state_dict_comfy(_trained(small), CFG, torch.float32)),
            r"shape mismatch.*\(4, 128\) vs model \(4, 256\)",
        ),
        "rank": (
            _write(tmp_path / "rank8.safetensors", lora_state_dict_comfy(
                _trained(base, LoraConfig(rank=8, alpha=6.0)), LoraConfig(rank=8, alpha=6.0), torch.float32)),
            r"rank 8 .*lora\.rank=4",
        ),  # fmt: skip
        "alpha": (
            _write(tmp_path / "alpha.safetensors", lora_state_dict_comfy(
                _trained(base, LoraConfig(rank=4, alpha=4.0)), LoraConfig(rank=4, alpha=4.0), torch.float32)),
            r"alpha \[4\.0\].*lora\.alpha=6",
        ),  # fmt: skip
        "fewer_targets": (
            _write(tmp_path / "few.safetensors", lora_state_dict_comfy(_trained(base, few), few, torch.float32)),
            r"lacks 54 tensor",
        ),
        "nan": (_write(tmp_path / "nan.safetensors", nan), "NaN"),
        "missing": (tmp_path / "nope.safetensors", "does not exist"),
        "garbage": (tmp_path / "garbage.safetensors", "not a readable"),
    }


def test_load_lora_state_refuses_foreign_files_before_changing_weights(base, tmp_path):
    bad = _bad_files(base, tmp_path)
    (tmp_path / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    dst = _trained(base, seed=4)
    before = _lora_snapshot(dst)
    for case, (path, pattern) in bad.items():
        with pytest.raises(LoraFileError, match=re.escape(str(path))) as info:
            load_lora_state(dst, path, CFG)
        assert re.search(pattern, str(info.value)), (case, str(info.value))
        assert all(torch.equal(a, b) for a, b in zip(_lora_snapshot(dst), before)), case


def test_lora_input_casts_are_off_only_inside_an_autocast_forward_and_detach_forgets_the_layers(base):
    from trainer_core.flow import predict_velocity

    model = copy.deepcopy(base).bfloat16()
    attach_lora(model, CFG)
    assert len(model.lora_layers) == 10 * TINY["num_layers"]  # the recorded layers are the model's LoRA layers
    seen = []
    hook = model.lora_layers[0].register_forward_pre_hook(lambda m, a: seen.append(m.cast_input_dtype_enabled))
    x = torch.randn(1, 16, 1, 8, 8)
    text = torch.randn(1, 4, 64)
    predict_velocity(model, x, torch.tensor([0.5]), text, torch.bfloat16)  # CPU bf16 autocast
    predict_velocity(model, x, torch.tensor([0.5]), text, None)  # no autocast: bf16 input, fp32 LoRA -> cast
    hook.remove()
    assert seen == [False, True]
    assert all(m.cast_input_dtype_enabled for m in model.lora_layers)  # restored after the forward
    detach_lora(model)
    assert not hasattr(model, "lora_layers") and not getattr(model, "peft_config", None)
    assert torch.equal(model(x.bfloat16(), torch.tensor([500.0]), text.bfloat16(), return_dict=False)[0],
                       copy.deepcopy(base).bfloat16()(x.bfloat16(), torch.tensor([500.0]), text.bfloat16(),
                                                      return_dict=False)[0])


def test_lora_dropout_draws_the_global_batch_masks_and_keeps_this_ranks_rows():
    """Rows 1 and 2 of a batch of 4, run alone, get exactly the masks those rows get when one process runs all 4
    (same seed), and the kept activations are scaled by 1 / (1 - p) as torch's dropout scales them."""
    from trainer_core.lora.dropout import GlobalBatchDropout, global_batch_rows

    drop = GlobalBatchDropout(0.5).train()
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    torch.manual_seed(3)
    with global_batch_rows(4, range(4)):
        whole = drop(x)
    torch.manual_seed(3)
    with global_batch_rows(4, (1, 2)):
        part = drop(x[1:3])
    assert torch.equal(part, whole[1:3])
    kept = whole != 0
    assert 0.3 < kept.double().mean() < 0.7
    torch.testing.assert_close(whole[kept], x[kept] * 2)
    assert torch.equal(drop.eval()(x), x)  # no dropout outside training


def test_attach_lora_uses_the_global_batch_dropout_only_when_dropout_is_on():
    from trainer_core.lora.dropout import GlobalBatchDropout

    for p, expected in ((0.0, 0), (0.1, 20)):
        model = _tiny()
        attach_lora(model, LoraConfig(rank=4, dropout=p))
        found = [m for m in model.modules() if isinstance(m, GlobalBatchDropout)]
        assert len(found) == expected and all(m.p == p for m in found)
