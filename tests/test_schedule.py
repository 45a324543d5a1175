"""Timestep sampling and expert routing, against float64 reference formulas and scipy statistics.

The reference CDFs below are written from the distribution definitions, independently of the module under test.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from trainer_core.errors import ConfigError
from trainer_core.schedule import (
    active_expert,
    expert_for_timestep,
    expert_sigma_range,
    expert_step_counts,
    high_noise_mask,
    loss_weights,
    round_steps,
    sample_sigmas,
)

N = 20_000
SHIFT = 5.0
TYPES = ("linear", "sigmoid", "shift", "weighted")
BIASES = ("balanced", "high_noise", "low_noise")


def ref_cdf(s: np.ndarray, timestep_type: str, shift: float = SHIFT) -> np.ndarray:
    """Untruncated CDF on (0, 1), float64."""
    s = np.asarray(s, dtype=np.float64)
    if timestep_type in ("linear", "weighted"):  # weighted samples uniformly and reweights the loss
        return s
    if timestep_type == "sigmoid":  # sigma = sigmoid(z), z ~ N(0,1)  =>  P(sigma <= s) = P(z <= logit s)
        with np.errstate(divide="ignore"):
            return stats.norm.cdf(np.log(s) - np.log1p(-s))
    if timestep_type == "shift":  # sigma = k u / (1 + (k-1) u)  =>  u = sigma / (k - (k-1) sigma)
        return s / (shift - (shift - 1.0) * s)
    raise AssertionError(timestep_type)


def ref_bias_cdf(q: np.ndarray, bias: str) -> np.ndarray:
    """CDF of the position v in [0, 1] (0 = low-noise end): v = u, 1 - u^3, u^3."""
    if bias == "balanced":
        return q
    if bias == "high_noise":  # P(1 - u^3 <= q) = P(u >= (1-q)^(1/3))
        return 1.0 - np.cbrt(1.0 - q)
    return np.cbrt(q)  # P(u^3 <= q)


def ref_truncated_cdf(timestep_type: str, bias: str, lo: float, hi: float, shift: float = SHIFT):
    f_lo, f_hi = ref_cdf(lo, timestep_type, shift), ref_cdf(hi, timestep_type, shift)

    def cdf(x):
        q = (ref_cdf(np.clip(x, lo, hi), timestep_type, shift) - f_lo) / (f_hi - f_lo)
        return ref_bias_cdf(np.clip(q, 0.0, 1.0), bias)

    return cdf


def draw(expert, timestep_type, bias, boundary=0.875, shift=SHIFT, seed=1234, n=N):
    gen = torch.Generator().manual_seed(seed)
    return sample_sigmas(
        n, expert=expert, boundary=boundary, timestep_type=timestep_type, timestep_bias=bias, shift=shift,
        generator=gen,
    )  # fmt: skip


RANGES = {"high": (0.875, 1.0), "low": (0.0, 0.875)}


# ---------------------------------------------------------------- ranges and routing


def test_expert_ranges():
    assert expert_sigma_range("high", 0.875) == (0.875, 1.0)
    assert expert_sigma_range("low", 0.9) == (0.0, 0.9)
    for bad in ("mid", "HIGH"):
        with pytest.raises(ConfigError, match="expert"):
            expert_sigma_range(bad, 0.875)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="boundary"):
            expert_sigma_range("high", bad)


@pytest.mark.parametrize(
    ("t", "boundary", "expert"),
    [(875.0, 0.875, "high"), (874.999, 0.875, "low"), (875.001, 0.875, "high"), (1000.0, 0.875, "high"),
     (0.0, 0.875, "low"), (900.0, 0.9, "high"), (899.99, 0.9, "low"), (880.0, 0.9, "low")],
)  # fmt: skip
def test_expert_for_timestep_at_boundary(t, boundary, expert):
    assert expert_for_timestep(t, boundary) == expert
    assert high_noise_mask(torch.tensor([t]), boundary).tolist() == [expert == "high"]


def test_high_noise_mask_vectorised():
    t = torch.tensor([0.0, 874.9, 875.0, 875.1, 999.0, 1000.0])
    assert high_noise_mask(t, 0.875).tolist() == [False, False, True, True, True, True]


@pytest.mark.parametrize("boundary", [0.875, 0.9])
@pytest.mark.parametrize("timestep_type", TYPES)
@pytest.mark.parametrize("bias", BIASES)
def test_samples_stay_in_range_and_route_to_their_expert(boundary, timestep_type, bias):
    for expert in ("high", "low"):
        s = draw(expert, timestep_type, bias, boundary=boundary, n=5000)
        assert s.dtype == torch.float32 and s.shape == (5000,)
        lo, hi = (boundary, 1.0) if expert == "high" else (0.0, boundary)
        assert float(s.min()) >= lo and float(s.max()) < hi
        mask = high_noise_mask(s * 1000.0, boundary)
        assert bool(mask.all()) if expert == "high" else not bool(mask.any())


def test_float32_rounding_edges_stay_inside():
    # Biased toward the open ends, many float64 draws round to exactly 1.0 / the boundary in float32.
    high = draw("high", "linear", "high_noise", n=N)
    low = draw("low", "shift", "high_noise", n=N)
    assert float(high.max()) < 1.0 and float(high.max()) > 1.0 - 1e-6
    assert float(low.max()) < 0.875 and float(low.max()) > 0.875 - 1e-6


# ---------------------------------------------------------------- distributions


@pytest.mark.parametrize("expert", ["high", "low"])
@pytest.mark.parametrize("timestep_type", TYPES)
@pytest.mark.parametrize("bias", BIASES)
def test_ks_against_analytic_truncated_cdf(expert, timestep_type, bias):
    lo, hi = RANGES[expert]
    s = draw(expert, timestep_type, bias).double().numpy()
    result = stats.kstest(s, ref_truncated_cdf(timestep_type, bias, lo, hi))
    assert result.pvalue > 1e-3, result


@pytest.mark.parametrize("shift", [1.0, 3.0, 12.0])
def test_ks_shift_values(shift):
    s = draw("low", "shift", "balanced", shift=shift).double().numpy()
    assert stats.kstest(s, ref_truncated_cdf("shift", "balanced", 0.0, 0.875, shift)).pvalue > 1e-3
    if shift != 1.0:  # a shift that was ignored would look uniform
        assert stats.kstest(s, ref_truncated_cdf("linear", "balanced", 0.0, 0.875)).pvalue < 1e-6


@pytest.mark.parametrize("expert", ["high", "low"])
def test_types_are_distinguishable(expert):
    lo, hi = RANGES[expert]
    sampling = ("linear", "sigmoid", "shift")  # weighted samples like linear by design
    for drawn, other in itertools.permutations(sampling, 2):
        s = draw(expert, drawn, "balanced").double().numpy()
        assert stats.kstest(s, ref_truncated_cdf(other, "balanced", lo, hi)).pvalue < 1e-6, (drawn, other)


@pytest.mark.parametrize("expert", ["high", "low"])
def test_biases_are_distinguishable_and_point_the_right_way(expert):
    lo, hi = RANGES[expert]
    for drawn, other in itertools.permutations(BIASES, 2):
        s = draw(expert, "linear", drawn).double().numpy()
        assert stats.kstest(s, ref_truncated_cdf("linear", other, lo, hi)).pvalue < 1e-6, (drawn, other)
    mid = (lo + hi) / 2
    assert float((draw(expert, "linear", "high_noise") > mid).float().mean()) > 0.75
    assert float((draw(expert, "linear", "low_noise") < mid).float().mean()) > 0.75


def test_sampling_is_reproducible_from_the_generator():
    a, b = draw("high", "sigmoid", "balanced", seed=7), draw("high", "sigmoid", "balanced", seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, draw("high", "sigmoid", "balanced", seed=8))


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="timestep_type"):
        draw("high", "cosine", "balanced")
    with pytest.raises(ConfigError, match="timestep_bias"):
        draw("high", "linear", "content")
    with pytest.raises(ConfigError, match="timestep_shift"):
        draw("high", "shift", "balanced", shift=0.0)
    with pytest.raises(ConfigError, match="timestep_type"):
        loss_weights(torch.zeros(2), "lognorm")


# ---------------------------------------------------------------- loss weights

# ai-toolkit toolkit/timestep_weighing/default_weighing_scheme.py, entry i is timestep t = 1000 - i.
AI_TOOLKIT_WEIGHTS = {1000: 0.906, 990: 1.043, 950: 1.375, 900: 1.507, 875: 1.522, 850: 1.507, 750: 1.355,
                      500: 0.925, 250: 0.715, 100: 0.716, 50: 0.582, 1: 0.447}  # fmt: skip


def test_loss_weights_ones_for_unweighted_types():
    s = torch.rand(64, generator=torch.Generator().manual_seed(0))
    for t in ("linear", "sigmoid", "shift"):
        w = loss_weights(s, t)
        assert w.shape == s.shape and w.dtype == torch.float32 and torch.equal(w, torch.ones(64))


def test_weighted_matches_ai_toolkit_curve():
    t = torch.tensor(sorted(AI_TOOLKIT_WEIGHTS), dtype=torch.float32)
    w = loss_weights(t / 1000.0, "weighted")
    want = torch.tensor([AI_TOOLKIT_WEIGHTS[int(x)] for x in t.tolist()])
    torch.testing.assert_close(w, want, atol=0.04, rtol=0)


def test_weighted_has_unit_mean_over_all_timesteps():
    def w(x: float) -> float:
        return loss_weights(torch.tensor([x], dtype=torch.float64), "weighted").double().item()

    knots = [0.025, 0.05] + [k / 20 for k in range(2, 20)] + [0.975, 0.99]
    mean, _ = integrate.quad(w, 0.0, 1.0, points=knots, limit=200)
    assert abs(mean - 1.0) < 1e-5


# ---------------------------------------------------------------- expert alternation


def test_active_expert_switch_every_1():
    seq = [active_expert(k, ["high", "low"], 1) for k in range(6)]
    assert seq == ["high", "low", "high", "low", "high", "low"]


def test_active_expert_switch_every_10():
    seq = [active_expert(k, ["high", "low"], 10) for k in range(45)]
    assert seq == ["high"] * 10 + ["low"] * 10 + ["high"] * 10 + ["low"] * 10 + ["high"] * 5


def test_active_expert_single_stage():
    assert {active_expert(k, ["low"], 10) for k in range(50)} == {"low"}
    assert {active_expert(k, ["high"], 1) for k in range(50)} == {"high"}


@pytest.mark.parametrize("total", [0, 1, 9, 10, 11, 20, 25, 2000, 2005])
@pytest.mark.parametrize("switch_every", [1, 3, 10])
@pytest.mark.parametrize("stages", [["high", "low"], ["high"], ["low"]])
def test_expert_step_counts_match_enumeration(total, switch_every, stages):
    seq: list[str] = []
    while len(seq) < total:
        for stage in stages:
            seq += [stage] * switch_every
    want = {stage: Counter(seq[:total])[stage] for stage in stages}
    assert expert_step_counts(total, stages, switch_every) == want
    assert sum(want.values()) == total


def test_alternation_rejects_bad_input():
    for stages, every in ((["high", "low"], 0), ([], 1), (["high", "high"], 1), (["mid"], 1)):
        with pytest.raises(ConfigError):
            active_expert(0, stages, every)
        with pytest.raises(ConfigError):
            expert_step_counts(10, stages, every)


def test_rounds_without_groups_are_single_steps():
    assert round_steps(7, 10, ["high", "low"], 10, grouped=False) == [7]
    assert round_steps(10, 10, ["high", "low"], 1, grouped=False) == []


@pytest.mark.parametrize("start,total", [(0, 9), (1, 9), (0, 8), (5, 6)])
def test_grouped_rounds_cover_every_step_once_with_each_expert_at_most_once(start, total):
    stages = ["high", "low"]
    rounds, step = [], start
    while step < total:
        rounds.append(round_steps(step, total, stages, 1, grouped=True))
        step += len(rounds[-1])
    assert [s for r in rounds for s in r] == list(range(start, total))
    for r in rounds:
        experts = [active_expert(s, stages, 1) for s in r]
        assert len(set(experts)) == len(experts) and 1 <= len(r) <= 2
    assert rounds[0] == ([start, start + 1] if start + 1 < total else [start])


def test_grouped_rounds_with_longer_blocks_hold_one_step():
    # switch_every 10: the next step has the same expert, so a round is one step (the other group idles)
    assert round_steps(3, 40, ["high", "low"], 10, grouped=True) == [3]
    assert round_steps(9, 40, ["high", "low"], 10, grouped=True) == [9, 10]
