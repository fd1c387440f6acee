"""SVD and SVD-Σ: the closed-form rank-``r`` optimum (DESIGN.md §2).

With ``M = L Lᵀ``, ``f(W̃) = ‖W̃ L − T L⁻ᵀ‖² + (energy − ‖T L⁻ᵀ‖²)``, so the best rank-``r`` ``W̃ L``
is the truncated SVD of ``T L⁻ᵀ = U S Vᵀ`` and ``W̃ = U_r S_r V_rᵀ L⁻¹`` (``T L⁻ᵀ = W L`` for the
plain Σ problem). The error is the discarded tail ``Σ_{i>r} s_i²`` (plus the irreducible part in
the cross-covariance form), exact without cancellation.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from sigmadecomp._compile import fast_compile_jit
from sigmadecomp._factorized import LowRank
from sigmadecomp._patches import matrix_to_kernel
from sigmadecomp.solvers._base import AbstractSolver, Problem, solution_stats
from sigmadecomp.solvers._driver import closed_form_status
from sigmadecomp.solvers._numerics import logged_jitter, record_jitter, safe_cholesky
from sigmadecomp.solvers._solution import Solution
from sigmadecomp.solvers._validation import (
    check_positive,
    check_positive_int,
    check_rank_fits,
    conv_shape,
)

__all__ = ["SVD"]


@dataclasses.dataclass(frozen=True)
class SVD(AbstractSolver):
    """Rank-``rank`` truncated SVD of the kernel matrix ``W`` (``cout × kh·kw·cin``) → ``LowRank``.

    Σ-norm (``cov`` given): ``W̃ = U_r S_r V_rᵀ L⁻¹`` with ``cov + ridge·(tr cov/d)·I = L Lᵀ`` and
    ``W L = U S Vᵀ`` — the exact optimum, no iterations: the :class:`Solution` has
    ``num_steps = 0``, ``errors`` of length 1 (the optimum's error) and status ``CONVERGED``,
    or ``NONFINITE`` when the factors or the error are not finite (same check as the iterative
    solvers; e.g. a NaN kernel under ``jit``).
    The layer is a ``kh×kw`` conv to ``rank`` channels then a 1×1 conv; the singular values are
    in ``out_factor``.

    >>> import jax, sigmadecomp as sd
    >>> kernel = jax.random.normal(jax.random.key(0), (64, 32))
    >>> sol = sd.decompose(kernel, sd.SVD(8))
    >>> sol.value.in_kernel.shape, sol.value.out_factor.shape, int(sol.num_steps)
    ((1, 1, 64, 8), (8, 32), 0)
    """

    rank: int
    ridge: float = 1e-6
    max_steps = 0

    def __post_init__(self):
        check_positive_int("SVD", "rank", self.rank)
        check_positive("SVD", "ridge", self.ridge)

    def check(self, kernel_shape: tuple) -> None:
        kh, kw, cin, cout = conv_shape(kernel_shape)
        check_rank_fits("SVD", "rank", self.rank, "min(cout, kh·kw·cin)", min(cout, kh * kw * cin),
                        kernel_shape)

    def solve(self, problem: Problem, *, key=None, init=None) -> Solution:
        del key, init  # closed form: no randomness, no warm start
        return _svd_solve(problem, rank=self.rank)


def _truncate(y, rank):
    """Top-``rank`` factors of ``y = U S Vᵀ``: ``(U_r S_r, V_rᵀ, Σ_{i>r} s_i², Σ s_i²)``."""
    u, s, vt = jnp.linalg.svd(y, full_matrices=False)
    s2 = s * s
    return u[:, :rank] * s[None, :rank], vt[:rank], jnp.sum(s2[rank:]), jnp.sum(s2)


@fast_compile_jit(static_argnames="rank")
def _svd_solve(problem: Problem, *, rank: int) -> Solution:
    kh, kw, cin, cout = problem.conv_shape
    if problem.metric is None:
        left, right, tail, _ = _truncate(problem.matrix, rank)
        f = tail
    else:
        with record_jitter() as log:
            chol = safe_cholesky(problem.metric)
        whitened = solve_triangular(chol, problem.target.T, lower=True).T  # T L⁻ᵀ
        left, right, tail, total = _truncate(whitened, rank)
        right = solve_triangular(chol.T, right.T, lower=False).T  # V_rᵀ L⁻¹
        # energy − ‖T L⁻ᵀ‖² is the part no W̃ can fit (exactly 0 unless cross-covariance form).
        f = tail if problem.direct else tail + jnp.maximum(problem.energy - total, 0.0)
    value = LowRank(
        in_kernel=matrix_to_kernel(right, (kh, kw, cin, rank)),
        out_factor=left.T,
        kernel_shape=problem.kernel_shape,
    )
    error = (f / problem.energy)[None]
    jitter = None if problem.metric is None else logged_jitter(log, error.dtype)
    status = closed_form_status(value, error)
    return Solution(value, status, error, jnp.int32(0), solution_stats(problem, jitter))
