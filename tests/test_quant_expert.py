"""quantize_expert / quantize_text_encoder on the tiny preset: what is quantized, accuracy, LoRA on top, cache."""

from __future__ import annotations

from functools import partial

import peft
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from trainer_core.config import JobConfig, LoraConfig, QuantConfig
from trainer_core.lora import attach_lora, lora_parameters, lora_state_dict_comfy
from trainer_core.models.tiny import tiny_text_encoder, tiny_transformer
from trainer_core.quant import (
    Float8Linear,
    NF4Linear,
    UInt4Linear,
    quant_targets,
    quantize_expert,
    quantize_text_encoder,
)

MODES = {
    "float8": (QuantConfig(transformer="float8"), Float8Linear),
    "nf4": (QuantConfig(transformer="4bit_ara", quantizer="nf4"), NF4Linear),
    "uint4": (QuantConfig(transformer="4bit_ara", quantizer="uint4"), UInt4Linear),
}
TARGET_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                   "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def batches(n: int, seed: int = 0) -> list[dict]:
    """Forward kwargs like the training loop's (2 latent frames of 8x8: 32 tokens; 12 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [
        dict(
            hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g),
            timestep=torch.tensor([900.0 - 10 * i]),
            encoder_hidden_states=torch.randn(1, 12, 64, generator=g),
            return_dict=False,
        )
        for i in range(n)
    ]


def quantized(mode: str, **overrides) -> tuple[nn.Module, object]:
    cfg = MODES[mode][0].model_copy(update=overrides)
    model = tiny_transformer("high")
    report = quantize_expert(model, cfg, expert="high", cache_key="tiny:high", device="cpu",
                             calibration=batches(4))
    return model, report


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _output(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch)[0]


def test_none_changes_nothing():
    model, ref = tiny_transformer("high"), tiny_transformer("high")
    report = quantize_expert(model, QuantConfig(), expert="low", cache_key="k", device="cpu")
    assert report.mode == "none" and report.summary() == "low-noise expert: not quantized"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("mode", list(MODES))
def test_only_block_linears_are_quantized(mode):
    model, report = quantized(mode)
    ref = tiny_transformer("high")
    names = {f"blocks.{i}.{s}" for i in range(2) for s in TARGET_SUFFIXES}
    quantized_names = {n for n, m in model.named_modules() if isinstance(m, MODES[mode][1])}
    assert quantized_names == names and report.layers == 20
    # Everything else (embeddings, norms, modulation, head) is bitwise what it was.
    ref_sd = ref.state_dict()
    untouched = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in names)}
    assert untouched and all(torch.equal(v, ref_sd[k]) for k, v in untouched.items())
    assert len(untouched) == len([k for k in ref_sd if not any(k.startswith(n + ".") for n in names)])
    assert all(not p.requires_grad for n in names for p in model.get_submodule(n).parameters())


def test_whole_model_output_close_to_fp32_and_adapters_help():
    ref = tiny_transformer("high")
    check = batches(1, seed=42)[0]  # held out: not among the calibration batches
    y_ref = _output(ref, check)
    # Bounds on the relative error of the model's output; measured: float8 0.007, nf4 / uint4 with calibrated
    # adapters 0.014 / 0.012, nf4 with residual-SVD adapters 0.021.
    f8, _ = quantized("float8")
    assert _rel(_output(f8, check), y_ref) < 0.02
    for mode in ("nf4", "uint4"):
        model, report = quantized(mode)
        with_ara = _rel(_output(model, check), y_ref)
        for m in model.modules():
            if isinstance(m, (NF4Linear, UInt4Linear)):
                m.set_ara(None, None, torch.float32)
        without = _rel(_output(model, check), y_ref)
        assert with_ara < 0.03 and with_ara < 0.8 * without, (mode, with_ara, without)
        assert report.ara_method == "calibrated" and report.calibration_samples == 4


def test_reported_errors_match_direct_measurement_on_captured_inputs():
    # The report comes from block-by-block covariances; measure the same errors directly on inputs captured by
    # hooks during full forward passes of the unquantized model (float64).
    calib = batches(4)
    ref = tiny_transformer("high")
    captured: dict[str, list[torch.Tensor]] = {}

    def keep(name, _module, args):
        captured.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [m.register_forward_pre_hook(partial(keep, n)) for n, m in quant_targets(ref).items()]
    for b in calib:
        _output(ref, b)
    for h in hooks:
        h.remove()
    model, report = quantized("nf4")
    assert report.error_metric == "activations" and set(report.errors) == set(captured)
    for name, layer in model.named_modules():
        if name not in captured:
            continue
        x = torch.cat(captured[name]).double().T
        w = ref.get_submodule(name).weight.double()
        wq = layer.dequantize(torch.float64)
        ba = layer.ara_up.double() @ layer.ara_down.double()
        plain, with_ara = report.errors[name]
        assert plain == pytest.approx(float(((w - wq) @ x).norm() / (w @ x).norm()), rel=1e-3)
        assert with_ara == pytest.approx(float(((w - wq - ba) @ x).norm() / (w @ x).norm()), rel=1e-3)
        assert with_ara < plain
    assert "% recovered" in report.summary()


@pytest.mark.parametrize("mode", list(MODES))
def test_lora_on_quantized_layers_saves_the_unquantized_format(mode):
    lora = LoraConfig(rank=4)
    plain = tiny_transformer("high")
    attach_lora(plain, lora)
    expected = lora_state_dict_comfy(plain, lora, torch.bfloat16)
    model, _ = quantized(mode)
    attach_lora(model, lora)
    got = lora_state_dict_comfy(model, lora, torch.bfloat16)
    assert list(got) == list(expected)
    assert all(got[k].shape == expected[k].shape and got[k].dtype == expected[k].dtype for k in got)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora_parameters(model))
    wrapper = model.get_submodule("blocks.0.attn1.to_q")
    if mode == "nf4":  # peft's own 4-bit LoRA layer, thanks to model.is_loaded_in_4bit
        assert isinstance(wrapper, peft.tuners.lora.bnb.Linear4bit)
    assert isinstance(wrapper.base_layer, MODES[mode][1])


@pytest.mark.parametrize("mode", list(MODES))
def test_lora_trains_through_quantized_layers(mode):
    model, _ = quantized(mode)
    attach_lora(model, LoraConfig(rank=4))
    model.train()
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = batches(1, seed=7)[0]
    target = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(6):
        loss = ((model(**batch)[0] - target) ** 2).mean()
        loss.backward()
        if len(losses) == 2:
            # lora_B starts at zero, so lora_A's gradient appears from step 2; block 0's can only arrive through
            # the input gradients of every quantized layer above it.
            first_a = model.get_submodule("blocks.0.attn1.to_q").lora_A["default"].weight
            assert first_a.grad is not None and first_a.grad.abs().sum() > 0
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0] and all(b < a for a, b in zip(losses, losses[1:])), losses


def test_quantizing_twice_or_after_lora_is_refused():
    model, _ = quantized("float8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_expert(model, MODES["float8"][0], expert="high", cache_key="k", device="cpu")
    fresh = tiny_transformer("high")
    attach_lora(fresh, LoraConfig(rank=4))
    with pytest.raises(ValueError, match="before attaching the LoRA"):
        quantize_expert(fresh, MODES["float8"][0], expert="high", cache_key="k", device="cpu")
    with pytest.raises(ValueError, match="'high' or 'low'"):
        quantize_expert(tiny_transformer("high"), MODES["nf4"][0], expert="mid", cache_key="k", device="cpu")


def test_calibrated_adapters_need_calibration_inputs():
    with pytest.raises(ValueError, match="calibration"):
        quantize_expert(tiny_transformer("high"), MODES["nf4"][0], expert="high", cache_key="k", device="cpu")
    no_calibration = MODES["nf4"][0].model_copy(update={"ara_calibration_samples": 0})
    report = quantize_expert(tiny_transformer("high"), no_calibration, expert="high", cache_key="k", device="cpu")
    assert report.ara_method == "residual_svd" and report.error_metric == "weights"
    assert all(q > a for q, a in report.errors.values())


class _Counter:
    """A calibration source that counts how often activations were asked for."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return iter(batches(4))


def _run(cfg: QuantConfig, source: _Counter, cache_dir, key: str = "tiny:high"):
    model = tiny_transformer("high")
    report = quantize_expert(model, cfg, expert="high", cache_key=key, device="cpu", calibration=source,
                             cache_dir=cache_dir)
    return model, report


def test_adapter_cache_hit_and_invalidation(tmp_path):
    cfg = MODES["nf4"][0]
    source = _Counter()
    first, rep1 = _run(cfg, source, tmp_path)
    assert source.calls == 1 and rep1.ara_source == "computed" and rep1.cache_path.is_file()
    second, rep2 = _run(cfg, source, tmp_path)
    assert source.calls == 1, "a cache hit must not compute activations"
    assert rep2.ara_source == "cache" and rep2.cache_path == rep1.cache_path
    assert rep2.errors.keys() == rep1.errors.keys() and rep2.error_metric == "activations"
    assert all(rep2.errors[k] == pytest.approx(rep1.errors[k]) for k in rep1.errors)
    for name, layer in first.named_modules():
        if isinstance(layer, NF4Linear):
            other = second.get_submodule(name)
            assert torch.equal(layer.ara_down, other.ara_down) and torch.equal(layer.ara_up, other.ara_up)
    assert _output(first, batches(1, 9)[0]).equal(_output(second, batches(1, 9)[0]))
    # Anything that changes the adapters misses the cache: rank, quantizer, model identity, calibration amount.
    for change, key in (({"ara_rank": 8}, "tiny:high"), ({"quantizer": "uint4"}, "tiny:high"), ({}, "other-model"),
                        ({"ara_calibration_samples": 2}, "tiny:high")):
        before = source.calls
        _, rep = _run(cfg.model_copy(update=change), source, tmp_path, key)
        assert rep.ara_source == "computed" and source.calls == before + 1, change
    assert len(list(tmp_path.glob("ara_*.safetensors"))) == 5
    # quant.ara_cache_dir wins over the caller's default folder.
    own = tmp_path / "own"
    _, rep = _run(cfg.model_copy(update={"ara_cache_dir": str(own)}), source, tmp_path / "unused")
    assert rep.cache_path.parent == own and not (tmp_path / "unused").exists()


def test_corrupt_cache_file_is_recomputed(tmp_path):
    cfg = MODES["nf4"][0]
    source = _Counter()
    _, rep = _run(cfg, source, tmp_path)
    rep.cache_path.write_bytes(b"not a safetensors file")
    _, again = _run(cfg, source, tmp_path)
    assert again.ara_source == "computed" and source.calls == 2


def test_quant_config_validation():
    assert JobConfig(model={"source": "tiny"}).quant == QuantConfig()
    assert QuantConfig().transformer == "none" and QuantConfig().ara_rank == 16
    with pytest.raises(ValidationError, match="only apply to transformer: 4bit_ara"):
        QuantConfig(transformer="float8", ara_source="ara.safetensors")
    with pytest.raises(ValidationError, match="'compute' or a .safetensors"):
        QuantConfig(transformer="4bit_ara", ara_source="ara.bin")
    with pytest.raises(ValidationError):
        QuantConfig(ara_rank=0)
    with pytest.raises(ValidationError):
        QuantConfig(transformer="int8")
    with pytest.raises(ValidationError):
        QuantConfig(ara_calibration_samples=-1)


def test_text_encoder_float8():
    ref, te = tiny_text_encoder(), tiny_text_encoder()
    assert quantize_text_encoder(te, QuantConfig(), "cpu").mode == "none"
    report = quantize_text_encoder(te, QuantConfig(text_encoder="float8"), "cpu")
    linears = [n for n, m in ref.named_modules() if type(m) is nn.Linear]
    assert report.layers == len(linears) and all(isinstance(te.get_submodule(n), Float8Linear) for n in linears)
    assert torch.equal(te.shared.weight, ref.shared.weight)  # embeddings untouched
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, expected = te(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state
    assert _rel(out, expected) < 0.05  # measured 0.02: e4m3 weight rounding through 2 layers
    assert report.mean_error < 0.035


def test_float8_keeps_a_float8_files_values_and_scale():
    """Weights read from a float8 file (its e4m3 values times its scale, as loaded in bf16) keep those values and
    that scale; re-quantized per row they would be rounded a second time. Any other scale is not trusted."""
    from trainer_core.quant.float8 import quantize_float8_rowwise

    g = torch.Generator().manual_seed(0)
    codes = (torch.randn(48, 80, generator=g) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    for file_scale in (torch.tensor(3.1e-4), torch.rand(48, 1, generator=g) * 1e-3 + 1e-5):  # per tensor, per row
        w = (codes.float() * file_scale).to(torch.bfloat16)
        q, scale = quantize_float8_rowwise(w, file_scale)
        assert torch.equal(q.float(), codes.float()) and torch.equal(scale, file_scale.expand(48, 1).float())
        rounded_again = quantize_float8_rowwise(w)
        assert _rel(rounded_again[0].double() * rounded_again[1].double(), w.double()) > 0.01
        for wrong in (file_scale * 1.37, None):
            q2, s2 = quantize_float8_rowwise(w, wrong)
            assert torch.equal(q2.float(), rounded_again[0].float()) and torch.equal(s2, rounded_again[1])
