"""Reshaped conv kernels r-CP, r-Tucker, r-TT, r-TR (:mod:`sigmadecomp._reshaped`) as engine formats.

The kernel matrix ``W (cout, d)`` is regrouped into ``X[p, (s₁t₁), …, (s_m t_m)]``
(:func:`~sigmadecomp._reshaped.regroup`, shared by all four); the cores contract to ``X̃`` and
back to ``W̃`` by one einsum, linear in each core, so the multilinear engine
(:mod:`sigmadecomp.solvers._engine`) fits them under Frobenius or Σ (the metric on the
``(cin, kh, kw)`` side as for every format). ``cout`` is spread over the channel cores, so no core
is an output core: every core takes the engine's generic block step (``U = I``; dense solve or
truncated CG, never increasing the error). Bonds and the QR gauge come from the labels; r-CP has no
tree of bonds and rescales instead (unit-norm columns in every core but the one updated).

Frobenius starts: TT-SVD (r-TT), HOSVD (r-Tucker), TT-SVD embedded in the ring plus a small
random ring part (r-TR, needs ``key``), leading singular vectors of each unfolding completed by
random columns (r-CP, needs ``key``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from sigmadecomp import _reshaped as rs
from sigmadecomp.solvers._engine import MultilinearALS
from sigmadecomp.solvers._numerics import HIGHEST, mm
from sigmadecomp.solvers._subspace import left_basis

__all__ = ["RCPALS", "RTRALS", "RTTALS", "RTuckerALS", "ReshapedALS"]

_NOISE = 1e-2  # relative size of the random part of the r-TR / r-CP starts (breaks their symmetry)


@dataclasses.dataclass(frozen=True)
class ReshapedALS(MultilinearALS):
    """Base of the reshaped engine formats; ``in_modes`` / ``out_modes`` (``cin = Π s_k``,
    ``cout = Π t_k``) default to :func:`sigmadecomp._reshaped.default_modes` with ``m`` from the
    ranks (r-CP: ``m = 3``). ``dense_threshold`` defaults lower than the engine's: every block
    matvec here touches the ``d×d`` metric, so a dense solve costs one matvec per core entry."""

    in_modes: Optional[tuple] = None
    out_modes: Optional[tuple] = None
    dense_threshold: int = 64
    kind = ""
    output = None

    def __post_init__(self):
        super().__post_init__()
        if (self.in_modes is None) != (self.out_modes is None):
            raise ValueError(f"{type(self).__name__}: give both in_modes and out_modes, or neither.")
        for name in ("in_modes", "out_modes"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))
        m = self.num_modes()
        if rs.FORMATS[self.kind][1](m) != len(self.ranks):
            raise ValueError(f"{type(self).__name__}: {self.kind} with m = {m} channel modes takes "
                             f"{rs.FORMATS[self.kind][1](m)} rank(s); got ranks {self.ranks}.")

    def num_modes(self) -> int:
        if self.in_modes is not None:
            return len(self.in_modes)
        return {"r-cp": rs.NUM_MODES, "r-tt": len(self.ranks)}.get(self.kind, len(self.ranks) - 1)

    def modes(self, kernel_shape) -> tuple[tuple, tuple]:
        if self.in_modes is None:
            return rs.default_modes(kernel_shape, self.num_modes())
        return rs.check_modes(kernel_shape, self.in_modes, self.out_modes)

    @property
    def labels(self) -> tuple:
        return rs.reshaped_labels(self.kind, self.num_modes())

    @property
    def bonds(self) -> tuple:
        """Pairs of cores sharing a rank letter (a tree for r-Tucker/r-TT, a ring for r-TR)."""
        out = []
        for i, a in enumerate(self.labels):
            for j, b in enumerate(self.labels[i + 1:], i + 1):
                out += [(i, a.index(c), j, b.index(c)) for c in a if c in rs.R_LETTERS and c in b]
        return tuple(out)

    def tensor_modes(self, kernel_shape) -> tuple:
        """Sizes of the regrouped tensor ``(P, s₁t₁, …)``."""
        kh, kw, _, _ = rs.kernel_dims(kernel_shape)
        in_modes, out_modes = self.modes(kernel_shape)
        return (kh * kw,) + tuple(s * t for s, t in zip(in_modes, out_modes))

    def check(self, kernel_shape: tuple) -> None:
        self.modes(kernel_shape)

    def needs_key(self, kernel_shape: tuple) -> bool:
        return self.init == "random"

    def core_shapes(self, kernel_shape: tuple) -> tuple:
        return rs.core_shapes(self.kind, kernel_shape, *self.modes(kernel_shape), self.ranks)

    def contract(self, cores: tuple, kernel_shape: tuple):
        m = self.num_modes()
        tensor = jnp.einsum(rs.dense_spec(self.kind, m), *cores, precision=HIGHEST)
        kh, kw, cin, cout = rs.kernel_dims(kernel_shape)
        perm = [1 + m + k for k in range(m)] + [1 + k for k in range(m)] + [0]  # (t…, s…, p)
        return jnp.transpose(tensor, perm).reshape(cout, cin * kh * kw)

    def regrouped(self, matrix, kernel_shape):
        return rs.regroup(matrix, kernel_shape, *self.modes(kernel_shape))

    def split_pairs(self, cores: tuple, kernel_shape) -> tuple:
        """Cores built on merged ``(s_k t_k)`` axes → the declared shapes (a row-major reshape)."""
        return tuple(jnp.reshape(c, s) for c, s in zip(cores, self.core_shapes(kernel_shape)))

    def check_init(self, init, kernel_shape: tuple, dtype):
        """A warm start must be this format with the solver's modes and core shapes."""
        if init is None:
            return None
        cls, name = rs.CLASSES[self.kind], type(self).__name__
        if type(init) is not cls:
            raise ValueError(f"{name}: init must be a {cls.__name__}; got {type(init).__name__}.")
        want = self.core_shapes(kernel_shape)
        got = tuple(tuple(jnp.shape(c)) for c in init.cores)
        if tuple(init.kernel_shape) != tuple(kernel_shape) or got != want:
            raise ValueError(f"{name}: init has kernel shape {tuple(init.kernel_shape)} and cores {got}; this "
                             f"kernel {tuple(kernel_shape)} and configuration need cores {want}.")
        if not all(bool(jnp.all(jnp.isfinite(c))) for c in init.cores):
            raise ValueError(f"{name}: init has non-finite entries.")
        return dataclasses.replace(init, cores=tuple(jnp.asarray(c, dtype) for c in init.cores))

    def to_factorized(self, cores: tuple, kernel_shape: tuple):
        in_modes, out_modes = self.modes(kernel_shape)
        return rs.CLASSES[self.kind](tuple(cores), in_modes, out_modes, tuple(kernel_shape))

    def from_factorized(self, value) -> tuple:
        return tuple(value.cores)


def _tt_svd(tensor, ranks):
    """TT-SVD of ``tensor`` with ranks clipped to what each unfolding holds, zero-padded to
    ``ranks``: cores ``(1, n₀, r₁)``, …, ``(r_m, n_m, 1)``."""
    dims, cores, r_prev, rest = tensor.shape, [], 1, tensor
    for j, r in enumerate(ranks):
        rest = rest.reshape(r_prev * dims[j], -1)
        u = left_basis(rest, min(r, *rest.shape))
        cores.append(u.reshape(r_prev, dims[j], -1))
        rest, r_prev = mm(u.T, rest), u.shape[1]
    cores.append(rest.reshape(r_prev, dims[-1], 1))
    full = (1, *ranks, 1)
    return [jnp.pad(c, ((0, full[j] - c.shape[0]), (0, 0), (0, full[j + 1] - c.shape[2])))
            for j, c in enumerate(cores)]


def _noise(cores, key, scale):
    keys = jax.random.split(key, len(cores))
    return tuple(c + scale * jnp.sqrt(jnp.mean(c * c)) * jax.random.normal(k, c.shape, c.dtype)
                 for c, k in zip(cores, keys))


@dataclasses.dataclass(frozen=True)
class RTTALS(ReshapedALS):
    """Reshaped tensor train (r-TT, Garipov's TT-conv) by the engine → :class:`~sigmadecomp.RTT`;
    ``ranks = (r₁, …, r_m)`` (``m`` channel modes). Each ``r_j`` may not exceed the unfoldings
    of the regrouped tensor ``(P, s₁t₁, …)``. Options: :class:`ReshapedALS`, :class:`MultilinearALS`.

    >>> import jax, sigmadecomp as sd
    >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))
    >>> sol = sd.decompose(kernel, sd.RTTALS((6, 8, 8), max_steps=3))
    >>> [c.shape for c in sol.value.cores], sol.value.in_modes
    ([(9, 6), (6, 2, 2, 8), (8, 2, 4, 8), (8, 4, 4)], (2, 2, 4))
    """

    kind = "r-tt"

    def check(self, kernel_shape: tuple) -> None:
        dims = self.tensor_modes(kernel_shape)
        for j, r in enumerate(self.ranks):
            left, right = math.prod(dims[: j + 1]), math.prod(dims[j + 1:])
            if r > min(left, right):
                raise ValueError(f"RTTALS: ranks[{j}] = {r} exceeds min({left}, {right}), the size of the "
                                 f"unfolding of the regrouped tensor {dims} (kernel {tuple(kernel_shape)}) "
                                 f"at that bond; use a rank <= {min(left, right)}.")

    def initialise(self, matrix, kernel_shape: tuple, key) -> tuple:
        del key
        cores = _tt_svd(self.regrouped(matrix, kernel_shape), self.ranks)
        return self.split_pairs((cores[0][0],) + tuple(cores[1:-1]) + (cores[-1][..., 0],), kernel_shape)


@dataclasses.dataclass(frozen=True)
class RTRALS(ReshapedALS):
    """Reshaped tensor ring (r-TR) by the engine → :class:`~sigmadecomp.RTR`; ``ranks = (r₀, r₁,
    …, r_m)`` with ``r₀`` the closing rank. The start is the TT-SVD of ``(r₁, …, r_m)`` in the
    ``r₀ = 0`` slice plus a small random ring part, so ``key`` is required.

    >>> import sigmadecomp as sd  # sd.decompose(kernel, solver, key=...) as for RTTALS
    >>> sd.RTRALS((2, 4, 6, 6)).core_shapes((3, 3, 16, 32))
    ((2, 9, 4), (4, 2, 2, 6), (6, 2, 4, 6), (6, 4, 4, 2))
    """

    kind = "r-tr"

    def needs_key(self, kernel_shape: tuple) -> bool:
        return True

    def initialise(self, matrix, kernel_shape: tuple, key) -> tuple:
        r0 = self.ranks[0]
        tt = _tt_svd(self.regrouped(matrix, kernel_shape), self.ranks[1:])
        first = jnp.pad(tt[0], ((0, r0 - 1), (0, 0), (0, 0)))
        last = jnp.pad(tt[-1], ((0, 0), (0, 0), (0, r0 - 1)))
        cores = _noise((first,) + tuple(tt[1:-1]) + (last,), key, _NOISE)
        return self.split_pairs(cores, kernel_shape)


@dataclasses.dataclass(frozen=True)
class RTuckerALS(ReshapedALS):
    """Reshaped Tucker (r-Tucker) by the engine → :class:`~sigmadecomp.RTucker`; ``ranks = (r₀,
    r₁, …, r_m)`` for the modes ``p, (s₁t₁), …``; each ``r_j`` at most its mode and at most the
    product of the other ranks. HOSVD start.

    >>> import sigmadecomp as sd  # sd.decompose(kernel, solver, cov=...) as for RTTALS
    >>> sd.RTuckerALS((4, 3, 4, 6)).core_shapes((3, 3, 16, 32))
    ((9, 4), (2, 2, 3), (2, 4, 4), (4, 4, 6), (4, 3, 4, 6))
    """

    kind = "r-tucker"

    def check(self, kernel_shape: tuple) -> None:
        dims = self.tensor_modes(kernel_shape)
        total = math.prod(self.ranks)
        for j, (r, n) in enumerate(zip(self.ranks, dims)):
            if r > n or r * r > total:
                raise ValueError(f"RTuckerALS: ranks[{j}] = {r} must be <= its mode {n} of the regrouped tensor "
                                 f"{dims} (kernel {tuple(kernel_shape)}) and <= the product of the other ranks "
                                 f"{total // r}; lower it.")

    def initialise(self, matrix, kernel_shape: tuple, key) -> tuple:
        del key
        x = self.regrouped(matrix, kernel_shape)
        factors = [left_basis(jnp.moveaxis(x, j, 0).reshape(x.shape[j], -1), r) for j, r in enumerate(self.ranks)]
        core = x
        for u in factors:  # contract mode 0 each time; it cycles to the back
            core = jnp.tensordot(core, u, axes=(0, 0), precision=HIGHEST)
        return self.split_pairs(tuple(factors) + (core,), kernel_shape)


@dataclasses.dataclass(frozen=True)
class RCPALS(ReshapedALS):
    """Reshaped CP (r-CP) by the engine → :class:`~sigmadecomp.RCP`; ``ranks = (R,)`` (any ``R``).
    Start: the leading left singular vectors of each unfolding, completed by random columns where
    ``R`` exceeds the mode, so ``key`` is required. Gauge: unit-norm columns in every core but the
    one updated (CP has no tree of bonds for the QR gauge).

    >>> import sigmadecomp as sd  # sd.decompose(kernel, solver, key=...) as for RTTALS
    >>> sd.RCPALS((12,), in_modes=(4, 4), out_modes=(4, 8)).core_shapes((3, 3, 16, 32))
    ((9, 12), (4, 4, 12), (4, 8, 12))
    """

    kind = "r-cp"

    @property
    def bonds(self) -> tuple:
        return ()

    def needs_key(self, kernel_shape: tuple) -> bool:
        return True

    def gauge(self, cores: tuple, k: int, skip=None) -> tuple:
        norms = [jnp.sqrt(jnp.sum(c.reshape(-1, c.shape[-1]) ** 2, axis=0)) for c in cores]
        norms = [jnp.where(n > 0, n, 1.0) for n in norms]
        scale = math.prod(n for j, n in enumerate(norms) if j != k)
        cols = lambda v, c: jnp.reshape(v, (1,) * (c.ndim - 1) + (-1,))  # noqa: E731
        return tuple(c * cols(scale, c) if j == k else c / cols(norms[j], c) for j, c in enumerate(cores))

    def initialise(self, matrix, kernel_shape: tuple, key) -> tuple:
        x = self.regrouped(matrix, kernel_shape)
        (rank,), keys = self.ranks, jax.random.split(key, x.ndim)
        factors = []
        for j in range(x.ndim):
            unfolding = jnp.moveaxis(x, j, 0).reshape(x.shape[j], -1)
            u = left_basis(unfolding, min(rank, x.shape[j]))
            extra = jax.random.normal(keys[j], (x.shape[j], rank - u.shape[1]), x.dtype) / math.sqrt(x.shape[j])
            factors.append(jnp.concatenate([u, extra], axis=1))
        # one scale in the spatial factor so that the start has the kernel's norm order
        approx = self.contract(self.split_pairs(tuple(factors), kernel_shape), kernel_shape)
        ratio = jnp.sqrt(jnp.sum(matrix * matrix) / jnp.maximum(jnp.sum(approx * approx), jnp.finfo(x.dtype).tiny))
        factors[0] = factors[0] * ratio.astype(x.dtype)
        return self.split_pairs(tuple(factors), kernel_shape)
