r"""Computing an accuracy recovery adapter (ARA) locally: the best rank-``r`` correction of a quantized layer.

A quantized layer computes ``W_q x`` instead of ``W x``; the adapter adds ``B A x`` (``A``: [r, in], ``B``: [out, r])
so that ``W_q + B A`` reproduces ``W``'s outputs as closely as a rank-``r`` term can. With the residual
``R = W - W_q`` two objectives are used:

* **Residual SVD** (no data): minimise ``||R - B A||_F``. By Eckart-Young the optimum is the truncated SVD
  ``R ≈ U_r S_r V_r^T``; we split it evenly, ``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_r^T``.

* **Calibrated** (activations ``X`` = [in, n], the layer's inputs on the user's data): minimise the output error
  ``||(R - B A) X||_F^2 = tr((R - M) C (R - M)^T)`` with ``M = B A`` and ``C = X X^T``. Let ``C = L L^T`` (Cholesky,
  ``L`` lower-triangular and invertible). Then the objective is ``||R L - M L||_F^2``, and since ``M -> M L`` is a
  bijection between rank-``r`` matrices, the optimal ``M L`` is the truncated SVD of ``R L`` (Eckart-Young again):
  ``R L ≈ U_r S_r V_r^T``, hence ``M = U_r S_r V_r^T L^{-1}`` and

      B = U_r S_r^{1/2},    A = S_r^{1/2} V_r^T L^{-1}    (one triangular solve).

  The minimum equals the sum of the squared discarded singular values of ``R L``. ``C`` is damped to
  ``C + λ I`` with ``λ = damping · mean(diag C)`` before the Cholesky (as in GPTQ): it keeps ``L`` well-conditioned
  when there are fewer samples than input channels or dead channels, and it means minimising
  ``||(R - M) X||^2 + λ ||R - M||^2`` - a small pull toward the residual-SVD solution on directions the
  calibration data never excites.

Large matrices use a randomized truncated SVD (``torch.svd_lowrank`` with power iterations); small ones the exact
SVD. Everything runs in float32 on the device of the inputs; on CUDA, fp32 matmuls may use TF32 (the adapter is
stored in bf16, so TF32's 10-bit mantissa costs nothing that matters).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

#: Relative damping of the activation covariance (fraction of its mean diagonal).
DAMPING = 0.01
#: Matrices whose smaller side is at most this get an exact SVD; larger ones a randomized one.
EXACT_SVD_MAX = 1024
_OVERSAMPLE = 16
_POWER_ITERATIONS = 4


@contextlib.contextmanager
def tf32_matmuls() -> Iterator[None]:
    """Allow TF32 for CUDA fp32 matmuls inside the block (restores the previous setting)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def top_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r [m, r], S_r [r], Vh_r [r, n])``: the ``rank`` largest singular triplets of ``matrix``."""
    if min(matrix.shape) <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    q = min(rank + _OVERSAMPLE, min(matrix.shape))
    u, s, v = torch.svd_lowrank(matrix, q=q, niter=_POWER_ITERATIONS)
    return u[:, :rank], s[:rank], v[:, :rank].T


def damped_cholesky(covariance: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Lower-triangular ``L`` with ``L L^T = C + λ I``, ``λ = damping · mean(diag C)``.

    If the factorization still fails (a numerically indefinite ``C``), the damping grows tenfold, up to three times.
    """
    c = covariance.float()
    mean_diag = float(c.diagonal().mean())
    if mean_diag <= 0:  # no signal at all: only the damping term is left, i.e. the residual-SVD objective
        return torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    lam = damping * mean_diag
    for _ in range(4):
        damped = c.clone()
        damped.diagonal().add_(lam)  # in place: no n x n identity next to the n x n copy
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return factor
        lam = max(lam * 10, 1e-6 * mean_diag)
    raise ValueError("activation covariance is not positive definite even after damping; calibration data is broken")


def low_rank_adapter(
    residual: torch.Tensor,
    rank: int,
    covariance: torch.Tensor | None = None,
    damping: float = DAMPING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down = A [rank, in], up = B [out, rank])`` minimising ``||(R - B A) X||`` (or ``||R - B A||`` without
    ``covariance = X X^T``); see the module docstring for the derivation. float32 results."""
    out_f, in_f = residual.shape
    if not 1 <= rank <= min(out_f, in_f):
        limit = min(out_f, in_f)
        raise ValueError(f"adapter rank must be between 1 and {limit} for a {in_f}->{out_f} layer, got {rank}")
    r = residual.float()
    with tf32_matmuls():
        if covariance is None:
            u, s, vh = top_svd(r, rank)
            root = s.sqrt()
            return root[:, None] * vh, u * root
        chol = damped_cholesky(covariance, damping)
        u, s, vh = top_svd(r @ chol, rank)
        root = s.sqrt()
        down = torch.linalg.solve_triangular(chol, root[:, None] * vh, upper=False, left=False)
        return down, u * root


def relative_output_errors(
    weight: torch.Tensor,
    residual: torch.Tensor,
    down: torch.Tensor | None,
    up: torch.Tensor | None,
    covariance: torch.Tensor | None = None,
) -> tuple[float, float | None]:
    """Relative output error of the quantized layer without and with the adapter.

    ``sqrt(tr(E C E^T) / tr(W C W^T))`` for ``E = R`` and ``E = R - B A``: the relative Frobenius error of the
    layer's outputs over the calibration inputs behind ``C = X X^T`` (or of the weights, ``C = I``, without one).
    """
    w, r = weight.float(), residual.float()
    with tf32_matmuls():
        if covariance is None:
            rc, wc = r, w
        else:
            c = covariance.float()
            rc, wc = r @ c, w @ c
        ref = float((wc * w).sum(dtype=torch.float64))
        plain = float((rc * r).sum(dtype=torch.float64))
        if down is None:
            return _ratio(plain, ref), None
        a, b = down.float(), up.float()
        ac = a if covariance is None else a @ c
        bac = b @ ac
        cross = float((bac * r).sum(dtype=torch.float64))
        corrected = plain - 2.0 * cross + float((bac * (b @ a)).sum(dtype=torch.float64))
    return _ratio(plain, ref), _ratio(max(corrected, 0.0), ref)


def _ratio(err: float, ref: float) -> float:
    return (err / ref) ** 0.5 if ref > 0 else 0.0
