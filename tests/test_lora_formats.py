"""LoRA files of every common Wan trainer: read as ComfyUI reads them, refused by name when made for another model,
rendered (Load Wan22 LoRA Pair -> Preview Sample, ``python -m trainer_core sample``) and trained on from
(``lora.init_high`` / ``init_low``).

Reference: ComfyUI's LoraLoaderModelOnly semantics written out in float64 (patched weight W + strength · (alpha /
rank) · up @ down per module, scale 1 without alpha; tests/lora_fixtures.py), independent of the pack's reader.
ComfyUI itself is not importable here; /work/comfy/compare_lora_formats.py runs the same files through ComfyUI's
own UNETLoader + LoraLoaderModelOnly (README: LoRA files in).
"""

from __future__ import annotations

import re
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import comfy_fakes as F  # noqa: E402

from tests.lora_fixtures import FORMATS, comfy_patch, write_diffusers_with_metadata, write_lora  # noqa: E402
from trainer_core.cli import main  # noqa: E402
from trainer_core.config import LoraConfig, SampleConfig, job_from_dict  # noqa: E402
from trainer_core.data import make_synthetic_dataset  # noqa: E402
from trainer_core.errors import ConfigError, LoraFileError  # noqa: E402
from trainer_core.keys import (  # noqa: E402
    LORA_TARGET_TO_DIFFUSERS,
    diffusers_module_to_original,
    diffusers_state_dict_to_original,
    parse_lora_key,
)
from trainer_core.lora import (  # noqa: E402
    adapter_config,
    attach_lora,
    load_lora_tensors,
    pair_warnings,
    read_lora_file,
    wan_weight_shapes,
)
from trainer_core.lora import formats as formats_module  # noqa: E402
from trainer_core.models import load_components  # noqa: E402
from trainer_core.models.tiny import TINY_TRANSFORMER_CONFIG, tiny_transformer  # noqa: E402
from trainer_core.sample import encode_sample_prompts, render, sample_videos  # noqa: E402
from trainer_core.train import loop as loop_module  # noqa: E402

ARCH = TINY_TRANSFORMER_CONFIG
SMALL_RENDER = dict(width=32, height=32, num_frames=5, steps=3, shift=5.0, guidance_high=3.0, guidance_low=2.0,
                    seed=11)


def _diffusers_name(module: str) -> str:
    _, block, target = module.split(".", 2)
    return f"blocks.{block}.{LORA_TARGET_TO_DIFFUSERS[target]}"


def _core_patched(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights the adapter attached to ``model`` applies: W + scaling · B @ A per module, in float64."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
            w = layer.get_base_layer().weight.detach().double()
            out[diffusers_module_to_original(name)] = w + layer.scaling["default"] * (b @ a)
    return out


def _max_rel(model: torch.nn.Module, expected: dict, base: torch.nn.Module, strength: float = 1.0) -> float:
    """Largest ‖core − ComfyUI‖ / ‖ComfyUI's patch‖ over every adapted module (modules the file lacks: unpatched)."""
    core, worst = _core_patched(model), 0.0
    for module, patched in core.items():
        w = base.get_submodule(_diffusers_name(module)).weight.detach()
        ref = comfy_patch(w, *expected[module], strength) if module in expected else w.double()
        delta = (ref - w.double()).norm() if module in expected else w.double().norm()
        worst = max(worst, float((patched - ref).norm() / delta))
    return worst


def _merged(expert: str, expected: dict, strength: float = 1.0) -> torch.nn.Module:
    """A tiny expert with ComfyUI's patched weights merged in (float64 math, stored in float32)."""
    model = tiny_transformer(expert)
    with torch.no_grad():
        for module, (down, up, scale) in expected.items():
            w = model.get_submodule(_diffusers_name(module)).weight
            w.copy_(comfy_patch(w, down, up, scale, strength))
    return model


# ------------------------------------------------------------------------------------------------ formats


def test_key_names_of_every_format_map_to_original_modules():
    assert parse_lora_key("diffusion_model.blocks.3.self_attn.q.lora_down.weight") == (
        "blocks.3.self_attn.q", "down", "comfyui")
    assert parse_lora_key("diffusion_model.blocks.3.ffn.2.lora_B.weight") == ("blocks.3.ffn.2", "up", "comfyui")
    assert parse_lora_key("lora_unet_blocks_12_cross_attn_o.alpha") == ("blocks.12.cross_attn.o", "alpha", "kohya")
    assert parse_lora_key("lora_unet__blocks_0_ffn_0.lora_up.weight") == ("blocks.0.ffn.0", "up", "kohya")
    assert parse_lora_key("transformer.blocks.1.attn1.to_out.0.lora_A.weight") == (
        "blocks.1.self_attn.o", "down", "diffusers")
    assert parse_lora_key("transformer.blocks.1.ffn.net.0.proj.lora_B.weight") == ("blocks.1.ffn.0", "up", "diffusers")
    assert parse_lora_key("blocks.0.self_attn.q.lora_A.weight") is None  # ComfyUI maps no unprefixed key
    assert parse_lora_key("diffusion_model.blocks.0.self_attn.q.hada_w1_a") is None
    # peft's own state dict, ComfyUI's trainer's differences, kohya names of the layers outside the blocks
    assert parse_lora_key("diffusion_model.blocks.0.ffn.2.lora_B.default.weight") == ("blocks.0.ffn.2", "up", "comfyui")
    assert parse_lora_key("diffusion_model.blocks.0.norm3.diff_b") == ("blocks.0.norm3", "diff_b", "comfyui")
    assert parse_lora_key("lora_unet_blocks_2_self_attn_norm_k.diff") == ("blocks.2.self_attn.norm_k", "diff", "kohya")
    assert parse_lora_key("lora_unet_time_projection_1.lora_down.weight") == ("time_projection.1", "down", "kohya")
    assert parse_lora_key("lora_unet_head_head.alpha") == ("head.head", "alpha", "kohya")


def test_wan_weight_shapes_are_the_models_own():
    # Reference: diffusers' WanTransformer3DModel built for the config, its names mapped to ComfyUI's
    from diffusers import WanTransformer3DModel

    other = {**ARCH, "num_layers": 3, "num_attention_heads": 3, "ffn_dim": 96, "text_dim": 32, "in_channels": 36}
    for arch in (ARCH, other):
        model = WanTransformer3DModel(**arch)
        ref = {k: tuple(v.shape) for k, v in diffusers_state_dict_to_original(model.state_dict()).items()
               if not k.endswith("modulation")}
        assert wan_weight_shapes(arch) == ref


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_applies_as_comfyui_loraloadermodelonly(fmt, tmp_path):
    expected = write_lora(fmt, tmp_path / f"{fmt}.safetensors", ARCH, seed=3)
    model, base = tiny_transformer("high"), tiny_transformer("high")
    tensors = read_lora_file(tmp_path / f"{fmt}.safetensors", "lora_high", arch=ARCH)
    cfg = adapter_config(tensors)
    attach_lora(model, cfg)
    load_lora_tensors(model, tensors, cfg)
    assert _max_rel(model, expected, base) < 1e-6
    # strength (Preview Sample's, applied by peft) scales the patch as LoraLoaderModelOnly's strength does
    from peft.helpers import rescale_adapter_scale

    with rescale_adapter_scale(model, 0.6):
        assert _max_rel(model, expected, base, strength=0.6) < 1e-6


def test_diffusers_metadata_alpha_is_applied_as_diffusers_applies_it(tmp_path):
    expected = write_diffusers_with_metadata(tmp_path / "d.safetensors", ARCH, lora_alpha=8.0)
    model, base = tiny_transformer("low"), tiny_transformer("low")
    tensors = read_lora_file(tmp_path / "d.safetensors", "lora_low", arch=ARCH)
    attach_lora(model, adapter_config(tensors))
    load_lora_tensors(model, tensors, adapter_config(tensors))
    assert _max_rel(model, expected, base) < 1e-6


def _save_raw(path: Path, tensors: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _lora(base: str, out: int, inn: int, rank: int = 4, naming=(".lora_down.weight", ".lora_up.weight")) -> dict:
    return {base + naming[0]: torch.zeros(rank, inn), base + naming[1]: torch.zeros(out, rank)}


BAD_FILES = {
    # a 1.3B file also adapts blocks the tiny experts lack: its width is named, not its depth
    "wan21_1_3b": ({**_lora("diffusion_model.blocks.0.self_attn.q", 1536, 1536),
                    **_lora("diffusion_model.blocks.29.self_attn.q", 1536, 1536)},
                   r"another size \(Wan 2\.1 T2V 1\.3B"),
    "i2v_channels": ({**_lora("diffusion_model.blocks.0.self_attn.q", 256, 256),
                      "diffusion_model.patch_embedding.lora_down.weight": torch.zeros(4, 36, 1, 2, 2),
                      "diffusion_model.patch_embedding.lora_up.weight": torch.zeros(256, 4)},
                     r"taking 36 latent channels"),
    "i2v_layers": ({**_lora("diffusion_model.blocks.0.cross_attn.k_img", 256, 256),
                    **_lora("diffusion_model.blocks.0.cross_attn.q", 256, 256)}, r"image-to-video"),
    "more_blocks": (_lora("lora_unet_blocks_39_ffn_2", 256, 512), r"block 39, beyond the 2 blocks of these experts"),
    "lokr": ({"diffusion_model.blocks.0.self_attn.q.lokr_w1": torch.zeros(4, 4)}, r"LoKr"),
    "sdxl": (_lora("lora_unet_down_blocks_0_attentions_0_proj_in", 8, 8), r"holds no Wan 2\.2 LoRA"),
    "no_up": ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 256)}, r"no up weight"),
    "mixed": ({**_lora("diffusion_model.blocks.0.self_attn.q", 256, 256),
               **_lora("lora_unet_blocks_0_self_attn_k", 256, 256)}, r"mixes key namings"),
    "unknown": ({"some.tensor": torch.zeros(2)}, r"not a Wan LoRA in a format ComfyUI reads"),
    # ComfyUI's trainer's differences, of a model of another width / a name no Wan model has
    "norm_diff_1_3b": ({"diffusion_model.blocks.0.norm3.diff": torch.zeros(1536)},
                       r"another size \(Wan 2\.1 T2V 1\.3B, width 1536; these experts: 256\)"),
    "unknown_module": ({**_lora("diffusion_model.blocks.0.ffn.0", 512, 256),
                        "diffusion_model.blocks.0.modulation.diff": torch.zeros(1, 6, 256)},
                       r"adapts blocks\.0\.modulation, which a Wan text-to-video transformer does not have"),
    "lora_and_diff": ({**_lora("diffusion_model.head.head", 64, 256), "diffusion_model.head.head.diff":
                       torch.zeros(64, 256)}, r"both a LoRA and a \.diff for head\.head \(ComfyUI applies only"),
    # diffusers' module names behind ComfyUI's prefix: ComfyUI skips them too
    "diffusers_behind_prefix": (_lora("diffusion_model.blocks.0.attn1.to_q", 256, 256, naming=(
        ".lora_A.weight", ".lora_B.weight")), r"names its modules in diffusers' spelling behind ComfyUI's "
        r"diffusion_model\. prefix \(blocks\.0\.attn1\.to_q\), which ComfyUI's loader skips too .* rename the "
        r"prefix diffusion_model\. to transformer\."),
    "diffusers_mixed_in": ({**_lora("diffusion_model.blocks.0.ffn.0", 512, 256),
                            **_lora("diffusion_model.blocks.1.attn2.to_out.0", 256, 256)},
                           r"names 1 of its 2 modules in diffusers' spelling .* rename those modules to original Wan "
                           r"names \(attn1 -> self_attn"),
    # 'diffusion_model' inside an unknown prefix is no '.diff' tensor
    "prefixed": (_lora("s.lora.high.diffusion_model.blocks.0.ffn.0", 512, 256),
                 r"is not a Wan LoRA in a format ComfyUI reads"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_file_for_another_model_is_refused_by_name_from_its_header(case, tmp_path, monkeypatch):
    tensors, message = BAD_FILES[case]
    path = _save_raw(tmp_path / f"{case}.safetensors", tensors)
    real_open = formats_module.safe_open

    class HeaderOnly:  # any tensor read before the refusal fails the test
        def __init__(self, *a, **k):
            self._ctx = real_open(*a, **k)

        def __enter__(self):
            handle = self._ctx.__enter__()

            class H:
                keys, get_slice, metadata = handle.keys, handle.get_slice, handle.metadata

                def get_tensor(self, key):
                    raise AssertionError(f"tensor {key} read before the header check")

            return H()

        def __exit__(self, *exc):
            return self._ctx.__exit__(*exc)

    monkeypatch.setattr(formats_module, "safe_open", HeaderOnly)
    with pytest.raises(LoraFileError, match=rf"^lora_high: .*{case}\.safetensors .*{message}"):
        read_lora_file(path, "lora_high", arch=ARCH)


def test_pickled_loras_read_as_comfyui_loads_them(tmp_path):
    # ComfyUI's load_torch_file reads every file not named .safetensors/.sft with torch.load(weights_only=True) and
    # unwraps a 'state_dict' entry; the patch must equal LoraLoaderModelOnly's semantics written out in float64
    expected = write_lora("comfyui", tmp_path / "a.safetensors", ARCH, seed=2)
    torch.save(load_file(str(tmp_path / "a.safetensors")), tmp_path / "a.pt")
    torch.save({"state_dict": load_file(str(tmp_path / "a.safetensors"))}, tmp_path / "wrapped.ckpt")
    for name in ("a.pt", "wrapped.ckpt"):
        model, base = tiny_transformer("high"), tiny_transformer("high")
        tensors = read_lora_file(tmp_path / name, "lora_high", arch=ARCH)
        attach_lora(model, adapter_config(tensors))
        load_lora_tensors(model, tensors, adapter_config(tensors))
        assert _max_rel(model, expected, base) < 1e-6, name
    torch.save({"diffusion_model.blocks.0.ffn.0.lora_down.weight": Path("x")}, tmp_path / "unsafe.pt")
    torch.save({**load_file(str(tmp_path / "a.safetensors")), "epoch": 3}, tmp_path / "extra.pt")
    (tmp_path / "text.pt").write_text("not a pickle")
    for name, message in [("unsafe.pt", r"is a pickle that torch\.load refuses to read safely \(weights_only"),
                          ("extra.pt", r"holds entries that are not tensors \(epoch\)"),
                          ("text.pt", r"is neither a \.safetensors nor a PyTorch file")]:
        with pytest.raises(LoraFileError, match=rf"^lora_high: .*{name} {message}"):
            read_lora_file(tmp_path / name, "lora_high", arch=ARCH)


def test_a_wan_fun_file_comfyui_skips_is_applied_with_a_warning(tmp_path):
    # ComfyUI converts Wan Fun's 'lora_unet__' keys only when block 0's cross_attn.k is among them
    # (comfy/lora_convert.py): without it LoraLoaderModelOnly renders the base model, the pack applies the file
    def wan_fun(blocks_targets):
        sd = {}
        for module, (o, i) in blocks_targets:
            sd |= _lora(f"lora_unet__{module}", o, i)
            sd[f"lora_unet__{module}.alpha"] = torch.tensor(2.0)
        return sd

    skipped = _save_raw(tmp_path / "fun.safetensors", wan_fun([("blocks_1_ffn_0", (512, 256))]))
    converted = _save_raw(tmp_path / "fun_k.safetensors", wan_fun([("blocks_0_cross_attn_k", (256, 256))]))
    said = []
    tensors = read_lora_file(skipped, "lora_high", arch=ARCH, on_warning=said.append)
    assert set(tensors) >= {"diffusion_model.blocks.1.ffn.0.lora_down.weight"}
    assert len(said) == 1 and re.match(r"lora_high: .*fun\.safetensors is a Wan Fun LoRA that ComfyUI's own LoRA "
                                       r"loaders skip .* use Apply Wan22 LoRA Pair, or rename", said[0]), said
    read_lora_file(converted, "lora_high", arch=ARCH, on_warning=said.append)
    assert len(said) == 1


@pytest.mark.parametrize("names, warned", [
    ({"high": "job_000000500_low_noise.safetensors", "low": "job_000000500_high_noise.safetensors"},
     r"^lora_high is job_000000500_low_noise\.safetensors and lora_low is job_000000500_high_noise\.safetensors: "
     r"their names say they are swapped"),
    ({"high": "Wan2.2-Lightning_T2V-A14B-4steps-lora_LOW_fp16.safetensors"},
     r"^lora_high is Wan2\.2-Lightning_T2V-A14B-4steps-lora_LOW_fp16\.safetensors, whose name says it is for the "
     r"low-noise expert - put it in lora_low, unless"),
    ({"high": "a.safetensors", "low": "WAN2.2-HighNoise_style.safetensors"}, r"^lora_low is .* put it in lora_high "
                                                                              r"\(now a\.safetensors\)"),
    ({"high": "same.safetensors", "low": "same.safetensors"}, r"^lora_high and lora_low are the same file same"),
    ({"high": "x_high_noise.safetensors", "low": "x-low-noise.safetensors"}, None),
    ({"high": "highlight_lowres.safetensors", "low": "Highway_Low.safetensors"}, None),  # no expert word
])
def test_pair_file_names_that_say_the_files_are_swapped_are_warned(names, warned, tmp_path):
    said = pair_warnings({e: tmp_path / n for e, n in names.items()}, {"high": "lora_high", "low": "lora_low"})
    assert (said == []) if warned is None else (len(said) == 1 and re.search(warned, said[0])), said


def test_init_files_named_for_the_other_experts_are_warned_when_the_run_starts(tmp_path):
    job = _job(tmp_path, init_high=str(tmp_path / "r_low_noise.safetensors"),
               init_low=str(tmp_path / "r_high_noise.safetensors"))
    said = loop_module.run_warnings(job_from_dict(job), SimpleNamespace(samples_per_epoch=4),
                                    SimpleNamespace(active=False))
    assert [w for w in said if re.match(r"lora\.init_high is r_low_noise\.safetensors and lora\.init_low is "
                                        r"r_high_noise\.safetensors: their names say they are swapped", w)], said


def test_a_training_state_given_as_a_lora_names_the_files_to_pick(tmp_path):
    path = tmp_path / "training_state_000040.safetensors"
    save_file({"s.lora.high.diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(4, 256)}, str(path),
              metadata={"state_skeleton": "{}", "training_config": "{}"})
    with pytest.raises(LoraFileError, match=r"lora_high: .* is a training state of this trainer, not a LoRA - pick"):
        read_lora_file(path, "lora_high", arch=ARCH)


def test_unreadable_missing_and_non_finite_files_are_named(tmp_path):
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    with pytest.raises(LoraFileError, match=r"lora_low: .*text\.safetensors is not a readable \.safetensors"):
        read_lora_file(tmp_path / "text.safetensors", "lora_low")
    with pytest.raises(LoraFileError, match=r"lora_low: .*gone\.safetensors does not exist"):
        read_lora_file(tmp_path / "gone.safetensors", "lora_low")
    bad = _lora("diffusion_model.blocks.0.self_attn.q", 256, 256)
    bad["diffusion_model.blocks.0.self_attn.q.lora_up.weight"][0, 0] = float("nan")
    with pytest.raises(LoraFileError, match=r"nan\.safetensors holds NaN/Inf values in blocks\.0\.self_attn\.q"):
        read_lora_file(_save_raw(tmp_path / "nan.safetensors", bad), "lora_low", arch=ARCH)


# ------------------------------------------------------------------------------------------------ training init


def _job(tmp_path: Path, **lora) -> dict:
    clips = make_synthetic_dataset(tmp_path / "clips", n_clips=2, num_frames=5, size=(32, 32), seed=1)
    return {
        "name": "cont", "model": {"source": "tiny", "dtype": "fp32", "text_encoder_dtype": "fp32"},
        "lora": {"rank": 6, **lora}, "multistage": {"switch_every": 1},
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        "train": {"steps": 2, "batch_size": 1, "gradient_checkpointing": False, "compute_dtype": "fp32",
                  "device": "cpu", "num_workers": 0},
        "save": {"output_dir": str(tmp_path / "out"), "save_every": 0},
        "datasets": [{"folder": str(clips), "num_frames": 5, "resolutions": [32], "caption_dropout": 0.0}],
        "sample": {**SMALL_RENDER, "prompts": ["a cat"], "sample_every": 0},
    }


def test_a_run_initialised_from_files_starts_from_exactly_those_weights(tmp_path, monkeypatch):
    # ai-toolkit's rank-4 file (scale 1) for the high expert, a per-module-rank ComfyUI file (ranks 2-5, some
    # modules absent, four alphas) for the low one; the run's rank 6 with alpha 3 differs from both.
    files = {"high": tmp_path / "tk.safetensors", "low": tmp_path / "mixed.safetensors"}
    expected = {"high": write_lora("aitoolkit", files["high"], ARCH, seed=5),
                "low": write_lora("per_module_rank", files["low"], ARCH, seed=6)}
    cfg = job_from_dict(_job(tmp_path, alpha=3.0, init_high=str(files["high"]), init_low=str(files["low"])))
    x = dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0)),
             timestep=torch.tensor([700.0]), encoder_hidden_states=torch.randn(1, 8, 64))
    seen = {}
    real_prepare = loop_module.prepare_expert

    def prepare_and_record(name, model, *args, **kwargs):
        expert = real_prepare(name, model, *args, **kwargs)
        seen[name] = (_max_rel(model, expected[name], tiny_transformer(name)), _step0(model, x), _fresh_rows(model))
        return expert

    monkeypatch.setattr(loop_module, "prepare_expert", prepare_and_record)
    loop_module.run_training(cfg, progress_bar=False)
    for name in ("high", "low"):
        rel, out, fresh = seen[name]
        assert rel < 1e-6, name
        with torch.no_grad():
            ref = _merged(name, expected[name]).double()(**{k: v.double() for k, v in x.items()}, return_dict=False)[0]
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
        assert fresh  # directions beyond the file's rank train from the start (lora_A random, lora_B zero)


def _step0(model: torch.nn.Module, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x, return_dict=False)[0]


def _fresh_rows(model: torch.nn.Module) -> bool:
    layer = model.get_submodule("blocks.0.attn1.to_q")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return bool(a[4:].abs().sum() > 0 and b[:, 4:].abs().sum() == 0)


def test_init_files_that_do_not_fit_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_module, "load_components", lambda *a, **k: pytest.fail("a model loaded"))
    tk = tmp_path / "tk.safetensors"
    write_lora("aitoolkit", tk, ARCH)
    with pytest.raises(LoraFileError, match=r"lora\.init_high: .*tk\.safetensors has rank 4 .* set lora\.rank to 4"):
        loop_module.run_training(job_from_dict({**_job(tmp_path), "lora": {"rank": 2, "init_high": str(tk)}}))
    narrow = {"rank": 8, "target_modules": ["self_attn.q", "self_attn.k"], "init_low": str(tk)}
    with pytest.raises(LoraFileError, match=r"lora\.init_low: .* adapts self_attn\.v, .* add them to lora\.target_"):
        loop_module.run_training(job_from_dict({**_job(tmp_path), "lora": narrow}))
    one = {**_job(tmp_path), "lora": {"rank": 8, "init_low": str(tk)}, "multistage": {"train_low_noise": False}}
    with pytest.raises(ConfigError, match=r"lora\.init_low is set but the low-noise expert is not trained"):
        loop_module.run_training(job_from_dict(one))
    other = _save_raw(tmp_path / "wan13b.safetensors", BAD_FILES["wan21_1_3b"][0])
    with pytest.raises(LoraFileError, match=r"lora\.init_high: .*wan13b\.safetensors was made for a model of anoth"):
        loop_module.run_training(job_from_dict({**_job(tmp_path), "lora": {"rank": 8, "init_high": str(other)}}))
    tensors = load_file(str(tk))
    next(v for k, v in tensors.items() if k.endswith(("lora_up.weight", "lora_B.weight")))[0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "inf.safetensors"))
    with pytest.raises(LoraFileError, match=r"lora\.init_high: .*inf\.safetensors holds NaN/Inf values"):
        loop_module.preflight(job_from_dict({**_job(tmp_path), "lora": {"rank": 8,
                                                                         "init_high": str(tmp_path / "inf.safetensors")}}))


# ------------------------------------------------------------------------------------------------ node and CLI


@pytest.fixture
def N(monkeypatch, tmp_path):
    host = F.install(monkeypatch, tmp_path)
    pack = F.load_pack()
    monkeypatch.setattr("trainer_core.bundle._STORES", weakref.WeakValueDictionary())
    return pack.NODE_CLASS_MAPPINGS, host


def test_load_pair_node_renders_as_comfyui_patched_experts_and_inits_training(N, tmp_path):
    nodes, host = N
    expected = {"high": write_lora("kohya", host.folder("loras") / "musubi_high.safetensors", ARCH, seed=1),
                "low": write_lora("aitoolkit", host.folder("loras") / "tk" / "x_low_noise.safetensors", ARCH, seed=2)}
    load = nodes["Wan22LoadLoraPair"]
    assert {"none", "musubi_high.safetensors", "tk/x_low_noise.safetensors"} <= set(load.INPUT_TYPES()[
        "required"]["lora_high"][0])
    (pair,) = F.call(load, lora_high="musubi_high.safetensors", strength_high=0.7,
                     lora_low="tk/x_low_noise.safetensors", strength_low=1.0)
    (bundle,) = F.call(nodes["Wan22LoadExperts"], **{**F.defaults(nodes["Wan22LoadExperts"]), "source": "tiny",
                                                     "dtype": "fp32", "text_encoder_dtype": "fp32"})
    preview = nodes["Wan22PreviewSample"]
    settings = {**F.defaults(preview), **SMALL_RENDER, "prompts": "a red square moving right", "boundary": 0.9}
    (frames,) = F.call(preview, experts=bundle, lora=pair, **{**settings, "unique_id": "3"})
    # the node text's native recipe states the strength LoraLoaderModelOnly needs: Load's 0.7 times Preview's 1
    assert any(node == "3" and "LoRA strength 0.7 / 1 ·" in text for node, text in host.texts), host.texts
    # Reference: the core sampler on experts whose weights carry ComfyUI's patch (strength 0.7 on the high one).
    ref = load_components(bundle.model)
    high, low = _merged("high", expected["high"], 0.7), _merged("low", expected["low"])
    cfg = SampleConfig(**{**SMALL_RENDER, "prompts": ["a red square moving right"]})
    video = sample_videos(high, low, ref.vae, encode_sample_prompts(ref.text_encoder, ref.tokenizer, cfg), cfg, 0.9)
    torch.testing.assert_close(frames, video[0], rtol=0, atol=1e-5)
    assert not getattr(bundle.loaded.high, "peft_config", None)  # the bundle's experts are left clean

    (only_low,) = F.call(load, lora_high="none", strength_high=1.0, lora_low="tk/x_low_noise.safetensors",
                         strength_low=1.0)
    assert set(only_low.tensors) == {"low"}
    with pytest.raises(ConfigError, match="both 'none'"):
        F.call(load, lora_high="none", strength_high=1.0, lora_low="none", strength_low=1.0)
    train = nodes["Wan22TrainLoRA"]
    job = sys.modules[train.__module__].build_job
    save = nodes["Wan22SaveCheckpoint"]().configure(**F.defaults(nodes["Wan22SaveCheckpoint"]))[0]
    args = (bundle, (_dataset_cfg(tmp_path),), F.defaults(train))
    with pytest.raises(ConfigError, match=r"init_lora was loaded with strength \{'high': 0\.7\}"):
        job(*args, save=save, init_lora=pair)
    cfg = job(*args, save=save, init_lora=only_low)
    assert (cfg.lora.init_high, cfg.lora.init_low) == (None, str(host.folder("loras") / "tk/x_low_noise.safetensors"))


def test_apply_refuses_a_lora_that_does_not_fit_the_comfyui_model_before_patching(N):
    # ComfyUI's load_lora_for_models only logs a LoRA of another size and returns the model unpatched; Apply checks the
    # pair against the MODEL's own weights (original names, as ComfyUI's WanModel holds them) first
    nodes, host = N
    _save_raw(host.folder("loras") / "wan13b.safetensors", BAD_FILES["wan21_1_3b"][0])
    _save_raw(host.folder("loras") / "deep.safetensors", BAD_FILES["more_blocks"][0])
    write_lora("kohya", host.folder("loras") / "fits.safetensors", ARCH)
    model = F.comfy_model(diffusers_state_dict_to_original(tiny_transformer("high").state_dict()))
    load, apply = nodes["Wan22LoadLoraPair"], nodes["Wan22ApplyLoraPair"]
    (pair,) = F.call(load, lora_high="wan13b.safetensors", strength_high=1.0, lora_low="deep.safetensors",
                     strength_low=1.0)  # Load has no model to check against: it reads both
    cases = [((0.5, 0.0), r"lora_high: .*wan13b\.safetensors was made for a model of another size \(Wan 2\.1 T2V "
                          r"1\.3B, width 1536; model_high: 256\)"),
             ((0.0, 1.0), r"lora_low: .*deep\.safetensors adapts block 39, beyond the 2 blocks of model_low")]
    for (high, low), message in cases:
        with pytest.raises(LoraFileError, match=rf"^Apply Wan22 LoRA Pair: Load Wan22 LoRA Pair {message}"):
            F.call(apply, model_high=model, model_low=model, lora=pair, strength_high=high, strength_low=low)
    assert not host.patches
    (fits,) = F.call(load, lora_high="fits.safetensors", strength_high=1.0, lora_low="none", strength_low=1.0)
    F.call(apply, model_high=model, model_low=model, lora=fits, strength_high=1.0, strength_low=1.0)
    assert len(host.patches) == 1


def test_preview_sample_refuses_a_lora_for_another_model_before_loading_anything(N, monkeypatch):
    nodes, host = N
    _save_raw(host.folder("loras") / "wan13b.safetensors", BAD_FILES["wan21_1_3b"][0])
    (pair,) = F.call(nodes["Wan22LoadLoraPair"], lora_high="wan13b.safetensors", strength_high=1.0, lora_low="none",
                     strength_low=1.0)
    (bundle,) = F.call(nodes["Wan22LoadExperts"], **{**F.defaults(nodes["Wan22LoadExperts"]), "source": "tiny"})
    monkeypatch.setattr(bundle.store, "provide", lambda *a, **k: pytest.fail("a component loaded"))
    preview = nodes["Wan22PreviewSample"]
    with pytest.raises(LoraFileError, match=r"^Load Wan22 LoRA Pair lora_high: .*wan13b\.safetensors was made for a "
                                            r"model of another size \(Wan 2\.1 T2V 1\.3B"):
        F.call(preview, experts=bundle, lora=pair, **{**F.defaults(preview), "prompts": "a cat"})


def test_load_pair_shows_what_renders_differently_than_its_names_or_comfyui_say(N):
    nodes, host = N
    write_lora("aitoolkit", host.folder("loras") / "run_000000500_low_noise.safetensors", ARCH)
    write_lora("comfyui", host.folder("loras") / "other.safetensors", ARCH)
    fun = {k.replace("lora_unet_", "lora_unet__"): v for k, v in _lora("lora_unet_blocks_1_ffn_0", 512, 256).items()}
    _save_raw(host.folder("loras") / "fun.safetensors", fun)
    F.call(nodes["Wan22LoadLoraPair"], lora_high="run_000000500_low_noise.safetensors", strength_high=1.0,
           lora_low="fun.safetensors", strength_low=1.0, unique_id="7")
    (node, text), = host.texts
    lines = text.splitlines()
    assert node == "7" and len(lines) == 2, lines
    assert re.match(r"warning: Load Wan22 LoRA Pair lora_low: .*fun\.safetensors is a Wan Fun LoRA that ComfyUI's "
                    r"own LoRA loaders skip", lines[0])
    assert re.match(r"warning: Load Wan22 LoRA Pair: lora_high is run_000000500_low_noise\.safetensors, whose name "
                    r"says it is for the low-noise expert - put it in lora_low \(now fun\.safetensors\)", lines[1])
    F.call(nodes["Wan22LoadLoraPair"], lora_high="other.safetensors", strength_high=1.0, lora_low="other.safetensors",
           strength_low=1.0, unique_id="8")
    assert re.match(r"warning: Load Wan22 LoRA Pair: lora_high and lora_low are the same file other\.safetensors",
                    host.texts[-1][1])


def test_strength_tooltips_say_load_and_render_strengths_multiply(N):
    nodes, _ = N
    spec = {name: nodes[name].INPUT_TYPES()["required"] for name in
            ("Wan22LoadLoraPair", "Wan22ApplyLoraPair", "Wan22PreviewSample")}
    for node, widgets in [("Wan22LoadLoraPair", ("strength_high", "strength_low")),
                          ("Wan22ApplyLoraPair", ("strength_high", "strength_low")),
                          ("Wan22PreviewSample", ("lora_strength_high", "lora_strength_low"))]:
        for widget in widgets:
            assert "Multiplies with" in spec[node][widget][1]["tooltip"] and "0.25" in spec[node][widget][1]["tooltip"]


def _dataset_cfg(tmp_path: Path):
    from trainer_core.config import DatasetConfig

    return DatasetConfig(folder=str(tmp_path / "clips"), num_frames=5, resolutions=[32])


def test_sample_cli_renders_any_pair_and_the_base_model(tmp_path, monkeypatch, capsys):
    expected = write_lora("diffusers", tmp_path / "pytorch_lora_weights.safetensors", ARCH, seed=4)
    job = _job(tmp_path)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**job, "multistage": {"boundary": 0.9}}))
    written = {}
    real_write = render.write_video

    def capture(frames, p, *args, **kwargs):
        written[Path(p).name] = frames
        return real_write(frames, p, *args, **kwargs)

    monkeypatch.setattr(render, "write_video", capture)
    out = tmp_path / "v.mp4"
    assert main(["sample", str(path), "--lora-low", str(tmp_path / "pytorch_lora_weights.safetensors"),
                 "--prompt", "a red square moving right", "--out", str(out)]) == 0
    assert f"video: {out}" in capsys.readouterr().out and out.is_file()
    ref = load_components(job_from_dict(job).model)
    cfg = SampleConfig(**{**SMALL_RENDER, "prompts": ["a red square moving right"]})
    prompts = encode_sample_prompts(ref.text_encoder, ref.tokenizer, cfg)
    video = sample_videos(ref.high, _merged("low", expected), ref.vae, prompts, cfg, 0.9)
    torch.testing.assert_close(written["v.mp4"], video[0], rtol=0, atol=1e-5)
    # without --lora-* the base model renders; two prompts give two files
    assert main(["sample", str(path), "--prompt", "a", "--prompt", "b", "--out", str(tmp_path / "base.webm")]) == 0
    assert {"base_00.webm", "base_01.webm"} <= set(written)
    # a LoRA for another model is refused by name before any model loads (exit status 2)
    monkeypatch.setattr(render, "load_components", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(render, "load_expert", lambda *a, **k: pytest.fail("an expert loaded"))
    other = _save_raw(tmp_path / "wan13b.safetensors", BAD_FILES["wan21_1_3b"][0])
    assert main(["sample", str(path), "--lora-high", str(other), "--prompt", "a", "--out", str(out)]) == 2
    assert "--lora-high: " in capsys.readouterr().err
    # so are a LoRA holding NaN, a blank prompt and a folder the video cannot be written to: one line each
    write_lora("comfyui", tmp_path / "nan.safetensors", ARCH)
    tensors = load_file(str(tmp_path / "nan.safetensors"))
    next(v for k, v in tensors.items() if k.endswith("lora_down.weight"))[0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    blocked = tmp_path / "a_file"  # a folder that cannot be made, even by root
    blocked.write_text("")
    cases = [(["--lora-low", str(tmp_path / "nan.safetensors")], out, r"--lora-low: .*nan\.safetensors holds NaN/Inf"),
             (["--prompt", ""], out, r"sample .*'prompts'.* blank"),
             ([], blocked / "v.mp4", r"--out: cannot write to .*a_file")]
    for extra, target, message in cases:
        prompt = [] if "--prompt" in extra else ["--prompt", "a"]
        assert main(["sample", str(path), *extra, *prompt, "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, err


def test_sample_cli_warns_about_swapped_file_names_before_loading(tmp_path, monkeypatch, caplog):
    files = {e: tmp_path / f"run_000000500_{e}_noise.safetensors" for e in ("high", "low")}
    for expert, path in files.items():
        write_lora("aitoolkit", path, ARCH, seed=1)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(_job(tmp_path)))

    def stop(*a, **k):
        raise ConfigError("stopped before loading")

    monkeypatch.setattr(render, "check_model_files", stop)
    assert main(["sample", str(tmp_path / "job.yaml"), "--lora-high", str(files["low"]), "--lora-low",
                 str(files["high"]), "--prompt", "a", "--out", str(tmp_path / "v.mp4")]) == 2
    assert any(re.match(r"warning: --lora-high is run_000000500_low_noise\.safetensors and --lora-low is "
                        r"run_000000500_high_noise\.safetensors: their names say they are swapped", r.getMessage())
               for r in caplog.records), caplog.text


def test_trained_pairs_load_unchanged(tmp_path):
    """This trainer's own files (one rank, one alpha) load into an adapter of that rank and alpha, bit for bit."""
    model = tiny_transformer("high")
    cfg = LoraConfig(rank=4, alpha=2.0)
    expected = write_lora("comfyui", tmp_path / "own.safetensors", ARCH)
    tensors = read_lora_file(tmp_path / "own.safetensors", "x")
    assert adapter_config(tensors) == LoraConfig(rank=4, alpha=2.0)
    attach_lora(model, cfg)
    load_lora_tensors(model, tensors, cfg)
    layer = model.get_submodule("blocks.1.ffn.net.2")
    down, up, _ = expected["blocks.1.ffn.2"]
    assert torch.equal(layer.lora_A["default"].weight, down.float()) and torch.equal(
        layer.lora_B["default"].weight, up.float())
