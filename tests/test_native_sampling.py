"""Previews that ComfyUI's native Wan 2.2 graph reproduces: the sigma schedules and split steps against ComfyUI's
formulas written out here in float64, and the preview sampler on the tiny preset against a float64 re-enactment of
ModelSamplingSD3 + two KSamplerAdvanced (euler), with CFG on and off, with and without LoRA.

The references below follow ComfyUI's definitions (comfy/model_sampling.py ModelSamplingDiscreteFlow, comfy/samplers.py
simple/normal schedulers and KSampler.sample's step slicing, comfy/k_diffusion/sampling.py sample_euler, comfy/sample.py
prepare_noise), written independently of the module under test. ComfyUI itself is not imported (not on PyPI); the
comparison against a real ComfyUI runs outside the suite (see README, "Previews ComfyUI reproduces").
"""

from __future__ import annotations

import copy
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from peft.tuners.lora import LoraLayer

import trainer_core.sample

from tests.lora_fixtures import with_random_lora
from tests.model_fixtures import tiny_components
from trainer_core.config import LoraConfig, SampleConfig
from trainer_core.sample import (
    comfy_sigmas,
    encode_sample_prompts,
    native_recipe,
    sample_latents,
    sample_metadata,
    split_step,
    switch_step,
)

sys.path.insert(0, str(Path(__file__).parent))
import comfy_fakes as F  # noqa: E402

BOUNDARY = 0.875
SMALL = dict(width=32, height=32, num_frames=5, seed=5)
LORA = LoraConfig(rank=4, alpha=8.0)

# ---------------------------------------------------------------- ComfyUI's formulas, float64


def ref_shift(u: float, s: float) -> float:
    """time_snr_shift: s·u / (1 + (s − 1)·u), u itself when s = 1."""
    return u if s == 1.0 else s * u / (1 + (s - 1) * u)


def ref_table(s: float) -> list[float]:
    """ModelSamplingDiscreteFlow's 1000 sigmas: shift(i/1000), i = 1..1000."""
    return [ref_shift(i / 1000, s) for i in range(1, 1001)]


def ref_simple(steps: int, s: float) -> list[float]:
    table, stride = ref_table(s), 1000 / steps
    return [table[-(1 + int(x * stride))] for x in range(steps)] + [0.0]


def ref_normal(steps: int, s: float) -> list[float]:
    table = ref_table(s)
    start, end = table[-1] * 1000, table[0] * 1000  # timestep(sigma) = 1000·sigma
    n, append_zero = steps, True
    if math.isclose(ref_shift(end / 1000, s), 0, abs_tol=1e-5):
        n, append_zero = steps + 1, False
    ts = [start + (end - start) * k / (n - 1) for k in range(n)] if n > 1 else [start]
    return [ref_shift(t / 1000, s) for t in ts] + ([0.0] if append_zero else [])


REF_SCHEDULES = {"simple": ref_simple, "normal": ref_normal}


def ref_split(sigmas: list[float], boundary: float) -> int:
    """Wan's rule: the high-noise expert takes the steps with t = 1000·σ ≥ 1000·boundary."""
    return sum(1 for sig in sigmas[:-1] if sig >= boundary)


# ---------------------------------------------------------------- 1. schedules and split steps


@pytest.mark.parametrize("scheduler", ["simple", "normal"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20, 30, 40, 1500])
@pytest.mark.parametrize("shift", [0.005, 1.0, 3.0, 5.0, 8.0, 12.0, 100.0])
def test_schedule_matches_comfyui_formula(scheduler, steps, shift):
    got = comfy_sigmas(scheduler, steps, shift)
    ref = torch.tensor(REF_SCHEDULES[scheduler](steps, shift), dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (steps + 1,)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert abs(got[0].item() - 1.0) < 1e-12  # σ_max = shift(1) = 1
    if steps <= 1000:  # past 1000 steps, simple repeats levels of its 1000-entry table
        assert (got[:-1] > got[1:]).all()


def test_tiny_shift_takes_comfyuis_extra_grid_point_instead_of_a_zero():
    sig = comfy_sigmas("normal", 4, 0.005)
    assert sig[-1] != 0 and sig[-1] < 1e-5 and len(sig) == 5


@pytest.mark.parametrize("steps, shift", [(40, 12.0), (30, 12.0), (20, 8.0), (13, 5.0), (50, 3.0)])
def test_normal_is_diffusers_flow_match_euler_grid(steps, shift):
    """Scheduler normal is the grid of diffusers' FlowMatchEulerDiscreteScheduler (WanPipeline's), so previews and
    WanPipeline agree where the settings coincide."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    torch.testing.assert_close(comfy_sigmas("normal", steps, shift).float(), sched.sigmas, rtol=0, atol=2e-7)


@pytest.mark.parametrize(
    "steps, shift, scheduler, split",
    # measured in issue #21 on ComfyUI: 40/12 normal 25, 30/12 19, 20/12 13, 20/8 11; 20/8 simple has σ 0.889 at
    # step 10, so its boundary step is 11 too (workflow 4 used 10).
    [(40, 12.0, "normal", 25), (30, 12.0, "normal", 19), (20, 12.0, "normal", 13), (20, 8.0, "normal", 11),
     (20, 8.0, "simple", 11), (1, 12.0, "normal", 1)],
)  # fmt: skip
def test_split_steps_of_known_recipes(steps, shift, scheduler, split):
    assert split_step(steps, shift, scheduler, BOUNDARY) == split


@pytest.mark.parametrize("scheduler", ["simple", "normal"])
@pytest.mark.parametrize("boundary", [0.5, 0.875, 0.9, 0.99])
def test_split_step_is_wans_rule_on_comfyuis_schedule(scheduler, boundary):
    for steps in (4, 10, 20, 25, 40, 60):
        for shift in (1.0, 5.0, 8.0, 12.0):
            sig = REF_SCHEDULES[scheduler](steps, shift)
            split = split_step(steps, shift, scheduler, boundary)
            assert split == ref_split(sig, boundary)
            assert 1 <= split <= steps and sig[split - 1] >= boundary
            assert split == steps or sig[split] < boundary


#: The exact ties the audit found: σ equals the boundary in exact arithmetic but is one ulp below it in float64.
TIES = [(38, 2.0, 0.46), (38, 3.0, 0.832), (75, 2.0, 0.46), (75, 3.0, 0.832)]


def wan_pipeline_split(steps: int, shift: float, boundary: float) -> int:
    """WanPipeline's expert decision (diffusers pipelines/wan/pipeline_wan.py): its scheduler's timesteps ``t`` run
    on ``transformer`` while ``t >= boundary_ratio * num_train_timesteps``, on ``transformer_2`` after."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    boundary_timestep = boundary * sched.config.num_train_timesteps
    return sum(1 for t in sched.timesteps if t >= boundary_timestep)


@pytest.mark.parametrize("steps, shift, boundary", TIES)
def test_exact_ties_switch_where_wan_pipeline_switches(steps, shift, boundary):
    split = wan_pipeline_split(steps, shift, boundary)
    assert split_step(steps, shift, "normal", boundary) == split == (
        ref_split(REF_SCHEDULES["normal"](steps, shift), boundary) + 1)  # float64 alone puts the tie one step low
    cfg = SampleConfig(prompts=["a"], steps=steps, shift=shift)
    assert f"high 0→{split} cfg 4 · low {split}→{steps} " in native_recipe(cfg, boundary)


def test_split_step_agrees_with_wan_pipeline_over_a_sweep():
    """Every boundary the widgets take (0.001 steps) at many steps and shifts: scheduler normal, ComfyUI's schedule,
    switches where WanPipeline switches (the audit's exhaustive search found only the ties above)."""
    boundaries = [b / 1000 for b in range(1, 1000)]
    for steps in (1, 2, 3, 4, 7, 10, 13, 20, 25, 30, 38, 40, 50, 75, 80):
        for shift in (1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0):
            sigmas = comfy_sigmas("normal", steps, shift)
            sched = FlowMatchEulerDiscreteScheduler(shift=shift)
            sched.set_timesteps(steps)
            for b in boundaries:
                assert switch_step(sigmas, b) == int((sched.timesteps >= b * 1000).sum()), (steps, shift, b)


def test_wan_pipeline_runs_the_tie_step_on_the_high_noise_expert(comps):
    """The reference above is what WanPipeline does: a real run at 38 steps, shift 2, boundary 0.46 calls the
    high-noise transformer on 27 steps, and the preview sampler does the same."""
    steps, shift, boundary = TIES[0]
    cfg = SampleConfig(prompts=["a"], steps=steps, shift=shift, guidance_high=1.0, guidance_low=1.0, **SMALL)
    calls = {"high": 0, "low": 0}
    hooks = [m.register_forward_pre_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
             for n, m in (("high", comps.high), ("low", comps.low))]  # fmt: skip
    pipe = WanPipeline(tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, vae=comps.vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), transformer=comps.high,
                       transformer_2=comps.low, boundary_ratio=boundary)  # fmt: skip
    try:
        pipe(prompt="a", height=32, width=32, num_frames=5, num_inference_steps=steps, guidance_scale=1.0,
             guidance_scale_2=1.0, output_type="latent")  # fmt: skip
        pipeline_calls = dict(calls)
        calls.update(high=0, low=0)
        sample_latents(comps.high, comps.low, encode_sample_prompts(comps.text_encoder, comps.tokenizer, cfg), cfg,
                       boundary)  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    assert pipeline_calls == calls == {"high": 27, "low": steps - 27}


# ---------------------------------------------------------------- 2. the sampler against ComfyUI's euler loop


@pytest.fixture(scope="module")
def comps():
    return tiny_components()


def _merged_float64(base, lora_model, strength: float):
    """What LoraLoaderModelOnly hands the sampler: W + strength·(alpha/rank)·up·down merged into a float64 copy."""
    ref = copy.deepcopy(base).double().eval()
    if lora_model is None:
        return ref
    with torch.no_grad():
        for name, module in lora_model.named_modules():
            if isinstance(module, LoraLayer):
                down, up = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
                ref.get_submodule(name).weight += strength * module.scaling["default"] * (up @ down)
    return ref


def _comfy_noise(shape, seed: int) -> torch.Tensor:
    """comfy.sample.prepare_noise: the global generator seeded with torch.manual_seed, randn on the CPU."""
    with torch.random.fork_rng(devices=[]):
        generator = torch.manual_seed(seed)
        return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")


def _comfy_ksampler_advanced(model, x, sigmas, cond, uncond, cfg: float, first: bool, last: bool):
    """One KSamplerAdvanced (euler) in float64 on the slice ``sigmas`` of the schedule: ComfyUI scales the incoming
    latent by the first σ (noise added, or none), runs sample_euler on x0 = x − σ·v with CFG on x0, and returns the
    latent divided by (1 − last σ) unless it ends at 0 (return_with_leftover_noise)."""
    noise = x if first else torch.zeros_like(x)
    latent = torch.zeros_like(x) if first else x
    x = sigmas[0] * noise + (1 - sigmas[0]) * latent  # CONST.noise_scaling
    for i in range(len(sigmas) - 1):
        sig = sigmas[i]
        t = torch.full((1,), sig * 1000, dtype=torch.float64)

        def x0(text):
            v = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            return x - v * sig  # CONST.calculate_denoised

        denoised = x0(cond) if math.isclose(cfg, 1.0) else x0(uncond) + (x0(cond) - x0(uncond)) * cfg
        d = (x - denoised) / sig  # to_d
        x = x + d * (sigmas[i + 1] - sig)
    return x if last else x / (1 - sigmas[-1])  # CONST.inverse_noise_scaling


def _comfy_reference(high, low, cache, cfg: SampleConfig, boundary: float, split: int | None = None) -> torch.Tensor:
    """The native graph's final latent (in the sampling space) for ``cfg``, split by Wan's rule unless ``split``."""
    sig = REF_SCHEDULES[cfg.scheduler](cfg.steps, cfg.shift)
    split = ref_split(sig, boundary) if split is None else split
    shape = (1, 16, (cfg.num_frames - 1) // 4 + 1, cfg.height // 8, cfg.width // 8)  # EmptyHunyuanLatentVideo
    x = _comfy_noise(shape, cfg.seed).double()
    cond, uncond = cache.embeddings[:1].double(), cache.negative_embedding.double()
    with torch.no_grad():
        x = _comfy_ksampler_advanced(high, x, sig[: split + 1], cond, uncond, cfg.guidance_high, True, False)
        return _comfy_ksampler_advanced(low, x, sig[split:], cond, uncond, cfg.guidance_low, False, True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    "scheduler, steps, shift, guidance, with_lora",
    [("normal", 8, 12.0, (4.0, 3.0), False), ("normal", 8, 12.0, (4.0, 3.0), True),
     ("normal", 8, 12.0, (1.0, 1.0), False), ("simple", 7, 8.0, (1.0, 1.0), True),
     ("simple", 7, 8.0, (1.0, 3.5), False)],
    ids=["normal-cfg", "normal-cfg-lora", "normal-no-cfg", "simple-no-cfg-lora", "simple-cfg-low-only"],
)  # fmt: skip
def test_sampler_equals_comfyuis_euler_graph(comps, scheduler, steps, shift, guidance, with_lora):
    cfg = SampleConfig(prompts=["a red square moving right"], steps=steps, shift=shift, scheduler=scheduler,
                       guidance_high=guidance[0], guidance_low=guidance[1], lora_strength_high=0.75, **SMALL)
    split = split_step(steps, shift, scheduler, BOUNDARY)
    assert 0 < split < steps  # both experts (and both guidance scales) take part
    high, low = comps.high, comps.low
    if with_lora:
        high, low = with_random_lora(comps.high, LORA, 1), with_random_lora(comps.low, LORA, 2)
    cache = encode_sample_prompts(comps.text_encoder, comps.tokenizer, cfg)
    got = sample_latents(high, low, cache, cfg, BOUNDARY)[0]

    ref_high = _merged_float64(comps.high, high if with_lora else None, cfg.lora_strength_high)
    ref_low = _merged_float64(comps.low, low if with_lora else None, cfg.lora_strength_low)
    ref = _comfy_reference(ref_high, ref_low, cache, cfg, BOUNDARY)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert _rel(got, ref) < 1e-5
    if with_lora:  # the LoRA matters far more than the tolerance
        assert _rel(sample_latents(comps.high, comps.low, cache, cfg, BOUNDARY)[0], ref) > 1e-3


def test_one_step_off_or_the_other_scheduler_is_not_the_same_video(comps):
    """The tolerance above is meaningful: the near misses users make natively are far outside it."""
    cfg = SampleConfig(prompts=["a red square moving right"], steps=8, shift=12.0, **SMALL)
    cache = encode_sample_prompts(comps.text_encoder, comps.tokenizer, cfg)
    got = sample_latents(comps.high, comps.low, cache, cfg, BOUNDARY)[0]
    high, low = _merged_float64(comps.high, None, 1.0), _merged_float64(comps.low, None, 1.0)
    assert _rel(got, _comfy_reference(high, low, cache, cfg, BOUNDARY)) < 1e-5
    split = split_step(8, 12.0, "normal", BOUNDARY)
    simple = _comfy_reference(high, low, cache, cfg.model_copy(update={"scheduler": "simple"}), BOUNDARY)
    for near_miss in (simple, *(_comfy_reference(high, low, cache, cfg, BOUNDARY, split + d) for d in (-1, 1))):
        assert _rel(got, near_miss) > 1e-4


# ---------------------------------------------------------------- 3. the recipe every preview states


def test_default_preview_is_a_native_recipe():
    cfg = SampleConfig(prompts=["a cat"])
    assert (cfg.sampler, cfg.scheduler, cfg.steps, cfg.shift) == ("euler", "normal", 40, 12.0)
    assert native_recipe(cfg, BOUNDARY).startswith(
        "ModelSamplingSD3 12 · KSamplerAdvanced euler/normal 40 · high 0→25 cfg 4 · low 25→40 cfg 3 · seed 42 · "
        "EmptyHunyuanLatentVideo 832×480×33"
    )


def test_recipe_names_each_prompts_seed_and_unipc_is_labelled_not_native(comps):
    cfg = SampleConfig(prompts=["a", "b"], seed=7, steps=30, scheduler="simple", guidance_high=3.5, **{
        k: v for k, v in SMALL.items() if k != "seed"})
    meta = sample_metadata(cfg, 1, 0.9, encode_sample_prompts(comps.text_encoder, comps.tokenizer, cfg))
    split = split_step(30, 12.0, "simple", 0.9)
    assert re.fullmatch(
        rf"ModelSamplingSD3 12 · KSamplerAdvanced euler/simple 30 · high 0→{split} cfg 3\.5 · low {split}→30 cfg 3 · "
        r"seed 8 · EmptyHunyuanLatentVideo 32×32×5 · LoRA strength 1 / 1 · boundary 0\.9", meta["native_recipe"])
    assert "seed 7 (+i for prompt i)" in native_recipe(cfg, 0.9)
    unipc = SampleConfig(prompts=["a"], sampler="unipc")  # the old name still reads
    assert unipc.sampler == "diffusers_unipc"
    assert native_recipe(unipc, BOUNDARY).startswith("diffusers UniPC, not reproducible natively")
    odd = SampleConfig(prompts=["a"], guidance_low=3.333)
    assert native_recipe(odd, BOUNDARY).endswith("not exact natively: ComfyUI's widgets keep 2 decimals of shift, "
                                                  "cfg and LoRA strength")


def test_recipe_strength_is_the_product_of_the_loaded_and_the_render_strength():
    # Load Wan22 LoRA Pair folds its strength into the pair: one LoraLoaderModelOnly needs the product
    cfg = SampleConfig(prompts=["a"], lora_strength_high=0.7, lora_strength_low=0.5)
    line = native_recipe(cfg, BOUNDARY, loaded_strength={"high": 0.6})
    assert "LoRA strength 0.42 / 0.5 ·" in line and "not exact natively" not in line  # 0.6 · 0.7 is no 0.4199...
    assert "not exact natively" in native_recipe(cfg, BOUNDARY, loaded_strength={"high": 0.35, "low": 0.35})


def test_recipe_names_experts_rendered_quantized():
    """The native graph runs the expert files as loaded: a render on quantized experts says so (the preview's own
    weights are not what the graph loads)."""
    cfg = SampleConfig(prompts=["a"])
    note = " · rendered on float8 experts (native graph: weights as loaded)"
    assert native_recipe(cfg, BOUNDARY, quantized={"high": "float8", "low": "float8"}).endswith(note)
    assert native_recipe(cfg, BOUNDARY, quantized={"high": "4bit_ara"}).endswith(
        " · rendered on a 4bit_ara high-noise expert (native graph: weights as loaded)")
    assert native_recipe(cfg, BOUNDARY, quantized={"high": "none", "low": "none"}) == native_recipe(cfg, BOUNDARY)
    unipc = SampleConfig(prompts=["a"], sampler="diffusers_unipc")
    assert note in native_recipe(unipc, BOUNDARY, quantized={"high": "float8", "low": "float8"})


# ComfyUI's prompt syntax (comfy/sd1_clip.py, 0.3.64), written out as the reference: SDTokenizer.tokenize_with_weights
# runs escape_important, token_weights (brackets: weight x1.1, or the number after the last ':'), then
# unescape_important on every segment before tokenizing it.
def comfy_escape_important(text: str) -> str:
    return text.replace("\\)", "\0\1").replace("\\(", "\0\2")


def comfy_unescape_important(text: str) -> str:
    return text.replace("\0\1", ")").replace("\0\2", "(")


def comfy_parse_parentheses(string: str) -> list[str]:
    result, current, level = [], "", 0
    for char in string:
        if char == "(":
            if level == 0 and current:
                result.append(current)
                current = ""
            current += char
            level += 1
        elif char == ")":
            level -= 1
            if level == 0:
                result.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    return result + ([current] if current else [])


def comfy_token_weights(string: str, weight: float) -> list[tuple[str, float]]:
    out = []
    for part in comfy_parse_parentheses(string):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner, w = part[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w, inner = float(inner[colon + 1:]), inner[:colon]
                except ValueError:
                    pass
            out += comfy_token_weights(inner, w)
        else:
            out.append((part, weight))
    return out


def comfy_reads(text: str) -> list[tuple[str, float]]:
    """What CLIPTextEncode tokenizes ``text`` as: (segment, weight) pairs."""
    return [(comfy_unescape_important(seg), w) for seg, w in comfy_token_weights(comfy_escape_important(text), 1.0)]


@pytest.mark.parametrize("text", [
    "A cat (orange) walks", "a camera pan, (slow:1.3)", "((nested)) and )unbalanced(", "a \\(literal\\) bracket",
    "a backslash \\ alone", "ends in a backslash \\", "(", "no brackets at all"])
def test_comfy_escape_is_read_literally_by_comfyuis_prompt_syntax(text):
    from trainer_core.models.text import comfy_escape

    assert comfy_reads(comfy_escape(text)) == [(text, 1.0)]
    if "(" in text and ")" in text and text.index("(") < text.rindex(")"):  # the reference does read weights
        assert comfy_reads(text) != [(text, 1.0)]


def test_comfy_prompt_is_what_the_pipeline_encodes(comps):
    """HTML entities resolved and whitespace collapsed as WanPipeline's prompt_clean does; a prompt over 512 tokens
    cut to the text of the tokens the pipeline keeps, which tokenizes (ComfyUI appending its </s>) to exactly those."""
    from trainer_core.models.text import comfy_prompt

    tok = comps.tokenizer
    short = comfy_prompt(tok, "cats &amp;  dogs (playing)\n")
    assert (short.text, short.tokens == short.kept, short.caveat) == ("cats & dogs \\(playing\\)", True, "")
    long = " ".join(["A cat walks across a sunny garden while the camera pans slowly to the left."] * 40)
    cut = comfy_prompt(tok, long)
    kept = tok(long, max_length=512, truncation=True)["input_ids"]  # what encode_prompts feeds the encoder
    assert cut.tokens > 512 and cut.kept == 512 and not cut.caveat
    assert tok(comfy_unescape_important(comfy_escape_important(cut.text)))["input_ids"] == kept
    assert "embedding:" in comfy_prompt(tok, "a photo, embedding:style").caveat


def test_prompt_notes_name_what_comfyui_must_be_given_otherwise(comps):
    from trainer_core.sample import comfy_prompt_notes

    cfg = SampleConfig(prompts=["a  plain prompt", "a (red) square"], negative_prompt="blurry &amp; static")
    assert comfy_prompt_notes(comps.tokenizer, cfg) == [
        "prompt 1 in ComfyUI's CLIPTextEncode: a \\(red\\) square",
        "negative prompt in ComfyUI's CLIPTextEncode: blurry & static"]
    long = SampleConfig(prompts=["word " * 600])
    (note,) = comfy_prompt_notes(comps.tokenizer, long)
    tokens = len(comps.tokenizer("word " * 600)["input_ids"])
    assert note.startswith("prompt 0 in ComfyUI's CLIPTextEncode: word word ") and note.endswith(
        f" (its first 512 of {tokens} tokens: the render, as WanPipeline, encodes no more, ComfyUI would encode them "
        "all)")


def test_preview_follows_its_recipes_split(comps):
    """The experts run exactly on the steps the recipe gives them (high 0→split, low split→end)."""
    cfg = SampleConfig(prompts=["a"], steps=9, shift=5.0, scheduler="simple", guidance_high=1.0, guidance_low=1.0,
                       **SMALL)  # fmt: skip
    split = int(re.search(r"high 0→(\d+)", native_recipe(cfg, BOUNDARY)).group(1))
    seen = []
    hooks = [m.register_forward_hook(lambda *_, n=n: seen.append(n)) for n, m in
             (("high", comps.high), ("low", comps.low))]  # fmt: skip
    try:
        sample_latents(comps.high, comps.low, encode_sample_prompts(comps.text_encoder, comps.tokenizer, cfg), cfg,
                       BOUNDARY)  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    assert seen == ["high"] * split + ["low"] * (9 - split) and 0 < split < 9


# ---------------------------------------------------------------- 4. the Wan22 Split Step node


def test_split_step_node_outputs_the_two_ksampler_steps(monkeypatch, tmp_path):
    host = F.install(monkeypatch, tmp_path)
    node = F.load_pack().NODE_CLASS_MAPPINGS["Wan22SplitStep"]
    assert F.defaults(node) == {"steps": 40, "shift": 12.0, "scheduler": "normal", "boundary": 0.875}
    assert F.call(node, **F.defaults(node), unique_id="3") == (25, 25, 40, 12.0)
    assert F.call(node, steps=20, shift=8.0, scheduler="simple", boundary=0.875) == (11, 11, 20, 8.0)
    for steps, shift, boundary in TIES:  # an exact tie goes where WanPipeline puts it
        split = wan_pipeline_split(steps, shift, boundary)
        assert F.call(node, steps=steps, shift=shift, scheduler="normal", boundary=boundary)[:2] == (split, split)
    assert host.texts[0][0] == "3" and host.texts[0][1].startswith("high 0→25, low 25→40")


def test_preview_sample_node_text_states_the_recipe(monkeypatch, tmp_path):
    host = F.install(monkeypatch, tmp_path)
    nodes = F.load_pack().NODE_CLASS_MAPPINGS
    preview = nodes["Wan22PreviewSample"]
    # the node imports the sampler when it runs
    monkeypatch.setattr(trainer_core.sample, "sample_videos", lambda *a, **k: [torch.zeros(1, 16, 16, 3)])
    (bundle,) = F.call(nodes["Wan22LoadExperts"], **{**F.defaults(nodes["Wan22LoadExperts"]), "source": "tiny"})
    settings = {**F.defaults(preview), "prompts": "a cat\na dog", "steps": 30, "scheduler": "simple", "boundary": 0.9}
    F.call(preview, experts=bundle, unique_id="7", **settings)
    cfg = SampleConfig(prompts=["a cat", "a dog"], steps=30, scheduler="simple")
    assert ("7", native_recipe(cfg, 0.9)) in host.texts
    # a prompt ComfyUI's CLIPTextEncode reads otherwise (weight brackets) comes with the text to type there
    F.call(preview, experts=bundle, unique_id="7", **{**settings, "prompts": "a cat\na (red) dog"})
    assert host.texts[-1] == ("7", native_recipe(cfg, 0.9) + "\nprompt 1 in ComfyUI's CLIPTextEncode: a \\(red\\) dog")
