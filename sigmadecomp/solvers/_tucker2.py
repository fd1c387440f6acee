"""Tucker-2 over the channel modes: HOOI (Frobenius) and exact block ALS (Σ), DESIGN.md §2.

``W̃ = U_out · G · (U_in ⊗ I_P)ᵀ`` with ``G`` the core as an ``(r_out, r_in·P)`` matrix (columns
ordered ``(a, p)`` like the kernel's ``(c, p)``), ``P = kh·kw``. ``(U_in ⊗ I_P)`` is never formed:
``_lift`` contracts it through a reshape.

Σ sweep (every block update is the exact minimiser, so the Σ-error never increases):

* :func:`update_outer` (step A): given ``U_in`` (orthonormal), ``M_V = Vᵀ M V = C Cᵀ``,
  ``N = T V``; ``U_out`` = top left singular vectors of ``N C⁻ᵀ``, ``G = U_outᵀ N M_V⁻¹``.
* :func:`update_in` (step B): given ``U_out, G``, the normal equations ``H(U_in) = B`` (SPD, size
  ``cin·r_in``), by dense Cholesky when small, else by PCG warm-started at the current ``U_in``
  with a Kronecker preconditioner ``M ≈ M_chan ⊗ M_space``. A matvec costs ``d²·r_out``.
* :func:`orthonormalise`: ``U_in = Q R``, ``R`` absorbed into ``G`` (``W̃`` unchanged), then
  ``M_V`` and ``N`` for the next step A (one ``d²·r_in`` product) also give the sweep's error.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from sigmadecomp._compile import fast_compile_jit
from sigmadecomp._factorized import Tucker2
from sigmadecomp.solvers._base import AbstractSolver, Problem, solution_stats
from sigmadecomp.solvers._driver import iterate
from sigmadecomp.solvers._numerics import (
    CG_PRECISIONS,
    HIGHEST,
    cholesky_solve,
    forcing_tol,
    kronecker_factors,
    logged_jitter,
    mm,
    pcg,
    record_jitter,
    reduced_mm,
    safe_cholesky,
    solve_by_dense,
)
from sigmadecomp.solvers._solution import Solution
from sigmadecomp.solvers._validation import (
    check_positive,
    check_positive_int,
    check_rank_fits,
    conv_shape,
)

__all__ = [
    "Tucker2ALS",
    "core_to_matrix",
    "matrix_to_core",
    "orthonormalise",
    "projections",
    "update_in",
    "update_outer",
]

_INITS = ("svd", "random")


@dataclasses.dataclass(frozen=True)
class Tucker2ALS(AbstractSolver):
    """Tucker-2 (1×1 → ``kh×kw`` core → 1×1) by block ALS → ``Tucker2``.

    Frobenius: HOOI (one warm-started subspace-iteration step per factor and sweep). Σ: step A
    (closed form for ``U_out`` and the core) then step B (quadratic minimisation in ``U_in``: a
    dense Cholesky solve when its estimated cost is below that of CG, else preconditioned CG
    warm-started at the current ``U_in``, stopped at the forcing tolerance
    ``min(½, cg_forcing·√(last relative decrease))`` of the starting residual or at ``cg_tol``
    relative to the right-hand side, whichever is looser). Truncated CG never increases the
    error. A CG stopped at ``cg_max_steps`` before its tolerance gives ``INNER_NOT_CONVERGED``.
    Stops when the relative error changes by ``<= rtol`` relatively, or at ``max_steps``.
    ``Solution.stats["inner_iterations"]`` holds the CG iterations of every sweep.

    Args:
        ranks: ``(r_out, r_in)``.
        init: ``"svd"`` (HOSVD of the kernel: top eigenvectors of the channel Gram matrices) or
            ``"random"`` (orthonormal factors from ``key``); a ``Tucker2`` passed to
            :func:`decompose` as ``init`` overrides it.
        ridge: ``cov + ridge·(tr cov/d)·I`` is used as the metric (``cov`` is often singular).
        dense_threshold: ``None`` (default) chooses dense Cholesky or CG for step B by estimated
            flops; an integer forces dense when ``cin·r_in <= dense_threshold`` (0: always CG).
        cg_forcing: scale of the forcing tolerance (above); 0 solves step B to ``cg_tol``.
        cg_precision: precision of CG's ``M·z`` products (the ``d²·r_out`` cost of a matvec):
            ``"highest"`` (default, exact float32/float64), ``"tf32"`` (the backend's default
            float32 matmul: TF32 on NVIDIA tensor-core GPUs, exact on CPU) or ``"bf16"``
            (bfloat16 operands, float32 accumulation). Everything else, including each sweep's
            error, stays at HIGHEST; a sweep whose step B raised that error keeps step A's
            result only, so the error history stays non-increasing.

    ``ranks``, ``max_steps``, ``cg_max_steps``, ``dense_threshold`` and ``init`` are compiled in;
    ``rtol``, ``cg_tol``, ``cg_forcing`` and ``ridge`` are traced (changing them does not
    recompile).

    >>> import jax, sigmadecomp as sd
    >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))
    >>> sol = sd.decompose(kernel, sd.Tucker2ALS((8, 4), max_steps=20))
    >>> sol.value.core.shape, sol.value.in_factor.shape, sol.value.out_factor.shape
    ((3, 3, 4, 8), (16, 4), (32, 8))
    """

    ranks: tuple
    max_steps: int = 50
    rtol: float = 1e-6
    ridge: float = 1e-6
    cg_tol: float = 1e-7
    cg_max_steps: int = 200
    dense_threshold: Optional[int] = None
    init: str = "svd"
    cg_forcing: float = 1.0
    cg_precision: str = "highest"

    def __post_init__(self):
        ranks = self.ranks
        if isinstance(ranks, (int, str)) or len(tuple(ranks)) != 2:
            raise ValueError(f"Tucker2ALS: ranks must be a pair (r_out, r_in); got {ranks!r}.")
        object.__setattr__(self, "ranks", tuple(ranks))
        for name, value in zip(("ranks[0] (r_out)", "ranks[1] (r_in)"), self.ranks):
            check_positive_int("Tucker2ALS", name, value)
        check_positive_int("Tucker2ALS", "max_steps", self.max_steps)
        check_positive_int("Tucker2ALS", "cg_max_steps", self.cg_max_steps)
        if self.dense_threshold is not None:
            check_positive_int("Tucker2ALS", "dense_threshold", self.dense_threshold, minimum=0)
        for name in ("rtol", "ridge", "cg_tol"):
            check_positive("Tucker2ALS", name, getattr(self, name))
        forcing = self.cg_forcing
        if isinstance(forcing, bool) or not isinstance(forcing, (int, float)) or not forcing >= 0 \
                or forcing == float("inf"):
            raise ValueError(f"Tucker2ALS: cg_forcing must be a finite number >= 0; got {forcing!r}.")
        if self.init not in _INITS:
            raise ValueError(f"Tucker2ALS: init must be one of {_INITS}; got {self.init!r}.")
        if self.cg_precision not in CG_PRECISIONS:
            raise ValueError(f"Tucker2ALS: cg_precision must be one of {CG_PRECISIONS}; "
                             f"got {self.cg_precision!r}.")

    def check(self, kernel_shape: tuple) -> None:
        kh, kw, cin, cout = conv_shape(kernel_shape)
        check_rank_fits("Tucker2ALS", "ranks[0] (r_out)", self.ranks[0], "cout", cout, kernel_shape)
        check_rank_fits("Tucker2ALS", "ranks[1] (r_in)", self.ranks[1], "cin", cin, kernel_shape)
        check_rank_fits(
            "Tucker2ALS", "ranks[0] (r_out)", self.ranks[0], "r_in·kh·kw (core unfolding)",
            self.ranks[1] * kh * kw, kernel_shape,
        )
        # r_in > r_out·kh·kw leaves step B singular (U_in has more columns than the core can
        # use) and stores parameters that change nothing.
        check_rank_fits(
            "Tucker2ALS", "ranks[1] (r_in)", self.ranks[1], "r_out·kh·kw (core unfolding)",
            self.ranks[0] * kh * kw, kernel_shape,
        )

    def needs_key(self, kernel_shape: tuple) -> bool:
        """``init="random"`` draws the orthonormal start from ``key``."""
        return self.init == "random"

    def init_shapes(self, kernel_shape: tuple) -> Tucker2:
        kh, kw, cin, cout = conv_shape(kernel_shape)
        r_out, r_in = self.ranks
        return Tucker2((kh, kw, r_in, r_out), (cin, r_in), (cout, r_out), tuple(kernel_shape))

    def solve(self, problem: Problem, *, key, init=None) -> Solution:
        tols = {name: jnp.asarray(getattr(self, name), problem.matrix.dtype)
                for name in ("rtol", "cg_tol", "cg_forcing")}
        return _tucker2_solve(
            problem, key, init, tols,
            ranks=self.ranks, max_steps=self.max_steps, cg_max_steps=self.cg_max_steps,
            dense=_step_b_dense(problem.conv_shape, self.ranks, self.dense_threshold),
            init_method=self.init, cg_precision=self.cg_precision,
        )


# ---------------------------------------------------------------------------------------------
# Layout helpers


def _lift(a, in_factor):
    """``a (U_in ⊗ I_P)`` for ``a`` of shape ``(n, cin·P)`` → ``(n, r_in·P)``, via a reshape."""
    n, cin = a.shape[0], in_factor.shape[0]
    out = jnp.einsum("ncp,ca->nap", a.reshape(n, cin, -1), in_factor, precision=HIGHEST)
    return out.reshape(n, -1)


def _unlift(b, in_factor):
    """``b (U_in ⊗ I_P)ᵀ`` for ``b`` of shape ``(n, r_in·P)`` → ``(n, cin·P)``."""
    n, r_in = b.shape[0], in_factor.shape[1]
    out = jnp.einsum("nap,ca->ncp", b.reshape(n, r_in, -1), in_factor, precision=HIGHEST)
    return out.reshape(n, -1)


def core_to_matrix(core):
    """Flax-layout core ``(kh, kw, r_in, r_out)`` → ``G`` ``(r_out, r_in·kh·kw)``."""
    kh, kw, r_in, r_out = core.shape
    return jnp.transpose(core, (3, 2, 0, 1)).reshape(r_out, r_in * kh * kw)


def matrix_to_core(g, kh: int, kw: int):
    """Inverse of :func:`core_to_matrix`."""
    r_out = g.shape[0]
    return jnp.transpose(g.reshape(r_out, -1, kh, kw), (2, 3, 1, 0))


def _top_left(y, rank: int):
    """Orthonormal basis of the top-``rank`` left singular subspace of ``y``.

    Eigen-decomposes the smaller Gram matrix (``y yᵀ`` or ``yᵀ y``): much cheaper than an SVD of
    the ``cout × r_in·P`` matrix, and only the leading subspace is needed.
    """
    rows, cols = y.shape
    if rows <= cols:
        _, vecs = jnp.linalg.eigh(mm(y, y.T))
        return vecs[:, ::-1][:, :rank]
    _, vecs = jnp.linalg.eigh(mm(y.T, y))
    q, _ = jnp.linalg.qr(mm(y, vecs[:, ::-1][:, :rank]))
    return q


def _top_eigvecs(gram, rank: int):
    return jnp.linalg.eigh(gram)[1][:, ::-1][:, :rank]


def _in_gram(y, cin: int):
    """``Σ_{o,p} y[o,(c,p)] y[o,(c',p)]``: the ``cin × cin`` Gram matrix of the input mode."""
    y3 = y.reshape(y.shape[0], cin, -1)
    return jnp.einsum("ocp,oep->ce", y3, y3, precision=HIGHEST)


# ---------------------------------------------------------------------------------------------
# Σ block updates (public so tests can check the error after each block)


def projections(problem: Problem, in_factor):
    """``(M_V, N) = (Vᵀ M V, T V)`` for ``V = U_in ⊗ I_P``; ``M_V = I`` (None) for Frobenius.

    The one ``d²·r_in`` product per sweep."""
    gram, cross, _ = _projections(problem, in_factor)
    return gram, cross


def _projections(problem: Problem, in_factor):
    """:func:`projections` and ``M V`` (``d × r_in·P``; None for Frobenius), which step B reuses
    for the starting residual of its CG."""
    cross = _lift(problem.target, in_factor)
    if problem.metric is None:
        return None, cross, None
    mv = _lift(problem.metric, in_factor)  # (M V)ᵀ = Vᵀ M, M symmetric
    gram = _lift(mv.T, in_factor)
    return 0.5 * (gram + gram.T), cross, mv


def update_outer(gram, cross, r_out: int):
    """Step A: the joint minimiser ``(U_out, G)`` given ``U_in``, from :func:`projections`.

    With ``M_V = C Cᵀ`` the error is ``‖U_out G C − N C⁻ᵀ‖² + const``: a truncated SVD.
    """
    if gram is None:
        u = _top_left(cross, r_out)
        return u, mm(u.T, cross)
    chol = safe_cholesky(gram)
    y = solve_triangular(chol, cross.T, lower=True).T  # N C⁻ᵀ
    u = _top_left(y, r_out)
    g = solve_triangular(chol.T, mm(u.T, y).T, lower=False).T  # Uᵀ N M_V⁻¹
    return u, g


def _rhs(problem: Problem, u, g, cin: int):
    """``B[c,b] = Σ_p [Tᵀ U_out G]_{(c,p),(b,p)}``."""
    r_out = u.shape[1]
    tu = mm(problem.target.T, u).reshape(cin, -1, r_out)  # (c, p, o)
    return jnp.einsum("cpo,obp->cb", tu, g.reshape(r_out, -1, tu.shape[1]), precision=HIGHEST)


def _metric_apply(problem: Problem, z, precision: str = "highest"):
    return z if problem.metric is None else reduced_mm(problem.metric, z, precision)


def _matvec(problem: Problem, gh, x, precision: str = "highest"):
    """``H(X)[c,b] = Σ_p [M (X ⊗ I) Ĝᵀ Ĝ]_{(c,p),(b,p)}`` with ``ĜᵀĜ = Gᵀ U_outᵀ U_out G``."""
    r_out = gh.shape[0]
    g3 = gh.reshape(r_out, x.shape[1], -1)  # (o, b, p)
    z = jnp.einsum("ca,oap->cpo", x, g3, precision=HIGHEST).reshape(-1, r_out)
    return _contract_out(_metric_apply(problem, z, precision), gh, x.shape[0])


def _contract_out(y, gh, cin: int):
    """``Σ_p y[(c,p),o] Ĝ[o,(b,p)]``: the last step of :func:`_matvec`, for ``y = M (X⊗I) Ĝᵀ``."""
    r_out = gh.shape[0]
    g3 = gh.reshape(r_out, -1, y.shape[0] // cin)
    return jnp.einsum("cpo,obp->cb", y.reshape(cin, -1, r_out), g3, precision=HIGHEST)


class _Kron(NamedTuple):
    """Per-solve constants of the preconditioner: ``M ≈ M_chan ⊗ M_space``, ``M_chan = L Lᵀ``."""

    chan_chol: Optional[jax.Array]
    space: jax.Array


def _kron_consts(problem: Problem, cin: int) -> _Kron:
    """Computed once per solve (``M`` is fixed), not once per sweep."""
    p = problem.matrix.shape[1] // cin
    if problem.metric is None:
        return _Kron(None, jnp.eye(p, dtype=problem.matrix.dtype))
    chan, space = kronecker_factors(problem.metric, cin)
    return _Kron(safe_cholesky(chan), space)


def _preconditioner(kron: _Kron, gh, r_in: int):
    """``R ↦ M_chan⁻¹ R K̃⁻¹`` with ``K̃[b,b'] = Σ_{pq} M_space[p,q] (ĜᵀĜ)[(b,p),(b',q)]``: the
    exact inverse of ``H`` when ``M`` is a Kronecker product (e.g. ``M = I``)."""
    g3 = gh.reshape(gh.shape[0], r_in, -1)
    k = jnp.einsum("obp,pq,oeq->be", g3, kron.space, g3, precision=HIGHEST)
    k = k + (jnp.finfo(k.dtype).eps * jnp.trace(k) / r_in) * jnp.eye(r_in, dtype=k.dtype)
    k_chol = safe_cholesky(0.5 * (k + k.T))

    def apply(r):
        r = r if kron.chan_chol is None else cholesky_solve(kron.chan_chol, r)
        return cholesky_solve(k_chol, r.T).T

    return apply


def _dense_in_system(problem: Problem, gh, cin: int, r_in: int):
    """``H`` as a dense ``(cin·r_in)²`` matrix: ``H[(c,b),(c',b')] = Σ_{pq} M[c,p,c',q] K[b,p,b',q]``."""
    kmat = mm(gh.T, gh).reshape(r_in, -1, r_in, gh.shape[1] // r_in)  # (b, p, e, q)
    p = kmat.shape[1]
    if problem.metric is None:
        m4 = jnp.eye(cin * p, dtype=gh.dtype).reshape(cin, p, cin, p)
    else:
        m4 = problem.metric.reshape(cin, p, cin, p)
    h = jnp.einsum("cpdq,bpeq->cbde", m4, kmat, precision=HIGHEST)
    n = cin * r_in
    h = h.reshape(n, n)
    return 0.5 * (h + h.T)


def _step_b_dense(conv_shape, ranks, dense_threshold) -> bool:
    """Static choice for step B: dense Cholesky when cheaper than CG by estimated flops
    (:func:`solve_by_dense`), or by ``cin·r_in <= dense_threshold`` when one is given."""
    kh, kw, cin, cout = conv_shape
    r_out, r_in = ranks
    if dense_threshold is not None:
        return cin * r_in <= dense_threshold
    p, n, d = kh * kw, cin * r_in, cin * kh * kw
    dense = 2.0 * n * n * p * p + n**3 / 3.0  # form H, factor it
    cg_step = 2.0 * d * d * r_out + 4.0 * d * r_in * r_out + 2.0 * (cin * n + n * r_in)
    return solve_by_dense(dense, cg_step)


def update_in(problem: Problem, u, g, in_factor, *, cg_tol, cg_max_steps: int = 200,
              dense_threshold: Optional[int] = None):
    """Step B: the exact minimiser over ``U_in`` given ``(U_out, G)``; returns
    ``(U_in, inner_converged)``. Dense Cholesky (chosen by :func:`_step_b_dense`), else PCG from
    ``in_factor`` to ``cg_tol`` (never increases the error even when stopped early)."""
    cin, r_in = in_factor.shape
    dense = _step_b_dense(problem.conv_shape, (u.shape[1], r_in), dense_threshold)
    x, ok, _ = _solve_in(problem, _kron_consts(problem, cin), u, g, in_factor, None, cg_tol=cg_tol,
                         start_tol=0.0, cg_max_steps=cg_max_steps, dense=dense)
    return x, ok


def _solve_in(problem: Problem, kron: _Kron, u, g, in_factor, mv, *, cg_tol, start_tol,
              cg_max_steps: int, dense: bool, precision: str = "highest"):
    """Step B from ``in_factor``; ``mv = M (U_in ⊗ I)`` (from :func:`_projections`, or None)
    gives CG's starting residual without a ``d²`` product. Returns ``(U_in, ok, cg_steps)``."""
    cin, r_in = in_factor.shape
    # Ĝ = Lᵀ G with U_outᵀ U_out = L Lᵀ, so H needs only Ĝ (U_out is orthonormal after step A,
    # but a warm start's U_out need not be).
    gh = mm(safe_cholesky(mm(u.T, u)).T, g)
    rhs = _rhs(problem, u, g, cin)
    if dense:
        chol = safe_cholesky(_dense_in_system(problem, gh, cin, r_in))
        x = cholesky_solve(chol, rhs.reshape(-1)).reshape(cin, r_in)
        return x, jnp.all(jnp.isfinite(x)), jnp.int32(0)
    ax0 = None if mv is None else _contract_out(mm(mv, gh.T), gh, cin)
    return pcg(
        functools.partial(_matvec, problem, gh, precision=precision), rhs, in_factor, ax0=ax0,
        precond=_preconditioner(kron, gh, r_in), tol=cg_tol, start_tol=start_tol,
        max_steps=cg_max_steps,
    )


def orthonormalise(in_factor, g):
    """``U_in = Q R`` → ``(Q, G·(R ⊗ I_P)ᵀ)``: same ``W̃``, orthonormal ``U_in``."""
    q, r = jnp.linalg.qr(in_factor)
    r_out, r_in = g.shape[0], r.shape[0]
    g = jnp.einsum("obp,ab->oap", g.reshape(r_out, r_in, -1), r, precision=HIGHEST)
    return q, g.reshape(r_out, -1)


# ---------------------------------------------------------------------------------------------
# Errors and sweeps


class _State(NamedTuple):
    in_factor: jax.Array  # (cin, r_in), orthonormal
    out_factor: jax.Array  # (cout, r_out)
    core: jax.Array  # G, (r_out, r_in·P)
    gram: Optional[jax.Array]  # M_V for in_factor (Σ only)
    cross: jax.Array  # N = T V for in_factor
    error: jax.Array  # relative error of (in_factor, out_factor, core)
    metric_in: Optional[jax.Array] = None  # M V for in_factor (Σ only)
    decrease: Optional[jax.Array] = None  # relative error decrease of the last sweep (Σ only)


def _sigma_error(problem: Problem, u, g, gram, cross):
    """``f/energy`` from the projections: ``tr(UᵀU G M_V Gᵀ) − 2 tr(Uᵀ N Gᵀ) + energy``.

    Costs no extra ``d²`` product (the ``M_V``, ``N`` of the next step A are reused)."""
    quad = jnp.sum(mm(u.T, u) * mm(mm(g, gram), g.T))
    f = quad - 2.0 * jnp.sum(mm(u.T, cross) * g) + problem.energy
    return jnp.maximum(f, 0.0) / problem.energy


def _frobenius_error(problem: Problem, u, g, in_factor):
    delta = problem.matrix - _unlift(mm(u, g), in_factor)
    return jnp.sum(delta * delta) / problem.energy


def _make_state(problem: Problem, in_factor, u, g, previous_error=None):
    in_factor, g = orthonormalise(in_factor, g)
    gram, cross, mv = _projections(problem, in_factor)
    if gram is None:
        return _State(in_factor, u, g, None, cross, _frobenius_error(problem, u, g, in_factor))
    err = _sigma_error(problem, u, g, gram, cross)
    if previous_error is None:
        decrease = jnp.ones((), err.dtype)
    else:
        decrease = (previous_error - err) / jnp.maximum(previous_error, jnp.finfo(err.dtype).tiny)
    return _State(in_factor, u, g, gram, cross, err, mv, decrease)


def _sigma_sweep(problem: Problem, kron: _Kron, state: _State, tols, r_out, cg_max_steps, dense,
                 precision: str = "highest"):
    u, g = update_outer(state.gram, state.cross, r_out)
    x, ok, steps = _solve_in(
        problem, kron, u, g, state.in_factor, state.metric_in, cg_tol=tols["cg_tol"],
        start_tol=forcing_tol(state.decrease, tols["cg_forcing"]), cg_max_steps=cg_max_steps,
        dense=dense, precision=precision,
    )
    new = _make_state(problem, x, u, g, state.error)
    if precision == "highest":
        return new, ok, steps
    # Reduced-precision CG minimises a perturbed quadratic, so its step B may raise the (exact,
    # HIGHEST) error: then keep step A alone, whose error comes from the unchanged projections.
    err_a = _sigma_error(problem, u, g, state.gram, state.cross)
    decrease_a = (state.error - err_a) / jnp.maximum(state.error, jnp.finfo(err_a.dtype).tiny)
    step_a = state._replace(out_factor=u, core=g, error=err_a, decrease=decrease_a)
    keep = new.error <= err_a
    return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, step_a), ok, steps


def _subspace_step(y, basis):
    """One warm-started subspace-iteration step for the top left singular subspace of ``y``:
    ``orth(y yᵀ basis)``. Never lowers ``‖basisᵀ y‖²`` (the captured energy), so HOOI with it
    stays monotone, and it costs two thin matmuls instead of an ``eigh`` of ``y yᵀ``."""
    return jnp.linalg.qr(mm(y, mm(y.T, basis)))[0]


def _in_unfolding(y, cin: int):
    """``y (n, cin·P)`` → ``cin × (n·P)``: the input-mode unfolding."""
    return jnp.transpose(y.reshape(y.shape[0], cin, -1), (1, 0, 2)).reshape(cin, -1)


def _hooi_sweep(problem: Problem, state: _State, ranks):
    """One HOOI sweep: ``U_out`` then ``U_in``, each one subspace-iteration step from the current
    factor; the error from norms, ``‖W‖² − ‖G‖²`` (orthonormal factors, optimal core)."""
    cin = state.in_factor.shape[0]
    u = _subspace_step(state.cross, state.out_factor)
    y = mm(u.T, problem.matrix)  # (r_out, d)
    x = _subspace_step(_in_unfolding(y, cin), state.in_factor)
    g = _lift(y, x)
    err = jnp.maximum(problem.energy - jnp.sum(g * g), 0.0) / problem.energy
    return _State(x, u, g, None, _lift(problem.matrix, x), err), jnp.bool_(True)


def _initial(problem: Problem, key, init, ranks, init_method):
    """The starting ``(U_in, U_out, G)``: a warm start, HOSVD (``"svd"``) or random."""
    kh, kw, cin, cout = problem.conv_shape
    r_out, r_in = ranks
    if init is not None:
        return init.in_factor, init.out_factor, core_to_matrix(init.core)
    w = problem.matrix
    if init_method == "svd":
        x, u = _top_eigvecs(_in_gram(w, cin), r_in), _top_left(w, r_out)
    else:
        k_in, k_out = jax.random.split(key)
        x = jnp.linalg.qr(jax.random.normal(k_in, (cin, r_in), w.dtype))[0]
        u = jnp.linalg.qr(jax.random.normal(k_out, (cout, r_out), w.dtype))[0]
    gram, cross = projections(problem, x)
    g = mm(u.T, cross)
    if gram is not None:  # the optimal core given (U_out, U_in): Uᵀ N M_V⁻¹
        g = cholesky_solve(safe_cholesky(gram), g.T).T
    return x, u, g


@fast_compile_jit(
    static_argnames=("ranks", "max_steps", "cg_max_steps", "dense", "init_method", "cg_precision"),
)
def _tucker2_solve(problem, key, init, tols, *, ranks, max_steps, cg_max_steps,
                   dense, init_method, cg_precision="highest") -> Solution:
    kh, kw = problem.conv_shape[:2]
    with record_jitter() as log:
        state = _make_state(problem, *_initial(problem, key, init, ranks, init_method))
    if problem.metric is None:
        sweep = functools.partial(_hooi_sweep, problem, ranks=ranks)
    else:
        sweep = functools.partial(
            _sigma_sweep, problem, _kron_consts(problem, problem.conv_shape[2]), tols=tols,
            r_out=ranks[0], cg_max_steps=cg_max_steps, dense=dense, precision=cg_precision,
        )
    state, status, errors, num_steps, inner, jitter = iterate(
        sweep, lambda s: s.error, state, max_steps=max_steps, rtol=tols["rtol"], with_jitter=True
    )
    jitter = jnp.maximum(jitter, logged_jitter(log, jitter.dtype))
    value = Tucker2(
        core=matrix_to_core(state.core, kh, kw),
        in_factor=state.in_factor,
        out_factor=state.out_factor,
        kernel_shape=problem.kernel_shape,
    )
    stats = dict(solution_stats(problem, jitter), inner_iterations=inner)
    return Solution(value, status, errors, num_steps, stats)
