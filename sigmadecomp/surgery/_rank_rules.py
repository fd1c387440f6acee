"""Per-layer rank rules from spectra: energy and empirical variational Bayes (EVBMF).

Both rules read the spectrum of the kernel matrix ``W ∈ R^{cout×d}`` (patch order of
:mod:`sigmadecomp._patches`) in the basis where the chosen norm is the Frobenius norm:

* Σ norm: the singular values of ``W cov^{1/2}``; truncating them at rank ``r`` is the SVD-Σ
  optimum, so the kept energy fraction ``τ`` means a relative Σ-error of exactly ``1 − τ``;
* Frobenius norm (``cov=None``): the singular values of ``W``.

Tucker-2 needs one rank per channel mode. The output mode is exact (left singular values of
``W cov^{1/2}``); the input mode is whitened with the nearest-Kronecker split
``cov ≈ cov_chan ⊗ cov_space`` (:func:`sigmadecomp.solvers._numerics.kronecker_factors`) and read
from the ``cin × (cout·kh·kw)`` unfolding, as in MUSCO's VBMF on mode unfoldings.

**EVBMF** (Nakajima, Sugiyama, Babacan, Tomioka, *Global analytic solution of fully-observed
variational Bayesian matrix factorization*, JMLR 14, 2013) is implemented here from the paper's
analytic solution: with ``L ≤ M`` the matrix sides, ``α = L/M`` and ``x_h = γ_h² / (M σ²)``,

    τ(x) = ½ (x − (1 + α) + √((x − (1 + α))² − 4α))
    ψ₀(x) = x − log x,     ψ₁(x) = log(τ(x) + 1) + α log(τ(x)/α + 1) − τ(x)
    σ̂² = argmin_σ² Σ_h ψ₀(x_h) + Σ_{x_h > x̄} ψ₁(x_h),      x̄ = (1 + τ̲)(1 + α/τ̲)

with ``τ̲`` the positive zero of ``log(τ + 1) + α log(τ/α + 1) − τ`` (≈ 2.5129 √α), searched on
``[σ̲², σ̄²]`` (the paper's bounds). Component ``h`` is kept iff ``γ_h > σ̂ √(M x̄)``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize

from sigmadecomp._patches import kernel_to_matrix

__all__ = [
    "VBMFResult",
    "energy_rank",
    "evbmf",
    "frobenius_fit_errors",
    "svd_errors",
    "tucker2_mode_spectra",
    "whitened_spectrum",
]


def _matrix(kernel) -> np.ndarray:
    return np.asarray(kernel_to_matrix(np.asarray(kernel, np.float64)), np.float64)


def _cov_sqrt(cov, d: int) -> np.ndarray:
    """Symmetric PSD square root (rounding-negative eigenvalues clipped): any root gives the same
    singular values of ``W cov^{1/2}``, and a singular ``cov`` needs no ridge here."""
    cov = np.asarray(cov, np.float64)
    if cov.shape != (d, d):
        raise ValueError(f"cov must be ({d}, {d}) for this kernel (d = kh·kw·cin); got {cov.shape}")
    w, v = np.linalg.eigh(0.5 * (cov + cov.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def whitened_spectrum(kernel, cov=None) -> np.ndarray:
    """Singular values (descending, float64) of ``W cov^{1/2}``, or of ``W`` when ``cov`` is None.

    >>> import numpy as np
    >>> whitened_spectrum(np.eye(3)[None, None] * 2.0).round(3).tolist()
    [2.0, 2.0, 2.0]
    """
    w = _matrix(kernel)
    if cov is not None:
        w = w @ _cov_sqrt(cov, w.shape[1])
    return np.linalg.svd(w, compute_uv=False)


def svd_errors(singular_values) -> np.ndarray:
    """Relative error of the best rank-``r`` approximation for ``r = 0 … len(s)``: the tail energy
    ``Σ_{i>r} s_i² / Σ s_i²`` (closed form for SVD-Σ when ``s`` is the whitened spectrum)."""
    energy = np.asarray(singular_values, np.float64) ** 2
    total = energy.sum()
    tail = np.concatenate([total - np.cumsum(np.concatenate([[0.0], energy]))[:-1], [0.0]])
    return np.clip(tail / total, 0.0, 1.0) if total > 0 else np.zeros(len(energy) + 1)


def frobenius_fit_errors(kernel, cov) -> np.ndarray:
    """Relative Σ-error of the Frobenius SVD truncation at every rank ``r = 0 … min(cout, d)``:
    with ``W = Σ s_i u_i v_iᵀ`` the error of dropping ``i > r`` is ``Σ_{i>r} s_i² v_iᵀ cov v_i``
    (the ``u_i`` are orthonormal), over ``tr(W cov Wᵀ)``."""
    w = _matrix(kernel)
    _, s, vt = np.linalg.svd(w, full_matrices=False)
    cov = np.asarray(cov, np.float64)
    per = s**2 * np.einsum("id,de,ie->i", vt, cov, vt)
    total = per.sum()
    tail = total - np.concatenate([[0.0], np.cumsum(per)])
    return np.clip(tail / total, 0.0, 1.0) if total > 0 else np.zeros(len(per) + 1)


def tucker2_mode_spectra(kernel, cov=None) -> tuple[np.ndarray, np.ndarray]:
    """``(s_out, s_in)``: singular values of the output-mode unfolding (exact whitening) and of
    the input-mode unfolding (Kronecker-whitened) of the kernel; see the module docstring."""
    w = _matrix(kernel)
    cout, d = w.shape
    kernel_shape = np.shape(kernel)
    cin = kernel_shape[-2]
    p = d // cin
    s_out = whitened_spectrum(kernel, cov)
    t = w.reshape(cout, cin, p)
    if cov is not None:
        m4 = np.asarray(cov, np.float64).reshape(cin, p, cin, p)
        chan = np.einsum("cpdp->cd", m4)
        space = np.einsum("cpcq->pq", m4) / max(np.trace(chan), np.finfo(np.float64).tiny)
        t = np.einsum("ocp,ce,pq->oeq", t, _cov_sqrt(chan, cin), _cov_sqrt(space, p))
    s_in = np.linalg.svd(t.transpose(1, 0, 2).reshape(cin, cout * p), compute_uv=False)
    return s_out, s_in


def energy_rank(singular_values, tau: float) -> int:
    """Smallest ``r ≥ 1`` whose leading ``r`` values keep a fraction ``≥ tau`` of ``Σ s²``.

    >>> energy_rank([3.0, 2.0, 1.0], 0.9)
    2
    """
    if not (isinstance(tau, (int, float)) and 0 < tau <= 1):
        raise ValueError(f"tau (kept energy fraction) must be in (0, 1]; got {tau!r}")
    energy = np.asarray(singular_values, np.float64) ** 2
    if energy.sum() <= 0:
        return 1
    kept = np.cumsum(energy) / energy.sum()
    return int(min(len(energy), max(1, np.searchsorted(kept, tau * (1 - 1e-12)) + 1)))


# ----------------------------------------------------------------------------------- EVBMF


@dataclasses.dataclass(frozen=True)
class VBMFResult:
    """EVBMF of an ``L × M`` (or ``M × L``) matrix: ``rank`` kept components, the estimated
    ``noise_variance`` σ̂², the singular-value ``threshold`` σ̂ √(M x̄) and the shrunk values of the
    kept components (the posterior-mean matrix's singular values)."""

    rank: int
    noise_variance: float
    threshold: float
    estimates: tuple


def _tau_bar(alpha: float) -> float:
    """Positive zero of ``log(τ+1) + α log(τ/α+1) − τ``; the function is concave, positive just
    above 0 (slope 1) and negative at 100 for every ``α ∈ (0, 1]``."""
    g = lambda t: math.log1p(t) + alpha * math.log1p(t / alpha) - t  # noqa: E731
    return optimize.brentq(g, alpha / (1.0 + alpha), 100.0, xtol=1e-14, rtol=1e-14)


def _tau(x, alpha):
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _objective(sigma2, gamma2, m, alpha, x_bar):
    x = gamma2 / (m * sigma2)
    value = np.sum(x - np.log(x))
    big = x[x > x_bar]
    t = _tau(big, alpha)
    return value + np.sum(np.log1p(t) + alpha * np.log1p(t / alpha) - t)


def evbmf(singular_values, shape) -> VBMFResult:
    """Empirical VBMF with the noise variance estimated (Nakajima et al. 2013, analytic solution).

    ``singular_values`` are all ``min(shape)`` singular values of the observed matrix.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> signal = rng.normal(size=(40, 3)) @ rng.normal(size=(3, 100)) * 3.0
    >>> s = np.linalg.svd(signal + rng.normal(size=(40, 100)), compute_uv=False)
    >>> evbmf(s, (40, 100)).rank
    3
    """
    big_l, m = sorted(int(n) for n in shape)
    gamma = np.sort(np.asarray(singular_values, np.float64))[::-1]
    if gamma.shape != (big_l,) or big_l < 1:
        raise ValueError(f"evbmf needs all min(shape) = {big_l} singular values of a {shape} matrix; "
                         f"got {gamma.shape[0]} values")
    gamma2 = gamma**2
    if gamma2.sum() <= 0:
        return VBMFResult(0, 0.0, 0.0, ())
    alpha = big_l / m
    tau_bar = _tau_bar(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    h_bar = max(0, min(big_l - 1, math.ceil(big_l / (1.0 + alpha)) - 1))  # most components EVB keeps
    upper = gamma2.sum() / (big_l * m)
    lower = max(gamma2[h_bar] / (m * x_bar), gamma2[h_bar:].sum() / (m * (big_l - h_bar)), upper * 1e-12)
    sigma2 = _minimise(lambda s2: _objective(s2, gamma2, m, alpha, x_bar), min(lower, upper), upper)
    threshold = math.sqrt(sigma2 * m * x_bar)
    kept = gamma[gamma > threshold]
    shrink = 1.0 - (big_l + m) * sigma2 / kept**2
    estimates = 0.5 * kept * (shrink + np.sqrt(np.maximum(shrink**2 - 4.0 * big_l * m * sigma2**2 / kept**4, 0)))
    return VBMFResult(int(len(kept)), float(sigma2), threshold, tuple(float(e) for e in estimates))


def _minimise(fn, lower: float, upper: float) -> float:
    """Global minimum on ``[lower, upper]``: a log grid (the objective can have several local
    minima) refined by bounded Brent between the grid neighbours of the best point."""
    if upper <= lower * (1 + 1e-12):
        return upper
    grid = np.geomspace(lower, upper, 257)
    values = [fn(g) for g in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = optimize.minimize_scalar(fn, bounds=(lo, hi), method="bounded", options={"xatol": lo * 1e-10})
    return float(res.x) if res.fun <= values[i] else float(grid[i])
