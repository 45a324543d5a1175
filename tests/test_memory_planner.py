"""The VRAM planner against measurements: exact byte counts of real (tiny) models, the tensors autograd really saves
in a tiny forward pass, the GPU peaks of FACTS.md and of the H200 calibration run, and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan
from transformers import UMT5Config, UMT5EncoderModel

from trainer_core.config import JobConfig, LoraConfig, ModelConfig, QuantConfig
from trainer_core.errors import ConfigError, ModelLoadError
from trainer_core.lora import attach_lora, lora_parameters
from trainer_core.memory import ExpertMemory, planner
from trainer_core.memory.planner import (
    GIB,
    WAN22_A14B_ARCH,
    ActivationModel,
    ExpertShapes,
    SideModels,
    check_plan,
    clip_tokens,
    estimate_host_memory,
    estimate_peak_vram,
    experts_load_on_device,
    model_arch,
    plan_job,
)
from trainer_core.memory.residency import frozen_tensors
from trainer_core.models import load_components
from trainer_core.models.tiny import TINY_TRANSFORMER_CONFIG
from trainer_core.quant import quantize_expert

NO_SIDE_MODELS = SideModels(
    vae_params=0, text_encoder_params=0, text_encoder_linear_params=0, text_encoder_linear_rows=0
)
TINY_SHAPES = ExpertShapes.from_arch(TINY_TRANSFORMER_CONFIG)


def _job(res=512, frames=33, two=False, ckpt=True, optimizer="adamw", rank=16, memory=None, quant=None, **extra):
    return JobConfig.model_validate(
        {
            "model": {"source": "Wan-AI/Wan2.2-T2V-A14B-Diffusers"},
            "lora": {"rank": rank},
            "optimizer": {"name": optimizer},
            "multistage": {"train_low_noise": two},
            "train": {"gradient_checkpointing": ckpt},
            "datasets": [{"folder": "clips", "resolutions": [res], "num_frames": frames}],
            "memory": memory or {},
            "quant": quant or {},
            **extra,
        }
    )


def _tiny_expert(dtype: str = "fp32"):
    return load_components(ModelConfig(source="tiny", dtype=dtype), low=False, vae=False, text_encoder=False).high


def _frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct storage of frozen tensors, bitsandbytes codebooks included."""
    storages = {}
    for t in frozen_tensors(model.modules()):
        storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    for m in model.modules():
        state = getattr(m, "quant_state", None)
        for s in (state, getattr(state, "state2", None)):
            if s is not None:
                storages[s.code.untyped_storage()._cdata] = s.code.untyped_storage().nbytes()
    return sum(storages.values())


def _weights(shapes: ExpertShapes, cfg: JobConfig) -> int:
    from trainer_core.memory.planner import _expert_bytes, _knobs

    head, block = _expert_bytes(shapes, _knobs(cfg, "cpu"))
    return head + shapes.num_blocks * block


def test_tokens_per_clip_follow_the_wan_formula():
    # FACTS.md: ((F-1)/4+1) * (H/16) * (W/16)
    assert clip_tokens(512, 33) == 9 * 32 * 32 == 9_216
    assert clip_tokens(768, 41) == 25_344
    assert clip_tokens(1024, 81) == 86_016


def test_a14b_parameter_count_matches_facts():
    shapes = ExpertShapes.from_arch(WAN22_A14B_ARCH)
    params = sum(n for name, n in shapes.tensors if not name.startswith("rope."))
    assert params == 14_288_491_584


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weight_bytes_are_exact_for_the_tiny_expert(dtype):
    model = _tiny_expert(dtype)
    actual = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    cfg = _job()
    cfg.model.dtype = dtype
    assert _weights(TINY_SHAPES, cfg) == actual


@pytest.mark.parametrize("quant,quantizer", [("float8", "nf4"), ("4bit_ara", "nf4"), ("4bit_ara", "uint4")])
def test_quantized_weight_bytes_are_exact(quant, quantizer):
    model = _tiny_expert("bf16")
    qcfg = QuantConfig(transformer=quant, quantizer=quantizer, ara_rank=4, ara_calibration_samples=0)
    quantize_expert(model, qcfg, expert="high", cache_key="test", device="cpu")
    cfg = _job(quant=qcfg.model_dump())
    cfg.model.dtype = "bf16"
    assert _weights(TINY_SHAPES, cfg) == _frozen_bytes(model)


def test_lora_and_optimizer_bytes_are_exact():
    model = _tiny_expert()
    lora = LoraConfig(rank=4, target_modules=["self_attn.q", "self_attn.v", "ffn.2"])
    attach_lora(model, lora)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    cfg = _job(rank=4)
    cfg.lora.target_modules = lora.target_modules
    plan = estimate_peak_vram(cfg, TINY_TRANSFORMER_CONFIG, None, device_type="cpu", side_models=NO_SIDE_MODELS)
    assert plan.phase == "training"
    items = {i.label: i.nbytes for i in plan.items}
    weights = sum(p.numel() * 4 for p in params)
    assert items["LoRA weights + optimizer states"] == weights + states
    assert items["LoRA gradients (active expert)"] == weights


def _saved_bytes_per_block(model, inputs) -> list[int]:
    """Bytes of the distinct storages autograd saves inside each block, excluding weights, the RoPE tables (computed
    once per forward) and anything an earlier block already saved (the shared text projection)."""
    owned = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    rope = model.rope.register_forward_hook(lambda m, a, out: owned.update(t.untyped_storage()._cdata for t in out))
    seen: set[int] = set()
    per_block: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in owned and key not in seen:
            seen.add(key)
            per_block[-1] += t.untyped_storage().nbytes()
        return t

    hooks = []
    for block in model.blocks:
        ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

        def enter(module, args, ctx=ctx):
            per_block.append(0)
            ctx.__enter__()

        def leave(module, args, output, ctx=ctx):
            ctx.__exit__(None, None, None)

        hooks += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    model(**inputs, return_dict=False)
    for h in (*hooks, rope):
        h.remove()
    return per_block


@pytest.mark.parametrize(
    "dtype,copy_bytes,targets",
    [
        ("fp32", 0, None),  # LoRA and activations both fp32: peft casts nothing, q/k/v share their input
        ("bf16", 4, None),  # bf16 activations, fp32 LoRA, no autocast: every LoRA keeps an fp32 copy, and CPU
        # RMSNorm saves its input upcast to fp32
        ("fp32", 0, ["self_attn.o", "cross_attn.k", "ffn.0"]),
    ],
)
def test_activation_inventory_matches_saved_tensors(dtype, copy_bytes, targets):
    """The per-token and per-text-token bytes the formula gives are exactly what autograd saves in block 1."""
    model = _tiny_expert(dtype)
    lora = LoraConfig(rank=4) if targets is None else LoraConfig(rank=4, target_modules=targets)
    attach_lora(model, lora)
    model.train()
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16

    def measure(frames, size, text):
        gen = torch.Generator().manual_seed(0)
        inputs = {
            "hidden_states": torch.randn(1, 16, frames, size, size, generator=gen, dtype=dt),
            "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(1, text, 64, generator=gen, dtype=dt),
        }
        return _saved_bytes_per_block(model, inputs)[1]

    small, big, more_text = measure(2, 8, 16), measure(4, 16, 16), measure(2, 8, 48)
    video_slope = (big - small) / (4 * 8 * 8 - 2 * 4 * 4)
    text_slope = (more_text - small) / (48 - 16)
    s = 4 if dtype == "fp32" else 2
    act = ActivationModel.build(TINY_SHAPES, 4, tuple(lora.target_modules), s, copy_bytes, 4)
    assert video_slope == act.per_block
    assert text_slope == act.text_per_block


def test_whole_forward_saved_bytes_match_the_no_checkpointing_estimate():
    model = _tiny_expert()
    attach_lora(model, LoraConfig(rank=4))
    model.train()
    owned = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    totals = []
    for frames, size in ((2, 8), (4, 16)):
        seen: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage()._cdata not in owned:
                seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(hidden_states=torch.randn(1, 16, frames, size, size), timestep=torch.tensor([300.0]),
                  encoder_hidden_states=torch.randn(1, 16, 64), return_dict=False)
        totals.append(sum(seen.values()))
    measured = (totals[1] - totals[0]) / (4 * 8 * 8 - 2 * 4 * 4)
    act = ActivationModel.build(TINY_SHAPES, 4, tuple(LoraConfig().target_modules), 4, 0)
    forward_saved = act.per_block * 2 + act.global_per_token  # the backward transient is not saved in forward
    # Block 0's input needs no gradient, so its first LayerNorm saves nothing: the formula is 2.5% above here.
    assert forward_saved * 0.95 <= measured <= forward_saved


@pytest.mark.parametrize(
    "res,frames,ckpt,measured_gib",
    [(512, 33, True, 33.5), (768, 41, True, 44.7), (1024, 81, True, 86.7), (512, 33, False, 111.0)],
)
def test_matches_facts_gpu_peaks(res, frames, ckpt, measured_gib):
    """FACTS.md's plain diffusers+peft loop (one expert, bf16 weights and LoRA, AdamW): the LoRA is bf16 there, so
    peft casts nothing; rebuild the estimate from the planner's parts with those settings."""
    shapes = ExpertShapes.from_arch(WAN22_A14B_ARCH)
    weights = _weights(shapes, _job())
    lora = sum(16 * n for _, i, o in shapes.block_linears for n in (i, o)) * shapes.num_blocks * (2 + 2 + 4)
    act = ActivationModel.build(shapes, 16, tuple(LoraConfig().target_modules), 2, 0)
    split = (0, 0, shapes.num_blocks) if ckpt else (shapes.num_blocks, 0, 0)
    acts = act.training_bytes(clip_tokens(res, frames), 512, split)
    estimate = (weights + lora + acts) / GIB
    assert abs(estimate - measured_gib) <= 0.02 * measured_gib


@pytest.mark.parametrize(
    "settings,measured_gib",
    [
        ({"res": 512, "frames": 33}, 35.08),
        ({"res": 768, "frames": 41}, 47.97),
        ({"res": 512, "frames": 33, "ckpt": "off"}, 111.71),
        ({"memory": {"offload_blocks": 20}}, 23.25),
        ({"memory": {"offload_blocks": 30}}, 16.68),
    ],
)
def test_matches_gpu_calibration_peaks(settings, measured_gib):
    """Peaks measured with this trainer's step (bf16 expert, fp32 LoRA r16 under bf16 autocast, AdamW, 512 text
    tokens, no VAE loaded, eager blocks): torch.cuda.max_memory_allocated over training steps, recorded by
    benchmarks/perf_bench.py (H200) and benchmarks/memory_bench.py (offloading, H100), 2026-11-26."""
    plan = estimate_peak_vram(_job(**settings), WAN22_A14B_ARCH, None, side_models=NO_SIDE_MODELS)
    assert abs(plan.phases["training"] / GIB - measured_gib) <= 0.03 * measured_gib


@pytest.mark.parametrize(
    "settings,split,measured_gib",
    [
        ({"res": 512, "frames": 33}, (40, 0, 0), 101.15),
        ({"res": 512, "frames": 33, "quant": {"transformer": "float8"}}, (40, 0, 0), 87.82),
        ({"res": 768, "frames": 41}, (3, 37, 0), 67.70),
        ({"res": 768, "frames": 41, "quant": {"transformer": "float8"}}, (5, 35, 0), 62.84),
    ],
)
def test_compiled_blocks_peak_below_the_estimate(settings, split, measured_gib):
    """Compiled blocks (benchmarks/perf_bench.py's fast paths, with the split the planner chose on that card) keep
    fewer activations than eager autograd, which the planner models: its estimate errs on the safe side, by at
    most 15%."""
    from trainer_core.memory.planner import _knobs, _one_plan

    cfg = _job(**settings)
    plan = _one_plan(_knobs(cfg, "cuda"), ExpertShapes.from_arch(WAN22_A14B_ARCH), NO_SIDE_MODELS, None, 0, 0, split)
    estimate = plan.phases["training"] / GIB
    assert measured_gib <= estimate <= 1.15 * measured_gib


def test_auto_checkpointing_gives_faster_policies_as_memory_allows():
    splits = {}
    for free_gib in (40, 60, 100, 139):
        plan = estimate_peak_vram(_job(ckpt="auto"), WAN22_A14B_ARCH, free_gib * GIB, side_models=NO_SIDE_MODELS)
        assert plan.fits and plan.required_bytes <= free_gib * GIB
        assert sum(plan.block_split) == 40 and plan.offload_blocks == 0
        splits[free_gib] = plan.block_split
    assert splits[40][0] == 0 and 0 < splits[40][1] < 40  # some blocks selective, the rest full
    assert splits[60][2] == 0 and splits[60][0] < splits[100][0] < splits[139][0] == 40
    # the CPU (no free memory known) and explicit policies keep the uniform split
    assert estimate_peak_vram(_job(ckpt="auto"), WAN22_A14B_ARCH, None).block_split == (0, 0, 40)
    assert estimate_peak_vram(_job(ckpt="selective"), WAN22_A14B_ARCH, 139 * GIB).block_split == (0, 40, 0)


def test_auto_offload_streams_more_blocks_where_that_makes_every_block_selective():
    """The 24 GB float8 recipe under 22 GiB: the fewest streamed blocks that fit leave every block fully
    checkpointed; streaming more (up to half the blocks) buys every block its self-attention output."""
    from trainer_core.memory.planner import _knobs, _one_plan

    job = dict(two=True, ckpt="auto", optimizer="adamw8bit", quant={"transformer": "float8"},
               memory={"low_vram": True, "offload_blocks": "auto", "headroom_gib": 0.5})
    free = 22 * GIB
    plan = estimate_peak_vram(_job(**job), WAN22_A14B_ARCH, free, side_models=NO_SIDE_MODELS)
    fewest = estimate_peak_vram(_job(**{**job, "ckpt": True}), WAN22_A14B_ARCH, free, side_models=NO_SIDE_MODELS)
    assert fewest.fits and fewest.block_split == (0, 0, 40) and fewest.offload_blocks > 0
    assert plan.fits and plan.block_split[2] == 0 and fewest.offload_blocks < plan.offload_blocks <= 20
    # the fewest: one block fewer streamed and every block selective does not fit
    k, shapes = _knobs(_job(**job), "cuda"), ExpertShapes.from_arch(WAN22_A14B_ARCH)
    assert not _one_plan(k, shapes, NO_SIDE_MODELS, free, GIB // 2, plan.offload_blocks - 1, (0, 40, 0)).fits
    # a count given by hand is kept (its split still chosen); a job that fits resident streams nothing
    given = _job(**{**job, "memory": {**job["memory"], "offload_blocks": 12}})
    kept = estimate_peak_vram(given, WAN22_A14B_ARCH, free, side_models=NO_SIDE_MODELS)
    assert kept.offload_blocks == 12 and kept.fits and kept.block_split[1] > 0
    roomy = estimate_peak_vram(_job(**job), WAN22_A14B_ARCH, 80 * GIB, side_models=NO_SIDE_MODELS)
    assert roomy.offload_blocks == 0 and roomy.block_split[2] == 0


def test_dop_doubles_the_activations_unless_low_vram():
    def acts(**extra):
        plan = estimate_peak_vram(_job(**extra), WAN22_A14B_ARCH, None, side_models=NO_SIDE_MODELS)
        return next(i.nbytes for i in plan.items if i.category == "activations")

    base = acts()
    dop = acts(trigger_word="sks", advanced={"dop": True})
    assert dop == 2 * base  # LoRA-on and preservation samples in one forward: twice the tokens
    assert acts(trigger_word="sks", advanced={"dop": True}, memory={"low_vram": True}) == acts(
        memory={"low_vram": True})


def test_side_model_sizes_match_the_real_architectures():
    with init_empty_weights():
        te = UMT5EncoderModel(
            UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
        )
        vae = AutoencoderKLWan()
    side = SideModels()
    linears = [m for m in te.modules() if type(m) is torch.nn.Linear]
    untied = te.encoder.embed_tokens.weight is not te.shared.weight
    # the checkpoint ties the encoder's token embedding to the shared one: count it once
    tied_params = sum(p.numel() for p in te.parameters()) - (te.shared.weight.numel() if untied else 0)
    assert side.text_encoder_params == tied_params
    assert side.text_encoder_linear_params == sum(m.weight.numel() for m in linears)
    assert side.text_encoder_linear_rows == sum(m.weight.shape[0] for m in linears)
    assert side.vae_params == sum(p.numel() for p in vae.parameters())


def test_offload_auto_picks_the_smallest_count_that_fits():
    free = 40 * GIB
    plan = estimate_peak_vram(_job(two=True, memory={"offload_blocks": "auto"}), WAN22_A14B_ARCH, free)
    k = plan.offload_blocks
    assert plan.fits and 0 < k < 40
    explicit = {
        n: estimate_peak_vram(_job(two=True, memory={"offload_blocks": n}), WAN22_A14B_ARCH, free) for n in (k - 1, k)
    }
    assert explicit[k].fits and not explicit[k - 1].fits
    assert explicit[k].peak_bytes == plan.peak_bytes


def test_24gb_card_recipe_fits_and_bf16_is_refused_with_a_fix():
    card = int(23.5 * GIB)
    recipe = _job(two=True, optimizer="adamw8bit", quant={"transformer": "4bit_ara"}, memory={"low_vram": True})
    plan = check_plan(estimate_peak_vram(recipe, WAN22_A14B_ARCH, card))
    assert plan.peak_bytes < 22 * GIB  # the target for a 24 GB card
    assert "does NOT fit" not in plan.summary() and "23.5 GiB free" in plan.summary()
    with pytest.raises(ConfigError) as err:
        check_plan(estimate_peak_vram(_job(two=True), WAN22_A14B_ARCH, card))
    message = str(err.value)
    assert "23.5 GiB are free" in message and "memory.check_vram: false" in message
    # bf16 experts fit only by streaming most blocks; the named count must really fit
    blocks = int(message.split("memory.offload_blocks: auto (-> ")[1].split("offload_blocks ")[1].split(")")[0])
    assert estimate_peak_vram(_job(two=True, memory={"offload_blocks": blocks}), WAN22_A14B_ARCH, card).fits
    assert not estimate_peak_vram(_job(two=True, memory={"offload_blocks": blocks - 1}), WAN22_A14B_ARCH, card).fits


def test_refusal_lists_each_setting_that_would_fit():
    free = 40 * GIB
    with pytest.raises(ConfigError) as err:
        check_plan(estimate_peak_vram(_job(two=True), WAN22_A14B_ARCH, free))
    message = str(err.value)
    for setting in ("memory.offload_blocks: auto", "memory.low_vram: true", "quant.transformer: float8",
                    "quant.transformer: 4bit_ara"):
        assert setting in message
        fixed = {
            "memory.offload_blocks: auto": _job(two=True, memory={"offload_blocks": "auto"}),
            "memory.low_vram: true": _job(two=True, memory={"low_vram": True}),
            "quant.transformer: float8": _job(two=True, quant={"transformer": "float8"}),
            "quant.transformer: 4bit_ara": _job(two=True, quant={"transformer": "4bit_ara"}),
        }[setting]
        assert estimate_peak_vram(fixed, WAN22_A14B_ARCH, free).fits


def test_resolution_is_suggested_when_memory_settings_are_not_enough():
    card = int(23.5 * GIB)
    job = _job(res=1024, frames=81, two=True, optimizer="adamw8bit", quant={"transformer": "4bit_ara"},
               memory={"low_vram": True, "offload_blocks": "auto"})
    plan = estimate_peak_vram(job, WAN22_A14B_ARCH, card)
    assert not plan.fits
    suggestion = next(s for s in plan.suggestions if s.startswith("datasets resolutions"))
    res = int(suggestion.split("[")[1].split("]")[0])
    fixed = copy.deepcopy(job)
    fixed.datasets[0].resolutions = [res]
    assert estimate_peak_vram(fixed, WAN22_A14B_ARCH, card).fits
    fixed.datasets[0].resolutions = [res + 16]
    assert not estimate_peak_vram(fixed, WAN22_A14B_ARCH, card).fits


def test_no_gpu_always_fits_and_offload_count_is_checked():
    assert estimate_peak_vram(_job(), WAN22_A14B_ARCH, None).fits
    with pytest.raises(ConfigError, match="memory.offload_blocks is 41"):
        estimate_peak_vram(_job(memory={"offload_blocks": 41}), WAN22_A14B_ARCH, None)
    with pytest.raises(ConfigError, match="datasets"):
        estimate_peak_vram(_job().model_copy(update={"datasets": []}), WAN22_A14B_ARCH, None)


def test_model_arch_is_read_without_loading_weights(tmp_path):
    assert model_arch(ModelConfig(source="tiny")) == TINY_TRANSFORMER_CONFIG
    _tiny_expert().save_config(tmp_path / "transformer")  # a diffusers folder's transformer/config.json
    arch = model_arch(ModelConfig(source=str(tmp_path)))
    assert arch == TINY_TRANSFORMER_CONFIG
    assert model_arch(ModelConfig(high_noise="wan2.2_t2v_high_noise_14B_fp16.safetensors")) == WAN22_A14B_ARCH
    # a ComfyUI expert file (fp8_scaled, behind the model prefix) is planned at its own size, from its header
    from tests.model_fixtures import save_comfy_transformer

    path = save_comfy_transformer(_tiny_expert(), tmp_path / "small_fp8_scaled.safetensors", prefix=True,
                                  fp8="scale_weight")
    assert model_arch(ModelConfig(high_noise=str(path), low_noise=str(path))) == TINY_TRANSFORMER_CONFIG


def test_plan_job_without_a_gpu_plans_the_tiny_preset(caplog):
    cfg = _job(memory={"offload_blocks": "auto", "low_vram": True}, two=True)
    cfg.model.source = "tiny"
    with caplog.at_level("INFO", logger="trainer_core.memory.planner"):
        plan = plan_job(cfg, torch.device("cpu"))
    assert plan.fits and plan.offload_blocks == 0 and "no GPU to compare with" in caplog.text
    memory = ExpertMemory.for_plan(cfg.memory, plan, "cpu")
    assert memory.low_vram and memory.offload_blocks == 0 and memory.managed
    assert plan.phases["caption encoding"] < GIB  # the tiny preset's own text encoder, not UMT5-XXL


def test_plan_job_warns_before_loading_when_the_host_ram_peak_exceeds_the_machine(caplog, monkeypatch):
    cfg = _job(memory={"low_vram": True}, two=True)
    cfg.model.source = "tiny"
    peak = estimate_host_memory(cfg, plan_job(cfg, torch.device("cpu"), quiet=True)).peak_bytes
    for ram, warned in ((peak, False), (peak - 1, True), (None, False)):
        monkeypatch.setattr(planner, "physical_memory", lambda: ram)
        caplog.clear()
        with caplog.at_level("INFO", logger="trainer_core.memory.planner"):
            plan_job(cfg, torch.device("cpu"))
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == warned, (ram, warnings)
        if warned:
            assert f"the job needs about {peak / GIB:.1f} GiB of host RAM (" in warnings[0]
            assert "expect swapping or an out-of-memory kill" in warnings[0] and "add swap" in warnings[0]


def test_sharded_weights_divide_over_the_ranks_and_are_suggested():
    shapes = ExpertShapes.from_arch(WAN22_A14B_ARCH)
    whole = _weights(shapes, _job())
    from trainer_core.memory.planner import _expert_bytes, _knobs

    _, block = _expert_bytes(shapes, _knobs(_job(), "cuda"))

    def weights(world, shard, two=False):
        job = _job(two=two, distributed={"shard_experts": shard})
        plan = estimate_peak_vram(job, WAN22_A14B_ARCH, None, side_models=NO_SIDE_MODELS, world=world)
        return sum(i.nbytes for i in plan.items if i.category == "weights")

    assert weights(1, True) == weights(4, False) == whole  # one process, or sharding off: a whole copy
    head = whole - shapes.num_blocks * block
    assert abs(weights(4, True) - (head + shapes.num_blocks * block / 4 + 2 * block)) < 4
    assert weights(4, True, two=True) < weights(4, False)
    # both bf16 experts at 768x41 do not fit 70 GiB free; over 4 GPUs sharding does, and is suggested
    job = _job(res=768, frames=41, two=True)
    plan = estimate_peak_vram(job, WAN22_A14B_ARCH, 70 * GIB, side_models=NO_SIDE_MODELS, world=4)
    assert not plan.fits
    assert any(s.startswith("distributed.shard_experts: true") for s in plan.suggestions)


def test_expert_groups_hold_one_expert_per_gpu():
    def weights(world, groups):
        job = _job(two=True, multistage={"train_low_noise": True, "switch_every": 1},
                   distributed={"expert_groups": groups})
        plan = estimate_peak_vram(job, WAN22_A14B_ARCH, None, side_models=NO_SIDE_MODELS, world=world)
        return sum(i.nbytes for i in plan.items if i.category == "weights")

    one = sum(i.nbytes for i in estimate_peak_vram(_job(), WAN22_A14B_ARCH, None, side_models=NO_SIDE_MODELS).items
              if i.category == "weights")
    assert weights(2, True) == one  # each GPU of a group: one expert's weights
    assert weights(1, True) == weights(2, False) == 2 * one  # one process (groups ignored), or groups off: both
    # a grouped job that does not fit is not told to shard (the two cannot be combined)
    job = _job(res=768, frames=41, two=True, multistage={"train_low_noise": True, "switch_every": 1},
               distributed={"expert_groups": True})
    plan = estimate_peak_vram(job, WAN22_A14B_ARCH, 40 * GIB, side_models=NO_SIDE_MODELS, world=2)
    assert not plan.fits and plan.suggestions
    assert not any(s.startswith("distributed.shard_experts") for s in plan.suggestions)


def _load_plan(free_gib: float, **over):
    cfg = _job(two=True, quant=over.pop("quant", {"transformer": "float8"}), **over)
    return cfg, estimate_peak_vram(cfg, WAN22_A14B_ARCH, int(free_gib * GIB))


def test_experts_load_on_device_only_when_the_unquantized_experts_fit_beside_the_plan():
    # Planned float8 need 39.4 GiB (two 13.6 GiB experts resident). Loading in bf16 first adds 13 GiB per expert
    # (26.6 GiB bf16 less its float8 size) and the bf16 text encoder's visit (10.6 GiB): 76.0 GiB for two experts,
    # which an H200 (139 GiB free) or an 80 GB card holds, and 63.0 GiB for one.
    cfg, plan = _load_plan(139)
    assert plan.fits and experts_load_on_device(cfg, plan, 2)
    cfg, plan = _load_plan(76.5)
    assert plan.fits and experts_load_on_device(cfg, plan, 2)
    cfg, plan = _load_plan(75.5)
    assert plan.fits and not experts_load_on_device(cfg, plan, 2)
    assert experts_load_on_device(cfg, plan, 1)
    assert not experts_load_on_device(*_load_plan(62.5), 1)
    cfg, plan = _load_plan(139, memory={"low_vram": True})
    assert not experts_load_on_device(cfg, plan, 2)  # Low VRAM keeps the experts in host memory
    assert not experts_load_on_device(cfg, _load_plan(139)[1], 2, sharded=True)
    cfg = _job(two=True, quant={"transformer": "float8"})
    assert not experts_load_on_device(cfg, estimate_peak_vram(cfg, WAN22_A14B_ARCH, None, device_type="cpu"), 2)


@pytest.mark.parametrize("free_gib", [22.0, 23.5, 31.0])
def test_a_card_with_fp8_matmuls_is_advised_float8_first(free_gib):
    # The default bf16 job with both experts on a 24/32 GB card: an Ada/Blackwell card (fp8 matmuls) is advised
    # float8 with Low VRAM (and as few streamed blocks as fit) first, and that advice fits; an Ampere card is not.
    card = int(free_gib * GIB)
    job = _job(two=True)
    ampere = estimate_peak_vram(job, WAN22_A14B_ARCH, card)
    ada = estimate_peak_vram(job, WAN22_A14B_ARCH, card, fp8_matmul=True)
    assert not ampere.fits and not any("float8" in s for s in ampere.suggestions)
    first = ada.suggestions[0]
    assert first.startswith("all of quant.transformer: float8; memory.low_vram: true")
    assert ada.suggestions[1:] == ampere.suggestions  # the single changes follow, as on any card
    advised = copy.deepcopy(job)
    advised.quant.transformer, advised.memory.low_vram = "float8", True
    if "offload_blocks" in first:
        advised.memory.offload_blocks = "auto"
    plan = estimate_peak_vram(advised, WAN22_A14B_ARCH, card)
    assert plan.fits and f"{plan.peak_bytes / GIB:.1f} GiB" in first
    assert ("offload_blocks" in first) == (free_gib < 30)  # a 32 GB card holds a float8 expert whole
    with pytest.raises(ConfigError, match="change one of:\n  - all of quant.transformer: float8"):
        check_plan(ada)


def test_model_arch_of_a_folder_it_cannot_read_is_refused_not_assumed(tmp_path):
    """A diffusers folder whose high-noise config.json is missing is planned from the low-noise one; with neither,
    the folder is refused by name instead of planned as Wan 2.2 A14B."""
    (tmp_path / "transformer").mkdir()
    _tiny_expert().save_config(tmp_path / "transformer_2")
    assert model_arch(ModelConfig(source=str(tmp_path))) == TINY_TRANSFORMER_CONFIG
    (tmp_path / "transformer_2" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=rf"^model\.source: {tmp_path}/transformer/config\.json is missing"):
        model_arch(ModelConfig(source=str(tmp_path)))


def test_previews_of_a_one_expert_job_count_the_untrained_expert_visiting_as_loaded():
    """The untrained expert renders previews too, unquantized: on a 24 GB card that cannot fit, so the job is
    refused before it trains (it used to run out of memory at the first preview)."""
    card = int(23.5 * GIB)
    recipe = dict(optimizer="adamw8bit", quant={"transformer": "4bit_ara"}, memory={"low_vram": True})
    previews = {"sample": {"prompts": ["a cat"], "sample_every": 250, "width": 512, "height": 512, "num_frames": 33}}
    assert estimate_peak_vram(_job(**recipe), WAN22_A14B_ARCH, card).fits
    plan = estimate_peak_vram(_job(**recipe, **previews), WAN22_A14B_ARCH, card)
    assert plan.phase == "sampling"
    [visiting] = [i for i in plan.items if i.label.startswith("untrained expert")]
    assert visiting.nbytes == pytest.approx(14_288_491_584 * 2, rel=0.01)  # FACTS.md's parameter count, in bf16
    with pytest.raises(ConfigError, match=r"sample\.sample_every: 0"):
        check_plan(plan)
    # training both experts, previews swap them like training does (workflow 1's 24 GB recipe)
    assert estimate_peak_vram(_job(two=True, **recipe, **previews), WAN22_A14B_ARCH, card).fits


@pytest.mark.parametrize("backend,expandable,share", [("native", True, 0.03), ("native", False, 0.25),
                                                       ("cudaMallocAsync", False, 0.25)])
def test_the_plan_keeps_more_spare_without_expandable_segments(monkeypatch, caplog, backend, expandable, share):
    """ComfyUI's default cudaMallocAsync allocator (no expandable segments) lost 20% of the card to fragmentation in
    a run the 3% margin planned; the planner keeps 25% there and says how to get the card back."""
    import trainer_core.memory.allocator as allocator

    monkeypatch.setattr(allocator, "use_expandable_segments", lambda: expandable)
    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: backend)
    with caplog.at_level("WARNING", logger=allocator.__name__):
        assert allocator.fragmentation_share(torch.device("cuda")) == share
    assert allocator.fragmentation_share(torch.device("cpu")) == 0.03
    warned = [r.getMessage() for r in caplog.records]
    assert bool(warned) is (share == 0.25)
    assert any("--disable-cuda-malloc" in m for m in warned) is (backend == "cudaMallocAsync")
    job = _job(two=True, ckpt="auto", quant={"transformer": "float8"})
    plan = estimate_peak_vram(job, WAN22_A14B_ARCH, 78 * GIB, side_models=NO_SIDE_MODELS, fragmentation=share)
    assert plan.fits and plan.required_bytes <= 78 * GIB
    assert plan.required_bytes == int(plan.peak_bytes * (1 + share)) + plan.headroom_bytes
    assert f"with {share:.0%} fragmentation" in plan.summary()
    tight = estimate_peak_vram(job, WAN22_A14B_ARCH, 78 * GIB, side_models=NO_SIDE_MODELS, fragmentation=0.03)
    if share > 0.03:  # less room: fewer blocks keep all their activations
        assert plan.block_split[0] < tight.block_split[0]


def test_a_plan_that_fits_only_with_expandable_segments_says_so():
    job = _job(res=1024, frames=81, two=True, ckpt="auto", optimizer="adamw8bit", quant={"transformer": "float8"},
               memory={"offload_blocks": "auto"})
    native = estimate_peak_vram(job, WAN22_A14B_ARCH, 78 * GIB, side_models=NO_SIDE_MODELS)
    unexpandable = estimate_peak_vram(job, WAN22_A14B_ARCH, 78 * GIB, side_models=NO_SIDE_MODELS, fragmentation=0.25)
    assert native.fits and not unexpandable.fits
    assert "--disable-cuda-malloc" in unexpandable.suggestions[0] and "25%" in unexpandable.suggestions[0]
    with pytest.raises(ConfigError, match=r"change one of:\n  - the native CUDA allocator"):
        check_plan(unexpandable)
    assert not any("cuda-malloc" in s for s in estimate_peak_vram(
        job, WAN22_A14B_ARCH, 40 * GIB, side_models=NO_SIDE_MODELS, fragmentation=0.25).suggestions)
