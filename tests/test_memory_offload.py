"""Block offloading and low-VRAM expert swapping give exactly the results of keeping everything resident.

Everything runs on the CPU: the "device" and the host copies are both CPU memory, but the code path is the one used
on CUDA (storages emptied to 0 bytes and refilled from the host copy), minus the side stream. References are plain
models that were never touched by the memory code; comparisons are bitwise.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from diffusers import WanTransformer3DModel

from trainer_core.config import LoraConfig, ModelConfig, QuantConfig
from trainer_core.lora import attach_lora, lora_parameters
from trainer_core.memory import BlockPlan, ExpertMemory, install_block_plan, streamed_blocks
from trainer_core.memory.residency import GroupState, HostArena, TensorGroup, frozen_tensors
from trainer_core.models import load_components
from trainer_core.models.tiny import TINY_TRANSFORMER_CONFIG
from trainer_core.quant import quantize_expert
from trainer_core.schedule import active_expert


def _randomize_lora(model: torch.nn.Module, seed: int) -> None:
    # lora_B starts at zero, which would make every lora_A gradient zero and hide mistakes.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def six_block_expert() -> WanTransformer3DModel:
    """The tiny architecture with 6 blocks (room for prefetching), LoRA attached and non-zero."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 6})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    model.requires_grad_(False)
    attach_lora(model, LoraConfig(rank=4))
    _randomize_lora(model, 0)
    return model.train()


def _inputs(seed: int = 0, frames: int = 3, size: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 16, frames, size, size, generator=gen),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 12, TINY_TRANSFORMER_CONFIG["text_dim"], generator=gen),
    }


def _forward_backward(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in lora_parameters(model):
        p.grad = None
    out = model(**inputs, return_dict=False)[0]
    (out.square().mean() + out.mean()).backward()
    return out.detach(), [p.grad.clone() for p in lora_parameters(model)]


def _spy_streamed_residency(monkeypatch: pytest.MonkeyPatch, memory: ExpertMemory, name: str) -> list[int]:
    """Record, after every load, how many streamed blocks of ``name`` hold device memory."""
    counts: list[int] = []
    original = TensorGroup.load

    def load(group: TensorGroup) -> None:
        original(group)
        expert = memory.experts[name]
        counts.append(sum(expert.blocks[i].state is not GroupState.RELEASED for i in expert.streamed))

    monkeypatch.setattr(TensorGroup, "load", load)
    return counts


def test_streamed_blocks_are_spread_evenly():
    assert streamed_blocks(40, 0) == []
    assert streamed_blocks(40, 20) == list(range(1, 40, 2))
    assert streamed_blocks(40, 40) == list(range(40))
    assert streamed_blocks(6, 4) == [0, 2, 3, 5]
    assert streamed_blocks(40, 10) == [3, 7, 11, 15, 19, 23, 27, 31, 35, 39]
    with pytest.raises(ValueError, match="0..40"):
        streamed_blocks(40, 41)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("offload,prefetch", [(3, 1), (6, 2), (4, 1)])
def test_offloading_matches_resident(six_block_expert, monkeypatch, checkpointing, offload, prefetch):
    reference, model = copy.deepcopy(six_block_expert), copy.deepcopy(six_block_expert)
    if checkpointing:
        reference.enable_gradient_checkpointing()
        model.enable_gradient_checkpointing()
    memory = ExpertMemory("cpu", low_vram=False, offload_blocks=offload, prefetch=prefetch)
    memory.place("high", model)
    expert = memory.experts["high"]
    counts = _spy_streamed_residency(monkeypatch, memory, "high")
    for seed in (0, 1):  # the second pass starts from the state the first one left
        inputs = _inputs(seed)
        ref_out, ref_grads = _forward_backward(reference, inputs)
        out, grads = _forward_backward(model, inputs)
        assert torch.equal(out, ref_out)
        assert len(grads) == len(ref_grads) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    with torch.no_grad():
        assert torch.equal(model(**_inputs(2), return_dict=False)[0], reference(**_inputs(2), return_dict=False)[0])
    assert counts and max(counts) <= prefetch + 1  # never more streamed blocks on the device than the window
    assert expert.misses() == 0  # every block was prefetched in time
    # After the pass, streamed blocks outside the kept window hold no memory at all.
    released = [i for i in expert.streamed if expert.blocks[i].state is GroupState.RELEASED]
    assert len(released) >= len(expert.streamed) - 2 * (prefetch + 1)
    for i in released:
        assert all(t.untyped_storage().nbytes() == 0 for t in frozen_tensors(model.blocks[i].modules()))


@pytest.mark.parametrize("compile_full", [True, False], ids=["compiled-checkpoint", "eager-full-blocks"])
def test_compiled_blocks_stream_with_their_load_hooks_outside_the_graph(six_block_expert, monkeypatch, compile_full):
    # Inductor's CPU backend: the streamed blocks' hooks run around the compiled block; results match the eager
    # resident model up to compile's float rounding, every block arrives in time and leaves afterwards.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compile afresh, so that the count below sees this test's graphs
    graphs = counters["stats"]["unique_graphs"]
    reference, model = copy.deepcopy(six_block_expert), copy.deepcopy(six_block_expert)
    install_block_plan(model, BlockPlan(off=2, selective=2, full=2, compile=True, fallback=False,
                                        compile_full=compile_full))  # fmt: skip
    memory = ExpertMemory("cpu", low_vram=False, offload_blocks=3, prefetch=1)
    memory.place("high", model)
    expert = memory.experts["high"]
    counts = _spy_streamed_residency(monkeypatch, memory, "high")
    for seed in (0, 1):
        inputs = _inputs(seed)
        ref_out, ref_grads = _forward_backward(reference, inputs)
        out, grads = _forward_backward(model, inputs)
        assert torch.allclose(out, ref_out, rtol=1e-4, atol=1e-5)
        assert all(torch.allclose(g, r, rtol=1e-3, atol=1e-6) for g, r in zip(grads, ref_grads))
    assert counts and max(counts) <= 2 and expert.misses() == 0
    assert counters["stats"]["unique_graphs"] > graphs  # the blocks did run compiled
    released = [i for i in expert.streamed if expert.blocks[i].state is GroupState.RELEASED]
    assert released and all(t.untyped_storage().nbytes() == 0
                            for i in released for t in frozen_tensors(model.blocks[i].modules()))  # fmt: skip


def test_offloading_rebinds_storages_it_cannot_resize(six_block_expert):
    """Weights in non-resizable storages (numpy-backed, like memory-mapped files) are moved to new storages."""
    reference, model = copy.deepcopy(six_block_expert), copy.deepcopy(six_block_expert)
    for block in model.blocks:
        for p in block.parameters():
            if not p.requires_grad:
                p.data = torch.from_numpy(p.detach().numpy().copy())
    assert not model.blocks[0].attn1.to_q.base_layer.weight.untyped_storage().resizable()
    memory = ExpertMemory("cpu", low_vram=False, offload_blocks=6, prefetch=1)
    memory.place("high", model)
    assert model.blocks[0].attn1.to_q.base_layer.weight.untyped_storage().resizable()
    inputs = _inputs(3)
    out, grads = _forward_backward(model, inputs)
    ref_out, ref_grads = _forward_backward(reference, inputs)
    assert torch.equal(out, ref_out) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("quant,quantizer", [("float8", "nf4"), ("4bit_ara", "nf4"), ("4bit_ara", "uint4")])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_offloading_quantized_experts(quant, quantizer, checkpointing):
    """trainer_core.quant's layers (float8 buffers, bitsandbytes NF4 with quant states, uint4) stream correctly."""
    expert = load_components(ModelConfig(source="tiny", dtype="fp32"), low=False, vae=False, text_encoder=False).high
    cfg = QuantConfig(transformer=quant, quantizer=quantizer, ara_rank=4, ara_calibration_samples=0)
    quantize_expert(expert, cfg, expert="high", cache_key="test", device="cpu")
    attach_lora(expert, LoraConfig(rank=4))
    _randomize_lora(expert, 1)
    expert.train()
    if checkpointing:
        expert.enable_gradient_checkpointing()
    reference, model = copy.deepcopy(expert), expert
    memory = ExpertMemory("cpu", low_vram=False, offload_blocks=2, prefetch=1)
    memory.place("high", model)
    managed = frozen_tensors(model.blocks[1].modules())
    assert managed  # quantized weights, scales/absmax, adapters
    for seed in (0, 1):
        inputs = _inputs(seed)
        ref_out, ref_grads = _forward_backward(reference, inputs)
        out, grads = _forward_backward(model, inputs)
        assert torch.equal(out, ref_out)
        assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    memory.close()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def _two_experts(checkpointing: bool) -> dict[str, torch.nn.Module]:
    c = load_components(ModelConfig(source="tiny", dtype="fp32"), vae=False, text_encoder=False)
    experts = {"high": c.high, "low": c.low}
    for i, m in enumerate(experts.values()):
        attach_lora(m, LoraConfig(rank=4))
        _randomize_lora(m, 10 + i)
        if checkpointing:
            m.enable_gradient_checkpointing()
        m.train()
    return experts


def _train(models, memory: ExpertMemory | None, steps: int, switch_every: int):
    """A few AdamW steps alternating experts like the loop; returns the losses and the final LoRA weights."""
    optimizers = {n: torch.optim.AdamW(lora_parameters(m), lr=1e-2) for n, m in models.items()}
    losses = []
    for step in range(steps):
        name = active_expert(step, ["high", "low"], switch_every)
        if memory is not None:
            memory.activate(name)
            other = memory.experts["low" if name == "high" else "high"]
            assert other.resident_bytes() == 0  # low VRAM: the waiting expert holds no device memory
        inputs = _inputs(100 + step)
        out = models[name](**inputs, return_dict=False)[0]
        loss = (out - inputs["hidden_states"]).square().mean()
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: [p.detach().clone() for p in lora_parameters(m)] for n, m in models.items()}


@pytest.mark.parametrize("offload", [0, 2], ids=["swap", "swap+offload"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_low_vram_training_matches_resident(offload, checkpointing):
    reference = _two_experts(checkpointing)
    models = copy.deepcopy(reference)
    memory = ExpertMemory("cpu", low_vram=True, offload_blocks=offload, prefetch=1)
    for name, model in models.items():
        memory.place(name, model)
    ref_losses, ref_weights = _train(reference, None, steps=6, switch_every=2)
    losses, weights = _train(models, memory, steps=6, switch_every=2)
    assert losses == ref_losses
    for name in ref_weights:
        assert all(torch.equal(a, b) for a, b in zip(weights[name], ref_weights[name]))
    # Switches at steps 2 and 4 (the first expert was active from the start): each copied a whole expert back in.
    assert [r.expert for r in memory.switches] == ["low", "high"]
    for record in memory.switches:
        assert record.nbytes == memory.experts[record.expert].total_bytes > 0
        assert record.copy_seconds() >= 0


def test_inactive_expert_is_activated_when_it_runs():
    models = _two_experts(checkpointing=False)
    reference = copy.deepcopy(models)
    memory = ExpertMemory("cpu", low_vram=True, offload_blocks=0)
    for name, model in models.items():
        memory.place(name, model)
    assert memory.active == "high" and memory.experts["low"].resident_bytes() == 0
    with torch.no_grad():  # e.g. the sampler moving on to the low-noise expert
        out = models["low"](**_inputs(5), return_dict=False)[0]
        ref = reference["low"](**_inputs(5), return_dict=False)[0]
    assert torch.equal(out, ref)
    assert memory.active == "low" and memory.experts["high"].resident_bytes() == 0


def test_prefetch_loads_the_next_expert_before_the_switch():
    models = _two_experts(checkpointing=False)
    memory = ExpertMemory("cpu", low_vram=True, offload_blocks=0)
    for name, model in models.items():
        memory.place(name, model)
    memory.prefetch("low")
    assert memory.experts["low"].resident_bytes() == memory.experts["low"].total_bytes  # both on the device now
    record = memory.activate("low")
    assert record.nbytes == memory.experts["low"].total_bytes
    assert memory.experts["high"].resident_bytes() == 0


def test_close_restores_an_ordinary_model(six_block_expert):
    original = copy.deepcopy(six_block_expert)
    model = copy.deepcopy(six_block_expert)
    memory = ExpertMemory("cpu", low_vram=True, offload_blocks=3)
    memory.place("high", model)
    _forward_backward(model, _inputs(0))
    memory.close()
    assert not model._forward_pre_hooks and not any(b._forward_pre_hooks or b._forward_hooks for b in model.blocks)
    for (name, a), b in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name


def test_close_lets_go_of_every_host_copy(monkeypatch):
    # A ComfyUI server outlives the run: whatever the memory code still references after close stays resident (on
    # an H100 CUDA's pinned cache kept 15.0 GiB beside the experts; benchmarks/pinned_release.py).
    copies: list[weakref.ref] = []
    original = HostArena.copy

    def copy(arena: HostArena, src: torch.Tensor) -> torch.Tensor:
        dst = original(arena, src)
        copies.append(weakref.ref(dst))
        return dst

    monkeypatch.setattr(HostArena, "copy", copy)
    models = _two_experts(checkpointing=False)
    memory = ExpertMemory("cpu", low_vram=True, offload_blocks=2)
    for name, model in models.items():
        memory.place(name, model)
    memory.activate("low")
    assert copies and all(c() is not None for c in copies)
    memory.close()
    gc.collect()
    assert [c for c in copies if c() is not None] == []


@pytest.mark.parametrize("low_vram, offload", [(True, 0), (True, 1), (False, 2)])
def test_close_restores_one_expert_at_a_time_and_leaves_it_in_host_memory(monkeypatch, low_vram, offload):
    # With Low VRAM the device holds one expert: restoring both whole at once would not fit a 24 GB card with float8
    # experts (2 x 13.6 GiB) after the last step. Offloaded blocks alone come back to the device (not 2 whole
    # experts more in host memory).
    models = _two_experts(checkpointing=False)
    reference = copy.deepcopy(models)
    memory = ExpertMemory("cpu", low_vram=low_vram, offload_blocks=offload)
    for name, model in models.items():
        memory.place(name, model)
    _forward_backward(models["high"], _inputs(1))
    experts = dict(memory.experts)
    largest = max(e.total_bytes for e in experts.values())
    resident: list[int] = []
    moved: list[str] = []
    original_load, original_to = TensorGroup.load, torch.nn.Module.to

    def load(group: TensorGroup) -> None:
        original_load(group)
        resident.append(sum(e.resident_bytes() for e in experts.values()))

    def to(module: torch.nn.Module, *args, **kwargs):
        if module in models.values():
            moved.append(f"{next(k for k, m in models.items() if m is module)} to {args[0]}")
        return original_to(module, *args, **kwargs)

    monkeypatch.setattr(TensorGroup, "load", load)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    memory.close()
    if low_vram:
        assert resident and max(resident) <= largest
        assert moved == ["high to cpu", "low to cpu"]
    else:
        assert moved == []
    for name in models:
        for (key, a), b in zip(models[name].state_dict().items(), reference[name].state_dict().values()):
            assert torch.equal(a, b), (name, key)


def test_offload_sends_an_expert_away_until_it_is_needed():
    models = _two_experts(checkpointing=True)
    reference = copy.deepcopy(models)
    memory = ExpertMemory("cpu", low_vram=True, offload_blocks=0)
    memory.place("high", models["high"])
    memory.offload("high")  # e.g. while the low-noise expert is quantized on the GPU
    memory.place("low", models["low"])
    assert memory.active is None
    assert all(e.resident_bytes() == 0 for e in memory.experts.values())
    record = memory.activate("low")
    assert record.nbytes == memory.experts["low"].total_bytes
    for name in ("low", "high"):
        out, grads = _forward_backward(models[name], _inputs(4))
        ref_out, ref_grads = _forward_backward(reference[name], _inputs(4))
        assert torch.equal(out, ref_out) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    assert memory.active == "high"
    with pytest.raises(ValueError, match="low_vram"):
        ExpertMemory("cpu", low_vram=False, offload_blocks=1).offload("high")
