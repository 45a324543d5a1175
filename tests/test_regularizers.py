"""DOP, differential guidance and the LoRA EMA on the tiny preset (CPU, fp32)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from tests.lora_fixtures import with_random_lora
from trainer_core.config import LoraConfig, ModelConfig, job_from_dict
from trainer_core.errors import ConfigError, LoraFileError
from trainer_core.lora import load_lora_state, lora_file_name, lora_parameters, lora_state_dict_comfy
from trainer_core.models import load_components
from trainer_core.regularizers import (
    LoraEMA,
    check_regularizers,
    dop_loss,
    ema_lora_file_name,
    ema_lora_state_dict,
    guided_target,
    lora_disabled,
    preservation_caption,
    preservation_captions,
    prior_prediction,
    save_ema_lora,
)
from trainer_core.train.state_io import load_state, save_state
from trainer_core.flow import predict_velocity
from trainer_core.train.objective import LossInputs, LossSettings, MicroBatchLoss, objective_loss
from trainer_core.train.step import micro_batch_loss

LORA = LoraConfig(rank=4)
TEXT_LEN = 8


@pytest.fixture(scope="module")
def base_model():
    """The tiny high-noise expert without LoRA (never modified by the tests)."""
    comps = load_components(ModelConfig(source="tiny", dtype="fp32"), high=True, low=False, vae=False, text_encoder=False)
    return comps.high.requires_grad_(False)


@pytest.fixture
def lora_model(base_model):
    return with_random_lora(base_model, LORA)


def _inputs(batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 16, 2, 8, 8, generator=gen)
    noise = torch.randn(batch, 16, 2, 8, 8, generator=gen)
    sigmas = torch.rand(batch, generator=gen) * 0.9 + 0.05
    text = torch.randn(batch, TEXT_LEN, 64, generator=gen)
    text_pres = torch.randn(batch, TEXT_LEN, 64, generator=gen)
    return x0, noise, sigmas, text, text_pres


def dop_step_loss(model, x0, noise, sigmas, text, text_pres, timestep_type, autocast_dtype, multiplier, batched,
                  preserve=None, guidance_scale=None, backward_scale=None):
    """The trainer's objective with DOP (``preserve`` None: every sample), read as (loss, parts). With
    ``backward_scale`` each loss term is backpropagated as it completes, as training does, and the loss is detached."""
    rows = [] if text_pres is None else list(range(x0.shape[0])) if preserve is None else list(preserve)
    inputs = LossInputs(x0, noise, sigmas, text, preserve=rows, text_preservation=text_pres)
    settings = LossSettings(timestep_type, autocast_dtype, guidance_scale, multiplier, dop_batched=batched)
    if backward_scale is None:
        loss, parts = objective_loss(model, inputs, settings)
    else:
        terms = MicroBatchLoss(model, inputs, settings)
        for term in terms:
            (term * backward_scale).backward()
        loss, parts = terms.parts.total, terms.parts
    return loss, {"normal": parts.normal, "normal_mse": parts.normal_mse, "dop": parts.dop}


def guided_micro_batch_loss(model, x0, noise, sigmas, text, timestep_type, autocast_dtype, scale):
    """The trainer's objective with differential guidance alone."""
    return objective_loss(model, LossInputs(x0, noise, sigmas, text), LossSettings(timestep_type, autocast_dtype, scale))[0]


def _x_t(x0, noise, sigmas):
    s = sigmas.view(-1, 1, 1, 1, 1)
    return (1 - s) * x0 + s * noise


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in lora_parameters(model)]


# --- preservation prompts ---


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("sks walks on a beach", "person walks on a beach"),
        ("A video of SKS, then Sks again.", "A video of person, then person again."),
        ("a photo of sks person smiling", "a photo of person smiling"),  # no "person person"
        ("sks personal trainer", "person personal trainer"),  # class word only collapses as a whole word
        ("sksfoo and foosks stay", None),  # not a whole word
        ("a woman walks", None),  # no trigger: no preservation prompt
        ("", None),  # caption dropout
    ],
)
def test_preservation_caption(caption, expected):
    assert preservation_caption(caption, "sks", "person") == expected


def test_preservation_caption_escapes_the_trigger():
    assert preservation_caption("s.k and sxk", "s.k", "dog") == "dog and sxk"


def test_preservation_captions_maps_and_refuses_when_none_has_the_trigger():
    got = preservation_captions({"sks runs", "", "a cat"}, "sks", "person")
    assert got == {"sks runs": "person runs"}
    with pytest.raises(ConfigError, match="trigger_word 'sks'"):
        preservation_captions({"", "a cat"}, "sks", "person")


# --- settings ---


def _job(**kw):
    return job_from_dict({"model": {"source": "tiny"}, **kw})


def test_check_regularizers_refuses_dop_without_trigger():
    for trigger in (None, "  "):
        with pytest.raises(ConfigError, match=r"advanced\.dop needs trigger_word"):
            check_regularizers(_job(trigger_word=trigger, advanced={"dop": True}))


def test_check_regularizers_refuses_class_containing_the_trigger():
    with pytest.raises(ConfigError, match=r"advanced\.dop_class 'sks man' contains trigger_word 'SKS'"):
        check_regularizers(_job(trigger_word="SKS", advanced={"dop": True, "dop_class": "sks man"}))


def test_check_regularizers_accepts_valid_settings():
    check_regularizers(_job(advanced={"dop": False}))  # no trigger needed without DOP
    for mode in ("cache", "unload", "live"):
        check_regularizers(_job(trigger_word="sks", text_encoder={"mode": mode}, advanced={"dop": True}))


@pytest.mark.parametrize(
    ("setting", "value"),
    [("dop_multiplier", 0.0), ("diff_guidance_scale", -1.0), ("ema_decay", 1.0), ("ema_decay", 0.0), ("dop_class", " ")],
)
def test_advanced_config_ranges(setting, value):
    with pytest.raises(ConfigError, match=rf"advanced\.{setting}"):
        _job(advanced={setting: value})


# --- DOP ---


def test_dop_loss_matches_hand_computation():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    prior = torch.tensor([[0.0, 2.0], [5.0, 1.0]])
    loss = dop_loss(pred, prior)
    assert loss.dtype == torch.float32
    assert loss.item() == (1 + 0 + 4 + 9) / 4


def test_prior_is_the_base_model_with_lora_off(base_model, lora_model):
    x0, noise, sigmas, _, text_pres = _inputs()
    x_t = _x_t(x0, noise, sigmas)
    with torch.no_grad():
        reference = base_model(hidden_states=x_t, timestep=sigmas * 1000, encoder_hidden_states=text_pres)[0]
        lora_on = predict_velocity(lora_model, x_t, sigmas, text_pres, None)
    prior = prior_prediction(lora_model, x_t, sigmas, text_pres, predict_velocity)
    torch.testing.assert_close(prior, reference, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(lora_on, reference, atol=1e-3)  # the LoRA does change the output
    assert not prior.requires_grad

    with torch.no_grad():  # other LoRA weights: the prior must not move
        for p in lora_parameters(lora_model):
            p.mul_(-3.0)
    torch.testing.assert_close(prior_prediction(lora_model, x_t, sigmas, text_pres), prior, rtol=0, atol=0)
    # ...and the LoRA is back on, trainable, afterwards
    assert all(p.requires_grad for p in lora_parameters(lora_model))
    with torch.no_grad():
        assert not torch.allclose(predict_velocity(lora_model, x_t, sigmas, text_pres, None), reference, atol=1e-3)


def test_lora_disabled_restores_state_on_exception(lora_model):
    x0, noise, sigmas, text, _ = _inputs()
    x_t = _x_t(x0, noise, sigmas)
    with torch.no_grad():
        before = predict_velocity(lora_model, x_t, sigmas, text, None)

    def failing(*_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        prior_prediction(lora_model, x_t, sigmas, text, failing)
    with torch.no_grad():
        torch.testing.assert_close(predict_velocity(lora_model, x_t, sigmas, text, None), before, rtol=0, atol=0)
    assert all(p.requires_grad for p in lora_parameters(lora_model))
    lora_model.disable_adapters()  # already off: stays off after the block
    with lora_disabled(lora_model):
        pass
    with torch.no_grad():
        assert not torch.allclose(predict_velocity(lora_model, x_t, sigmas, text, None), before, atol=1e-3)


def test_dop_step_loss_equals_its_definition(base_model, lora_model):
    x0, noise, sigmas, text, text_pres = _inputs()
    multiplier = 0.7
    loss, parts = dop_step_loss(
        lora_model, x0, noise, sigmas, text, text_pres, "weighted", None, multiplier, batched=False
    )
    x_t = _x_t(x0, noise, sigmas)
    with torch.no_grad():
        normal = micro_batch_loss(lora_model, x0, noise, sigmas, text, "weighted", None)
        on = predict_velocity(lora_model, x_t, sigmas, text_pres, None)
        prior = base_model(hidden_states=x_t, timestep=sigmas * 1000, encoder_hidden_states=text_pres)[0]
    expected_dop = (on.double() - prior.double()).pow(2).mean()
    torch.testing.assert_close(parts["normal"], normal, rtol=1e-6, atol=0)
    torch.testing.assert_close(parts["normal_mse"], normal, rtol=1e-6, atol=0)
    torch.testing.assert_close(parts["dop"].double(), expected_dop, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), normal.double() + multiplier * expected_dop, rtol=1e-5, atol=0)
    assert expected_dop > 0


@pytest.mark.parametrize(("preserve", "checkpointing"), [(None, True), ([1], False)])
def test_dop_batched_equals_unbatched(base_model, preserve, checkpointing):
    """Same loss and gradients batched, unbatched, and unbatched with the backward passes run one at a time."""
    x0, noise, sigmas, text, text_pres = _inputs(batch=2)
    if preserve is not None:
        text_pres = text_pres[preserve]
    results = {}
    for mode in ("unbatched", "batched", "sequential"):
        model = with_random_lora(base_model, LORA)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        loss, parts = dop_step_loss(
            model, x0, noise, sigmas, text, text_pres, "linear", None, 1.3, batched=mode == "batched",
            preserve=preserve, backward_scale=0.5 if mode == "sequential" else None,
        )
        if mode == "sequential":
            assert not loss.requires_grad
        else:
            (loss * 0.5).backward()
        results[mode] = (loss.detach(), parts["dop"], _grads(model))
    l0, d0, g0 = results["unbatched"]
    assert d0 > 0
    for mode in ("batched", "sequential"):
        l1, d1, g1 = results[mode]
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
        torch.testing.assert_close(d1, d0, rtol=1e-5, atol=0)
        for a, b in zip(g0, g1):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_dop_without_preserved_samples_is_the_plain_loss(lora_model):
    x0, noise, sigmas, text, _ = _inputs()
    loss, parts = dop_step_loss(lora_model, x0, noise, sigmas, text, None, "linear", None, 1.0, batched=True)
    plain = micro_batch_loss(lora_model, x0, noise, sigmas, text, "linear", None)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    assert parts["dop"].item() == 0.0


# --- differential guidance ---


def test_guided_target_scales_the_gradient_exactly_float64():
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(4, 7, dtype=torch.float64, generator=gen)
    scale = 3.0
    pred = torch.randn(4, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    (g_plain,) = torch.autograd.grad((pred - target).pow(2).mean(), pred)
    guided = guided_target(pred, target, scale)
    assert not guided.requires_grad and guided.dtype == torch.float64
    loss = (pred - guided).pow(2).mean()
    (g_guided,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(g_guided, scale * g_plain, rtol=1e-13, atol=0)
    torch.testing.assert_close(loss, scale**2 * (pred - target).pow(2).mean(), rtol=1e-13, atol=0)


def test_guided_loss_on_the_model_changes_gradient_and_sgd_update_by_scale(base_model):
    x0, noise, sigmas, text, _ = _inputs()
    scale = 3.0
    plain_model, guided_model = with_random_lora(base_model, LORA), with_random_lora(base_model, LORA)
    plain = micro_batch_loss(plain_model, x0, noise, sigmas, text, "weighted", None)
    guided = guided_micro_batch_loss(guided_model, x0, noise, sigmas, text, "weighted", None, scale)
    plain.backward()
    guided.backward()
    torch.testing.assert_close(guided.detach(), scale**2 * plain.detach(), rtol=1e-6, atol=0)
    for a, b in zip(_grads(plain_model), _grads(guided_model)):
        # fp32 end to end: elements near zero carry cancellation noise, so the tolerance is relative to the layer's
        # largest gradient (a wrong factor would be off by 100 %).
        torch.testing.assert_close(b, scale * a, rtol=1e-5, atol=1e-6 * scale * a.abs().max().item())

    # The optimizer update, measured in float64 from zero (so it is read off exactly): SGD moves scale times further;
    # AdamW (eps -> 0, no clipping) makes the same update - the gradient factor cancels.
    grads = {"plain": _grads(plain_model), "guided": _grads(guided_model)}
    for opt_cls, kwargs, factor in ((torch.optim.SGD, {}, scale), (torch.optim.AdamW, {"eps": 1e-30}, 1.0)):
        updates = {}
        for name, gs in grads.items():
            leaves = [torch.zeros_like(g, dtype=torch.float64, requires_grad=True) for g in gs]
            for leaf, g in zip(leaves, gs):
                leaf.grad = g.double()
            opt_cls(leaves, lr=1e-3, **kwargs).step()
            updates[name] = [leaf.detach() for leaf in leaves]
        for a, b, g in zip(updates["plain"], updates["guided"], grads["plain"]):
            # Only where the gradient stands clear of fp32 cancellation noise (Adam's first step is lr·sign(g)).
            clear = g.abs() > 1e-3 * g.abs().max()
            torch.testing.assert_close(b[clear], factor * a[clear], rtol=1e-4, atol=1e-6 * b.abs().max().item())


def test_dop_step_loss_applies_guidance_to_the_normal_part_only(base_model):
    x0, noise, sigmas, text, text_pres = _inputs()
    scale, multiplier = 2.0, 0.5
    loss, parts = dop_step_loss(
        with_random_lora(base_model, LORA), x0, noise, sigmas, text, text_pres, "linear", None, multiplier, False,
        guidance_scale=scale,
    )
    torch.testing.assert_close(parts["normal"], scale**2 * parts["normal_mse"], rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.detach(), parts["normal"] + multiplier * parts["dop"], rtol=1e-6, atol=0)


# --- EMA ---


def _perturb(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def test_ema_matches_a_float64_hand_loop(lora_model):
    decay = 0.9
    ema = LoraEMA(lora_model, decay)
    params = lora_parameters(lora_model)
    shadow = [p.detach().double().clone() for p in params]
    for step in range(6):
        _perturb(lora_model, step)
        ema.update()
        shadow = [decay * s + (1 - decay) * p.detach().double() for s, p in zip(shadow, params)]
    got = list(ema.state_dict().values())
    assert len(got) == len(shadow) and all(t.dtype == torch.float32 for t in got)
    for g, s in zip(got, shadow):
        torch.testing.assert_close(g.double(), s, rtol=0, atol=1e-6)
    assert not torch.allclose(got[0], params[0].detach())


def test_ema_resume_through_a_training_state_file(base_model, tmp_path):
    a, b = with_random_lora(base_model, LORA), with_random_lora(base_model, LORA)
    ema_a = LoraEMA(a, 0.95)
    for step in range(3):
        _perturb(a, step)
        ema_a.update()
    path = save_state(tmp_path / "state.safetensors", {"ema": {"high": ema_a.state_dict()}})
    state, _ = load_state(path)
    with torch.no_grad():  # the resumed run's LoRA (restored separately in the loop)
        for pa, pb in zip(lora_parameters(a), lora_parameters(b)):
            pb.copy_(pa)
    ema_b = LoraEMA(b, 0.95)
    ema_b.load_state_dict(state["ema"]["high"])
    for step in range(3, 6):
        _perturb(a, step)
        _perturb(b, step)
        ema_a.update()
        ema_b.update()
    for ta, tb in zip(ema_a.state_dict().values(), ema_b.state_dict().values()):
        assert torch.equal(ta, tb)


def test_ema_load_state_dict_refuses_a_mismatch(lora_model):
    ema = LoraEMA(lora_model, 0.99)
    state = dict(ema.state_dict())
    state.pop(next(iter(state)))
    with pytest.raises(LoraFileError, match="1 missing"):
        ema.load_state_dict(state)


def test_swapped_in_uses_ema_weights_and_restores_live_exactly(lora_model):
    ema = LoraEMA(lora_model, 0.5)
    _perturb(lora_model, 0)
    ema.update()
    _perturb(lora_model, 1)
    live = [p.detach().clone() for p in lora_parameters(lora_model)]
    with pytest.raises(RuntimeError):
        with ema.swapped_in():
            for p, s in zip(lora_parameters(lora_model), ema.state_dict().values()):
                assert torch.equal(p.detach(), s)
            raise RuntimeError("preview failed")
    for p, before in zip(lora_parameters(lora_model), live):
        assert torch.equal(p.detach(), before)


def test_ema_lora_files(lora_model, base_model, tmp_path):
    ema = LoraEMA(lora_model, 0.5)
    _perturb(lora_model, 0)
    ema.update()
    live = [p.detach().clone() for p in lora_parameters(lora_model)]
    reference_model = copy.deepcopy(lora_model)  # reference: a model whose LoRA holds the EMA values
    with torch.no_grad():
        for p, s in zip(lora_parameters(reference_model), ema.state_dict().values()):
            p.copy_(s)
    expected = lora_state_dict_comfy(reference_model, LORA, torch.float32)

    got = ema_lora_state_dict(ema, LORA, torch.float32)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert all(torch.equal(p.detach(), b) for p, b in zip(lora_parameters(lora_model), live))

    path = save_ema_lora(tmp_path / ema_lora_file_name("run", 250, "high"), ema, LORA, torch.float32, {"step": "250"})
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["ema_decay"] == "0.5"
    fresh = with_random_lora(base_model, LORA, seed=9)
    load_lora_state(fresh, path, LORA)
    for p, s in zip(lora_parameters(fresh), ema.state_dict().values()):
        assert torch.equal(p.detach(), s)


def test_ema_file_name_follows_lora_file_name():
    assert lora_file_name("run", 250, "low") == "run_000250_low_noise.safetensors"
    assert ema_lora_file_name("run", 250, "high") == "run_000250_ema_high_noise.safetensors"
    assert ema_lora_file_name("run", 7, "low") == "run_000007_ema_low_noise.safetensors"
    with pytest.raises(ValueError, match="expert"):
        ema_lora_file_name("run", 1, "mid")
