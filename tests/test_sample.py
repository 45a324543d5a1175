"""Preview sampler, checked against diffusers' WanPipeline (two experts, boundary_ratio, guidance_scale_2) on the tiny
preset where the settings coincide (euler with scheduler normal = FlowMatchEulerDiscreteScheduler; diffusers UniPC),
with and without LoRAs, plus video files and bad inputs. ComfyUI's native graph: test_native_sampling.py."""

from __future__ import annotations

import copy
import errno
import json
from pathlib import Path

import av
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from tests.lora_fixtures import with_random_lora
from tests.model_fixtures import tiny_components
from trainer_core.config import WAN_NEGATIVE_PROMPT, LoraConfig, SampleConfig, job_from_dict
from trainer_core.errors import ConfigError, LoraFileError
from trainer_core.fileio import ArtifactWriteError
from trainer_core.lora import attach_lora, lora_file_name, save_lora
from trainer_core.models.tiny import TINY_TRANSFORMER_CONFIG
from trainer_core.sample import (
    attach_lora_file,
    encode_sample_prompts,
    read_video_metadata,
    sample_metadata,
    sample_videos,
    write_video,
)

BOUNDARY = 0.875
PROMPTS = ["A cat walks across a sunny garden", "A dog running on the beach, waves crashing"]
# 6 steps at shift 12 put timesteps on both sides of t = 875, so both experts and both guidance scales are used.
BASE = dict(width=32, height=32, num_frames=5, steps=6, shift=12.0, guidance_high=4.0, guidance_low=3.0, seed=7)
LORA = LoraConfig(rank=4, alpha=6.0, dropout=0.5)  # alpha != rank: a lost alpha shows; dropout: must be off


def _reference_scheduler(sampler: str):
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=12.0)
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=12.0)


def _pipeline(comps, high, low, sampler: str) -> WanPipeline:
    return WanPipeline(
        tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, vae=comps.vae,
        scheduler=_reference_scheduler(sampler), transformer=high, transformer_2=low, boundary_ratio=BOUNDARY,
    )  # fmt: skip


def _reference(pipe: WanPipeline, cfg: SampleConfig, prompt: str, seed: int) -> torch.Tensor:
    """WanPipeline's video as [F, H, W, C] in 0..1."""
    out = pipe(
        prompt=prompt, negative_prompt=cfg.negative_prompt, height=cfg.height, width=cfg.width,
        num_frames=cfg.num_frames, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_high,
        guidance_scale_2=cfg.guidance_low, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
    ).frames[0]  # fmt: skip
    return out.permute(0, 2, 3, 1)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def _differs(a: torch.Tensor, b: torch.Tensor, by: float = 1e-3) -> bool:
    return (a - b).abs().max().item() > by


@pytest.fixture(scope="module")
def comps():
    return tiny_components()


@pytest.fixture(scope="module")
def euler_cfg() -> SampleConfig:
    return SampleConfig(prompts=PROMPTS[:1], sampler="euler", **BASE)


@pytest.fixture(scope="module")
def euler_cache(comps, euler_cfg):
    return encode_sample_prompts(comps.text_encoder, comps.tokenizer, euler_cfg)


@pytest.fixture(scope="module")
def base_reference(comps, euler_cfg) -> torch.Tensor:
    return _reference(_pipeline(comps, comps.high, comps.low, "euler"), euler_cfg, PROMPTS[0], euler_cfg.seed)


@pytest.fixture(scope="module")
def lora_run(comps, euler_cfg, tmp_path_factory):
    """Experts with trained-looking LoRAs (random A and B), their saved files, and WanPipeline's render on fresh
    base copies after load_lora_weights of those files."""
    high, low = with_random_lora(comps.high, LORA, 1), with_random_lora(comps.low, LORA, 2)
    root = tmp_path_factory.mktemp("loras")
    files = {
        name: save_lora(root / lora_file_name("t", 10, name), model, LORA, torch.float32, {"expert": f"{name}_noise"})
        for name, model in (("high", high), ("low", low))
    }
    pipe = _pipeline(comps, copy.deepcopy(comps.high), copy.deepcopy(comps.low), "euler")
    pipe.load_lora_weights(str(files["high"]), adapter_name="h")
    pipe.load_lora_weights(str(files["low"]), adapter_name="l", load_into_transformer_2=True)
    reference = _reference(pipe, euler_cfg, PROMPTS[0], euler_cfg.seed)
    return dict(high=high, low=low, files=files, pipe=pipe, reference=reference)


# ---------------------------------------------------------------- 1. equals WanPipeline without LoRA


@pytest.mark.parametrize("sampler", ["euler", "diffusers_unipc"])  # euler with its default scheduler, normal
def test_matches_wan_pipeline_with_both_experts(comps, sampler):
    prompts = PROMPTS if sampler == "euler" else PROMPTS[:1]
    cfg = SampleConfig(prompts=prompts, sampler=sampler, walk_seeds=True, **BASE)
    cache = encode_sample_prompts(comps.text_encoder, comps.tokenizer, cfg)

    calls = {"high": 0, "low": 0}
    hooks = [m.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
             for n, m in (("high", comps.high), ("low", comps.low))]  # fmt: skip
    steps_seen: list[tuple[int, int]] = []
    try:
        videos = sample_videos(
            comps.high, comps.low, comps.vae, cache, cfg, BOUNDARY, on_step=lambda *a: steps_seen.append(a)
        )
    finally:
        for h in hooks:
            h.remove()

    # Both experts ran, on exactly the steps the reference schedule puts on each side of the boundary (x2 for CFG).
    ref_sched = _reference_scheduler(sampler)
    ref_sched.set_timesteps(cfg.steps)
    n_high = int((ref_sched.timesteps >= BOUNDARY * 1000).sum())
    assert 0 < n_high < cfg.steps
    assert calls == {"high": 2 * n_high * len(prompts), "low": 2 * (cfg.steps - n_high) * len(prompts)}
    total = cfg.steps * len(prompts)
    assert steps_seen == [(i + 1, total) for i in range(total)]

    pipe = _pipeline(comps, comps.high, comps.low, sampler)
    assert len(videos) == len(prompts)
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        assert video.shape == (5, 32, 32, 3) and video.dtype == torch.float32
        ref = _reference(pipe, cfg, prompt, cfg.seed + i)  # walking seeds: prompt i uses seed + i
        assert ref.std() > 0.05  # a real picture, not a constant
        _close(video, ref)
    if len(videos) > 1:
        assert _differs(videos[0], videos[1])


def test_same_seed_for_every_prompt_without_walking(comps, base_reference):
    cfg = SampleConfig(prompts=[PROMPTS[1], PROMPTS[0]], sampler="euler", walk_seeds=False, **BASE)
    cache = encode_sample_prompts(comps.text_encoder, comps.tokenizer, cfg)
    videos = sample_videos(comps.high, comps.low, comps.vae, cache, cfg, BOUNDARY)
    _close(videos[1], base_reference)  # second prompt, still seed 7


# ---------------------------------------------------------------- 2. LoRAs


def test_lora_strength_one_matches_pipeline_with_loaded_files(comps, euler_cfg, euler_cache, lora_run, base_reference):
    video = sample_videos(lora_run["high"], lora_run["low"], comps.vae, euler_cache, euler_cfg, BOUNDARY)[0]
    assert _differs(lora_run["reference"], base_reference, 1e-2)  # the LoRAs change the picture materially
    _close(video, lora_run["reference"])


def test_lora_files_attached_for_sampling_match_pipeline(comps, euler_cfg, euler_cache, lora_run):
    high, low = copy.deepcopy(comps.high), copy.deepcopy(comps.low)
    got = attach_lora_file(high, lora_run["files"]["high"], expert="high", setting="lora_high")
    attach_lora_file(low, lora_run["files"]["low"], expert="low", setting="lora_low")
    assert (got.rank, got.effective_alpha, got.target_modules) == (LORA.rank, LORA.effective_alpha, LORA.target_modules)
    video = sample_videos(high, low, comps.vae, euler_cache, euler_cfg, BOUNDARY)[0]
    _close(video, lora_run["reference"])


def test_lora_strength_zero_is_base_and_partial_strength_matches_adapter_weights(
    comps, euler_cfg, euler_cache, lora_run, base_reference
):
    high, low = lora_run["high"], lora_run["low"]
    scales = [dict(m.scaling) for m in high.modules() if isinstance(m, LoraLayer)]

    zero = euler_cfg.model_copy(update=dict(lora_strength_high=0.0, lora_strength_low=0.0))
    _close(sample_videos(high, low, comps.vae, euler_cache, zero, BOUNDARY)[0], base_reference)

    part = euler_cfg.model_copy(update=dict(lora_strength_high=0.5, lora_strength_low=0.75))
    video = sample_videos(high, low, comps.vae, euler_cache, part, BOUNDARY)[0]
    assert _differs(video, base_reference) and _differs(video, lora_run["reference"])
    # Reference: diffusers' own adapter weights on the pipeline that loaded the files.
    pipe = lora_run["pipe"]
    pipe.transformer.set_adapters(["h"], weights=[0.5])
    pipe.transformer_2.set_adapters(["l"], weights=[0.75])
    try:
        _close(video, _reference(pipe, part, PROMPTS[0], part.seed))
    finally:
        pipe.transformer.set_adapters(["h"], weights=[1.0])
        pipe.transformer_2.set_adapters(["l"], weights=[1.0])
    assert [dict(m.scaling) for m in high.modules() if isinstance(m, LoraLayer)] == scales  # scales restored


# ---------------------------------------------------------------- 3. does not disturb training


def test_sampling_leaves_rng_modes_and_grads_untouched(comps, euler_cfg, euler_cache, lora_run):
    high, low = lora_run["high"], lora_run["low"]
    high.train()
    low.train()
    high.blocks[0].eval()  # a mixed state must come back exactly as it was
    modes = {m: m.training for model in (high, low, comps.vae) for m in model.modules()}
    trainable = {p: p.requires_grad for p in (*high.parameters(), *low.parameters())}
    rng = torch.get_rng_state()
    try:
        video = sample_videos(high, low, comps.vae, euler_cache, euler_cfg, BOUNDARY)[0]
        assert torch.equal(torch.get_rng_state(), rng)
        assert {m: m.training for m in modes} == modes
        assert {p: p.requires_grad for p in trainable} == trainable
        assert all(p.grad is None for p in trainable)
        # LoRA dropout (0.5) was off and the experts in eval mode: the same render as the pipeline reference.
        _close(video, lora_run["reference"])
    finally:
        high.eval()
        low.eval()


def test_vae_tiling_matches_pipeline_with_tiling_and_is_restored(comps):
    # 272 px is wider than diffusers' 256 px tile, so the tiled decoder really runs.
    cfg = SampleConfig(
        prompts=PROMPTS[:1], sampler="euler", width=272, height=16, num_frames=1, steps=2, vae_tiling=True
    )
    cache = encode_sample_prompts(comps.text_encoder, comps.tokenizer, cfg)
    tiled = sample_videos(comps.high, comps.low, comps.vae, cache, cfg, BOUNDARY)[0]
    assert comps.vae.use_tiling is False
    untiled = cfg.model_copy(update={"vae_tiling": False})
    plain = sample_videos(comps.high, comps.low, comps.vae, cache, untiled, BOUNDARY)[0]
    assert _differs(tiled, plain, 1e-5)
    pipe = _pipeline(comps, comps.high, comps.low, "euler")
    comps.vae.enable_tiling()
    try:
        _close(tiled, _reference(pipe, cfg, PROMPTS[0], cfg.seed))
    finally:
        comps.vae.disable_tiling()


# ---------------------------------------------------------------- 4. video files


def _gradient_video(frames: int = 5, h: int = 32, w: int = 48) -> torch.Tensor:
    ys = torch.linspace(0, 1, h)[:, None].expand(h, w)
    xs = torch.linspace(0, 1, w)[None, :].expand(h, w)
    return torch.stack([torch.stack([ys, xs, (ys + xs + f / frames) % 1.0 * 0.5], -1) for f in range(frames)])


@pytest.mark.parametrize("fmt, codec", [("mp4", "h264"), ("webm", "vp9")])
def test_write_video_decodes_with_frames_size_and_metadata(comps, tmp_path, fmt, codec):
    frames = _gradient_video()
    settings = {k: v for k, v in BASE.items() if k != "seed"}
    cfg = SampleConfig(prompts=["一只猫 walks\nin the (rain)"], seed=11, fps=16, format=fmt, **settings)
    cache = encode_sample_prompts(comps.text_encoder, comps.tokenizer, cfg)
    meta = sample_metadata(cfg, 0, BOUNDARY, cache) | {"step": "250"}
    path = write_video(frames, tmp_path / f"sample.{fmt}", cfg.fps, fmt, meta)
    assert path == tmp_path / f"sample.{fmt}" and [p.name for p in tmp_path.iterdir()] == [path.name]

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == codec and stream.codec_context.pix_fmt == "yuv420p"
        assert abs(container.duration / 1e6 - 5 / 16) < 0.02  # webm reports 0 frames: check the duration
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5 and decoded[0].shape == (32, 48, 3)
    err = (torch.from_numpy(decoded[2]).float() / 255 - frames[2]).abs().mean()
    assert err < 0.03

    got = read_video_metadata(path)
    assert {k: got[k] for k in meta} == meta
    assert got["negative_prompt"] == WAN_NEGATIVE_PROMPT and got["seed"] == "11"
    settings = json.loads(got["settings"])
    assert settings["boundary"] == BOUNDARY and settings["steps"] == 6
    assert (settings["sampler"], settings["scheduler"]) == ("euler", "normal")
    assert got["native_recipe"].startswith("ModelSamplingSD3 12 · KSamplerAdvanced euler/normal 6 · high 0→")
    assert got["comfyui_prompt"] == "一只猫 walks in the \\(rain\\)"


def test_a_full_disk_while_writing_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    def no_space(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")  # what the encoder had written when the disk filled
        raise av.error.OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(av, "open", no_space)
    with pytest.raises(ArtifactWriteError) as caught:
        write_video(_gradient_video(), tmp_path / "a.mp4", 16, "mp4")
    assert str(caught.value) == (f"could not write {tmp_path / 'a.mp4'}: the disk is full - free space (or point "
                                 "save.output_dir at another disk) and resume")
    assert list(tmp_path.iterdir()) == []


def test_write_video_refuses_bad_frames_and_format(tmp_path):
    good = _gradient_video()
    with pytest.raises(ConfigError, match="0..1"):
        write_video(good * 2 - 1, tmp_path / "a.mp4", 16, "mp4")
    with pytest.raises(ConfigError, match=r"\[F, H, W, 3\]"):
        write_video(good.permute(0, 3, 1, 2), tmp_path / "a.mp4", 16, "mp4")
    with pytest.raises(ConfigError, match="sample.format"):
        write_video(good, tmp_path / "a.gif", 16, "gif")
    with pytest.raises(ConfigError, match=r"\.webm"):
        write_video(good, tmp_path / "a.mp4", 16, "webm")
    with pytest.raises(ConfigError, match="lower-case"):
        write_video(good, tmp_path / "a.mp4", 16, "mp4", {"Prompt": "x"})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 5. bad inputs


@pytest.mark.parametrize(
    "sample, pattern",
    [
        ({"num_frames": 6}, r"sample\.num_frames.*4n\+1.*use 5 or 9"),
        ({"width": 100}, r"sample\.width.*multiple of 16.*use 96 or 112"),
        ({"height": 8}, r"sample\.height.*multiple of 16"),
        ({"sample_every": 250}, r"'sample'.*prompts is empty"),
        ({"prompts": ["ok", "  "]}, r"sample\.prompts.*index \[1\].*blank"),
        ({"sampler": "ddim"}, r"sample\.sampler"),
        ({"scheduler": "karras"}, r"sample\.scheduler"),
        ({"guidance_low": 0.5}, r"sample\.guidance_low"),
    ],
)
def test_bad_sample_settings_are_refused_by_name(sample, pattern):
    with pytest.raises(ConfigError, match=pattern):
        job_from_dict({"model": {"source": "tiny"}, "sample": sample})


def test_sampler_refuses_empty_prompts_stale_cache_and_missing_expert(comps, euler_cfg, euler_cache):
    empty = SampleConfig(**BASE)
    with pytest.raises(ConfigError, match="sample.prompts is empty"):
        encode_sample_prompts(comps.text_encoder, comps.tokenizer, empty)
    with pytest.raises(ConfigError, match="sample.prompts is empty"):
        sample_videos(comps.high, comps.low, comps.vae, euler_cache, empty, BOUNDARY)
    other = euler_cfg.model_copy(update={"prompts": ["something else"]})
    with pytest.raises(ConfigError, match="encode them again"):
        sample_videos(comps.high, comps.low, comps.vae, euler_cache, other, BOUNDARY)
    with pytest.raises(ConfigError, match="low-noise expert is not loaded"):
        sample_videos(comps.high, None, comps.vae, euler_cache, euler_cfg, BOUNDARY)
    with pytest.raises(ConfigError, match="multistage.boundary"):
        sample_videos(comps.high, comps.low, comps.vae, euler_cache, euler_cfg, 1.0)


def test_lora_file_of_another_model_is_refused_and_leaves_expert_unchanged(comps, lora_run, tmp_path):
    smaller = WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_attention_heads": 1})  # dim 128, not 256
    attach_lora(smaller, LORA)
    other_size = save_lora(tmp_path / "other_size.safetensors", smaller, LORA, torch.float32, {})
    sd_keys = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(sd_keys))

    expert = copy.deepcopy(comps.high)
    x = dict(hidden_states=torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
             timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 8, 64))  # fmt: skip
    with torch.no_grad():
        before = expert(**x, return_dict=False)[0]
    with pytest.raises(LoraFileError, match=r"lora_high: .*other_size\.safetensors.*another size"):
        attach_lora_file(expert, other_size, setting="lora_high")
    with pytest.raises(LoraFileError, match=r"lora_high: .*sdxl\.safetensors holds no Wan 2\.2 LoRA"):
        attach_lora_file(expert, sd_keys, setting="lora_high")
    with pytest.raises(LoraFileError, match=r"lora_low: .*missing\.safetensors does not exist"):
        attach_lora_file(expert, tmp_path / "missing.safetensors", setting="lora_low")
    with pytest.raises(LoraFileError, match=r"lora_high: .*low_noise\.safetensors was trained for the low-noise"):
        attach_lora_file(expert, lora_run["files"]["low"], expert="high", setting="lora_high")
    assert not getattr(expert, "peft_config", None)
    with torch.no_grad():
        assert torch.equal(expert(**x, return_dict=False)[0], before)
