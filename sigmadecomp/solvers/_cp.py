"""CP-ALS for conv kernels, Frobenius and Σ (DESIGN.md §2, "CP").

The kernel ``W`` (``cout × d``, ``d = cin·kh·kw``, channel-major patch order) is approximated by
``W̃ = A Zᵀ`` with ``Z[(c, i, j), r] = B[c, r]·C[i, r]·E[j, r]``. Internally CP-3 (spatial modes
merged) is the same problem with ``kh' = kh·kw``, ``kw' = 1`` and ``E ≡ 1`` held fixed, so both
formats share every update below.

A sweep updates ``B`` (in), ``C`` (kh), ``E`` (kw), then ``A`` (out); each update is the exact
minimiser of the objective over its block (up to the CG tolerance for large ``B``), so the
objective never increases. Between sweeps the column norms are balanced across the factors
(``W̃`` unchanged); on return the scales are moved into ``out_factor``.

Σ updates read only ``T`` and ``M`` of the :class:`Problem` (so the cross-covariance form costs
nothing extra):

* out:  ``A = (T Z)(Zᵀ M Z + τ I)⁻¹``.
* in:   ``H(X) = rhs`` with ``H(X)[c, r] = Σ_p φ_r[p] [M lift(X) Q]_{(c,p), r} + τ X[c, r]``,
  ``Q = AᵀA``, ``φ_r = C[:, r] ⊗ E[:, r]``, ``rhs[c, r] = Σ_p φ_r[p] (TᵀA)_{(c,p), r}``. Dense
  Cholesky when cheaper by estimated flops; else PCG warm-started from the current ``B`` (its
  starting residual from the last sweep's ``M Z``, no extra ``d²R`` product), stopped at a
  forcing tolerance (``cg_forcing``: truncated, still monotone), preconditioned by the Kronecker
  approximation ``M ≈ M_chan ⊗ M_spat`` under which ``H ≈ (φᵀ M_spat φ ⊙ Q) ⊗ M_chan + τ I``
  has a closed-form inverse (two ``eigh``).
* kh / kw: the same with the roles of the modes exchanged, built from
  ``Y = M (B ⊗ I_P)`` (``d × P × R``, computed once per sweep and shared by the kh, kw and out
  updates); dense when ``kh·R <= dense_threshold`` (2048 by default) else PCG with a
  per-component block-Jacobi preconditioner.

``τ = tikhonov · energy / ‖W‖_F^{2/N}`` (``N`` = number of factors, 4 or 3): the optional
Tikhonov term ``τ Σ_k ‖X_k‖²`` added to ``f``. The scaling makes ``tikhonov`` dimensionless
(invariant to rescaling ``W`` or ``cov``); with it, ``f + τ Σ_k ‖X_k‖²`` is what never increases.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp

from sigmadecomp._compile import fast_compile_jit, registered_jit
from sigmadecomp._factorized import CP, CP3
from sigmadecomp.solvers._base import AbstractSolver, Problem, problem_error, solution_stats
from sigmadecomp.solvers._driver import iterate
from sigmadecomp.solvers._numerics import (
    HIGHEST,
    cholesky_solve,
    forcing_tol,
    kronecker_factors,
    logged_jitter,
    mm,
    pcg,
    record_jitter,
    safe_cholesky,
    solve_by_dense,
)
from sigmadecomp.solvers._solution import Solution

__all__ = ["CPALS"]

_INITS = ("svd", "random")


def _einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=HIGHEST)


@dataclasses.dataclass(frozen=True)
class CPALS(AbstractSolver):
    """CP decomposition of a conv kernel by alternating exact block updates (Frobenius or Σ).

    Returns :class:`~sigmadecomp.CP` (modes cout, cin, kh, kw) or, with ``merge_spatial=True``,
    :class:`~sigmadecomp.CP3` (spatial modes merged). With ``cov=None`` this is classic CP-ALS
    (normal equations from the MTTKRP and Hadamard products of Gram matrices); with ``cov`` every
    block update is the exact minimiser of the Σ-error (see the module docstring for the maths).

    Args:
        rank: number of rank-one components ``R``. May exceed the size of any single mode (the
            factors are then padded with random columns from ``key``), but not the generic
            maximal CP rank ``prod(modes) / max(modes)``, beyond which CP gives no compression.
        merge_spatial: return ``CP3`` (one depthwise ``kh×kw`` conv) instead of ``CP``.
        max_steps: maximum number of sweeps (static).
        rtol: stop when the relative error changes by at most ``rtol`` (relative) in a sweep.
        ridge: the metric ridge ``cov + ridge·(tr cov / d)·I`` applied by ``decompose``.
        tikhonov: dimensionless weight of the optional penalty ``τ Σ_k ‖X_k‖²`` on the factors,
            ``τ = tikhonov · energy / ‖W‖_F^{2/N}`` (``N`` factors). Counters CP degeneracy;
            when ``> 0`` the penalised objective is what decreases. Default 0 (off).
        cg_tol: relative residual tolerance of the conjugate-gradient solves.
        cg_max_steps: iteration cap of each CG solve; hitting it is reported as
            ``Status.INNER_NOT_CONVERGED``.
        dense_threshold: ``None`` (default): each input-side update is solved by a dense Cholesky
            when its estimated flops are below those of CG, else by matrix-free PCG; an integer:
            dense when the update has at most this many (``n_mode·R``) unknowns.
        cg_forcing: the in-factor CG stops at ``min(½, cg_forcing·√(last relative decrease))`` of
            its starting residual (or at ``cg_tol``): few steps in early sweeps, more later, and
            still monotone (truncated CG from the current factor never increases the objective).
            0 solves to ``cg_tol``. ``Solution.stats["inner_iterations"]`` counts the steps.
        init: ``"svd"`` (leading singular vectors of each input mode's unfolding, deterministic
            except for random padding when ``R`` exceeds a mode) or ``"random"`` (from ``key``).
            The out factor then starts at its exact optimum.

    ``rtol``, ``tikhonov``, ``cg_tol`` and ``cg_forcing`` are traced: changing them never recompiles.

    >>> import jax, jax.numpy as jnp, sigmadecomp as sd
    >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 8, 6))
    >>> sol = sd.decompose(kernel, CPALS(4, max_steps=20), key=jax.random.key(1))
    >>> sol.value.in_factor.shape, sol.errors.shape
    ((8, 4), (21,))
    """

    rank: int
    _: dataclasses.KW_ONLY
    merge_spatial: bool = False
    max_steps: int = 100
    rtol: float = 1e-6
    ridge: float = 1e-6
    tikhonov: float = 0.0
    cg_tol: float = 1e-7
    cg_max_steps: int = 200
    dense_threshold: int | None = None
    init: str = "svd"
    cg_forcing: float = 1.0

    def __post_init__(self):
        optional = ("dense_threshold",) if self.dense_threshold is not None else ()
        for name in ("rank", "max_steps", "cg_max_steps") + optional:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CPALS: {name} must be an integer >= 1; got {value!r}.")
        if not isinstance(self.merge_spatial, bool):
            raise ValueError(f"CPALS: merge_spatial must be True or False; got {self.merge_spatial!r}.")
        for name, positive in (("rtol", False), ("ridge", False), ("tikhonov", False), ("cg_tol", True),
                               ("cg_forcing", False)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (value > 0 if positive else value >= 0)
            if not ok:
                need = "> 0" if positive else ">= 0"
                raise ValueError(f"CPALS: {name} must be a finite number {need}; got {value!r}.")
        if self.init not in _INITS:
            raise ValueError(f"CPALS: init must be one of {_INITS}; got {self.init!r}.")

    def modes(self, kernel_shape) -> tuple[int, ...]:
        """Mode sizes of the decomposed tensor: (cout, cin, kh, kw), or (cout, cin, kh·kw)."""
        kh, kw, cin, cout = _conv_shape(kernel_shape)
        return (cout, cin, kh * kw) if self.merge_spatial else (cout, cin, kh, kw)

    def check(self, kernel_shape) -> None:
        modes = self.modes(kernel_shape)
        bound = math.prod(modes) // max(modes)
        if self.rank > bound:
            raise ValueError(
                f"CPALS: rank = {self.rank} exceeds the maximal CP rank {bound} = prod / max of "
                f"the modes {modes} (kernel shape {tuple(kernel_shape)}): any such tensor is "
                f"exactly a sum of {bound} rank-one terms, so a larger rank cannot help and stores "
                f"more numbers than the kernel. Use rank <= {bound}."
            )

    def init_shapes(self, kernel_shape):
        """The warm-start format with shape tuples: ``CP`` (or ``CP3``) for ``kernel_shape``."""
        kh, kw, cin, cout = _conv_shape(kernel_shape)
        R, shape = self.rank, tuple(kernel_shape)
        if self.merge_spatial:
            return CP3((cout, R), (cin, R), (kh, kw, R), kernel_shape=shape)
        return CP((cout, R), (cin, R), (kh, R), (kw, R), kernel_shape=shape)

    def needs_key(self, kernel_shape) -> bool:
        """Whether the start uses randomness (``init="random"``, or ``R`` above an input mode)."""
        return self.init == "random" or self.rank > min(self.modes(kernel_shape)[1:])

    def solve(self, problem: Problem, *, key=None, init=None) -> Solution:
        self.check(problem.kernel_shape)
        if key is None:
            if init is None and self.needs_key(problem.kernel_shape):
                raise ValueError(
                    f"CPALS(rank={self.rank}, init={self.init!r}) draws random start columns for "
                    f"kernel shape {tuple(problem.kernel_shape)}; pass key=jax.random.key(0) "
                    f"(any key) to make that choice explicit."
                )
            key = jax.random.key(0)  # never used for randomness on this path
        dtype = problem.matrix.dtype
        init = self.check_init(init, problem.kernel_shape, dtype)
        knobs = {n: jnp.asarray(getattr(self, n), dtype) for n in ("rtol", "tikhonov", "cg_tol", "cg_forcing")}
        return _solve(self._static(), problem, key, init, knobs)

    def _static(self) -> "CPALS":
        """This configuration with the traced knobs zeroed: the jit cache key."""
        return dataclasses.replace(self, rtol=0.0, ridge=0.0, tikhonov=0.0, cg_tol=1.0, cg_forcing=0.0)


def _conv_shape(kernel_shape) -> tuple[int, int, int, int]:
    s = tuple(int(n) for n in kernel_shape)
    return (1, 1, *s) if len(s) == 2 else s


# ----------------------------------------------------------------------------------- the geometry


@dataclasses.dataclass(frozen=True)
class _Dims:
    """Static sizes of the internal 4-mode problem (CP-3: ``kh' = kh·kw``, ``kw' = 1``)."""

    cout: int
    cin: int
    kh: int
    kw: int
    rank: int
    merged: bool

    @property
    def p(self) -> int:
        return self.kh * self.kw

    @property
    def d(self) -> int:
        return self.cin * self.p

    @property
    def num_factors(self) -> int:
        return 3 if self.merged else 4


def _dims(solver: CPALS, kernel_shape) -> _Dims:
    kh, kw, cin, cout = _conv_shape(kernel_shape)
    if solver.merge_spatial:
        kh, kw = kh * kw, 1
    return _Dims(cout, cin, kh, kw, solver.rank, solver.merge_spatial)


def _spatial(C, E):
    """``φ[(i, j), r] = C[i, r]·E[j, r]``: the spatial part of every component, ``(P, R)``."""
    return (C[:, None, :] * E[None, :, :]).reshape(-1, C.shape[1])


def _lift(B, phi):
    """``Z[(c, p), r] = B[c, r]·φ[p, r]`` (``d × R``), in the package's patch order."""
    return (B[:, None, :] * phi[None, :, :]).reshape(-1, B.shape[1])


def _solve_gram(gram, rhs):
    """``X = rhs · gram⁻¹`` for an SPD ``gram`` (R×R): the Frobenius/out normal equations."""
    gram = 0.5 * (gram + gram.T)
    return cholesky_solve(safe_cholesky(gram), rhs.T).T


def _solve_dense(h, rhs):
    """Solve the SPD system ``h`` (``(n·R) × (n·R)``, (row, component) order) for ``rhs (n, R)``."""
    h = 0.5 * (h + h.T)
    return cholesky_solve(safe_cholesky(h), rhs.reshape(-1)).reshape(rhs.shape)


def _eye(n, dtype):
    return jnp.eye(n, dtype=dtype)


# -------------------------------------------------------------------------------------- Frobenius


@dataclasses.dataclass(frozen=True)
class _Frobenius:
    """Classic CP-ALS: each factor from its MTTKRP and the Hadamard product of Gram matrices."""

    problem: Problem
    dims: _Dims
    tau: jax.Array

    def base(self, A):
        """``V = Aᵀ W`` as ``(R, cin, kh, kw)``: shared by the in, kh and kw MTTKRPs of a sweep."""
        n = self.dims
        return mm(A.T, self.problem.matrix).reshape(n.rank, n.cin, n.kh, n.kw)

    def _normal(self, rhs, gram):
        return _solve_gram(gram + self.tau * _eye(gram.shape[0], gram.dtype), rhs)

    def update_in(self, f, V):
        A, B, C, E = f
        rhs = _einsum("raij,ir,jr->ar", V, C, E)
        return (A, self._normal(rhs, mm(A.T, A) * mm(C.T, C) * mm(E.T, E)), C, E)

    def update_kh(self, f, V):
        A, B, C, E = f
        rhs = _einsum("raij,ar,jr->ir", V, B, E)
        return (A, B, self._normal(rhs, mm(A.T, A) * mm(B.T, B) * mm(E.T, E)), E)

    def update_kw(self, f, V):
        A, B, C, E = f
        rhs = _einsum("raij,ar,ir->jr", V, B, C)
        return (A, B, C, self._normal(rhs, mm(A.T, A) * mm(B.T, B) * mm(C.T, C)))

    def update_out(self, f):
        A, B, C, E = f
        z = _lift(B, _spatial(C, E))
        gram = mm(B.T, B) * mm(C.T, C) * mm(E.T, E)
        return (self._normal(mm(self.problem.matrix, z), gram), B, C, E)

    def error(self, f):
        A, B, C, E = f
        return problem_error(self.problem, mm(A, _lift(B, _spatial(C, E)).T))

    def sweep(self, f, mz, start_tol):
        del start_tol
        V = self.base(f[0])
        f = self.update_in(f, V)
        f = self.update_kh(f, V)
        if not self.dims.merged:
            f = self.update_kw(f, V)
        f = self.update_out(f)
        return f, self.error(f), jnp.bool_(True), jnp.int32(0), mz

    def start(self, f, fit_out: bool):
        if fit_out:
            f = self.update_out(f)
        return f, self.error(f), jnp.zeros((), f[0].dtype)


# ------------------------------------------------------------------------------------------- Σ


@dataclasses.dataclass(frozen=True)
class _Sigma:
    """Exact Σ block updates (module docstring); reads ``T`` and ``M`` only."""

    problem: Problem
    dims: _Dims
    tau: jax.Array
    cg_tol: jax.Array
    cg_max_steps: int
    dense_threshold: int | None
    chan_eig: tuple  # eigh of the channel factor of M ≈ M_chan ⊗ M_spat (fixed per solve)
    spat: jax.Array  # M_spat (P × P)

    @classmethod
    def build(cls, problem, dims, tau, cg_tol, cg_max_steps, dense_threshold):
        chan, spat = kronecker_factors(problem.metric, dims.cin)
        return cls(problem, dims, tau, cg_tol, cg_max_steps, dense_threshold, jnp.linalg.eigh(chan), spat)

    def in_dense(self) -> bool:
        """Static: dense Cholesky for the in-factor update (by flops unless a threshold is set)."""
        n = self.dims
        size = n.cin * n.rank
        if self.dense_threshold is not None:
            return size <= self.dense_threshold
        dense = 2.0 * n.cin**2 * n.p * n.rank * (n.p + n.rank) + size**3 / 3.0
        cg_step = 2.0 * n.d * n.d * n.rank + 2.0 * n.d * n.rank * n.rank + 4.0 * size * (n.cin + n.rank)
        return solve_by_dense(dense, cg_step)

    def spatial_dense(self, size: int) -> bool:
        """Static: the kh / kw updates are tiny (``kh·R``); dense unless a threshold says not."""
        return size <= (2048 if self.dense_threshold is None else self.dense_threshold)

    # -- shared products ---------------------------------------------------------------------
    def target_out(self, A):
        """``G = Tᵀ A`` as ``(cin, kh, kw, R)``: the right-hand sides of the in/kh/kw updates."""
        n = self.dims
        return mm(self.problem.target.T, A).reshape(n.cin, n.kh, n.kw, n.rank)

    def metric_in(self, B):
        """``Y = M (B ⊗ I_P)`` as ``(cin, kh, kw, kh, kw, R)``: one ``d²R`` product per sweep."""
        n = self.dims
        m3 = self.problem.metric.reshape(n.d, n.cin, n.p)
        y = _einsum("xbq,bs->xqs", m3, B)
        return y.reshape(n.cin, n.kh, n.kw, n.kh, n.kw, n.rank)

    # -- in (B) ------------------------------------------------------------------------------
    def update_in(self, f, G, mz=None, start_tol=0.0):
        """Returns ``(factors, ok, cg_steps)``; ``mz = M Z`` for the current ``B, C, E`` (from the
        last sweep) gives CG's starting residual without a ``d²R`` product."""
        A, B, C, E = f
        n, phi, Q = self.dims, _spatial(C, E), mm(A.T, A)
        rhs = _einsum("apr,pr->ar", G.reshape(n.cin, n.p, n.rank), phi)
        if self.in_dense():
            return (A, _solve_dense(self._in_dense(phi, Q), rhs), C, E), jnp.bool_(True), jnp.int32(0)
        matvec = partial(self._in_matvec, phi=phi, Q=Q)
        ax0 = None if mz is None else self._in_contract(mm(mz, Q), B, phi)
        precond = self._in_precond(phi, Q)
        B, ok, steps = pcg(matvec, rhs, B, precond=precond, tol=self.cg_tol, max_steps=self.cg_max_steps,
                           start_tol=start_tol, ax0=ax0)
        return (A, B, C, E), ok, steps

    def _in_matvec(self, X, *, phi, Q):
        return self._in_contract(mm(mm(self.problem.metric, _lift(X, phi)), Q), X, phi)

    def _in_contract(self, u, X, phi):
        """``Σ_p φ_r[p] u[(c,p),r] + τ X``: the last step of the in-factor matvec."""
        n = self.dims
        return _einsum("apr,pr->ar", u.reshape(n.cin, n.p, n.rank), phi) + self.tau * X

    def _in_dense(self, phi, Q):
        n = self.dims
        m4 = self.problem.metric.reshape(n.cin, n.p, n.cin, n.p)
        t = _einsum("apbq,qs->apbs", m4, phi)
        h = _einsum("pr,apbs->arbs", phi, t) * Q[None, :, None, :]
        size = n.cin * n.rank
        return h.reshape(size, size) + self.tau * _eye(size, h.dtype)

    def _in_precond(self, phi, Q):
        """Exact inverse of ``(φᵀ M_spat φ ⊙ Q) ⊗ M_chan + τ I`` (clamped to stay SPD)."""
        gam, vc = self.chan_eig
        lam, u = jnp.linalg.eigh(mm(mm(phi.T, self.spat), phi) * Q)
        denom = jnp.abs(gam)[:, None] * jnp.abs(lam)[None, :] + self.tau
        floor = jnp.finfo(denom.dtype).eps * jnp.max(denom) + jnp.finfo(denom.dtype).tiny
        inv = 1.0 / jnp.maximum(denom, floor)
        return lambda r: mm(mm(vc, mm(mm(vc.T, r), u) * inv), u.T)

    # -- kh (C) and kw (E) -------------------------------------------------------------------
    def update_spatial(self, f, G, Y, mode: str):
        """Exact update of C (``mode="kh"``) or E (``"kw"``); the kw case is the kh case on the
        tensors with the two spatial axes swapped."""
        A, B, C, E = f
        own, other = (C, E) if mode == "kh" else (E, C)
        if mode == "kw":
            G, Y = G.transpose(0, 2, 1, 3), Y.transpose(0, 2, 1, 4, 3, 5)
        Q = mm(A.T, A)
        psi = B[:, None, :] * other[None, :, :]  # (cin, n_other, R)
        y_o = _einsum("aijkls,ls->aijks", Y, other)  # M lift with `own` still free: (.., n_own, R)
        rhs = _einsum("ajr,aijr->ir", psi, G)
        new, ok = self._spatial_solve(own, psi, y_o, Q, rhs)
        f = (A, B, new, E) if mode == "kh" else (A, B, C, new)
        return f, ok

    def _spatial_solve(self, own, psi, y_o, Q, rhs):
        size = own.size
        if self.spatial_dense(size):
            h = _einsum("ajr,aijks->irks", psi, y_o) * Q[None, :, None, :]
            return _solve_dense(h.reshape(size, size) + self.tau * _eye(size, h.dtype), rhs), jnp.bool_(True)

        def matvec(X):
            u = mm(_einsum("aijks,ks->aijs", y_o, X), Q)
            return _einsum("ajr,aijr->ir", psi, u) + self.tau * X

        # Block-Jacobi over components: each component's own (n_own × n_own) spatial system.
        blocks = _einsum("ajr,aijkr->rik", psi, y_o) * jnp.diagonal(Q)[:, None, None]
        blocks = blocks + self.tau * _eye(own.shape[0], own.dtype)[None]
        chol = jax.vmap(partial(safe_cholesky, record=False))(0.5 * (blocks + blocks.transpose(0, 2, 1)))
        precond = lambda r: jax.vmap(cholesky_solve)(chol, r.T[:, :, None])[:, :, 0].T  # noqa: E731
        x, ok, _ = pcg(matvec, rhs, own, precond=precond, tol=self.cg_tol, max_steps=self.cg_max_steps)
        return x, ok

    # -- out (A) and the error ---------------------------------------------------------------
    def metric_lift(self, f, Y):
        """``M Z`` from ``Y`` (cheap: ``d·P·R``)."""
        n = self.dims
        phi = _spatial(f[2], f[3])
        y = Y.reshape(n.cin, n.p, n.p, n.rank)
        return _einsum("apqs,qs->aps", y, phi).reshape(n.d, n.rank)

    def update_out(self, f, mz):
        A, B, C, E = f
        z = _lift(B, _spatial(C, E))
        gram = mm(z.T, mz)
        A = _solve_gram(gram + self.tau * _eye(gram.shape[0], gram.dtype), mm(self.problem.target, z))
        return (A, B, C, E)

    def error(self, f, mz):
        """Relative Σ-error from ``M Z``, never forming ``W̃ M`` (``cout·d²``).

        Plain Σ: ``f = ⟨Δ, Δ M⟩`` with ``Δ M = T − A (M Z)ᵀ`` (``T = W M``), which keeps ``Δ``
        explicit and so avoids most of the cancellation of the expanded form. Cross form: the
        expanded ``tr(A ZᵀMZ Aᵀ) − 2⟨A, T Z⟩ + energy`` (no ``Δ`` exists there).
        """
        A, B, C, E = f
        p, z = self.problem, _lift(B, _spatial(C, E))
        if p.direct:
            val = jnp.sum((p.matrix - mm(A, z.T)) * (p.target - mm(A, mz.T)))
        else:
            quad = jnp.sum(mm(A.T, A) * mm(z.T, mz))
            val = jnp.maximum(quad - 2.0 * jnp.sum(A * mm(p.target, z)) + p.energy, 0.0)
        return val / p.energy

    def sweep(self, f, mz, start_tol):
        """One sweep from factors ``f`` with ``mz = M Z(f)``; returns ``(f, error, ok, cg_steps,
        M Z)`` (the last for the next sweep's starting residual)."""
        G = self.target_out(f[0])
        f, ok_in, steps = self.update_in(f, G, mz, start_tol)
        Y = self.metric_in(f[1])
        f, ok_kh = self.update_spatial(f, G, Y, "kh")
        ok_kw = jnp.bool_(True)
        if not self.dims.merged:
            f, ok_kw = self.update_spatial(f, G, Y, "kw")
        mz = self.metric_lift(f, Y)
        f = self.update_out(f, mz)
        return f, self.error(f, mz), ok_in & ok_kh & ok_kw, steps, mz

    def start(self, f, fit_out: bool):
        mz = mm(self.problem.metric, _lift(f[1], _spatial(f[2], f[3])))
        if fit_out:
            f = self.update_out(f, mz)
        return f, self.error(f, mz), mz


# ------------------------------------------------------------------------------ start and scales


def _leading(unfolding, rank, key):
    """Leading ``min(rank, n)`` left singular vectors of an ``n × m`` unfolding (via the Gram
    matrix, cheaper than an SVD of the wide unfolding), padded with random unit-scale columns."""
    n = unfolding.shape[0]
    _, v = jnp.linalg.eigh(mm(unfolding, unfolding.T))
    v = v[:, ::-1][:, : min(rank, n)]
    if rank <= n:
        return v
    pad = jax.random.normal(key, (n, rank - n), v.dtype) / math.sqrt(n)
    return jnp.concatenate([v, pad], axis=1)


def _initial(solver: CPALS, problem: Problem, dims: _Dims, key):
    """In-side factors ``(B, C, E)`` of the start (``A`` is then fitted exactly)."""
    n, dtype = dims, problem.matrix.dtype
    w4 = problem.matrix.reshape(n.cout, n.cin, n.kh, n.kw)
    keys = jax.random.split(key, 3)
    sizes = (n.cin, n.kh) if n.merged else (n.cin, n.kh, n.kw)
    if solver.init == "svd":
        factors = [
            _leading(jnp.moveaxis(w4, axis + 1, 0).reshape(size, -1), n.rank, k)
            for axis, (size, k) in enumerate(zip(sizes, keys))
        ]
    else:
        factors = [
            jax.random.normal(k, (size, n.rank), dtype) / math.sqrt(size) for size, k in zip(sizes, keys)
        ]
    if n.merged:
        factors.append(jnp.ones((1, n.rank), dtype))
    return tuple(factors)


def _column_norms(x):
    return jnp.sqrt(jnp.sum(x * x, axis=0))


def _balance(f, merged: bool):
    """Give every active factor's column ``r`` the same norm (their geometric mean).

    ``W̃`` is unchanged, and among all rescalings this one minimises ``Σ_k ‖X_k‖²``, so the
    Tikhonov term never grows; it also keeps the factors' scales comparable for the solves.
    """
    active = f[:3] if merged else f
    norms = jnp.stack([_column_norms(x) for x in active])
    alive = jnp.all(norms > 0, axis=0)
    mean = jnp.exp(jnp.mean(jnp.log(jnp.where(alive[None], norms, 1.0)), axis=0))
    scale = jnp.where(alive[None], mean[None] / jnp.where(alive[None], norms, 1.0), 1.0)
    scaled = tuple(x * s[None, :] for x, s in zip(active, scale))
    return scaled + f[3:] if merged else scaled


def _scales_to_out(f, merged: bool):
    """Unit-norm columns in the in-side factors, all scales in ``out_factor``."""
    A, *rest = f
    inside = rest[:2] if merged else rest
    norms = [_column_norms(x) for x in inside]
    safe = [jnp.where(nr > 0, nr, 1.0) for nr in norms]
    unit = [x / s[None, :] for x, s in zip(inside, safe)]
    scale = math.prod(safe)
    return (A * scale[None, :], *unit, *rest[len(inside):])


def _to_format(f, dims: _Dims, kernel_shape):
    """The factors as ``CP``/``CP3`` with the scales moved into ``out_factor``."""
    return _as_format(_scales_to_out(f, dims.merged), dims, kernel_shape)


def _as_format(f, dims: _Dims, kernel_shape):
    A, B, C, E = f
    if dims.merged:
        kh, kw, _, _ = _conv_shape(kernel_shape)
        return CP3(A, B, C.reshape(kh, kw, dims.rank), kernel_shape=kernel_shape)
    return CP(A, B, C, E, kernel_shape=kernel_shape)


def _from_format(init, dims: _Dims):
    if dims.merged:
        s = init.spatial_factor.reshape(dims.kh, dims.rank)
        return (init.out_factor, init.in_factor, s, jnp.ones((1, dims.rank), s.dtype))
    return (init.out_factor, init.in_factor, init.kh_factor, init.kw_factor)


# ----------------------------------------------------------------------------------------- solve


def _penalty(problem: Problem, dims: _Dims, tikhonov):
    """``τ = tikhonov · energy / ‖W‖_F^{2/N}``: dimensionless ``tikhonov`` (module docstring)."""
    wnorm2 = jnp.sum(problem.matrix * problem.matrix)
    return tikhonov * problem.energy / wnorm2 ** (1.0 / dims.num_factors)


def _engine(solver: CPALS, problem: Problem, knobs):
    """The Frobenius or Σ block updates for ``problem`` (static choice on ``metric is None``)."""
    dims = _dims(solver, problem.kernel_shape)
    tau = _penalty(problem, dims, knobs["tikhonov"])
    if problem.metric is None:
        return _Frobenius(problem, dims, tau)
    return _Sigma.build(problem, dims, tau, knobs["cg_tol"], solver.cg_max_steps, solver.dense_threshold)


def _in_side_scale(before, after, merged: bool):
    """Per-component factor by which ``Z``'s columns changed in :func:`_balance` (so ``M Z`` can be
    rescaled instead of recomputed)."""
    inside = slice(1, 3) if merged else slice(1, 4)
    old = math.prod(_column_norms(x) for x in before[inside])
    new = math.prod(_column_norms(x) for x in after[inside])
    return jnp.where(old > 0, new / jnp.where(old > 0, old, 1.0), 1.0)


@fast_compile_jit(static_argnums=0)
def _solve(solver: CPALS, problem: Problem, key, init, knobs) -> Solution:
    engine = _engine(solver, problem, knobs)
    dims = engine.dims
    if init is None:
        start = (jnp.zeros((dims.cout, dims.rank), problem.matrix.dtype), *_initial(solver, problem, dims, key))
    else:
        start = _from_format(init, dims)
    with record_jitter() as log:
        factors, err, mz = engine.start(start, fit_out=init is None)

    def sweep(state):
        f, prev, mz, decrease = state
        f, err, ok, steps, mz = engine.sweep(f, mz, forcing_tol(decrease, knobs["cg_forcing"]))
        balanced = _balance(f, dims.merged)
        mz = mz * _in_side_scale(f, balanced, dims.merged)[None, :] if mz.ndim == 2 else mz
        decrease = (prev - err) / jnp.maximum(prev, jnp.finfo(err.dtype).tiny)
        return (balanced, err, mz, decrease), ok, steps

    balanced = _balance(factors, dims.merged)
    mz = mz * _in_side_scale(factors, balanced, dims.merged)[None, :] if mz.ndim == 2 else mz
    state = (balanced, err, mz, jnp.ones((), err.dtype))
    (factors, *_), status, errors, steps, inner, jitter = iterate(
        sweep, lambda s: s[1], state, max_steps=solver.max_steps, rtol=knobs["rtol"], with_jitter=True
    )
    stats = solution_stats(problem, jnp.maximum(jitter, logged_jitter(log, jitter.dtype)), engine.tau)
    return Solution(_to_format(factors, dims, problem.kernel_shape), status, errors, steps,
                    dict(stats, inner_iterations=inner))


# ------------------------------------------------------------------------- single block updates


def block_update(solver: CPALS, problem: Problem, factors, block: str):
    """Apply ONE exact block update (``block`` in ``"out", "in", "kh", "kw"``) to a ``CP``/``CP3``
    and return ``(factors, inner_converged)``; the building block of a sweep, exposed for tests
    that check the objective after every single update. Scales are left where they are."""
    blocks = ("out", "in", "kh") if solver.merge_spatial else ("out", "in", "kh", "kw")
    if block not in blocks:
        raise ValueError(f"block must be one of {blocks} for this solver; got {block!r}.")
    dtype = problem.matrix.dtype
    knobs = {n: jnp.asarray(getattr(solver, n), dtype) for n in ("tikhonov", "cg_tol", "cg_forcing")}
    return _block_update(solver._static(), problem, factors, block, knobs)


@registered_jit(static_argnums=(0, 3))
def _block_update(solver: CPALS, problem: Problem, factors, block: str, knobs):
    engine = _engine(solver, problem, knobs)
    f = _from_format(factors, engine.dims)
    ok = jnp.bool_(True)
    if isinstance(engine, _Frobenius):
        V = engine.base(f[0])
        f = {"out": lambda: engine.update_out(f), "in": lambda: engine.update_in(f, V),
             "kh": lambda: engine.update_kh(f, V), "kw": lambda: engine.update_kw(f, V)}[block]()
    elif block == "out":
        f = engine.update_out(f, mm(problem.metric, _lift(f[1], _spatial(f[2], f[3]))))
    elif block == "in":
        f, ok, _ = engine.update_in(f, engine.target_out(f[0]))
    else:
        G, Y = engine.target_out(f[0]), engine.metric_in(f[1])
        f, ok = engine.update_spatial(f, G, Y, block)
    return _as_format(f, engine.dims, problem.kernel_shape), ok
