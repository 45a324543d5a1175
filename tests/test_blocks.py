"""Per-block activation checkpointing policies and compiled blocks (trainer_core.memory.blocks)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import trainer_core.memory.blocks as blocks_module
from trainer_core.config import JobConfig, LoraConfig, ModelConfig
from trainer_core.lora import attach_lora
from trainer_core.memory import BlockPlan, choose_block_plan, install_block_plan
from trainer_core.memory.blocks import ATTENTION_OPS
from trainer_core.memory.planner import Plan
from trainer_core.models import load_components
from trainer_core.train.experts import block_plan_for
from trainer_core.flow import predict_velocity


class _AttentionCalls(TorchDispatchMode):
    """Counts SDPA forward kernels, split into self-attention (query length == key length) and cross-attention."""

    def __init__(self):
        super().__init__()
        self.self_attn = self.cross_attn = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in ATTENTION_OPS:
            if args[0].shape[-2] == args[1].shape[-2]:
                self.self_attn += 1
            else:
                self.cross_attn += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def expert():
    model = load_components(ModelConfig(source="tiny", dtype="fp32"), low=False, vae=False, text_encoder=False).high
    attach_lora(model, LoraConfig(rank=4))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so every LoRA weight gets a gradient
            p.data.normal_(0, 0.02)
    return model.train()


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 3, 16, 16, generator=gen), torch.tensor([0.4]),
            torch.randn(1, 8, 64, generator=gen))


def _train_pass(model, plan: BlockPlan | None):
    model = copy.deepcopy(model)
    if plan is not None:
        install_block_plan(model, plan)
    x, sigma, text = _inputs()
    counter = _AttentionCalls()
    with counter:
        out = predict_velocity(model, x, sigma, text, None)
        out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, counter


@pytest.mark.parametrize(
    "plan,self_calls,cross_calls",
    [
        (BlockPlan(off=2), 2, 2),  # each block's attention runs once
        (BlockPlan(selective=2), 2, 4),  # self-attention output kept, cross-attention recomputed
        (BlockPlan(full=2), 4, 4),  # the whole block recomputed in backward
        (BlockPlan(off=1, selective=1), 2, 3),
        (BlockPlan(off=1, full=1), 3, 3),
    ],
    ids=["off", "selective", "full", "off+selective", "off+full"],
)
def test_policies_recompute_what_they_say_and_change_no_number(expert, plan, self_calls, cross_calls):
    ref_out, ref_grads, _ = _train_pass(expert, None)
    out, grads, calls = _train_pass(expert, plan)
    assert (calls.self_attn, calls.cross_attn) == (self_calls, cross_calls)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and all(g is not None for g in grads.values())
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def test_compiled_blocks_match_eager(expert):
    # torch.compile (inductor's CPU backend here) reorders float arithmetic: equal up to rounding.
    ref_out, ref_grads, _ = _train_pass(expert, None)
    out, grads, _ = _train_pass(expert, BlockPlan(off=1, selective=1, compile=True))
    assert torch.allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-3, atol=1e-6), name


def test_no_grad_passes_skip_the_plan(expert, monkeypatch):
    model = copy.deepcopy(expert)
    install_block_plan(model, BlockPlan(full=2, compile=True))
    monkeypatch.setattr("trainer_core.memory.blocks._compiled", lambda policy: pytest.fail("compiled in no-grad"))
    x, sigma, text = _inputs()
    with torch.no_grad():
        predict_velocity(model, x, sigma, text, None)


def test_all_off_without_compile_is_plain_diffusers(expert):
    model = copy.deepcopy(expert)
    install_block_plan(model, BlockPlan(full=2))
    assert model.is_gradient_checkpointing
    install_block_plan(model, BlockPlan(off=2))
    assert not model.is_gradient_checkpointing and model.block_plan == BlockPlan(off=2)


def test_block_plan_policy_order_and_text():
    plan = BlockPlan(off=2, selective=3, full=1, compile=True)
    assert [plan.policy(i) for i in range(6)] == ["off", "off", "selective", "selective", "selective", "full"]
    assert BlockPlan.uniform("selective", 4) == BlockPlan(selective=4)
    assert plan.describe() == "2 off / 3 selective / 1 full checkpointing, compiled"


def _fits_budget(budget: float, full: float = 1.0, selective: float = 2.0, off: float = 10.0):
    return lambda o, s, f: o * off + s * selective + f * full <= budget


@pytest.mark.parametrize(
    "budget,expected",
    [
        (40, (0, 0, 40)),  # only full fits
        (30, (0, 0, 40)),  # nothing fits: all full (the planner reports it)
        (55, (0, 15, 25)),  # each selective block costs 1 more
        (80, (0, 40, 0)),
        (88, (1, 39, 0)),  # each off block costs 8 more than selective
        (400, (40, 0, 0)),
    ],
)
def test_choose_block_plan_is_greedy_by_time_per_byte(budget, expected):
    assert choose_block_plan(40, _fits_budget(budget)) == expected


def _plan(offload: int = 0, split=(0, 0, 2)) -> Plan:
    return Plan(items=[], phase="training", phases={"training": 1}, free_bytes=None, headroom_bytes=0,
                offload_blocks=offload, tokens=1, host_bytes=0, prefetch_next_expert=False, block_split=split)


def _cfg(**train) -> JobConfig:
    return JobConfig.model_validate({"model": {"source": "tiny"}, "train": train,
                                     "datasets": [{"folder": "x"}]})


@pytest.mark.parametrize(
    "compile,device,offload,quant,triton,expected",
    [
        ("auto", "cpu", 0, "none", True, False),
        ("auto", "cuda", 0, "none", True, True),
        ("auto", "cuda", 0, "float8", True, True),
        ("auto", "cuda", 0, "none", False, False),  # no Triton (e.g. Windows): no GPU code generator
        ("auto", "cuda", 4, "none", True, True),  # streamed blocks: their load hooks run around the compiled block
        ("auto", "cuda", 4, "float8", True, True),
        ("on", "cuda", 4, "none", True, True),
        ("auto", "cuda", 0, "4bit_ara", True, False),  # bitsandbytes kernels would split the graph
        ("on", "cpu", 0, "none", True, True),
        ("off", "cuda", 0, "none", True, False),
    ],
)
def test_block_plan_for_resolves_compile(monkeypatch, compile, device, offload, quant, triton, expected):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if triton else None) if name == "triton" else real(name, *a))
    cfg = _cfg(compile=compile).model_copy(deep=True)
    cfg.quant.transformer = quant
    plan = block_plan_for(cfg, _plan(offload, (1, 1, 0)), torch.device(device))
    assert plan == BlockPlan(off=1, selective=1, compile=expected, fallback=compile == "auto",
                             compile_full=quant != "4bit_ara")  # the default quantizer, nf4
    if compile == "auto" and expected:
        assert block_plan_for(cfg, _plan(offload, (1, 1, 0)), torch.device(device), sharded=True).compile is False


def test_full_blocks_run_eagerly_without_compile_full(expert, monkeypatch):
    compiled = []

    def recording(policy, dynamic=False):
        def run(block, *args):
            compiled.append(policy)
            return blocks_module._RUNNERS[policy](block, *args)
        return run

    monkeypatch.setattr("trainer_core.memory.blocks._compiled", recording)
    plan = BlockPlan(off=0, selective=1, full=1, compile=True, compile_full=False)
    ref_out, _, _ = _train_pass(expert, None)
    out, _, calls = _train_pass(expert, plan)
    assert compiled == ["selective"]  # the full block ran through the eager checkpoint
    assert (calls.self_attn, calls.cross_attn) == (3, 4) and torch.equal(out, ref_out)
    assert plan.describe().endswith("compiled (full blocks eager)")
    assert BlockPlan(selective=2, compile=True, compile_full=False).describe().endswith("checkpointing, compiled")


@pytest.mark.parametrize("quant,quantizer,compile_full", [
    ("float8", "nf4", True), ("4bit_ara", "uint4", True), ("4bit_ara", "nf4", False), ("none", "nf4", True)])
def test_only_nf4_experts_keep_their_full_blocks_eager(quant, quantizer, compile_full):
    # bitsandbytes' NF4 matmul is an autograd.Function, whose outputs a compiled checkpoint would keep.
    cfg = _cfg(compile="on").model_copy(deep=True)
    cfg.quant.transformer, cfg.quant.quantizer = quant, quantizer
    assert block_plan_for(cfg, _plan(0, (0, 1, 1)), torch.device("cuda")).compile_full is compile_full


@pytest.mark.parametrize("fallback", [True, False])
def test_a_compile_failure_falls_back_to_eager_blocks_or_raises(expert, monkeypatch, caplog, fallback):
    calls = []

    def broken(policy, dynamic=False):
        def run(block, *args):
            calls.append(policy)
            raise torch._dynamo.exc.Unsupported("no compiler here")
        return run

    monkeypatch.setattr("trainer_core.memory.blocks._compiled", broken)
    plan = BlockPlan(off=1, selective=1, compile=True, fallback=fallback)
    if not fallback:
        with pytest.raises(torch._dynamo.exc.Unsupported):
            _train_pass(expert, plan)
        return
    ref_out, ref_grads, _ = _train_pass(expert, None)
    out, grads, _ = _train_pass(expert, plan)
    assert calls == ["off"]  # tried once, then every block ran eagerly
    assert torch.equal(out, ref_out) and all(torch.equal(g, ref_grads[n]) for n, g in grads.items())
    assert "torch.compile failed" in caplog.text



def _quantized(model: torch.nn.Module, layer_class) -> torch.nn.Module:
    """A copy of ``model`` whose block Linears are frozen ``layer_class`` layers (the LoRA rides on top)."""
    from trainer_core.quant import quant_targets

    model = copy.deepcopy(model)
    for name, linear in quant_targets(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer_class(linear, torch.float32))
    attach_lora(model, LoraConfig(rank=4))
    return model.train()


def _saved_for_backward(model: torch.nn.Module, plan: BlockPlan) -> int:
    """Bytes of activations (not weights or buffers) autograd keeps between a training forward and its backward."""
    model = copy.deepcopy(model)
    install_block_plan(model, plan)
    stored = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in stored:
            kept.append(t.numel() * t.element_size())
        return t

    x, sigma, text = _inputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = predict_velocity(model, x, sigma, text, None)
    out.square().mean().backward()
    return sum(kept)


def _fp8_matmul_on_cpu() -> bool:
    try:  # rowwise-scaled fp8 matmuls run on the CPU from torch 2.13
        a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def test_compiled_full_checkpoint_of_quantized_blocks_keeps_what_plain_blocks_keep():
    # A compiled full-checkpoint block keeps its inputs only, whatever the weights' storage: the frozen matmul is
    # one custom op the compiled checkpoint recomputes. As an autograd.Function its outputs were kept instead
    # (torch 2.11, the GPU machine's version: 8.0 MB here against 1.0 MB; H100: out of memory at 1024²×81).
    from trainer_core.quant import Float8Linear, UInt4Linear

    plain = load_components(ModelConfig(source="tiny", dtype="fp32"), low=False, vae=False, text_encoder=False).high
    plan = BlockPlan(full=2, compile=True, fallback=False)
    reference = _saved_for_backward(_with_lora(plain), plan)
    layers = {"float8": Float8Linear, "uint4": UInt4Linear}
    if _fp8_matmul_on_cpu():
        layers["float8, fp8 matmuls"] = lambda linear, dtype: Float8Linear(linear, dtype, fp8_matmul=True)
    for name, layer_class in layers.items():
        assert _saved_for_backward(_quantized(plain, layer_class), plan) == reference, name
    assert reference < _saved_for_backward(_with_lora(plain), BlockPlan(off=2)) / 5  # really checkpointed


def _with_lora(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    attach_lora(model, LoraConfig(rank=4))
    return model.train()


def test_quantized_layers_keep_their_output_dtype_under_autocast_compiled_or_not():
    # Autocast casts a linear's input to its dtype; the custom op gets that input, so eager and compiled agree.
    from trainer_core.quant import Float8Linear

    layer = Float8Linear(torch.nn.Linear(64, 32), torch.float32)
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, compiled = layer(x), torch.compile(layer)(x)
    assert eager.dtype == compiled.dtype == torch.bfloat16
    assert torch.allclose(eager.float(), compiled.float())
    compiled.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
