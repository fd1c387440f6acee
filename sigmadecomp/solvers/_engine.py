"""One multilinear block-ALS engine for every tensor-network format under Σ (DESIGN.md §5).

A format is a set of cores ``θ = (G₁, …, G_K)`` and a contraction building ``W̃(θ) ∈ R^{cout×d}``
(package patch order) that is linear in each core separately. Both calibration forms give one
quadratic (see :class:`~sigmadecomp.solvers.Problem`)

    f(W̃) = tr(W̃ M W̃ᵀ) − 2 tr(T W̃ᵀ) + energy.

**Declaring a format** = subclassing :class:`MultilinearALS` (a frozen solver configuration whose
first field is ``ranks``) and giving

* :meth:`~MultilinearALS.core_shapes` ``(kernel_shape) -> ((…), …)``;
* :attr:`~MultilinearALS.bonds`: ``((i, axis_i, j, axis_j), …)``, the contracted index pairs;
* :attr:`~MultilinearALS.output`: ``(k, axis)``, the core holding the ``cout`` index, or ``None``
  when no single core holds it (the reshaped formats spread ``cout = t₁⋯t_m`` over several cores:
  then every core is updated by the generic block step with ``U = I`` and ``contract`` returns
  ``(cout, d)``);
* :meth:`~MultilinearALS.gauge` (optional): the gauge fixed before a block update (default: the
  canonical form below; a format without a tree of bonds, e.g. reshaped CP, rescales instead);
* :attr:`~MultilinearALS.input` (optional): ``(k, axis)``, the core holding the ``cin`` index;
* :meth:`~MultilinearALS.contract` ``(cores, kernel_shape) -> (n, d)`` with ``n`` the size of the
  output core's ``axis`` (so the engine can substitute an identity there);
* :meth:`~MultilinearALS.initialise` ``(matrix, kernel_shape, key) -> cores`` (a Frobenius start:
  HOSVD, TT-SVD, …), and :meth:`~MultilinearALS.to_factorized` / ``from_factorized``.

**What the engine does with it** (every step the exact minimiser over one core, or truncated CG
from the current core, so the Σ-error never increases):

* *Output side in closed form.* Moving the output core's ``cout`` axis first and flattening the
  rest gives ``W̃ = U Z`` with ``U (cout × r')``; ``Z`` is the contraction with ``U`` replaced by the
  identity. ``U = (T Zᵀ)(Z M Zᵀ)⁻¹`` (an ``r'×r'`` Cholesky solve; ``Z M`` is the one ``r'·d²``
  product), and the error follows from the same products, with no extra ``d²`` work.
* *Any other core k.* ``Z = A_k(G_k)`` is linear; with ``UᵀU = L Lᵀ`` and ``Ẑ = Lᵀ Z`` the block
  objective is ``tr(Ẑ M Ẑᵀ) − 2 tr(T̂ Ẑᵀ)``, ``T̂ = L⁻¹ Uᵀ T`` (the ``cout`` side never meets ``M``).
  Normal equations ``Âᵀ(Â(G) M) = Âᵀ(T̂)`` with the adjoint from :func:`jax.linear_transpose`: a
  dense Cholesky solve when the core has ``<= dense_threshold`` entries, else matrix-free CG warm
  started at the current core (every CG iterate has a block objective <= the start; a guard
  keeps the start if rounding says otherwise). A matvec is one contraction, one ``r'·d²``
  product with ``M`` and one adjoint.
* *Input side projected once per sweep.* When the format declares an input core ``X`` (``cin``
  against its bonds ``β``), ``W̃ = U Ẑ Vᵀ`` with ``V = X ⊗ I_P``; after ``X``'s own block update
  the engine forms ``M_V = Vᵀ M V`` and ``T V`` (one ``d²·β`` product) and every later block of the
  sweep runs on that ``(β·P)``-sized problem (the input core replaced by the identity, left out of
  the canonical form), so only the input core's CG touches the ``d×d`` metric.
* *Canonical form.* Before core k is updated, every other core is orthonormalised toward it along a
  BFS spanning tree of the bonds (QR; the ``R`` factor absorbed into the neighbour; ``W̃`` is
  unchanged), as in TT-ALS/DMRG: for a tree network ``Â_k`` is then an isometry when ``M = I``, and
  gauge freedom cannot make the block systems singular. (A ring keeps one bond outside the tree.)

Frobenius (``M = I``) is the same engine; its block systems are then identities in canonical form.
One ``lax.while_loop`` (:func:`~sigmadecomp.solvers._driver.iterate`), float32/float64, status,
error history, CG iterations per sweep in ``Solution.stats["inner_iterations"]``; ``rtol``,
``cg_tol`` and ``ridge`` are traced, so new data or tolerances never recompile.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import solve_triangular

from sigmadecomp._compile import registered_jit
from sigmadecomp.solvers._base import AbstractSolver, Problem, problem_error, solution_stats
from sigmadecomp.solvers._driver import iterate
from sigmadecomp.solvers._numerics import (
    HIGHEST,
    cholesky_solve,
    logged_jitter,
    mm,
    record_jitter,
    safe_cholesky,
)
from sigmadecomp.solvers._solution import Solution
from sigmadecomp.solvers._validation import check_positive, check_positive_int, conv_shape

__all__ = ["MultilinearALS", "canonicalise", "input_matrix", "output_matrix", "project_input", "update_core",
           "update_output"]

_INITS = ("svd", "random")
_TRACED = ("rtol", "cg_tol", "ridge")


@dataclasses.dataclass(frozen=True)
class MultilinearALS(AbstractSolver):
    """Base of every engine format: block ALS under Frobenius or Σ, declared once per format.

    Args:
        ranks: the format's ranks (a tuple; its meaning is the subclass's).
        max_steps: sweeps at most (a sweep updates every core once, the output core last).
        rtol: stop when the relative error changes by ``<= rtol`` relatively in one sweep.
        ridge: ``cov + ridge·(tr cov/d)·I`` is the metric (read by :func:`sigmadecomp.decompose`).
        cg_tol, cg_max_steps: inner CG tolerance (relative residual) and iteration cap per block;
            a capped CG still never increases the error; a sweep whose CG stopped above
            ``cg_tol`` reports ``INNER_NOT_CONVERGED`` if it is the last.
        dense_threshold: cores with at most this many entries are solved by dense Cholesky.
        init: ``"svd"`` (the format's Frobenius start) or ``"random"`` (from ``key``).

    Subclass contract: see the module docstring of ``sigmadecomp.solvers._engine``.
    """

    ranks: tuple
    max_steps: int = 50
    rtol: float = 1e-6
    ridge: float = 1e-6
    cg_tol: float = 1e-6
    cg_max_steps: int = 30
    dense_threshold: int = 256
    init: str = "svd"

    # ---- the declaration (subclasses) ----------------------------------------------------

    bonds = ()  # class attributes, not fields: ((i, axis_i, j, axis_j), …)
    output = (0, 0)  # (core index, axis of cout); None: cout is spread over several cores
    input = None  # optional (core index, axis of cin): enables the per-sweep projection

    @abc.abstractmethod
    def core_shapes(self, kernel_shape: tuple) -> tuple:
        """Shapes of the cores for a kernel of ``kernel_shape``."""

    @abc.abstractmethod
    def contract(self, cores: tuple, kernel_shape: tuple):
        """``W̃ (n, d)`` in patch order, ``n`` = size of the output core's ``cout`` axis."""

    @abc.abstractmethod
    def initialise(self, matrix, kernel_shape: tuple, key) -> tuple:
        """Frobenius starting cores from ``W (cout, d)``."""

    @abc.abstractmethod
    def to_factorized(self, cores: tuple, kernel_shape: tuple):
        """The format's pytree (e.g. ``TT``) from the cores."""

    @abc.abstractmethod
    def from_factorized(self, value) -> tuple:
        """The cores of a pytree of the format (warm start)."""

    # ---- provided ------------------------------------------------------------------------

    def __post_init__(self):
        name = type(self).__name__
        ranks = self.ranks
        if isinstance(ranks, (int, str)) or not all(isinstance(r, int) for r in tuple(ranks)):
            raise ValueError(f"{name}: ranks must be a tuple of ints; got {ranks!r}.")
        object.__setattr__(self, "ranks", tuple(ranks))
        for i, r in enumerate(self.ranks):
            check_positive_int(name, f"ranks[{i}]", r)
        for field in ("max_steps", "cg_max_steps"):
            check_positive_int(name, field, getattr(self, field))
        check_positive_int(name, "dense_threshold", self.dense_threshold, minimum=0)
        for field in _TRACED:
            check_positive(name, field, getattr(self, field))
        if self.init not in _INITS:
            raise ValueError(f"{name}: init must be one of {_INITS}; got {self.init!r}.")

    def gauge(self, cores: tuple, k: int, skip=None) -> tuple:
        """Cores with ``W̃`` unchanged, normalised toward core ``k`` before its block update."""
        return canonicalise(cores, k, self.bonds, skip)

    def init_shapes(self, kernel_shape: tuple):
        shapes = self.core_shapes(tuple(kernel_shape))
        return self.to_factorized(shapes, tuple(kernel_shape))

    def random_cores(self, kernel_shape: tuple, key, dtype) -> tuple:
        """Gaussian cores scaled so that ``W̃`` has unit-order entries (``init="random"``)."""
        shapes = self.core_shapes(tuple(kernel_shape))
        keys = jax.random.split(key, len(shapes))
        return tuple(jax.random.normal(k, s, dtype) / math.sqrt(max(1, math.prod(s) // s[0]))
                     for k, s in zip(keys, shapes))

    def solve(self, problem: Problem, *, key, init=None) -> Solution:
        dtype = problem.matrix.dtype
        tols = {name: jnp.asarray(getattr(self, name), dtype) for name in ("rtol", "cg_tol")}
        cores = None if init is None else tuple(self.from_factorized(init))
        static = dataclasses.replace(self, **{name: 1.0 for name in _TRACED})
        return _engine_solve(problem, key, cores, tols, solver=static)


# ---------------------------------------------------------------------------------------------
# Canonical form


def _bfs_tree(num_cores: int, bonds: tuple, root: int, skip=None) -> list:
    """``[(child, child_axis, parent, parent_axis), …]`` in BFS order from ``root`` (static),
    over the cores other than ``skip``."""
    bonds = tuple(b for b in bonds if skip not in (b[0], b[2]))
    seen, order, frontier = {root}, [], [root]
    while frontier:
        nxt = []
        for node in frontier:
            for i, ai, j, aj in bonds:
                for a, aa, b, ab in ((i, ai, j, aj), (j, aj, i, ai)):
                    if a == node and b not in seen:
                        seen.add(b)
                        order.append((b, ab, a, aa))
                        nxt.append(b)
        frontier = nxt
    if len(seen) != num_cores - (skip is not None):
        raise ValueError(f"the bonds {bonds} do not connect all {num_cores} cores (without {skip})")
    return order


def canonicalise(cores: tuple, k: int, bonds: tuple, skip=None) -> tuple:
    """Orthonormalise every core except ``k`` toward ``k`` (leaves first); ``W̃`` unchanged.

    Core ``j`` with parent ``p`` over bond ``(aj, ap)``: ``G_j`` unfolded with ``aj`` as columns
    is ``Q R``; ``G_j ← Q``, ``G_p ← R ×_{ap} G_p``. A core with fewer rows than its bond
    dimension is left as it is (its ranks are redundant; the solution is still exact). Core
    ``skip`` (the identity in a projected problem) is left out of the tree and untouched."""
    cores = list(cores)
    for child, ca, parent, pa in reversed(_bfs_tree(len(cores), bonds, k, skip)):
        c = jnp.moveaxis(cores[child], ca, -1)
        rows, cols = math.prod(c.shape[:-1]), c.shape[-1]
        if rows < cols:
            continue
        q, r = jnp.linalg.qr(c.reshape(rows, cols))
        cores[child] = jnp.moveaxis(q.reshape(c.shape), -1, ca)
        moved = jnp.tensordot(r, cores[parent], axes=(1, pa), precision=HIGHEST)
        cores[parent] = jnp.moveaxis(moved, 0, pa)
    return tuple(cores)


# ---------------------------------------------------------------------------------------------
# Block updates (public so tests can check the error after each block)


def output_matrix(solver: MultilinearALS, cores: tuple):
    """``U (cout × r')``: the output core with its ``cout`` axis first, the rest flattened."""
    k, axis = solver.output
    moved = jnp.moveaxis(cores[k], axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _identity_at(cores: tuple, k: int, axis: int) -> tuple:
    """``cores`` with core ``k`` replaced by the identity from ``axis`` to its other axes."""
    rest = jnp.moveaxis(cores[k], axis, 0).shape[1:]
    r = math.prod(rest)
    eye = jnp.eye(r, dtype=cores[k].dtype).reshape((r,) + rest)
    return cores[:k] + (jnp.moveaxis(eye, 0, axis),) + cores[k + 1:]


def _z(solver: MultilinearALS, cores: tuple, kernel_shape):
    """``Z (r' × d)`` with ``W̃ = U Z`` (``W̃`` itself when there is no output core)."""
    if solver.output is None:
        return solver.contract(cores, kernel_shape)
    return solver.contract(_identity_at(cores, *solver.output), kernel_shape)


def input_matrix(solver: MultilinearALS, cores: tuple):
    """``X (cin × β)``: the input core with its ``cin`` axis first, the rest flattened."""
    k, axis = solver.input
    moved = jnp.moveaxis(cores[k], axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _lift(a, x):
    """``a (X ⊗ I_P)`` for ``a (n, cin·P)`` → ``(n, β·P)``, through a reshape."""
    out = jnp.einsum("ncp,cb->nbp", a.reshape(a.shape[0], x.shape[0], -1), x, precision=HIGHEST)
    return out.reshape(a.shape[0], -1)


def project_input(solver: MultilinearALS, problem: Problem, cores: tuple):
    """The problem seen by every core but the input one: ``T V``, ``M_V = Vᵀ M V`` with
    ``V = X ⊗ I_P`` (one ``d²·β`` product), and the cores with ``X`` replaced by the identity;
    ``f`` is unchanged for every such core (``W̃ = U Ẑ Vᵀ``)."""
    x = input_matrix(solver, cores)
    p = problem.target.shape[1] // x.shape[0]
    if problem.metric is None:
        metric = jnp.kron(mm(x.T, x), jnp.eye(p, dtype=x.dtype))
    else:
        metric = _lift(_lift(problem.metric, x).T, x)
        metric = 0.5 * (metric + metric.T)
    target = _lift(problem.target, x)
    kh, kw, _, cout = conv_shape(problem.kernel_shape)
    projected = Problem(target, target, metric, problem.energy, direct=False,
                        kernel_shape=(kh, kw, x.shape[1], cout))
    return projected, _identity_at(cores, *solver.input)


def _metric(problem: Problem, z):
    return z if problem.metric is None else mm(z, problem.metric)


def _identity_output(solver: MultilinearALS, cores: tuple) -> tuple:
    return _identity_at(cores, *solver.output)


def update_output(solver: MultilinearALS, problem: Problem, cores: tuple):
    """Closed-form output core ``U = (T Zᵀ)(Z M Zᵀ)⁻¹``; returns ``(cores, relative error)``."""
    k, axis = solver.output
    z = _z(solver, cores, problem.kernel_shape)
    gram = mm(_metric(problem, z), z.T)
    gram = 0.5 * (gram + gram.T)
    cross = mm(problem.target, z.T)
    u = cholesky_solve(safe_cholesky(gram), cross.T).T
    f = jnp.sum(mm(u.T, u) * gram) - 2.0 * jnp.sum(u * cross) + problem.energy
    rest = jnp.moveaxis(cores[k], axis, 0).shape[1:]
    core = jnp.moveaxis(u.reshape((u.shape[0],) + rest), 0, axis)
    return cores[:k] + (core,) + cores[k + 1:], jnp.maximum(f, 0.0) / problem.energy


def _cg(matvec, b, x0, *, tol, max_steps: int):
    """CG from ``x0`` returning ``(x, iterations, converged)``; keeps ``x0`` if the block
    objective ``q(x) = −½⟨x, r + b⟩`` did not decrease (rounding guard for the monotone claim)."""
    dot = lambda u, v: jnp.vdot(u, v, precision=HIGHEST)  # noqa: E731
    stop2 = (tol**2) * jnp.maximum(dot(b, b), jnp.finfo(b.dtype).tiny)
    r0 = b - matvec(x0)
    init = (x0, r0, r0, dot(r0, r0), jnp.int32(0))

    def cond(c):
        return (c[3] > stop2) & (c[4] < max_steps)

    def body(c):
        x, r, p, rr, i = c
        ap = matvec(p)
        pap = dot(p, ap)
        alpha = jnp.where(pap > 0, rr / jnp.where(pap > 0, pap, 1.0), 0.0)
        x, r = x + alpha * p, r - alpha * ap
        rr_new = dot(r, r)
        beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)
        return x, r, r + beta * p, rr_new, i + 1

    x, r, _, rr, steps = lax.while_loop(cond, body, init)
    better = -0.5 * dot(x, r + b) <= -0.5 * dot(x0, r0 + b)
    return jnp.where(better, x, x0), steps, rr <= stop2


def _output_side(solver: MultilinearALS, problem: Problem, cores: tuple):
    """``(L, T̂ = L⁻¹ Uᵀ T)`` with ``UᵀU = L Lᵀ``; ``(None, T)`` without an output core (``U = I``)."""
    if solver.output is None:
        return None, problem.target
    u = output_matrix(solver, cores)
    chol = safe_cholesky(mm(u.T, u))
    return chol, solve_triangular(chol, mm(u.T, problem.target), lower=True)


def update_core(solver: MultilinearALS, problem: Problem, cores: tuple, k: int, *, cg_tol):
    """Exact (dense) or truncated-CG minimiser over core ``k`` (not the output core), others
    fixed; returns ``(cores, cg_iterations, converged)``."""
    chol, t_hat = _output_side(solver, problem, cores)

    def op(g):  # G_k ↦ Ẑ = Lᵀ Z(G_k)
        z = _z(solver, cores[:k] + (g,) + cores[k + 1:], problem.kernel_shape)
        return z if chol is None else mm(chol.T, z)

    adjoint = jax.linear_transpose(op, cores[k])

    def matvec(g):
        return adjoint(_metric(problem, op(g)))[0]

    rhs = adjoint(t_hat)[0]
    shape, n = cores[k].shape, cores[k].size
    if n <= solver.dense_threshold:
        basis = jnp.eye(n, dtype=rhs.dtype).reshape((n,) + shape)
        h = jax.vmap(matvec)(basis).reshape(n, n)
        g = cholesky_solve(safe_cholesky(0.5 * (h + h.T)), rhs.reshape(-1)).reshape(shape)
        return cores[:k] + (g,) + cores[k + 1:], jnp.int32(0), jnp.all(jnp.isfinite(g))
    g, steps, ok = _cg(matvec, rhs, cores[k], tol=cg_tol, max_steps=solver.cg_max_steps)
    return cores[:k] + (g,) + cores[k + 1:], steps, ok


# ---------------------------------------------------------------------------------------------
# Sweeps and the solve


class _State(NamedTuple):
    cores: tuple
    error: jax.Array
    inner: jax.Array  # (max_steps,) int32: CG iterations per sweep
    step: jax.Array


def _settle_output(solver, problem, cores, skip=None):
    if solver.output is None:  # every core was a block step: the error of the current cores
        return cores, problem_error(problem, solver.contract(cores, problem.kernel_shape))
    return update_output(solver, problem, canonicalise(cores, solver.output[0], solver.bonds, skip))


def _direct_error(solver, problem: Problem, cores, error):
    """Frobenius: the direct ``‖W − W̃‖²/‖W‖²`` (a ``cout·d`` pass) instead of the expanded form,
    whose cancellation shows as float32 rounding noise in the history; Σ keeps the expanded form
    (the direct one would cost a ``cout·d²`` product per sweep)."""
    if problem.metric is not None:
        return error
    return problem_error(problem, solver.contract(cores, problem.kernel_shape))


def _sweep(solver: MultilinearALS, problem: Problem, tols, state: _State):
    """Input core (full problem), then the other cores and the output core (on the projected
    problem when an input core is declared)."""
    cores, iterations, ok = state.cores, jnp.int32(0), jnp.bool_(True)
    state_problem = problem
    order = [k for k in range(len(cores)) if solver.output is None or k != solver.output[0]]
    skip, full = None, cores
    if solver.input is not None:
        order.remove(solver.input[0])
        cores = solver.gauge(cores, solver.input[0])
        full, steps, ok = update_core(solver, problem, cores, solver.input[0], cg_tol=tols["cg_tol"])
        iterations = iterations + steps
        problem, cores = project_input(solver, problem, full)
        skip = solver.input[0]
    for k in order:
        cores = solver.gauge(cores, k, skip)
        cores, steps, done = update_core(solver, problem, cores, k, cg_tol=tols["cg_tol"])
        iterations, ok = iterations + steps, ok & done
    cores, error = _settle_output(solver, problem, cores, skip)
    if skip is not None:  # put the real input core back: W̃ = U Ẑ Vᵀ
        cores = cores[:skip] + (full[skip],) + cores[skip + 1:]
    error = _direct_error(solver, state_problem, cores, error)
    inner = state.inner.at[state.step].set(iterations)
    return _State(cores, error, inner, state.step + 1), ok


@registered_jit(static_argnames=("solver",))
def _engine_solve(problem, key, cores, tols, *, solver: MultilinearALS) -> Solution:
    shape = problem.kernel_shape
    if cores is None:
        if solver.init == "random":
            cores = solver.random_cores(shape, key, problem.matrix.dtype)
        else:
            cores = tuple(solver.initialise(problem.matrix, shape, key))
    with record_jitter() as log:
        cores, error = _settle_output(solver, problem, tuple(cores))
    error = _direct_error(solver, problem, cores, error)
    state = _State(cores, error, jnp.zeros((solver.max_steps,), jnp.int32), jnp.int32(0))
    state, status, errors, num_steps, _, jitter = iterate(
        functools.partial(_sweep, solver, problem, tols), lambda s: s.error, state,
        max_steps=solver.max_steps, rtol=tols["rtol"], with_jitter=True,
    )
    value = solver.to_factorized(state.cores, shape)
    stats = solution_stats(problem, jnp.maximum(jitter, logged_jitter(log, jitter.dtype)))
    return Solution(value, status, errors, num_steps, stats=dict(stats, inner_iterations=state.inner))


def kernel_dims(kernel_shape) -> tuple[int, int, int, int]:
    """``(kh, kw, cin, cout)`` of a conv or dense kernel shape (for the declarations)."""
    return conv_shape(kernel_shape)
