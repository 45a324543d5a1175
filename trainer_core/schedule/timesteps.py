"""Which noise levels each training step sees, per expert.

Everything lives in sigma space: the noisy latent is ``x_t = (1 - σ)·x0 + σ·ε`` and the model's timestep is
``t = 1000·σ``. The high-noise expert only ever sees ``σ ∈ [boundary, 1)``, the low-noise expert ``σ ∈ [0, boundary)``
(Wan 2.2 T2V: boundary 0.875, i.e. t ≥ 875 goes to the high-noise expert).

Timestep types (``train.timestep_type``): each is a distribution on (0, 1) with density f and CDF F.

* ``linear``: uniform, f(σ) = 1, F(σ) = σ.
* ``sigmoid``: logit-normal, σ = sigmoid(z) with z ~ N(0, 1); F(σ) = Φ(logit σ),
  f(σ) = φ(logit σ) / (σ(1 − σ)). Concentrates on mid noise levels (peak at σ = 0.5).
* ``shift``: uniform u pushed through the flow-matching shift σ = s·u / (1 + (s − 1)·u) (s = ``train.timestep_shift``);
  F(σ) = σ / (s − (s − 1)·σ), f(σ) = s / (s − (s − 1)·σ)². For s > 1 it favours high noise (s = 1 is linear).
* ``weighted``: sampled like ``linear``; each sample's loss is multiplied by :func:`loss_weights` (below), the
  per-timestep weighting ai-toolkit ships under this name.

Restriction to the active expert's range [lo, hi) is exact (inverse-CDF truncation, no rejection):
``σ = F⁻¹(F(lo) + v·(F(hi) − F(lo)))`` where v ∈ [0, 1] is the quantile position inside the range
(0 = low-noise end, 1 = high-noise end). So within the range the density is f(σ) / (F(hi) − F(lo)) when v is uniform.

Timestep bias (``train.timestep_bias``) sets v from u ~ U(0, 1), as ai-toolkit's ``content_or_style`` does on its
timestep grid (cubic sampling):

* ``balanced``: v = u (the type's own distribution, truncated).
* ``high_noise``: v = 1 − u³; P(v ≤ x) = 1 − (1 − x)^(1/3). Half the samples fall in the top 12.5% of the range's
  quantiles (median v = 1 − 0.5³ = 0.875).
* ``low_noise``: v = u³; P(v ≤ x) = x^(1/3), the mirror image: median v = 0.125.

The resulting CDF of σ inside [lo, hi) is B((F(σ) − F(lo)) / (F(hi) − F(lo))) with B the bias CDF above.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..names import EXPERTS

TIMESTEP_TYPES = ("linear", "sigmoid", "shift", "weighted")
TIMESTEP_BIASES = ("balanced", "high_noise", "low_noise")

# ai-toolkit's "weighted" table (toolkit/timestep_weighing/default_weighing_scheme.py): for each of its 1000
# training timesteps, the reciprocal of the flow-matching MSE it measured on one image with Flex.1-alpha,
# normalised to mean 1. Resampled here at knots in σ (local means over σ ± 0.005) and linearly interpolated:
# largest deviation from the table 0.036, rms 0.007. Low near σ = 0 (0.45), peak 1.51 around σ = 0.85-0.9.
_WEIGHT_KNOTS = (
    (0.0, 0.446), (0.025, 0.493), (0.05, 0.582), (0.1, 0.716), (0.15, 0.729), (0.2, 0.716), (0.25, 0.715),
    (0.3, 0.731), (0.35, 0.762), (0.4, 0.805), (0.45, 0.86), (0.5, 0.925), (0.55, 1.0), (0.6, 1.083),
    (0.65, 1.172), (0.7, 1.263), (0.75, 1.355), (0.8, 1.442), (0.85, 1.509), (0.9, 1.505), (0.95, 1.374),
    (0.975, 1.217), (0.99, 1.047), (1.0, 0.932),
)  # fmt: skip


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_boundary(boundary: float) -> None:
    if not 0.0 < boundary < 1.0:
        raise ConfigError(f"multistage.boundary must lie strictly between 0 and 1 (T2V: 0.875), got {boundary}")


def _check_shift(shift: float) -> None:
    if not shift > 0:
        raise ConfigError(f"train.timestep_shift must be > 0 (typical 3-5; 1 = no shift), got {shift}")


def expert_sigma_range(expert: str, boundary: float) -> tuple[float, float]:
    """Half-open σ range [lo, hi) an expert trains on: high = [boundary, 1), low = [0, boundary)."""
    _check("expert", expert, EXPERTS)
    _check_boundary(boundary)
    return (boundary, 1.0) if expert == "high" else (0.0, boundary)


def timestep_cdf(sigma: torch.Tensor | float, timestep_type: str, shift: float) -> torch.Tensor:
    """Untruncated CDF F(σ) of ``timestep_type`` in float64 (``shift`` only matters for ``shift``)."""
    _check("train.timestep_type", timestep_type, TIMESTEP_TYPES)
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if timestep_type == "sigmoid":
        return torch.special.ndtr(torch.special.logit(s))
    if timestep_type == "shift":
        _check_shift(shift)
        return s / (shift - (shift - 1.0) * s)
    return s.clone()


def _inverse_cdf(p: torch.Tensor, timestep_type: str, shift: float) -> torch.Tensor:
    if timestep_type == "sigmoid":
        return torch.sigmoid(torch.special.ndtri(p))
    if timestep_type == "shift":
        return shift * p / (1.0 + (shift - 1.0) * p)
    return p


def _bias(u: torch.Tensor, timestep_bias: str) -> torch.Tensor:
    if timestep_bias == "high_noise":
        return 1.0 - u**3
    if timestep_bias == "low_noise":
        return u**3
    return u


def _float32_interval(lo: float, hi: float) -> tuple[float, float]:
    """Float32 bounds [a, b] inside [lo, hi) such that σ and float32 ``t = 1000·σ`` both stay in range.

    Rounding can otherwise put a low-expert σ just below 0.9 onto t = 900.0, which routes to the high expert.
    """
    up, down = torch.tensor(2.0), torch.tensor(-1.0)
    a = torch.tensor(lo, dtype=torch.float32)
    while a.double() < lo or (a * 1000.0).double() < lo * 1000.0:
        a = torch.nextafter(a, up)
    b = torch.tensor(hi, dtype=torch.float32)
    while b.double() >= hi or (b * 1000.0).double() >= hi * 1000.0:
        b = torch.nextafter(b, down)
    return a.item(), b.item()


def sample_sigmas(
    n: int,
    *,
    expert: str,
    boundary: float,
    timestep_type: str,
    timestep_bias: str,
    shift: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw ``n`` noise levels σ (float32, on the generator's device) inside ``expert``'s range.

    See the module docstring for the exact distributions; the math runs in float64 and the float32 result is
    guaranteed to stay inside the half-open range, and so is ``t = 1000·σ`` computed in float32: it always
    routes to ``expert``.
    """
    _check("train.timestep_bias", timestep_bias, TIMESTEP_BIASES)
    _check("train.timestep_type", timestep_type, TIMESTEP_TYPES)
    if timestep_type == "shift":
        _check_shift(shift)
    lo, hi = expert_sigma_range(expert, boundary)
    f_lo, f_hi = timestep_cdf(lo, timestep_type, shift).item(), timestep_cdf(hi, timestep_type, shift).item()
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    p = f_lo + _bias(u, timestep_bias) * (f_hi - f_lo)
    sigma = _inverse_cdf(p, timestep_type, shift).float()
    return sigma.clamp(*_float32_interval(lo, hi))


def loss_weights(sigmas: torch.Tensor, timestep_type: str) -> torch.Tensor:
    """Per-sample loss multipliers: ai-toolkit's curve for ``weighted``, ones for every other type.

    The ``weighted`` curve w(σ) interpolates the knots above, rescaled so that ∫₀¹ w(σ) dσ = 1 (the table's
    mean is 1, so a run over all timesteps keeps its loss scale). Like ai-toolkit, it is not renormalised per
    expert: over the high-noise range [0.875, 1) the mean weight is about 1.35, over [0, 0.875) about 0.95.
    """
    _check("train.timestep_type", timestep_type, TIMESTEP_TYPES)
    if timestep_type != "weighted":
        return torch.ones_like(sigmas, dtype=torch.float32)
    knots = torch.tensor(_WEIGHT_KNOTS, dtype=torch.float64, device=sigmas.device)
    xs, ys = knots[:, 0].contiguous(), knots[:, 1]
    area = torch.trapezoid(ys, xs)
    s = sigmas.to(torch.float64).clamp(0.0, 1.0)
    i = torch.searchsorted(xs, s, right=True).clamp(1, len(xs) - 1)
    frac = (s - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ((ys[i - 1] + frac * (ys[i] - ys[i - 1])) / area).float()
