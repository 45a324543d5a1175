"""The accuracy recovery adapter's math: closed form vs float64 brute force, and what calibration buys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from trainer_core.quant import NF4Linear, UInt4Linear, ara, low_rank_adapter, relative_output_errors


def _objective(r: np.ndarray, x: np.ndarray, b: np.ndarray, a: np.ndarray) -> float:
    return float(np.sum(((r - b @ a) @ x) ** 2))


def test_calibrated_closed_form_matches_float64_brute_force():
    # min over rank-r B A of ||(R - B A) X||_F^2, found independently by L-BFGS from several random starts in
    # float64 (this factorization problem has no spurious local minima, so the best start is the optimum).
    rng = np.random.default_rng(0)
    out_f, in_f, n, rank = 12, 9, 40, 3
    r = rng.standard_normal((out_f, in_f))
    x = rng.standard_normal((in_f, n)) * rng.uniform(0.1, 3.0, size=(in_f, 1))  # anisotropic inputs
    down, up = low_rank_adapter(torch.from_numpy(r), rank, torch.from_numpy(x @ x.T), damping=0.0)
    closed = _objective(r, x, up.double().numpy(), down.double().numpy())

    def f(theta):
        b, a = theta[: out_f * rank].reshape(out_f, rank), theta[out_f * rank :].reshape(rank, in_f)
        e = (r - b @ a) @ x
        grad_m = -2 * e @ x.T
        return float(np.sum(e**2)), np.concatenate([(grad_m @ a.T).ravel(), (b.T @ grad_m).ravel()])

    best = min(
        minimize(f, rng.standard_normal(rank * (out_f + in_f)), jac=True, method="L-BFGS-B",
                 options={"maxiter": 20000, "gtol": 1e-12, "ftol": 1e-15}).fun
        for _ in range(8)
    )
    assert closed <= best * (1 + 1e-6)
    assert closed == pytest.approx(best, rel=1e-4)
    # And it is the Eckart-Young value: the discarded singular values of R L, C = X X^T = L L^T.
    s = np.linalg.svd(r @ np.linalg.cholesky(x @ x.T), compute_uv=False)
    assert closed == pytest.approx(float(np.sum(s[rank:] ** 2)), rel=1e-4)


def test_residual_svd_is_eckart_young_optimum():
    torch.manual_seed(0)
    r = torch.randn(20, 14, dtype=torch.float64)
    down, up = low_rank_adapter(r, 4)
    s = torch.linalg.svdvals(r)
    assert float(((r - up.double() @ down.double()) ** 2).sum()) == pytest.approx(float((s[4:] ** 2).sum()), rel=1e-5)


def test_relative_output_errors_match_direct_float64():
    torch.manual_seed(0)
    w = torch.randn(30, 16, dtype=torch.float64)
    r = 0.1 * torch.randn(30, 16, dtype=torch.float64)
    down, up = 0.1 * torch.randn(3, 16, dtype=torch.float64), 0.1 * torch.randn(30, 3, dtype=torch.float64)
    x = torch.randn(16, 50, dtype=torch.float64) * torch.linspace(0.1, 2, 16, dtype=torch.float64)[:, None]
    plain, corrected = relative_output_errors(w, r, down, up, x @ x.T)
    assert plain == pytest.approx(float((r @ x).norm() / (w @ x).norm()), rel=1e-5)
    assert corrected == pytest.approx(float(((r - up @ down) @ x).norm() / (w @ x).norm()), rel=1e-5)
    plain_w, corrected_w = relative_output_errors(w, r, down, up)
    assert corrected_w == pytest.approx(float((r - up @ down).norm() / w.norm()), rel=1e-5)
    assert relative_output_errors(w, r, None, None)[1] is None


def _outlier_activations(in_f: int, n: int, seed: int) -> torch.Tensor:
    """Activations like a transformer's: log-normal channel scales, and four outlier channels at scale 20."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(in_f, generator=g))
    scales[:4] = 20.0
    return torch.randn(n, in_f, generator=g) * scales


@pytest.mark.parametrize("cls", [NF4Linear, UInt4Linear])
def test_calibrated_adapter_recovers_output_error_and_beats_residual_svd(cls):
    torch.manual_seed(0)
    lin = nn.Linear(256, 384).requires_grad_(False)
    nn.init.normal_(lin.weight, std=0.02)
    layer = cls(lin, torch.float32)
    residual = lin.weight - layer.dequantize()
    calib = _outlier_activations(256, 2048, seed=1)
    cov = calib.T @ calib
    down_c, up_c = low_rank_adapter(residual, 16, cov)
    down_s, up_s = low_rank_adapter(residual, 16)
    plain, calibrated = relative_output_errors(lin.weight, residual, down_c, up_c, cov)
    _, svd_only = relative_output_errors(lin.weight, residual, down_s, up_s, cov)
    # Measured (seeds 0-3): 0.091 -> 0.039..0.046 calibrated (about -55%), 0.083 with the residual SVD.
    assert calibrated < 0.6 * plain
    assert calibrated < svd_only < plain
    # Held-out inputs from the same distribution (measured 0.091 -> 0.056..0.059, SVD 0.083): the gain is not
    # overfitting to the calibration samples.
    held = _outlier_activations(256, 512, seed=2).T
    err = lambda m: float((m @ held).norm() / (lin.weight @ held).norm())  # noqa: E731
    assert err(residual - up_c @ down_c) < min(0.75 * err(residual), err(residual - up_s @ down_s))
    # Each adapter is optimal for its own objective: on the weights themselves the residual SVD wins.
    assert relative_output_errors(lin.weight, residual, down_s, up_s)[1] < relative_output_errors(
        lin.weight, residual, down_c, up_c
    )[1]


def test_randomized_svd_path_is_near_optimal(monkeypatch):
    torch.manual_seed(0)
    m = torch.randn(300, 40) @ torch.randn(40, 260) + 0.5 * torch.randn(300, 260)
    exact = low_rank_adapter(m, 8)
    monkeypatch.setattr(ara, "EXACT_SVD_MAX", 16)  # force torch.svd_lowrank
    randomized = low_rank_adapter(m, 8)
    err = lambda d, u: float((m - u @ d).norm())  # noqa: E731
    assert err(*exact) <= err(*randomized) <= 1.01 * err(*exact)


def test_damping_handles_fewer_samples_than_channels():
    # 10 samples for 64 input channels: X X^T is singular; the damped factorization still gives a finite adapter
    # that lowers the error on those samples.
    torch.manual_seed(0)
    r = torch.randn(48, 64)
    x = torch.randn(10, 64)
    cov = x.T @ x
    down, up = low_rank_adapter(r, 4, cov)
    assert torch.isfinite(down).all() and torch.isfinite(up).all()
    plain, corrected = relative_output_errors(torch.randn(48, 64), r, down, up, cov)
    assert corrected < plain
    # No signal at all (dead inputs): the objective degenerates to the residual SVD's.
    d0, u0 = low_rank_adapter(r, 4, torch.zeros(64, 64))
    d1, u1 = low_rank_adapter(r, 4)
    assert torch.allclose(u0 @ d0, u1 @ d1, atol=1e-5)


def test_rank_larger_than_layer_is_refused():
    with pytest.raises(ValueError, match="rank must be between 1 and 8"):
        low_rank_adapter(torch.randn(8, 16), 9)
