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
from trainer_core.keys import LORA_TARGET_TO_DIFFUSERS, diffusers_module_to_original, parse_lora_key  # noqa: E402
from trainer_core.lora import adapter_config, attach_lora, load_lora_tensors, read_lora_file  # noqa: E402
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
    "wan21_1_3b": (_lora("diffusion_model.blocks.0.self_attn.q", 1536, 1536), r"another size \(Wan 2\.1 T2V 1\.3B"),
    "i2v_channels": ({**_lora("diffusion_model.blocks.0.self_attn.q", 256, 256),
                      "diffusion_model.patch_embedding.lora_down.weight": torch.zeros(4, 36, 1, 2, 2),
                      "diffusion_model.patch_embedding.lora_up.weight": torch.zeros(256, 4)},
                     r"taking 36 latent channels"),
    "i2v_layers": ({**_lora("diffusion_model.blocks.0.cross_attn.k_img", 256, 256),
                    **_lora("diffusion_model.blocks.0.cross_attn.q", 256, 256)}, r"image-to-video"),
    "more_blocks": (_lora("lora_unet_blocks_39_ffn_2", 256, 512), r"block 39 but these experts have 2 blocks"),
    "lokr": ({"diffusion_model.blocks.0.self_attn.q.lokr_w1": torch.zeros(4, 4)}, r"LoKr"),
    "sdxl": (_lora("lora_unet_down_blocks_0_attentions_0_proj_in", 8, 8), r"holds no Wan 2\.2 LoRA"),
    "head": ({**_lora("diffusion_model.blocks.0.ffn.0", 512, 256), **_lora("diffusion_model.head.head", 64, 256)},
             r"head\.head, outside the attention and feed-forward"),
    "no_up": ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 256)}, r"no up weight"),
    "mixed": ({**_lora("diffusion_model.blocks.0.self_attn.q", 256, 256),
               **_lora("lora_unet_blocks_0_self_attn_k", 256, 256)}, r"mixes key namings"),
    "unknown": ({"some.tensor": torch.zeros(2)}, r"not a Wan LoRA in a format ComfyUI reads"),
    "diff": ({"diffusion_model.blocks.0.ffn.0.diff": torch.zeros(512, 256),
              "diffusion_model.blocks.0.ffn.0.diff_b": torch.zeros(512)}, r"full-weight difference"),
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
    (frames,) = F.call(preview, experts=bundle, lora=pair, **settings)
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

    def capture(frames, p, *args):
        written[Path(p).name] = frames
        return real_write(frames, p, *args)

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
