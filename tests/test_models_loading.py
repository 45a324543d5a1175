"""Model loading: every source layout reproduces the in-memory tiny preset; bad inputs are refused by name."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.model_fixtures import (
    FAKE_REPO_ID,
    FP8,
    comfy_transformer_tensors,
    fp8_transformer_targets,
    make_fake_hf_cache,
    quantize_fp8_scaled,
    save_comfy_files,
    save_comfy_text_encoder,
    save_comfy_transformer,
    save_comfy_vae,
    save_diffusers_folder,
    tiny_components,
    vae_state_dict_to_original,
)
from trainer_core.config import ModelConfig
from trainer_core.errors import ModelLoadError
from trainer_core.keys import diffusers_state_dict_to_original
from trainer_core.models import check_model_files, describe_base_model, load_components
from trainer_core.models.single_file import DIFFUSION_MODEL_PREFIX, load_transformer_file
from trainer_core.models.tiny import TINY_TRANSFORMER_CONFIG, tiny_spiece_model

ONLY_HIGH = {"low": False, "vae": False, "text_encoder": False}
FP32 = {"dtype": "fp32", "text_encoder_dtype": "fp32", "vae_dtype": "fp32"}
FP32_KEPT = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def src():
    return tiny_components()


@pytest.fixture(scope="module")
def folder(src, tmp_path_factory):
    return save_diffusers_folder(src, tmp_path_factory.mktemp("diffusers") / "Wan2.2-tiny-Diffusers")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "latent": torch.randn(1, 16, 3, 8, 8, generator=g),
        "text": torch.randn(1, 12, TINY_TRANSFORMER_CONFIG["text_dim"], generator=g),
        "ids": torch.tensor([[17, 26, 11, 49, 27, 21, 35, 1], [5, 9, 60, 1, 0, 0, 0, 0]]),
        "video": torch.rand(1, 3, 5, 16, 16, generator=g) * 2 - 1,
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@torch.no_grad()
def _outputs(c, inputs) -> dict[str, torch.Tensor]:
    """Forward outputs of whatever components are loaded, in float32."""
    out = {}
    for name in ("high", "low"):
        m = getattr(c, name)
        if m is not None:
            x = inputs["latent"].to(m.patch_embedding.weight.dtype)
            out[name] = m(x, torch.tensor([700]), inputs["text"].to(x.dtype)).sample.float()
    if c.text_encoder is not None:
        mask = (inputs["ids"] != 0).long()
        out["text_encoder"] = c.text_encoder(inputs["ids"], mask).last_hidden_state.float()
    if c.vae is not None:
        x = inputs["video"].to(next(c.vae.parameters()).dtype)
        out["vae"] = c.vae.encode(x).latent_dist.mode().float()
    return out


def _dtypes(model) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in [*model.named_parameters(), *model.named_buffers()]}


def _comfy_cfg(files: dict[str, Path], **kw) -> ModelConfig:
    return ModelConfig(
        high_noise=str(files["high"]),
        low_noise=str(files["low"]),
        text_encoder=str(files["text_encoder"]),
        vae=str(files["vae"]),
        **kw,
    )


# ------------------------------------------------------------------------------------------------ tiny preset


def test_tiny_preset_is_deterministic_real_architecture(src):
    again = load_components(ModelConfig(source="tiny", **FP32))
    for name in ("high", "low", "vae", "text_encoder"):
        a, b = getattr(src, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(src.high.blocks[0].attn1.to_q.weight, src.low.blocks[0].attn1.to_q.weight)
    cfg = src.high.config
    assert cfg.attention_head_dim == 128 and cfg.num_attention_heads * 128 == src.high.blocks[0].attn1.to_q.in_features
    assert cfg.text_dim == src.text_encoder.config.d_model
    assert src.vae.config.z_dim == 16 and len(src.vae.config.latents_mean) == len(src.vae.config.latents_std) == 16
    assert tiny_spiece_model() == tiny_spiece_model()
    # The tokenizer tokenizes exactly as sentencepiece itself (what ComfyUI uses) plus </s>.
    sp = spm.SentencePieceProcessor(model_proto=tiny_spiece_model())
    for text in ("A cat dances in the snow", "Drone shot, golden hour!", "zq ülk"):
        assert src.tokenizer(text).input_ids == sp.encode(text) + [sp.eos_id()]


def test_tiny_dtypes_and_fp32_kept_modules_match_diffusers_from_pretrained(src, folder):
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        cfg = {"dtype": dtype, "text_encoder_dtype": dtype, "vae_dtype": dtype}
        tiny = load_components(ModelConfig(source="tiny", **cfg))
        ref = load_components(ModelConfig(source=str(folder), **cfg))  # pure from_pretrained
        for name in ("high", "low", "vae", "text_encoder"):
            assert _dtypes(getattr(tiny, name)) == _dtypes(getattr(ref, name)), (name, dtype)
        kept = {k for k, d in _dtypes(tiny.high).items() if d == torch.float32}
        assert kept and all(any(m in k.split(".") for m in FP32_KEPT) for k in kept)
        assert {m for k in kept for m in FP32_KEPT if m in k.split(".")} == {
            "rope",
            "time_embedder",
            "scale_shift_table",
            "norm2",
        }
        source = src.high.state_dict()
        for k, v in tiny.high.state_dict().items():
            expected = source[k] if k in kept else source[k].to(torch_dtype)
            assert torch.equal(v, expected), k


# ------------------------------------------------------------------------------------------------ diffusers folder


def test_diffusers_folder_reproduces_source(src, folder, inputs):
    c = load_components(ModelConfig(source=str(folder), **FP32))
    ref, got = _outputs(src, inputs), _outputs(c, inputs)
    for name in ref:
        assert torch.allclose(got[name], ref[name], atol=1e-6, rtol=1e-5), name
    assert c.tokenizer("A cat dances in the snow").input_ids == src.tokenizer("A cat dances in the snow").input_ids
    assert c.base_model == str(folder)


def test_diffusers_folder_bf16_matches_within_dtype_tolerance(src, folder, inputs):
    c = load_components(ModelConfig(source=str(folder)))  # bf16 experts and TE, fp32 VAE
    assert c.high.proj_out.weight.dtype == torch.bfloat16 and c.text_encoder.shared.weight.dtype == torch.bfloat16
    assert c.vae.encoder.conv_in.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in c.high.parameters()) and not c.high.training
    ref, got = _outputs(src, inputs), _outputs(c, inputs)
    for name in ("high", "low", "text_encoder"):
        assert _rel(got[name], ref[name]) < 3e-2, name
    assert _rel(got["vae"], ref["vae"]) < 1e-6


# ------------------------------------------------------------------------------------------------ ComfyUI files


@pytest.mark.parametrize("prefix", [False, True], ids=["bare", "model.diffusion_model"])
def test_comfy_fp16_files_reproduce_source(src, inputs, tmp_path, prefix):
    files = save_comfy_files(src, tmp_path, dtype=torch.float16, prefix=prefix)
    c = load_components(_comfy_cfg(files, **FP32))
    for name in ("high", "low", "vae", "text_encoder"):
        loaded, source = getattr(c, name).state_dict(), getattr(src, name).state_dict()
        assert loaded.keys() == source.keys(), name
        for k in source:
            assert torch.equal(loaded[k], source[k].half().float()), (name, k)
    ref, got = _outputs(src, inputs), _outputs(c, inputs)
    for name in ref:
        assert _rel(got[name], ref[name]) < 5e-3, name
    # The tokenizer comes from the spiece_model bytes inside the UMT5 file.
    assert c.tokenizer("A cat dances in the snow").input_ids == src.tokenizer("A cat dances in the snow").input_ids
    assert c.base_model == "wan2.2_t2v_high_noise_tiny.safetensors + wan2.2_t2v_low_noise_tiny.safetensors"


def test_single_file_keeps_fp32_modules_from_source_values(src, folder, tmp_path):
    path = save_comfy_transformer(src.high, tmp_path / "high_fp32.safetensors", dtype=torch.float32)
    got = load_components(ModelConfig(high_noise=str(path), dtype="bf16"), **ONLY_HIGH).high
    ref = load_components(ModelConfig(source=str(folder), dtype="bf16"), **ONLY_HIGH).high
    assert _dtypes(got) == _dtypes(ref)
    source = src.high.state_dict()
    kept = [k for k, v in got.state_dict().items() if v.dtype == torch.float32]
    assert kept
    for k, v in got.state_dict().items():
        # fp32-kept tensors are the file's fp32 values, not values rounded through bf16
        assert torch.equal(v, source[k] if k in kept else source[k].to(torch.bfloat16)), k
    assert any(not torch.equal(source[k], source[k].to(torch.bfloat16).float()) for k in kept)


def _dequantized_reference(path: Path) -> dict[str, torch.Tensor]:
    """Original-named weights of an fp8_scaled file computed independently in float64: fp8 value * scale."""
    raw = load_file(str(path))
    raw = {k.removeprefix("model.diffusion_model."): v for k, v in raw.items()}
    out = {}
    for k, v in raw.items():
        if not k.endswith(".weight"):
            continue
        layer = k[: -len(".weight")]
        scale = raw.get(f"{layer}.scale_weight", raw.get(f"{layer}.weight_scale"))
        out[k] = v.double() * scale.double() if scale is not None else v.double()
    return out


@pytest.mark.parametrize("naming", ["scale_weight", "weight_scale"])
def test_fp8_scaled_expert_applies_scales(src, inputs, tmp_path, naming):
    path = save_comfy_transformer(
        src.high, tmp_path / f"high_fp8_{naming}.safetensors", fp8=naming, prefix=naming == "weight_scale"
    )
    c = load_components(ModelConfig(high_noise=str(path), dtype="fp32"), **ONLY_HIGH)
    reference = _dequantized_reference(path)
    loaded = diffusers_state_dict_to_original(c.high.state_dict())
    fp8_weights = [k for k in reference if ".blocks." in f".{k}" and reference[k].ndim == 2]
    assert fp8_weights
    for k in fp8_weights:
        assert torch.allclose(loaded[k].double(), reference[k], rtol=1e-6, atol=0), k
    with safe_open(str(path), "pt") as f:  # the scales are far from 1: ignoring them would be very wrong
        scales = [f.get_tensor(k) for k in f.keys() if k.endswith(("scale_weight", "weight_scale"))]
    assert max(s.max().item() for s in scales) < 0.01
    assert _rel(_outputs(c, inputs)["high"], _outputs(src, inputs)["high"]) < 5e-2


def test_float8_keeps_the_fp8_scaled_files_own_values(src, tmp_path):
    """Experts and text encoder from fp8_scaled files, made float8 (Quantize ARA's float8 path): every quantized
    weight is exactly the file's e4m3 value times its scale (float64 reference from the raw file), not rounded
    again; the report says so."""
    from trainer_core.config import QuantConfig
    from trainer_core.keys import diffusers_module_to_original
    from trainer_core.quant import Float8Linear, quantize_expert, quantize_text_encoder

    high = save_comfy_transformer(src.high, tmp_path / "high_fp8.safetensors", fp8="scale_weight")
    te = save_comfy_text_encoder(src.text_encoder, tmp_path / "umt5_fp8.safetensors", fp8="scale_weight",
                                 spiece_model=tiny_spiece_model())
    c = load_components(ModelConfig(source="tiny", high_noise=str(high), text_encoder=str(te)), low=False, vae=False)
    reports = [quantize_expert(c.high, QuantConfig(transformer="float8"), expert="high", cache_key="k", device="cpu"),
               quantize_text_encoder(c.text_encoder, QuantConfig(text_encoder="float8"), "cpu")]
    for model, path, name_of in ((c.high, high, diffusers_module_to_original), (c.text_encoder, te, lambda n: n)):
        reference = _dequantized_reference(path)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, Float8Linear)}
        assert layers
        for n, layer in layers.items():
            assert torch.equal(layer.qweight.double() * layer.weight_scale.double(), reference[f"{name_of(n)}.weight"]), n
    assert all(r.mean_error < 4e-3 for r in reports)  # bf16 rounding of the product only (0.029 rounded again)


def test_fp8_scaled_bf16_keeps_fp32_modules(src, folder, tmp_path):
    path = save_comfy_transformer(src.high, tmp_path / "high_fp8.safetensors", fp8="scale_weight")
    got = load_components(ModelConfig(high_noise=str(path), dtype="bf16"), **ONLY_HIGH).high
    ref = load_components(ModelConfig(source=str(folder), dtype="bf16"), **ONLY_HIGH).high
    assert _dtypes(got) == _dtypes(ref)
    source = src.high.state_dict()
    for k, v in got.state_dict().items():
        if v.dtype == torch.float32:  # the file's fp16 values, widened exactly
            assert torch.equal(v, source[k].half().float()), k


@pytest.mark.parametrize("naming", ["scale_weight", "weight_scale"])
def test_fp8_scaled_text_encoder(src, inputs, tmp_path, naming):
    path = save_comfy_text_encoder(
        src.text_encoder, tmp_path / "umt5_fp8.safetensors", fp8=naming, spiece_model=tiny_spiece_model()
    )
    c = load_components(
        ModelConfig(source="tiny", text_encoder=str(path), text_encoder_dtype="fp32"), high=False, low=False, vae=False
    )
    ref = _outputs(src, inputs)["text_encoder"]
    assert _rel(_outputs(c, inputs)["text_encoder"], ref) < 0.1
    raw = load_file(str(path))
    q = "encoder.block.0.layer.0.SelfAttention.q"
    scale = raw.get(f"{q}.scale_weight", raw.get(f"{q}.weight_scale"))
    assert torch.allclose(
        c.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight.double(),
        raw[f"{q}.weight"].double() * scale.double(),
    )


def test_text_encoder_for_a_gpu_is_read_there_and_to_host_memory_when_it_does_not_fit(
    src, inputs, tmp_path, monkeypatch, caplog
):
    """``text_encoder_device``: the file is read to that device (no host copy) where about twice its size is free;
    with less it is read to host memory without trying, and out of memory there it is read to host memory with one
    warning; the encoder is the file's, exactly."""
    import trainer_core.models.loading as loading
    from trainer_core.models.single_file import text_encoder_file_bytes

    path = save_comfy_text_encoder(src.text_encoder, tmp_path / "umt5.safetensors", spiece_model=tiny_spiece_model())
    real, asked = loading.load_text_encoder_file, []
    size = text_encoder_file_bytes(path, torch.float32)
    assert size == sum(p.numel() for p in src.text_encoder.parameters()) * 4  # the tied embedding once
    free = [2**40]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[0], 2**40))

    def no_room_on_cards(path, dtype, setting="model.text_encoder", device="cpu"):
        asked.append(str(device))
        if str(device) != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.91 GiB")
        return real(path, dtype, setting, device=device)

    monkeypatch.setattr(loading, "load_text_encoder_file", no_room_on_cards)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    cfg = ModelConfig(source="tiny", text_encoder=str(path), text_encoder_dtype="fp32")
    with caplog.at_level("WARNING", logger=loading.__name__):
        c = load_components(cfg, high=False, low=False, vae=False, text_encoder_device="cuda:0")
    assert asked == ["cuda:0", "cpu"]
    assert [r.getMessage() for r in caplog.records] == [
        "the text encoder does not fit on cuda:0 beside what it holds: reading it to host memory"]
    assert torch.equal(_outputs(c, inputs)["text_encoder"], _outputs(load_components(
        cfg, high=False, low=False, vae=False), inputs)["text_encoder"])
    asked.clear()
    load_components(cfg, high=False, low=False, vae=False)  # the default: host memory, no GPU asked
    assert asked == ["cpu"]

    def room_on_cards(path, dtype, setting="model.text_encoder", device="cpu"):  # the read itself needs a GPU
        asked.append(str(device))
        return real(path, dtype, setting)

    monkeypatch.setattr(loading, "load_text_encoder_file", room_on_cards)
    asked.clear()
    caplog.clear()
    with caplog.at_level("INFO", logger=loading.__name__):
        load_components(cfg, high=False, low=False, vae=False, text_encoder_device="cuda:0")
    assert asked == ["cuda:0"]
    assert "text encoder read straight to cuda:0 (no copy in host memory)" in [r.getMessage() for r in caplog.records]

    free[0] = 2 * size + 2**30 - 1  # one byte short of the encoder twice plus 1 GiB
    asked.clear()
    caplog.clear()
    with caplog.at_level("INFO", logger=loading.__name__):
        load_components(cfg, high=False, low=False, vae=False, text_encoder_device="cuda:0")
    assert asked == ["cpu"]
    need = (2 * size + 2**30) / 2**30
    assert (f"text encoder read to host memory: reading it to cuda:0 needs about {need:.1f} GiB there, "
            f"{free[0] / 2**30:.1f} GiB are free") in [r.getMessage() for r in caplog.records]


def test_components_arrive_one_at_a_time(src, tmp_path, monkeypatch):
    """``on_loaded`` sees each component before the next one starts loading."""
    import trainer_core.models.loading as loading

    files = save_comfy_files(src, tmp_path)
    events = []
    for name, part in (("_expert", None), ("_vae", "vae"), ("_text_encoder", "text_encoder")):
        def spy(cfg, *args, _real=getattr(loading, name), _part=part, **kw):
            events.append(f"load {_part or args[0]}")
            return _real(cfg, *args, **kw)

        monkeypatch.setattr(loading, name, spy)
    c = load_components(_comfy_cfg(files, **FP32),
                        on_loaded=lambda part, m: events.append(f"{part}: {type(m).__name__}"))
    assert events == ["load high", "high: WanTransformer3DModel", "load low", "low: WanTransformer3DModel",
                      "load vae", "vae: AutoencoderKLWan", "load text_encoder", "text_encoder: UMT5EncoderModel"]
    assert c.tokenizer is not None


def _mangle(path: Path, out: Path, edit) -> Path:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(out), metadata=metadata)
    return out


def _drop_scales(t):
    for k in [k for k in t if k.endswith("scale_weight")]:
        del t[k]


def _wrong_shape_scale(t):
    t["blocks.0.self_attn.q.scale_weight"] = torch.ones(3)


def _orphan_scale(t):
    t["blocks.7.self_attn.q.scale_weight"] = torch.tensor(0.01)


def _zero_scale(t):
    t["blocks.1.ffn.0.scale_weight"] = torch.tensor(0.0)


def _scale_on_fp16_weight(t):
    t["head.head.scale_weight"] = torch.tensor(0.01)


def _one_dim_per_row_scale(t):
    # a per-row scale stored 1-D would broadcast along the wrong axis of the (square) q matrix
    t["blocks.0.self_attn.q.scale_weight"] = torch.full((256,), 0.01)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop_scales, "have no scale"),
        (_wrong_shape_scale, "cannot scale"),
        (_orphan_scale, "not in the file"),
        (_zero_scale, "non-positive"),
        (_scale_on_fp16_weight, "not fp8"),
        (_one_dim_per_row_scale, "cannot scale"),
    ],
)
def test_fp8_scaled_with_bad_scales_is_refused(src, tmp_path, edit, message):
    good = save_comfy_transformer(src.high, tmp_path / "good.safetensors", fp8="scale_weight")
    bad = _mangle(good, tmp_path / "bad_fp8.safetensors", edit)
    with pytest.raises(ModelLoadError, match=message) as err:
        load_components(ModelConfig(high_noise=str(bad)), **ONLY_HIGH)
    assert "bad_fp8.safetensors" in str(err.value) and "model.high_noise" in str(err.value)


def test_unsupported_quantization_format_is_refused(src, tmp_path):
    good = save_comfy_transformer(src.high, tmp_path / "good.safetensors", fp8="weight_scale")

    def nvfp4(t):
        t["blocks.0.self_attn.q.comfy_quant"] = torch.tensor(
            list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8
        )

    bad = _mangle(good, tmp_path / "nvfp4.safetensors", nvfp4)
    with pytest.raises(ModelLoadError, match="nvfp4.*only fp16/bf16/fp32, fp8 and fp8_scaled"):
        load_components(ModelConfig(high_noise=str(bad)), **ONLY_HIGH)


def test_plain_fp8_file_loads_unscaled(src, inputs, tmp_path):
    tensors = {
        k: (v.to(FP8) if ".blocks." in f".{k}" and v.ndim == 2 else v)
        for k, v in comfy_transformer_tensors(src.high).items()
    }
    save_file(tensors, str(tmp_path / "high_fp8_e4m3fn.safetensors"))
    c = load_components(
        ModelConfig(high_noise=str(tmp_path / "high_fp8_e4m3fn.safetensors"), dtype="fp32"), **ONLY_HIGH
    )
    assert torch.equal(c.high.blocks[0].attn1.to_q.weight, tensors["blocks.0.self_attn.q.weight"].float())


def test_vae_inverse_mapping_round_trips_through_diffusers_converter(src):
    sd = src.vae.state_dict()
    original = vae_state_dict_to_original(sd)
    assert "encoder.conv1.weight" in original and "decoder.upsamples.4.shortcut.weight" in original
    back = convert_wan_vae_to_diffusers(original)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


# ------------------------------------------------------------------------------------------------ Hugging Face repo id


_HUB_SCRIPT = r"""
import sys
from safetensors.torch import save_file
from trainer_core.config import ModelConfig
from trainer_core.errors import ModelLoadError
from trainer_core.models import load_components

repo, revision, out = sys.argv[1], sys.argv[2], sys.argv[3]
c = load_components(ModelConfig(source=repo, revision=revision, dtype="fp32", text_encoder_dtype="fp32"))
tensors = {f"{name}.{k}": v.contiguous() for name in ("high", "low", "vae", "text_encoder")
           for k, v in getattr(c, name).state_dict().items() if k != "encoder.embed_tokens.weight"}
ids = " ".join(map(str, c.tokenizer("A cat dances").input_ids))
save_file(tensors, out, metadata={"base_model": c.base_model, "ids": ids})
try:
    load_components(ModelConfig(source=repo, revision="no-such-revision"), low=False, vae=False, text_encoder=False)
except ModelLoadError as exc:
    print("REFUSED:", exc)
"""


def test_repo_id_loads_from_hub_cache_offline(src, folder, tmp_path):
    sha = make_fake_hf_cache(folder, tmp_path / "hub")
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    out = tmp_path / "loaded.safetensors"
    run = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, FAKE_REPO_ID, sha, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = load_file(str(out))
    for name in ("high", "low", "vae", "text_encoder"):
        for k, v in getattr(src, name).state_dict().items():
            if k != "encoder.embed_tokens.weight":
                assert torch.equal(loaded[f"{name}.{k}"], v), (name, k)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["base_model"] == f"{FAKE_REPO_ID}@{sha}"
    assert meta["ids"] == " ".join(map(str, src.tokenizer("A cat dances").input_ids))
    assert "REFUSED:" in run.stdout and FAKE_REPO_ID in run.stdout and "no-such-revision" in run.stdout


# ------------------------------------------------------------------------------------------------ bad inputs


def test_missing_source_folder(tmp_path):
    missing = tmp_path / "nowhere" / "Wan2.2"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_components(ModelConfig(source=str(missing)))
    assert str(missing) in str(err.value)


def test_source_that_is_a_file_is_refused(src, tmp_path):
    path = save_comfy_transformer(src.high, tmp_path / "high.safetensors")
    with pytest.raises(ModelLoadError, match="model.high_noise"):
        load_components(ModelConfig(source=str(path)))


def test_folder_without_transformer_2(folder, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial, ignore=shutil.ignore_patterns("transformer_2"))
    with pytest.raises(ModelLoadError, match="transformer_2/") as err:
        load_components(ModelConfig(source=str(partial)))
    assert str(partial) in str(err.value) and "model.low_noise" in str(err.value)
    # ... but training only the high-noise expert does not need it.
    assert load_components(ModelConfig(source=str(partial)), low=False).low is None


def test_missing_comfy_file(tmp_path):
    missing = tmp_path / "wan2.2_t2v_high_noise_14B_fp16.safetensors"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_components(ModelConfig(high_noise=str(missing)), **ONLY_HIGH)
    assert str(missing) in str(err.value) and "model.high_noise" in str(err.value)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors") as err:
        load_components(ModelConfig(high_noise=str(path)), **ONLY_HIGH)
    assert "broken.safetensors" in str(err.value)


def test_non_wan_file_is_refused(tmp_path):
    sdxl_like = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
    }
    save_file(sdxl_like, str(tmp_path / "sd_xl_base_1.0.safetensors"))
    for setting, kw in (("model.high_noise", "high_noise"), ("model.low_noise", "low_noise")):
        with pytest.raises(ModelLoadError, match="not a Wan 2.2 T2V transformer") as err:
            load_components(
                ModelConfig(source="tiny", **{kw: str(tmp_path / "sd_xl_base_1.0.safetensors")}),
                vae=False,
                text_encoder=False,
            )
        assert "sd_xl_base_1.0.safetensors" in str(err.value) and setting in str(err.value)
    with pytest.raises(ModelLoadError, match="not the Wan 2.1 VAE") as err:
        load_components(
            ModelConfig(source="tiny", vae=str(tmp_path / "sd_xl_base_1.0.safetensors")),
            high=False,
            low=False,
            text_encoder=False,
        )
    assert "sd_xl_base_1.0.safetensors" in str(err.value)
    with pytest.raises(ModelLoadError, match="not a UMT5 text encoder") as err:
        load_components(
            ModelConfig(source="tiny", text_encoder=str(tmp_path / "sd_xl_base_1.0.safetensors")),
            high=False,
            low=False,
            vae=False,
        )
    assert "sd_xl_base_1.0.safetensors" in str(err.value)


def test_wrong_architecture_files_are_refused(src, tmp_path):
    base = comfy_transformer_tensors(src.high)
    # Wan 2.1 I2V: 36 input channels (noise + image latents + mask) and image cross-attention.
    i2v = dict(base)
    i2v["patch_embedding.weight"] = torch.zeros(256, 36, 1, 2, 2, dtype=torch.float16)
    i2v["blocks.0.cross_attn.k_img.weight"] = torch.zeros(256, 256, dtype=torch.float16)
    save_file(i2v, str(tmp_path / "wan2.1_i2v_480p_14B_fp16.safetensors"))
    with pytest.raises(ModelLoadError, match="image-to-video") as err:
        load_components(ModelConfig(high_noise=str(tmp_path / "wan2.1_i2v_480p_14B_fp16.safetensors")), **ONLY_HIGH)
    assert "wan2.1_i2v_480p_14B_fp16.safetensors" in str(err.value)
    # extra image-attention tensors in an otherwise T2V-shaped file
    extra = dict(base, **{"blocks.0.cross_attn.k_img.weight": torch.zeros(256, 256, dtype=torch.float16)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ModelLoadError, match="unexpected tensor.*k_img") as err:
        load_components(ModelConfig(high_noise=str(tmp_path / "extra.safetensors")), **ONLY_HIGH)
    assert "extra.safetensors" in str(err.value)
    # a tensor of the wrong shape, and a missing tensor
    wrong = dict(base, **{"blocks.1.ffn.2.weight": torch.zeros(256, 384, dtype=torch.float16)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ModelLoadError, match=r"wrong shape.*blocks\.1\.ffn\.2\.weight"):
        load_components(ModelConfig(high_noise=str(tmp_path / "wrong.safetensors")), **ONLY_HIGH)
    missing = {k: v for k, v in base.items() if k != "blocks.1.cross_attn.o.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing.*blocks\.1\.cross_attn\.o\.weight"):
        load_components(ModelConfig(high_noise=str(tmp_path / "missing.safetensors")), **ONLY_HIGH)


def test_wrong_text_encoder_and_vae_files_are_refused(src, tmp_path):
    # T5 (not UMT5): relative attention bias only in the first block.
    te = {k: v for k, v in src.text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    t5 = {k: v for k, v in te.items() if not (k.endswith("relative_attention_bias.weight") and ".block.0." not in k)}
    save_file(t5, str(tmp_path / "t5xxl_fp16.safetensors"))
    with pytest.raises(ModelLoadError, match="T5 encoder.*not UMT5") as err:
        load_components(
            ModelConfig(source="tiny", text_encoder=str(tmp_path / "t5xxl_fp16.safetensors")),
            high=False,
            low=False,
            vae=False,
        )
    assert "t5xxl_fp16.safetensors" in str(err.value)
    # A UMT5 file without spiece_model and no other tokenizer source.
    save_comfy_text_encoder(src.text_encoder, tmp_path / "umt5_no_tok.safetensors")
    with pytest.raises(ModelLoadError, match="no tokenizer.*model.tokenizer"):
        load_components(
            ModelConfig(high_noise="unused.safetensors", text_encoder=str(tmp_path / "umt5_no_tok.safetensors")),
            high=False,
            low=False,
            vae=False,
        )
    # ... which model.tokenizer fixes (a spiece.model file).
    (tmp_path / "spiece.model").write_bytes(tiny_spiece_model())
    c = load_components(
        ModelConfig(
            high_noise="unused.safetensors",
            text_encoder=str(tmp_path / "umt5_no_tok.safetensors"),
            tokenizer=str(tmp_path / "spiece.model"),
        ),
        high=False,
        low=False,
        vae=False,
    )
    assert c.tokenizer("A cat").input_ids == src.tokenizer("A cat").input_ids
    # Wan 2.2 TI2V-5B VAE: 48 latent channels.
    vae = vae_state_dict_to_original(src.vae.state_dict())
    vae["conv2.weight"] = torch.zeros(48, 48, 1, 1, 1)
    save_file(vae, str(tmp_path / "wan2.2_vae.safetensors"))
    with pytest.raises(ModelLoadError, match="48 latent channels") as err:
        load_components(
            ModelConfig(source="tiny", vae=str(tmp_path / "wan2.2_vae.safetensors")),
            high=False,
            low=False,
            text_encoder=False,
        )
    assert "wan2.2_vae.safetensors" in str(err.value)
    # An intact fp8_scaled expert file in the VAE or text encoder slot is named as the wrong kind of file, not as a
    # damaged one (its scaled_fp8 marker sits behind the model prefix, which those readers do not strip).
    expert = save_comfy_transformer(src.high, tmp_path / "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
                                    prefix=True, fp8="scale_weight")
    for slot, message in (("vae", "is not the Wan 2.1 VAE"), ("text_encoder", "")):
        with pytest.raises(ModelLoadError) as err:
            check_model_files(ModelConfig(source="tiny", **{slot: str(expert)}))
        assert "no scale" not in str(err.value) and message in str(err.value), str(err.value)


def test_mismatched_experts_are_refused(src, tmp_path):
    smaller = WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 1})
    path = save_comfy_transformer(smaller, tmp_path / "other_low.safetensors")
    with pytest.raises(ModelLoadError, match="different architectures"):
        load_components(ModelConfig(source="tiny", low_noise=str(path)), vae=False, text_encoder=False)


# ------------------------------------------------------------------------------------------------ selective loading


def test_unrequested_components_are_never_opened(src, tmp_path):
    files = save_comfy_files(src, tmp_path)
    nowhere = str(tmp_path / "does-not-exist.safetensors")
    c = load_components(
        ModelConfig(high_noise=nowhere, low_noise=str(files["low"]), vae=nowhere, text_encoder=nowhere),
        high=False,
        vae=False,
        text_encoder=False,
    )
    assert c.high is None and c.vae is None and c.text_encoder is None and c.tokenizer is None and c.low is not None
    c = load_components(
        ModelConfig(high_noise=str(files["high"]), low_noise=nowhere), low=False, vae=False, text_encoder=False
    )
    assert c.low is None and c.high is not None
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        load_components(ModelConfig(high_noise=str(files["high"]), low_noise=nowhere), vae=False, text_encoder=False)


def test_comfy_vae_file_with_bf16_storage(src, inputs, tmp_path):
    path = save_comfy_vae(src.vae, tmp_path / "wan_2.1_vae.safetensors", dtype=torch.bfloat16)
    c = load_components(
        ModelConfig(source="tiny", vae=str(path), vae_dtype="bf16"), high=False, low=False, text_encoder=False
    )
    assert all(p.dtype == torch.bfloat16 for p in c.vae.parameters())
    assert _rel(_outputs(c, inputs)["vae"], _outputs(src, inputs)["vae"]) < 3e-2


def test_base_model_description():
    assert describe_base_model(ModelConfig(source="tiny")) == "tiny"
    assert (
        describe_base_model(ModelConfig(source="Wan-AI/Wan2.2-T2V-A14B-Diffusers", revision="abc"))
        == "Wan-AI/Wan2.2-T2V-A14B-Diffusers@abc"
    )
    cfg = ModelConfig(
        high_noise="/m/wan2.2_t2v_high_noise_14B_fp16.safetensors",
        low_noise="/m/wan2.2_t2v_low_noise_14B_fp16.safetensors",
    )
    assert (
        describe_base_model(cfg)
        == "wan2.2_t2v_high_noise_14B_fp16.safetensors + wan2.2_t2v_low_noise_14B_fp16.safetensors"
    )
    assert describe_base_model(ModelConfig(source="tiny", low_noise="/m/low.safetensors")) == "tiny + low.safetensors"


def _mapped_file_bytes() -> int:
    """Resident bytes of files this process has memory-mapped (Linux)."""
    return int(re.search(r"RssFile:\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024


def test_reading_a_file_keeps_at_most_remap_bytes_of_it_mapped(tmp_path, monkeypatch):
    # safetensors returns views of a memory map whose pages stay resident while it is open: a 14 GB expert read
    # tensor by tensor would otherwise add its whole size to host memory beside the converted copy.
    import trainer_core.models.single_file as single_file

    path = tmp_path / "fp8.safetensors"
    names = [f"blocks.{i}.ffn.net.0.proj.weight" for i in range(12)]
    save_file({n: torch.randn(2048, 4096).to(torch.float8_e4m3fn) for n in names}, str(path))  # 8 MiB each
    grown = {}
    for remap in (1 << 40, 16 << 20):
        monkeypatch.setattr(single_file, "REMAP_BYTES", remap)
        with single_file.SingleFile(path, "model.high_noise") as f:
            base, grown[remap] = _mapped_file_bytes(), 0
            for n in names:
                assert f.get(n).dtype == torch.float32
                grown[remap] = max(grown[remap], _mapped_file_bytes() - base)
    assert grown[1 << 40] > 80 << 20  # without remapping, the whole file stays resident
    assert grown[16 << 20] <= 24 << 20  # with it, at most REMAP_BYTES plus one tensor


def test_a_loaded_expert_keeps_no_view_of_its_file(tmp_path):
    # Tensors the file already holds in the wanted dtype (norms, biases, embeddings beside the fp8 weights) are
    # copied: a view would keep the whole memory map, with every page read, alive as long as the model.
    model = WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 4, "ffn_dim": 2048,
                                     "attention_head_dim": 64, "num_attention_heads": 8}).to(torch.bfloat16)
    tensors = comfy_transformer_tensors(model, torch.bfloat16, prefix=True)
    tensors, _ = quantize_fp8_scaled(tensors, fp8_transformer_targets(tensors), "scale_weight",
                                     prefix=DIFFUSION_MODEL_PREFIX)
    path = tmp_path / "expert_fp8_scaled.safetensors"
    save_file(tensors, str(path))
    base = _mapped_file_bytes()
    loaded = load_transformer_file(path, torch.bfloat16, "model.high_noise")
    assert _mapped_file_bytes() - base < path.stat().st_size // 8
    mapped = [tuple(int(a, 16) for a in line.split()[0].split("-"))
              for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(path))]
    assert not any(lo <= p.data_ptr() < hi for p in loaded.parameters() for lo, hi in mapped)  # no parameter in it
