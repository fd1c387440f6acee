"""Numerical safety in a few named helpers, each saying why it exists.

All matmuls here use HIGHEST precision: on accelerators the default may drop to bf16/tf32 passes,
and the Σ-solvers' monotone-decrease guarantee needs the products to be exact to working precision.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "add_ridge",
    "cholesky_solve",
    "forcing_tol",
    "kronecker_factors",
    "logged_jitter",
    "metric_is_psd",
    "mm",
    "pcg",
    "psd_sqrt",
    "psd_tolerance",
    "record_jitter",
    "reduced_mm",
    "ridge_scale",
    "safe_cholesky",
    "solve_by_dense",
]

HIGHEST = lax.Precision.HIGHEST


def mm(a, b):
    """``a @ b`` at HIGHEST precision."""
    return jnp.matmul(a, b, precision=HIGHEST)


#: Precisions an inner CG's large products may use (:func:`reduced_mm`).
CG_PRECISIONS = ("highest", "tf32", "bf16")


def reduced_mm(a, b, precision: str):
    """``a @ b`` at ``precision`` (one of :data:`CG_PRECISIONS`), result in ``a``'s dtype.

    Why: an inexact inner solve tolerates inexact products (the caller checks the outer error at
    HIGHEST), and on tensor-core GPUs ``"tf32"`` (the default float32 matmul there) and ``"bf16"``
    (bfloat16 operands, float32 accumulation) run several times faster than HIGHEST.
    """
    if precision == "bf16":
        return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=a.dtype)
    if precision == "tf32":
        return jnp.matmul(a, b, precision=lax.Precision.DEFAULT)
    return mm(a, b)


def ridge_scale(cov):
    """``tr cov / d`` (1 when that is not positive): the unit of the ridge and of the PSD test."""
    scale = jnp.trace(cov) / cov.shape[-1]
    return jnp.where(scale > 0, scale, jnp.ones_like(scale))


def add_ridge(cov, ridge):
    """``cov + ridge · (tr cov / d) · I``.

    Why: calibration covariances are often singular (dead ReLU channels, zero padding), and the
    Σ-solvers need SPD systems. Scaling by the mean eigenvalue makes ``ridge`` dimensionless, so
    the default 1e-6 changes the objective by ~1e-6 relative whatever the activations' scale.
    """
    d = cov.shape[-1]
    return cov + (ridge * ridge_scale(cov)) * jnp.eye(d, dtype=cov.dtype)


#: Relative jitters ``j·mean(diag a)`` that :func:`safe_cholesky` may try, the same for every
#: dtype (values below the dtype's eps would be no-ops and are skipped). The cap, 1e-6, is the
#: default ridge: a fallback never perturbs a system by more than the ridge already did.
JITTERS = (1e-12, 1e-11, 1e-10, 1e-9, 1e-8, 1e-7, 1e-6)
MAX_JITTER = JITTERS[-1]

_JITTER_LOG: contextvars.ContextVar = contextvars.ContextVar("sigmadecomp_jitter_log", default=None)


@contextlib.contextmanager
def record_jitter():
    """Collect (at trace time) the jitter of every :func:`safe_cholesky` traced inside the block.

    Why: the jitter a sweep needed belongs in the returned ``Solution.stats``, and collecting it
    here keeps every block update's signature unchanged. The driver opens one around each sweep
    (the log holds arrays of that sweep's trace, which it reduces immediately).
    """
    log: list = []
    token = _JITTER_LOG.set(log)
    try:
        yield log
    finally:
        _JITTER_LOG.reset(token)


def logged_jitter(log, dtype):
    """The largest jitter in a :func:`record_jitter` log (0 when empty)."""
    if not log:
        return jnp.zeros((), dtype)
    return jnp.max(jnp.stack([j.astype(dtype) for j in log]))


def safe_cholesky(a, *, record: bool = True):
    """Lower Cholesky factor of an SPD ``a``; retries with a small, capped diagonal jitter.

    Why: a matrix that is SPD in exact arithmetic (a Gram matrix ``Vᵀ cov V`` of a ridged cov) can
    fail Cholesky by rounding. We retry with ``j·mean(diag a)`` for ``j`` in :data:`JITTERS`
    (from the first value above the dtype's eps up to :data:`MAX_JITTER` = 1e-6), the same
    schedule in float32 and float64. If ``a`` still fails, the factor is NaN and the solver's
    finiteness check reports it (status ``NONFINITE``): a larger jitter would change the block
    minimiser by more than the ridge and silently break the monotone decrease. The jitter used is
    logged for ``Solution.stats["jitter"]`` when ``record`` (see :func:`record_jitter`; pass
    ``record=False`` under ``vmap`` or for preconditioners, which do not change the answer).
    """
    n = a.shape[-1]
    eye = jnp.eye(n, dtype=a.dtype)
    base = jnp.maximum(jnp.mean(jnp.diagonal(a)), jnp.finfo(a.dtype).tiny)
    eps = float(jnp.finfo(a.dtype).eps)
    schedule = jnp.asarray((0.0,) + tuple(j for j in JITTERS if j >= eps), a.dtype)

    def cond(carry):
        chol, i = carry
        return (~jnp.all(jnp.isfinite(chol))) & (i + 1 < schedule.shape[0])

    def body(carry):
        _, i = carry
        return jnp.linalg.cholesky(a + (base * schedule[i + 1]) * eye), i + 1

    chol, i = lax.while_loop(cond, body, (jnp.linalg.cholesky(a), jnp.int32(0)))
    log = _JITTER_LOG.get()
    if record and log is not None:
        log.append(schedule[i])
    return chol


def psd_tolerance(d: int, dtype) -> float:
    """The tolerance of the PSD test, relative to ``tr cov / d``: ``10·d·eps(dtype)``.

    Why: rounding ``cov`` to ``dtype`` moves its eigenvalues by at most ``‖E‖₂ ≤ eps·‖cov‖_F ≤
    eps·tr cov = d·eps·(tr cov / d)``; a factor 10 covers the accumulation. A true second moment
    passes; a matrix with a clearly negative direction (``−1e-3·tr cov / d`` in float64) fails.
    """
    return 10.0 * d * float(jnp.finfo(dtype).eps)


def metric_is_psd(cov):
    """Traced PSD test: ``cov + psd_tolerance·(tr cov / d)·I`` has a finite Cholesky factor."""
    d = cov.shape[-1]
    tol = psd_tolerance(d, cov.dtype)
    shifted = cov + (tol * ridge_scale(cov)) * jnp.eye(d, dtype=cov.dtype)
    return jnp.all(jnp.isfinite(jnp.linalg.cholesky(shifted)))


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
    start_tol=0.0,
    ax0=None,
):
    """Preconditioned conjugate gradients for an SPD operator on arrays of any shape.

    Stops when ``‖b − A x‖ <= max(tol · ‖b‖, start_tol · ‖b − A x₀‖)`` or after ``max_steps``
    iterations. Warm-started from ``x0``; ``ax0 = A x₀`` may be passed when the caller already has
    it (saves one matvec). Returns ``(x, converged, num_steps)``; ``converged`` (the tolerance was
    reached, not the step cap) is a bool array, never a Python bool, so the caller can report
    non-convergence in its status instead of raising.

    Why truncating is safe for block updates: CG from ``x₀`` minimises the quadratic
    ``½xᵀAx − bᵀx`` over ``x₀ +`` a growing Krylov space, so every iterate's objective is at most
    the start's — a loose ``start_tol`` (a forcing term) never makes a block update increase it.
    """
    precond = precond or (lambda r: r)
    dot = lambda u, v: jnp.vdot(u, v, precision=HIGHEST)  # noqa: E731
    tol = jnp.asarray(tol, b.dtype)
    start_tol = jnp.asarray(start_tol, b.dtype)
    r0 = b - (matvec(x0) if ax0 is None else ax0)
    rr0 = dot(r0, r0)
    stop2 = jnp.maximum((tol**2) * dot(b, b), (start_tol**2) * rr0)
    stop2 = jnp.maximum(stop2, jnp.finfo(b.dtype).tiny)
    z0 = precond(r0)
    init = (x0, r0, z0, z0, dot(r0, z0), rr0, jnp.int32(0))

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


def forcing_tol(decrease, forcing):
    """Inner CG tolerance relative to the starting residual: ``min(½, forcing·√decrease)``.

    Why: ``decrease`` is the last sweep's relative error decrease. Early sweeps (large decrease)
    move the other blocks a lot, so an exact inner solve is wasted: a loose tolerance costs a few
    CG steps. As the sweeps settle the tolerance tightens, so the outer stopping test
    (``decrease <= rtol``) is met only by sweeps whose inner solves were nearly exact.
    ``forcing = 0`` gives the exact solve (``cg_tol`` alone).
    """
    eta = forcing * jnp.sqrt(jnp.maximum(decrease, 0.0))
    return jnp.minimum(eta, jnp.asarray(0.5, eta.dtype))


def solve_by_dense(dense_flops: float, cg_step_flops: float, *, cg_steps: int = 20) -> bool:
    """Static choice between a dense Cholesky solve and CG, by estimated cost.

    Why: a fixed size threshold picked 1920² Cholesky solves (81 ms per sweep) where 20 PCG steps
    cost 7 ms. Dense costs ``dense_flops``; CG ``cg_steps`` iterations of ``cg_step_flops`` plus a
    fixed per-iteration overhead (a while-loop step on CPU is ~10 µs, ≈ 1 MFLOP). XLA's Cholesky
    runs well below matmul speed, so its flops count 4×.
    """
    return 4.0 * dense_flops <= cg_steps * (cg_step_flops + 1e6)
