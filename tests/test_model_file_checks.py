"""Model files and folders that cannot train are refused from their headers and config files, before any weight is
read, in one line naming the file or subfolder and what to do: experts, VAE and text encoder that do not fit each
other, broken diffusers folders, and files this trainer cannot read (GGUF, pickles, downloads cut short)."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file
from transformers import UMT5Config, UMT5EncoderModel

from tests.model_fixtures import (
    save_comfy_files,
    save_comfy_text_encoder,
    save_comfy_transformer,
    save_diffusers_folder,
    tiny_components,
)
from trainer_core.config import ModelConfig
from trainer_core.errors import ModelLoadError
from trainer_core.models import check_model_files, load_components, loading
from trainer_core.models.single_file import safetensors_problem
from trainer_core.models.tiny import TINY_TEXT_ENCODER_CONFIG, TINY_TRANSFORMER_CONFIG, tiny_spiece_model

ONLY_TEXT = {"high": False, "low": False, "vae": False}


@pytest.fixture(scope="module")
def src():
    return tiny_components()


@pytest.fixture(scope="module")
def comfy(src, tmp_path_factory) -> dict[str, Path]:
    """The tiny preset's four ComfyUI files."""
    return save_comfy_files(src, tmp_path_factory.mktemp("comfy"))


@pytest.fixture(scope="module")
def folder(src, tmp_path_factory) -> Path:
    """The tiny preset as a diffusers folder, its low-noise expert in shards (as the 14B one ships)."""
    root = save_diffusers_folder(src, tmp_path_factory.mktemp("diffusers") / "Wan2.2-tiny")
    shutil.rmtree(root / "transformer_2")
    src.low.save_pretrained(root / "transformer_2", max_shard_size="1MB")
    assert len(list((root / "transformer_2").glob("*-of-*.safetensors"))) > 2
    return root


@pytest.fixture
def no_weights(monkeypatch):
    """Every weight loader fails the test: what is refused here is refused from headers and config files."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model weight was loaded")

    for name in ("_expert", "_vae", "_text_encoder"):
        monkeypatch.setattr(loading, name, refuse)


def _refused(cfg: ModelConfig, **parts: bool) -> str:
    """The one-line message both the pre-flight's check and the loader (training's path) refuse ``cfg`` with."""
    with pytest.raises(ModelLoadError) as checked:
        check_model_files(cfg, **parts)
    with pytest.raises(ModelLoadError) as loaded:
        load_components(cfg, **parts)
    assert str(checked.value) == str(loaded.value) and "\n" not in str(checked.value)
    return str(checked.value)


def _comfy_cfg(comfy: dict[str, Path], **files: Path) -> ModelConfig:
    paths = {"high_noise": comfy["high"], "low_noise": comfy["low"], "text_encoder": comfy["text_encoder"],
             "vae": comfy["vae"], **files}
    return ModelConfig(**{k: str(v) for k, v in paths.items()})


# ------------------------------------------------------------------------------------ components that do not fit


def test_ti2v_5b_experts_are_refused_by_name(comfy, tmp_path, no_weights):
    # Wan 2.2 TI2V-5B: 48 latent channels in and out (its own VAE's), so the image-to-video rule does not catch it
    model = WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "in_channels": 48, "out_channels": 48})
    ti2v = save_comfy_transformer(model, tmp_path / "wan2.2_ti2v_5B.safetensors")
    message = _refused(_comfy_cfg(comfy, high_noise=ti2v, low_noise=ti2v))
    assert message.startswith("model.high_noise: wan2.2_ti2v_5B.safetensors")
    assert "Wan 2.2 TI2V-5B" in message and "48 latent channels, not the Wan 2.1 VAE's 16" in message
    message = _refused(_comfy_cfg(comfy, low_noise=ti2v))
    assert message.startswith("model.low_noise: wan2.2_ti2v_5B.safetensors") and "TI2V-5B" in message


def test_experts_of_two_architectures_are_refused_naming_both(comfy, tmp_path, no_weights):
    deeper = save_comfy_transformer(WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 3}),
                                    tmp_path / "wan2.1_t2v_1.3B.safetensors")
    message = _refused(_comfy_cfg(comfy, low_noise=deeper))
    assert message.startswith("the high- and low-noise experts have different architectures (high vs low: "
                              "num_layers 2 vs 3; model.high_noise (wan2.2_t2v_high_noise_tiny.safetensors), "
                              "model.low_noise (wan2.1_t2v_1.3B.safetensors))")
    # one trained expert needs no twin
    check_model_files(_comfy_cfg(comfy, low_noise=deeper), high=False)


def test_a_text_encoder_of_another_width_is_refused(comfy, tmp_path, no_weights):
    wide = UMT5EncoderModel(UMT5Config(**{**TINY_TEXT_ENCODER_CONFIG, "d_model": 128}))
    te = save_comfy_text_encoder(wide, tmp_path / "umt5_wide.safetensors", spiece_model=tiny_spiece_model())
    message = _refused(_comfy_cfg(comfy, text_encoder=te))
    assert message.startswith("model.high_noise (wan2.2_t2v_high_noise_tiny.safetensors) takes 64-wide text "
                              "embeddings but model.text_encoder (umt5_wide.safetensors) makes 128")


def _edit_config(root: Path, sub: str, **changes) -> None:
    path = root / sub / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("sub", "changes", "expected"),
    [
        ("transformer_2", {"num_layers": 3}, r"^the high- and low-noise experts have different architectures "
                                             r"\(high vs low: num_layers 2 vs 3; model\.source .*/transformer/, "
                                             r"model\.source .*/transformer_2/\)"),
        ("transformer", {"in_channels": 36}, r"^model\.source .*/transformer/ is an image-to-video model "
                                             r"\(36 input vs 16 output channels\)"),
        ("vae", {"z_dim": 48}, r"^model\.source .*/vae/ is a VAE with 48 latent channels.*wan_2\.1_vae"),
        ("text_encoder", {"d_model": 32}, r"^model\.source .*/transformer/ takes 64-wide text embeddings but "
                                          r"model\.source .*/text_encoder/ makes 32"),
    ],
    ids=["experts", "i2v", "vae", "text_encoder"],
)
def test_folder_components_that_do_not_fit_are_refused_from_config_json(folder, tmp_path, no_weights, sub,
                                                                        changes, expected):
    root = shutil.copytree(folder, tmp_path / "f")
    _edit_config(root, sub, **changes)
    assert re.match(expected, _refused(ModelConfig(source=str(root)))), expected


# ------------------------------------------------------------------------------------------ broken diffusers folders


def _drop(root: Path, pattern: str) -> None:
    for path in sorted(root.glob(pattern))[-1:]:
        path.unlink()


BROKEN_FOLDERS = {
    "text_encoder_config": (lambda r: _drop(r, "text_encoder/config.json"),
                            "{r}/text_encoder/config.json is missing (the text encoder's settings): the folder is "
                            "incomplete - download it again"),
    "low_config": (lambda r: _drop(r, "transformer_2/config.json"),
                   "{r}/transformer_2/config.json is missing (the low-noise expert's settings): the folder is "
                   "incomplete"),
    "shard": (lambda r: _drop(r, "transformer_2/*-of-*.safetensors"),
              "{r}/transformer_2/diffusion_pytorch_model-{n:05d}-of-{n:05d}.safetensors (listed in "
              "diffusion_pytorch_model.safetensors.index.json) is missing: the folder is incomplete"),
    "index": (lambda r: _drop(r, "transformer_2/*.index.json"),
              "{r}/transformer_2/ has weight shards (diffusion_pytorch_model-00001-of-{n:05d}.safetensors, ...) but "
              "not diffusion_pytorch_model.safetensors.index.json, which lists them: the folder is incomplete"),
    "no_weights": (lambda r: _drop(r, "vae/diffusion_pytorch_model.safetensors"),
                   "{r}/vae/ has no weights (diffusion_pytorch_model.safetensors, or "
                   "diffusion_pytorch_model.safetensors.index.json and its shards): the folder is incomplete"),
    "cut_short": (lambda r: (r / "text_encoder/model.safetensors").write_bytes(
                      (r / "text_encoder/model.safetensors").read_bytes()[:-1000]),
                  "{r}/text_encoder/model.safetensors is cut short: {size} bytes of the {full} its header describes "
                  "(1,000 missing), so the download did not finish - download it again"),
    "tokenizer": (lambda r: _drop(r, "tokenizer/tokenizer.json"),
                  "{r}/tokenizer/ has neither tokenizer.json nor spiece.model (the tokenizer's vocabulary): the "
                  "tokenizer is incomplete - download it again"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
def test_a_broken_diffusers_folder_is_named_before_any_weight_loads(folder, tmp_path, no_weights, case):
    root = shutil.copytree(folder, tmp_path / "f")
    full = (root / "text_encoder/model.safetensors").stat().st_size
    shards = len(list((root / "transformer_2").glob("*-of-*.safetensors")))
    break_it, expected = BROKEN_FOLDERS[case]
    break_it(root)
    message = _refused(ModelConfig(source=str(root)))
    assert message.startswith("model.source: " + expected.format(r=root, n=shards, size=f"{full - 1000:,}",
                                                                 full=f"{full:,}")), message


def test_a_tokenizer_folder_without_its_vocabulary_is_refused(tmp_path, no_weights):
    # T5Tokenizer builds a tokenizer of a few placeholder tokens from such a folder, without an error
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text("{}")
    message = _refused(ModelConfig(source="tiny", tokenizer=str(tmp_path)), **ONLY_TEXT)
    assert message == (f"model.tokenizer: {tmp_path}/tokenizer/ has neither tokenizer.json nor spiece.model (the "
                       "tokenizer's vocabulary): the tokenizer is incomplete - download it again")


def test_the_intact_folder_passes_the_checks(folder):
    check_model_files(ModelConfig(source=str(folder)))


def test_a_loader_failure_inside_a_folder_is_one_line_naming_the_component(folder, tmp_path):
    # a config.json that no longer fits the weights (d_ff): transformers raises a RuntimeError about
    # ignore_mismatched_sizes, which used to end the run in a traceback
    root = shutil.copytree(folder, tmp_path / "f")
    _edit_config(root, "text_encoder", d_ff=256)
    check_model_files(ModelConfig(source=str(root)), **ONLY_TEXT)  # config.json alone cannot tell
    with pytest.raises(ModelLoadError) as err:
        load_components(ModelConfig(source=str(root)), **ONLY_TEXT)
    message = str(err.value)
    assert message.startswith(f"model.source: could not load the text encoder from {root}/text_encoder/: ")
    assert message.endswith("the folder is damaged or incomplete: download it again") and "\n" not in message


# ------------------------------------------------------------------------- files this trainer cannot read: say why


def _gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0" * 4096)
    return path


def _pickle(path: Path, src, zipped: bool) -> Path:
    torch.save(dict(src.high.state_dict()), str(path), _use_new_zipfile_serialization=zipped)
    return path


def _cut(path: Path, comfy, keep) -> Path:
    data = comfy["high"].read_bytes()
    path.write_bytes(data[: keep(len(data))])
    return path


SAME_MODEL = "use the fp16/bf16 or fp8_scaled .safetensors of the same model (e.g. Comfy-Org's {example})"
HIGH_EXAMPLE = "wan2.2_t2v_high_noise_14B_fp16.safetensors"
UNREADABLE = {
    "gguf": (lambda p, s, c: _gguf(p / "wan2.2_t2v_high_noise_14B_Q4_K_M.gguf"),
             "is a GGUF file (llama.cpp-style quantization), which this trainer cannot read - " + SAME_MODEL),
    "gguf_renamed": (lambda p, s, c: _gguf(p / "high.safetensors"),
                     "is a GGUF file (llama.cpp-style quantization), which this trainer cannot read - " + SAME_MODEL),
    "pt_zip": (lambda p, s, c: _pickle(p / "high.pt", s, True),
               "is a PyTorch pickle checkpoint (.pt/.ckpt), which this trainer does not read - " + SAME_MODEL),
    "pt_legacy": (lambda p, s, c: _pickle(p / "high.ckpt", s, False),
                  "is a PyTorch pickle checkpoint (.pt/.ckpt), which this trainer does not read - " + SAME_MODEL),
    "cut_tail": (lambda p, s, c: _cut(p / "high.safetensors", c, lambda n: n - 4096),
                 "is cut short: {size} bytes of the {full} its header describes (4,096 missing), so the download "
                 "did not finish - download it again"),
    "cut_half": (lambda p, s, c: _cut(p / "high.safetensors", c, lambda n: n // 2),
                 "is cut short: {size} bytes of the {full} its header describes ({missing} missing), so the download "
                 "did not finish - download it again"),
    "cut_header": (lambda p, s, c: _cut(p / "high.safetensors", c, lambda n: 100),
                   "is cut short: 100 bytes, less than its own header needs ({header}) - download it again"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_an_unreadable_expert_file_says_why_and_what_to_do(src, comfy, tmp_path, no_weights, case):
    make, expected = UNREADABLE[case]
    path = make(tmp_path, src, comfy)
    size, full = path.stat().st_size, comfy["high"].stat().st_size
    header = 8 + int.from_bytes(comfy["high"].read_bytes()[:8], "little")
    message = _refused(ModelConfig(source="tiny", high_noise=str(path)), low=False)
    assert message == f"model.high_noise: {path} " + expected.format(
        example=HIGH_EXAMPLE, size=f"{size:,}", full=f"{full:,}", missing=f"{full - size:,}", header=f"{header:,}")


@pytest.mark.parametrize(("setting", "example"), [("vae", "wan_2.1_vae.safetensors"),
                                                  ("text_encoder", "umt5_xxl_fp16.safetensors")])
def test_the_advice_names_the_file_of_the_same_component(tmp_path, no_weights, setting, example):
    path = _gguf(tmp_path / "component.gguf")
    message = _refused(ModelConfig(source="tiny", **{setting: str(path)}), high=False, low=False)
    assert message.startswith(f"model.{setting}: {path} is a GGUF file") and message.endswith(
        SAME_MODEL.format(example=example))


def test_an_intact_file_has_no_header_problem(comfy):
    assert all(safetensors_problem(path) is None for path in comfy.values())
    assert load_file(str(comfy["high"]))  # the reference reader agrees that it is whole
