"""LoRA files of ComfyUI's own trainer (comfy_extras/nodes_train.py): block LoRAs plus LoRAs on the layers outside the
blocks and full-weight differences of every norm weight (``.diff``) and bias (``.diff_b``). Renders (Load Wan22 LoRA
Pair -> Preview Sample, ``python -m trainer_core sample``) apply them as ComfyUI patches them; continuing training
from one is refused by name.

Reference: ComfyUI's ``calculate_weight`` semantics written out in float64 (tests/lora_fixtures.py
``comfy_patched``), independent of the pack's reader and merger.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft.helpers import rescale_adapter_scale
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import comfy_fakes as F  # noqa: E402

from tests.lora_fixtures import comfy_patched, comfy_trainer_lora  # noqa: E402
from tests import test_lora_formats  # noqa: E402
from tests.test_lora_formats import ARCH, SMALL_RENDER, _job  # noqa: E402
from trainer_core.bundle import LoraPair, lora_attached  # noqa: E402
from trainer_core.cli import main  # noqa: E402
from trainer_core.config import SampleConfig, job_from_dict  # noqa: E402
from trainer_core.errors import LoraFileError  # noqa: E402
from trainer_core.keys import (  # noqa: E402
    diffusers_key_to_original,
    diffusers_module_to_original,
    diffusers_state_dict_to_original,
)
from trainer_core.lora import adapter_config, merged_patches, read_lora_file, split_patches  # noqa: E402
from trainer_core.models import load_components  # noqa: E402
from trainer_core.models.tiny import tiny_transformer  # noqa: E402
from trainer_core.sample import attach_lora_file, encode_sample_prompts, render, sample_videos  # noqa: E402
from trainer_core.train import loop as loop_module  # noqa: E402


def _original_weights(expert: str) -> dict[str, torch.Tensor]:
    return diffusers_state_dict_to_original(tiny_transformer(expert).state_dict())


def _write(path: Path, expert: str, seed: int = 0) -> dict[str, torch.Tensor]:
    tensors = comfy_trainer_lora(_original_weights(expert), seed)
    save_file(tensors, str(path))
    return tensors


def _effective(model: torch.nn.Module, strength: float) -> dict[str, torch.Tensor]:
    """The weights ``model`` computes with, original names, float64: merged weights plus the adapter at
    ``strength`` (what the sampler's strength does to it)."""
    out = {}
    for name, module in model.named_modules():
        try:
            original = diffusers_module_to_original(name)
        except KeyError:
            continue
        base = module.get_base_layer() if isinstance(module, LoraLayer) else module
        for attr in ("weight", "bias"):
            if getattr(base, attr, None) is not None:
                out[f"{original}.{attr}"] = getattr(base, attr).detach().double()
        if isinstance(module, LoraLayer):
            a, b = (w["default"].weight.detach().double() for w in (module.lora_A, module.lora_B))
            out[f"{original}.weight"] = out[f"{original}.weight"] + strength * module.scaling["default"] * (b @ a)
    return out


def _patched_expert(expert: str, lora: dict[str, torch.Tensor], strength: float) -> torch.nn.Module:
    """A tiny expert whose weights are ComfyUI's patched ones (float64 math, stored in float32)."""
    model = tiny_transformer(expert)
    patched = comfy_patched(_original_weights(expert), lora, strength)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if not key.endswith("scale_shift_table"):
                param.copy_(patched[diffusers_key_to_original(key)])
    return model


def test_a_comfyui_trainer_file_renders_as_comfyui_patches_it_and_leaves_the_expert_clean(tmp_path):
    lora = _write(tmp_path / "comfy_trainer.safetensors", "high", seed=1)
    tensors = read_lora_file(tmp_path / "comfy_trainer.safetensors", "lora_high", arch=ARCH)
    adapter, patches = split_patches(tensors)
    assert adapter and {k.rsplit(".", 1)[-1] for k in patches} >= {"diff", "diff_b", "weight", "alpha"}
    pair = LoraPair(adapter_config(adapter), {"high": tensors})
    model, fresh = tiny_transformer("high"), tiny_transformer("high").state_dict()
    reference = {k: v for k, v in comfy_patched(_original_weights("high"), lora, 0.6).items()
                 if not k.endswith("modulation")}  # no LoRA patches a modulation table
    with lora_attached(model, pair, "high", strength=0.6), rescale_adapter_scale(model, 0.6):
        effective = _effective(model, 1.0)
    assert effective.keys() == reference.keys()
    for key, ref in reference.items():
        patch = (ref - _original_weights("high")[key].double()).norm()
        # merged weights are stored in float32 (as ComfyUI stores them): their rounding on top of 1e-6 of the patch
        assert float((effective[key] - ref).norm()) < float(1e-6 * patch + 2**-23 * ref.norm()), key
    # every tensor back bit for bit, no adapter left
    assert not getattr(model, "peft_config", None)
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())
    # attaching the file as an adapter alone would drop its differences: refused
    with pytest.raises(LoraFileError, match=r"comfy_trainer\.safetensors holds full-weight differences .* which no "
                                            r"adapter holds"):
        attach_lora_file(model, tmp_path / "comfy_trainer.safetensors", setting="lora_high")


def test_a_weight_patch_of_a_quantized_layer_is_refused_before_any_weight_changes(tmp_path):
    model = tiny_transformer("low")
    model.blocks[0].attn1.to_q.weight = None  # as a quantized layer holds it (FrozenQuantLinear)
    patches = {"diffusion_model.blocks.0.norm3.diff": torch.ones(256),
               "diffusion_model.blocks.0.self_attn.q.diff": torch.ones(256, 256)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraFileError, match=r"^x\.safetensors patches blocks\.0\.self_attn\.q\.weight, which these "
                                            r"experts hold quantized"):
        with merged_patches(model, patches, 1.0, "x.safetensors"):
            pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


N = test_lora_formats.N  # the node fixture (nodes, host)


def test_load_pair_to_preview_sample_and_apply_render_a_comfyui_trainer_pair(N):
    nodes, host = N
    lora = _write(host.folder("loras") / "trained_1_steps.safetensors", "low", seed=2)
    (pair,) = F.call(nodes["Wan22LoadLoraPair"], lora_high="none", strength_high=1.0,
                     lora_low="trained_1_steps.safetensors", strength_low=0.5)
    (bundle,) = F.call(nodes["Wan22LoadExperts"], **{**F.defaults(nodes["Wan22LoadExperts"]), "source": "tiny",
                                                     "dtype": "fp32", "text_encoder_dtype": "fp32"})
    preview = nodes["Wan22PreviewSample"]
    settings = {**F.defaults(preview), **SMALL_RENDER, "prompts": "a red square", "boundary": 0.9,
                "lora_strength_low": 0.6}
    (frames,) = F.call(preview, experts=bundle, lora=pair, **settings)
    ref = load_components(bundle.model)
    cfg = SampleConfig(**{**SMALL_RENDER, "prompts": ["a red square"]})
    video = sample_videos(ref.high, _patched_expert("low", lora, 0.5 * 0.6), ref.vae,
                          encode_sample_prompts(ref.text_encoder, ref.tokenizer, cfg), cfg, 0.9)
    torch.testing.assert_close(frames, video[0], rtol=0, atol=1e-5)
    fresh = tiny_transformer("low").state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in bundle.loaded.low.state_dict().items())  # the store stays clean
    # Apply hands every tensor (differences included) to ComfyUI's own loader, after checking they fit the model
    model = F.comfy_model(_original_weights("low"))
    F.call(nodes["Wan22ApplyLoraPair"], model_high=model, model_low=model, lora=pair, strength_high=1.0,
           strength_low=1.0)
    assert host.patches[-1][1] is pair.tensors["low"] and any(k.endswith(".diff_b") for k in host.patches[-1][1])


def test_sample_cli_renders_a_comfyui_trainer_file(tmp_path, monkeypatch):
    lora = _write(tmp_path / "comfy.safetensors", "high", seed=3)
    job = {**_job(tmp_path), "multistage": {"boundary": 0.9}}
    job["sample"] = {**job["sample"], "lora_strength_high": 0.7}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    written = {}
    monkeypatch.setattr(render, "write_video", lambda frames, p, *a, **k: written.setdefault(Path(p).name, frames))
    assert main(["sample", str(tmp_path / "job.yaml"), "--lora-high", str(tmp_path / "comfy.safetensors"),
                 "--prompt", "a red square", "--out", str(tmp_path / "v.mp4")]) == 0
    ref = load_components(job_from_dict(job).model)
    cfg = SampleConfig(**{**SMALL_RENDER, "prompts": ["a red square"]})
    video = sample_videos(_patched_expert("high", lora, 0.7), ref.low, ref.vae,
                          encode_sample_prompts(ref.text_encoder, ref.tokenizer, cfg), cfg, 0.9)
    torch.testing.assert_close(written["v.mp4"], video[0], rtol=0, atol=1e-5)


def test_training_from_a_comfyui_trainer_file_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    _write(tmp_path / "comfy.safetensors", "high")
    monkeypatch.setattr(loop_module, "load_components", lambda *a, **k: pytest.fail("a model loaded"))
    cfg = job_from_dict({**_job(tmp_path), "lora": {"rank": 8, "init_high": str(tmp_path / "comfy.safetensors")}})
    with pytest.raises(LoraFileError, match=r"^lora\.init_high: .*comfy\.safetensors holds full-weight differences "
                                            r"\(.*\) and LoRAs outside the transformer blocks' layers \(head\.head.*: "
                                            r"training here cannot continue from it .* continue it with ComfyUI's "
                                            r"Train LoRA node \(existing_lora\), or remove lora\.init_high"):
        loop_module.run_training(cfg)
