"""TT-matrix under Σ: block ALS over the cores (DESIGN.md §5–§6) → :class:`TTMatrix`.

With the other cores fixed, ``W̃ = Σ_{a,b} L_a ⊗ G_k[a, :, :, b] ⊗ R_b`` is linear in core ``G_k``
(``L_a``: the left interface, an ``(m_{<k}, n_{<k})`` matrix per left rank index; ``R_b`` the right
one). Because ``M`` acts on the input side only, the normal equations of core ``k`` factor as
``H ⊗ I_{n_k}``:

    H[(a,i,b), (c,i',d)] = Σ M[(x,i,z), (x',i',z')] · P_ac[x, x'] · Q_bd[z, z'],
    P_ac[x, x'] = Σ_y L_a[x, y] L_c[x', y],   Q_bd[z, z'] = Σ_w R_b[z, w] R_d[z', w],
    rhs[(a,i,b), j] = Σ T̃[(x,i,z), (y,j,w)] L_a[x, y] R_b[z, w]        (T̃ = Tᵀ, in × out)

so each block update is ONE dense SPD solve of size ``r_{k−1}·m_k·r_k`` with ``n_k`` right-hand
sides — the exact block minimiser, so the Σ-error never increases. A diagonal metric (Frobenius,
or an embedding's token frequencies) makes ``H`` block-diagonal in ``i`` (``m_k`` solves of size
``r_{k−1}·r_k``). Cores other than the one being updated are kept orthonormal towards it (QR /
LQ shifts, ``W̃`` unchanged), as in TT-ALS, so the systems stay well conditioned. A sweep updates
the cores left to right then right to left. Initialisation: Frobenius TT-SVD of ``W``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from sigmadecomp._compile import registered_jit
from sigmadecomp._ttmatrix import (
    TTMatrix,
    balanced_modes,
    check_tt_config,
    max_tt_ranks,
    tt_ranks_for_tolerance,
    tt_svd,
    tt_to_dense,
)
from sigmadecomp.solvers._base import AbstractSolver, Problem, problem_error, solution_stats
from sigmadecomp.solvers._driver import iterate
from sigmadecomp.solvers._numerics import HIGHEST, cholesky_solve, safe_cholesky
from sigmadecomp.solvers._solution import Solution

__all__ = ["TTMatrixALS", "solve_tt_diagonal"]


def _ein(spec, *ops):
    return jnp.einsum(spec, *ops, precision=HIGHEST)


@dataclasses.dataclass(frozen=True)
class TTMatrixALS(AbstractSolver):
    """TT-matrix of a dense ``(in, out)`` kernel, Frobenius or Σ (block ALS) → :class:`TTMatrix`.

    Give ``ranks`` ``(r₁, …, r_{K−1})`` or a tolerance ``eps`` (rank-adaptive TT-SVD: ranks are the
    smallest with ``‖W − W̃‖ ≤ eps·‖W‖`` — in the Σ-whitened basis ``W L`` for a Σ fit — then ALS
    at those ranks). ``in_modes``/``out_modes`` default to :func:`balanced_modes` with
    ``num_cores`` factors. ``max_steps`` sweeps (0 = plain TT-SVD), stop when the relative error
    changes by less than ``rtol``. ``ridge`` as in every Σ solver.

    >>> import jax, sigmadecomp as sd
    >>> kernel = jax.random.normal(jax.random.key(0), (64, 48))
    >>> x = jax.random.normal(jax.random.key(1), (500, 64))
    >>> sol = sd.decompose(kernel, sd.TTMatrixALS(ranks=(8,), in_modes=(8, 8), out_modes=(6, 8)),
    ...                    cov=x.T @ x / 500)
    >>> [c.shape for c in sol.value.cores], bool(sol.errors[sol.num_steps] <= sol.errors[0])
    ([(1, 8, 6, 8), (8, 8, 8, 1)], True)
    """

    ranks: Optional[tuple] = None
    eps: Optional[float] = None
    in_modes: Optional[tuple] = None
    out_modes: Optional[tuple] = None
    num_cores: int = 3
    max_steps: int = 10
    rtol: float = 1e-6
    ridge: float = 1e-6

    def __post_init__(self):
        for name in ("ranks", "in_modes", "out_modes"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))
        if (self.ranks is None) == (self.eps is None):
            raise ValueError(f"TTMatrixALS: give exactly one of ranks=(r1, ..., r_{{K-1}}) or eps=<tolerance>; got ranks={self.ranks}, eps={self.eps}")
        if self.eps is not None and not 0 < self.eps < 1:
            raise ValueError(f"TTMatrixALS: eps is a relative Frobenius tolerance in (0, 1); got {self.eps}")
        if int(self.max_steps) < 0 or int(self.num_cores) < 2:
            raise ValueError(f"TTMatrixALS: max_steps must be >= 0 and num_cores >= 2; got {self.max_steps}, {self.num_cores}")
        if not self.ridge > 0:
            raise ValueError(f"TTMatrixALS: ridge must be > 0; got {self.ridge}")

    def modes(self, kernel_shape: tuple) -> tuple[tuple, tuple]:
        """``(in_modes, out_modes)`` for a kernel: the given ones, or balanced factorisations."""
        k = len(self.in_modes or self.out_modes or ()) or self.num_cores
        in_modes = self.in_modes or balanced_modes(int(kernel_shape[0]), k)
        out_modes = self.out_modes or balanced_modes(int(kernel_shape[-1]), k)
        return in_modes, out_modes

    def check(self, kernel_shape: tuple) -> None:
        if len(kernel_shape) != 2:
            raise ValueError(f"TTMatrixALS: a TT-matrix approximates a dense (in, out) kernel; got kernel shape {tuple(kernel_shape)}")
        check_tt_config("TTMatrixALS", tuple(kernel_shape), *self.modes(kernel_shape), self.ranks)

    def check_init(self, init, kernel_shape: tuple, dtype):
        if init is None:
            return None
        if not isinstance(init, TTMatrix):
            raise ValueError(f"init must be a TTMatrix; got {type(init).__name__}")
        if (init.in_modes, init.out_modes) != self.modes(kernel_shape):
            raise ValueError(f"init has modes {init.in_modes}×{init.out_modes}; the solver uses {self.modes(kernel_shape)}")
        if self.ranks is not None and init.ranks != self.ranks:
            raise ValueError(f"init has ranks {init.ranks}; the solver wants {self.ranks}")
        return TTMatrix(tuple(jnp.asarray(c, dtype) for c in init.cores), init.in_modes, init.out_modes)

    def resolve_ranks(self, problem: Problem) -> tuple:
        """The fixed ranks, or those of the rank-adaptive TT-SVD (host) for ``eps``."""
        if self.ranks is not None:
            return self.ranks
        in_modes, out_modes = self.modes(problem.kernel_shape)
        if problem.metric is None:
            basis = problem.matrix.T
        else:  # W L = T L⁻ᵀ with M = L Lᵀ, as (in, out): the Σ-whitened kernel
            basis = solve_triangular(safe_cholesky(problem.metric), problem.target.T, lower=True)
        return tt_ranks_for_tolerance(basis, in_modes, out_modes, self.eps, max_ranks=max_tt_ranks(in_modes, out_modes))

    def solve(self, problem: Problem, *, key=None, init=None) -> Solution:
        del key  # TT-SVD start: deterministic
        in_modes, out_modes = self.modes(problem.kernel_shape)
        ranks = init.ranks if init is not None else self.resolve_ranks(problem)
        check_tt_config("TTMatrixALS", problem.kernel_shape, in_modes, out_modes, ranks)
        return _solve(problem, None, init, in_modes=in_modes, out_modes=out_modes, ranks=ranks,
                      max_steps=int(self.max_steps), rtol=self.rtol)


def solve_tt_diagonal(kernel, weights, solver: TTMatrixALS, *, init=None) -> Solution:
    """Fit ``kernel`` ``(in, out)`` under a DIAGONAL metric ``diag(weights)`` (e.g. token
    frequencies of an embedding table, whose ``cov`` of one-hot inputs is diagonal), without ever
    forming the ``in × in`` matrix. ``weights`` get ``ridge·mean(weights)`` added, so unseen rows
    are fitted by the Frobenius tie-break. Errors are relative to ``Σ_i w_i ‖W_i‖²``.

    >>> import jax, jax.numpy as jnp
    >>> table = jax.random.normal(jax.random.key(0), (64, 16))
    >>> sol = solve_tt_diagonal(table, jnp.arange(64.0), TTMatrixALS(ranks=(4,), in_modes=(8, 8), out_modes=(4, 4)))
    >>> sol.value.ranks
    (4,)
    """
    kernel = jnp.asarray(kernel)
    weights = jnp.asarray(weights, kernel.dtype)
    if kernel.ndim != 2 or weights.shape != kernel.shape[:1]:
        raise ValueError(f"solve_tt_diagonal: kernel must be (in, out) and weights (in,); got {kernel.shape} and {weights.shape}")
    if not bool(jnp.all(weights >= 0)) or not bool(jnp.any(weights > 0)):
        raise ValueError("solve_tt_diagonal: weights must be >= 0 and not all zero (they are token frequencies)")
    solver.check(tuple(kernel.shape))
    init = solver.check_init(init, tuple(kernel.shape), kernel.dtype)
    diag = weights + solver.ridge * jnp.mean(weights)
    w = kernel.T
    problem = Problem(w, w * diag[None, :], None, jnp.sum(w * w * diag[None, :]), direct=True,
                      kernel_shape=tuple(kernel.shape))
    in_modes, out_modes = solver.modes(kernel.shape)
    ranks = solver.ranks
    if ranks is None:
        ranks = tt_ranks_for_tolerance(kernel * jnp.sqrt(diag)[:, None], in_modes, out_modes, solver.eps,
                                       max_ranks=max_tt_ranks(in_modes, out_modes))
    return _solve(problem, diag, init, in_modes=in_modes, out_modes=out_modes, ranks=tuple(ranks),
                  max_steps=int(solver.max_steps), rtol=solver.rtol)


def _left_interface(cores, dtype):
    """``(m_{<k}, n_{<k}, r_{k−1})`` from the cores left of k (ones for k = 0)."""
    if not cores:
        return jnp.ones((1, 1, 1), dtype)
    acc = cores[0][0]
    for core in cores[1:]:
        acc = _ein("MNa,amnb->MmNnb", acc, core).reshape(acc.shape[0] * core.shape[1], acc.shape[1] * core.shape[2], -1)
    return acc


def _right_interface(cores, dtype):
    """``(r_k, m_{>k}, n_{>k})`` from the cores right of k (ones for k = K−1)."""
    if not cores:
        return jnp.ones((1, 1, 1), dtype)
    acc = cores[-1][..., 0]
    for core in reversed(cores[:-1]):
        acc = _ein("amnb,bMN->amMnN", core, acc).reshape(core.shape[0], core.shape[1] * acc.shape[1], -1)
    return acc


def _block_update(cores, k, target_t, metric, diag):
    """The exact minimiser over core ``k`` (others fixed): one SPD solve, ``n_k`` right sides."""
    a, m, n, b = cores[k].shape
    left, right = _left_interface(cores[:k], target_t.dtype), _right_interface(cores[k + 1 :], target_t.dtype)
    ml, nl, mr, nr = left.shape[0], left.shape[1], right.shape[1], right.shape[2]
    rhs = _ein("xizyjw,xya,bzw->aibj", target_t.reshape(ml, m, mr, nl, n, nr), left, right)
    if metric is None:  # diagonal metric: H is block-diagonal in i
        d = jnp.ones((ml * m * mr,), target_t.dtype) if diag is None else diag
        h = _ein("xiz,xya,xyc,bzw,dzw->iabcd", d.reshape(ml, m, mr), left, left, right, right)
        h = h.reshape(m, a * b, a * b)
        x = jax.vmap(lambda hi, ri: cholesky_solve(safe_cholesky(hi, record=False), ri))(h, rhs.transpose(1, 0, 2, 3).reshape(m, a * b, n))
        return x.reshape(m, a, b, n).transpose(1, 0, 3, 2)
    p = _ein("xya,Xyc->acxX", left, left)
    q = _ein("bzw,dZw->bdzZ", right, right)
    h = _ein("xizXjZ,acxX,bdzZ->aibcjd", metric.reshape(ml, m, mr, ml, m, mr), p, q)
    x = cholesky_solve(safe_cholesky(h.reshape(a * m * b, a * m * b)), rhs.reshape(a * m * b, n))
    return x.reshape(a, m, b, n).transpose(0, 1, 3, 2)


def _shift_right(core, nxt):
    """QR: ``core`` left-orthonormal, ``R`` into ``nxt`` (``W̃`` unchanged)."""
    a, m, n, b = core.shape
    q, r = jnp.linalg.qr(core.reshape(a * m * n, b))
    return q.reshape(a, m, n, -1), _ein("cb,bmnd->cmnd", r, nxt)


def _shift_left(prev, core):
    """LQ: ``core`` right-orthonormal, ``L`` into ``prev`` (``W̃`` unchanged)."""
    a, m, n, b = core.shape
    q, r = jnp.linalg.qr(core.reshape(a, m * n * b).T)
    return _ein("xmna,ca->xmnc", prev, r), q.T.reshape(-1, m, n, b)


def _right_canonical(cores):
    cores = list(cores)
    for k in range(len(cores) - 1, 0, -1):
        cores[k - 1], cores[k] = _shift_left(cores[k - 1], cores[k])
    return tuple(cores)


@registered_jit(static_argnames=("in_modes", "out_modes", "ranks", "max_steps"))
def _solve(problem: Problem, diag, init, *, in_modes, out_modes, ranks, max_steps, rtol) -> Solution:
    target_t, metric = problem.target.T, problem.metric
    start = tt_svd(problem.matrix.T, in_modes=in_modes, out_modes=out_modes, ranks=ranks) if init is None else init
    num = len(in_modes)

    def dense(cores):
        return tt_to_dense(TTMatrix(cores, in_modes, out_modes)).T

    def error(cores):
        if diag is None:
            return problem_error(problem, dense(cores))
        delta = problem.matrix - dense(cores)
        return jnp.sum(delta * delta * diag[None, :]) / problem.energy

    def sweep(cores):
        cores = list(cores)
        for k in range(num - 1):
            cores[k] = _block_update(cores, k, target_t, metric, diag)
            cores[k], cores[k + 1] = _shift_right(cores[k], cores[k + 1])
        for k in range(num - 1, 0, -1):
            cores[k] = _block_update(cores, k, target_t, metric, diag)
            cores[k - 1], cores[k] = _shift_left(cores[k - 1], cores[k])
        return tuple(cores), jnp.bool_(True)

    cores, status, errors, steps, _, jitter = iterate(sweep, error, _right_canonical(start.cores),
                                                      max_steps=max_steps, rtol=rtol, with_jitter=True)
    return Solution(TTMatrix(cores, in_modes, out_modes), status, errors, steps, solution_stats(problem, jitter))
