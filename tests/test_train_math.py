"""Flow-matching math, LR schedules and state serialization against independent references."""

import math

import numpy as np
import pytest
import torch

from trainer_core.config import OptimizerConfig
from trainer_core.flow import flow_matching_loss, noisy_latents, velocity_target
from trainer_core.train.optim import build_lr_scheduler, build_optimizer
from trainer_core.train.state_io import load_state, save_state


def test_flow_matching_matches_float64_reference():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 16, 2, 4, 4))
    eps = rng.standard_normal((3, 16, 2, 4, 4))
    sigma = np.array([0.1, 0.5, 0.95])
    pred = rng.standard_normal((3, 16, 2, 4, 4))
    w = np.array([1.0, 2.0, 0.5])

    ref_xt = (1 - sigma[:, None, None, None, None]) * x0 + sigma[:, None, None, None, None] * eps
    ref_target = eps - x0
    per_sample = ((pred - ref_target) ** 2).reshape(3, -1).mean(axis=1)

    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    xt = noisy_latents(t(x0), t(eps), t(sigma))
    tgt = velocity_target(t(x0), t(eps))
    np.testing.assert_allclose(xt.numpy(), ref_xt, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tgt.numpy(), ref_target, rtol=1e-6, atol=1e-6)
    assert flow_matching_loss(t(pred), tgt).item() == pytest.approx(per_sample.mean(), rel=1e-6)
    assert flow_matching_loss(t(pred), tgt, t(w)).item() == pytest.approx((per_sample * w).mean(), rel=1e-6)


def test_endpoints_of_the_interpolation():
    x0, eps = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2)
    assert torch.equal(noisy_latents(x0, eps, torch.zeros(2)), x0)
    assert torch.equal(noisy_latents(x0, eps, torch.ones(2)), eps)


def _lrs(name, warmup, total, lr=1.0):
    p = torch.nn.Parameter(torch.zeros(4))
    cfg = OptimizerConfig(name="adamw", lr=lr, lr_scheduler=name, warmup_steps=warmup)
    opt = build_optimizer([p], cfg)
    sched = build_lr_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedules_follow_their_formulas():
    total, warm = 20, 4
    const = _lrs("constant", 0, total)
    assert const == [1.0] * total
    cw = _lrs("constant", warm, total)
    assert cw[:warm] == pytest.approx([i / warm for i in range(warm)]) and cw[warm:] == [1.0] * (total - warm)
    lin = _lrs("linear", warm, total)
    assert lin[warm:] == pytest.approx([(total - i) / (total - warm) for i in range(warm, total)])
    cos = _lrs("cosine", warm, total)
    ref = [0.5 * (1 + math.cos(math.pi * (i - warm) / (total - warm))) for i in range(warm, total)]
    assert cos[warm:] == pytest.approx(ref)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_optimizer_state_roundtrip_through_safetensors(tmp_path, name):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(128, 64))]
    cfg = OptimizerConfig(name=name, lr=1e-2)
    opt = build_optimizer(params, cfg)
    for _ in range(3):
        sum((p**2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    state = {"opt": opt.state_dict(), "rng": torch.get_rng_state(), "pos": (3, 1), "tags": ["a", None, 1.5]}
    save_state(tmp_path / "s.safetensors", state, {"note": "x"})
    loaded, meta = load_state(tmp_path / "s.safetensors")
    assert meta == {"note": "x"}
    assert loaded["pos"] == (3, 1) and loaded["tags"] == ["a", None, 1.5]
    assert torch.equal(loaded["rng"], state["rng"])

    # A fresh optimizer restored from the file takes exactly the same next step as the original.
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = build_optimizer(clones, cfg)
    opt2.load_state_dict(loaded["opt"])
    for ps, o in ((params, opt), (clones, opt2)):
        sum((p**3).sum() for p in ps).backward()
        o.step()
    for a, b in zip(params, clones):
        assert torch.equal(a, b)


def test_state_file_is_plain_safetensors(tmp_path):
    from safetensors import safe_open

    save_state(tmp_path / "s.safetensors", {"w": torch.ones(2), "n": 3})
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as fh:
        assert list(fh.keys()) == ["s.w"]
