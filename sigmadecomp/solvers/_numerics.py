"""Numerical safety in a few named helpers, each saying why it exists.

All matmuls here use HIGHEST precision: on accelerators the default may drop to bf16/tf32 passes,
and the Σ-solvers' monotone-decrease guarantee needs the products to be exact to working precision.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["add_ridge", "cholesky_solve", "kronecker_factors", "mm", "pcg", "psd_sqrt", "safe_cholesky"]

HIGHEST = lax.Precision.HIGHEST


def mm(a, b):
    """``a @ b`` at HIGHEST precision."""
    return jnp.matmul(a, b, precision=HIGHEST)


def add_ridge(cov, ridge):
    """``cov + ridge · (tr cov / d) · I``.

    Why: calibration covariances are often singular (dead ReLU channels, zero padding), and the
    Σ-solvers need SPD systems. Scaling by the mean eigenvalue makes ``ridge`` dimensionless, so
    the default 1e-6 changes the objective by ~1e-6 relative whatever the activations' scale.
    """
    d = cov.shape[-1]
    scale = jnp.trace(cov) / d
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    return cov + (ridge * scale) * jnp.eye(d, dtype=cov.dtype)


def safe_cholesky(a):
    """Lower Cholesky factor of an SPD ``a``; retries with a growing diagonal jitter.

    Why: a matrix that is SPD in exact arithmetic (a Gram matrix ``Vᵀ cov V`` of a ridged cov) can
    fail Cholesky in float32 by rounding. We retry with ``eps·k·mean(diag)``, k = 10, 100, ...;
    the jitter is far below the ridge, so the exact block minimiser is changed only at rounding level.
    """
    n = a.shape[-1]
    eye = jnp.eye(n, dtype=a.dtype)
    base = jnp.finfo(a.dtype).eps * jnp.maximum(jnp.mean(jnp.diagonal(a)), jnp.finfo(a.dtype).tiny)

    def attempt(k):
        return jnp.linalg.cholesky(a + (base * k) * eye)

    def cond(carry):
        chol, k = carry
        return (~jnp.all(jnp.isfinite(chol))) & (k < 1e7)

    def body(carry):
        _, k = carry
        k = k * 10.0
        return attempt(k), k

    chol, _ = lax.while_loop(cond, body, (jnp.linalg.cholesky(a), jnp.asarray(1.0, a.dtype)))
    return chol


def cholesky_solve(chol, b):
    """Solve ``(L Lᵀ) x = b`` given the lower factor ``L``."""
    y = jax.scipy.linalg.solve_triangular(chol, b, lower=True)
    return jax.scipy.linalg.solve_triangular(chol.T, y, lower=False)


def kronecker_factors(metric, cin: int):
    """Nearest-Kronecker factors ``M ≈ M_chan ⊗ M_space`` of a ``(cin·P) × (cin·P)`` metric by
    partial traces (exact if ``M`` is a Kronecker product; both SPD when ``M`` is).

    Why: the Σ input-side systems are preconditioned with this split, whose inverse is cheap.
    """
    m4 = metric.reshape(cin, metric.shape[0] // cin, cin, -1)
    chan = jnp.einsum("cpdp->cd", m4)
    space = jnp.einsum("cpcq->pq", m4) / jnp.trace(chan)
    return chan, space


def psd_sqrt(a):
    """Symmetric square root of a PSD matrix (negative rounding eigenvalues clipped to zero)."""
    w, v = jnp.linalg.eigh(a)
    return mm(v * jnp.sqrt(jnp.clip(w, 0))[None, :], v.T)


def pcg(
    matvec: Callable,
    b,
    x0,
    *,
    precond: Callable | None = None,
    tol,
    max_steps: int,
):
    """Preconditioned conjugate gradients for an SPD operator on arrays of any shape.

    Stops when ``‖b − A x‖ <= tol · ‖b‖`` or after ``max_steps`` iterations. Warm-started from
    ``x0``. Returns ``(x, converged, num_steps)``; ``converged`` is a bool array, never a Python
    bool, so the caller can report non-convergence in its status instead of raising.
    """
    precond = precond or (lambda r: r)
    dot = lambda u, v: jnp.vdot(u, v, precision=HIGHEST)  # noqa: E731
    tol = jnp.asarray(tol, b.dtype)
    bnorm2 = dot(b, b)
    stop2 = (tol**2) * jnp.maximum(bnorm2, jnp.finfo(b.dtype).tiny)
    r0 = b - matvec(x0)
    z0 = precond(r0)
    init = (x0, r0, z0, z0, dot(r0, z0), dot(r0, r0), jnp.int32(0))

    def cond(c):
        *_, rr, k = c
        return (rr > stop2) & (k < max_steps)

    def body(c):
        x, r, z, p, rz, _, k = c
        ap = matvec(p)
        pap = dot(p, ap)
        alpha = jnp.where(pap > 0, rz / pap, 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        z = precond(r)
        rz_new = dot(r, z)
        beta = jnp.where(rz > 0, rz_new / rz, 0.0)
        return x, r, z, z + beta * p, rz_new, dot(r, r), k + 1

    x, *_, rr, k = lax.while_loop(cond, body, init)
    return x, rr <= stop2, k
