"""Tensor train of the kernel over ``cin → kh → kw → cout`` (TNN seed), an engine format.

``W̃[o, (c, i, j)] = Σ_abe X_in[c, a] X_kh[a, i, b] X_kw[b, j, e] X_out[e, o]``, ranks
``(r1, r2, r3)``. Frobenius start: TT-SVD (sequential truncated SVDs of the unfoldings); then the
engine's block ALS (:mod:`sigmadecomp.solvers._engine`) under either norm.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sigmadecomp._factorized import TT
from sigmadecomp.solvers._engine import MultilinearALS, kernel_dims
from sigmadecomp.solvers._numerics import HIGHEST, mm
from sigmadecomp.solvers._subspace import left_basis
from sigmadecomp.solvers._validation import check_rank_fits

__all__ = ["TTALS", "kernel_tensor"]


def kernel_tensor(matrix, kernel_shape):
    """``W (cout, d)`` → the 4-way tensor ``X[c, i, j, o]`` (modes in the train's order)."""
    kh, kw, cin, cout = kernel_dims(kernel_shape)
    return jnp.transpose(matrix.reshape(cout, cin, kh, kw), (1, 2, 3, 0))


@dataclasses.dataclass(frozen=True)
class TTALS(MultilinearALS):
    """Tensor-train kernel by the multilinear engine → ``TT``; ``ranks = (r1, r2, r3)``.

    Cores ``cin×r1``, ``r1×kh×r2``, ``r2×kw×r3``, ``r3×cout``; layer 1×1, ``kh×1``, ``1×kw``, 1×1.
    Needs ``r1 <= cin``, ``r2 <= r1·kh``, ``r3 <= r2·kw``, ``r3 <= cout`` (larger ranks cannot
    be reached by the train). Options: :class:`MultilinearALS`.

    >>> import jax, sigmadecomp as sd
    >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))
    >>> sol = sd.decompose(kernel, sd.TTALS((8, 12, 8), max_steps=5))
    >>> sol.value.kh_core.shape, sol.value.out_core.shape
    ((8, 3, 12), (8, 32))
    """

    bonds = ((0, 1, 1, 0), (1, 2, 2, 0), (2, 2, 3, 0))
    output = (3, 1)
    input = (0, 0)

    def __post_init__(self):
        if isinstance(self.ranks, (int, str)) or len(tuple(self.ranks)) != 3:
            raise ValueError(f"TTALS: ranks must be (r1, r2, r3); got {self.ranks!r}.")
        super().__post_init__()

    def check(self, kernel_shape: tuple) -> None:
        kh, kw, cin, cout = kernel_dims(kernel_shape)
        r1, r2, r3 = self.ranks
        check_rank_fits("TTALS", "ranks[0] (r1)", r1, "cin", cin, kernel_shape)
        check_rank_fits("TTALS", "ranks[1] (r2)", r2, "r1·kh", r1 * kh, kernel_shape)
        check_rank_fits("TTALS", "ranks[1] (r2)", r2, "kw·cout", kw * cout, kernel_shape)
        check_rank_fits("TTALS", "ranks[2] (r3)", r3, "cout", cout, kernel_shape)
        check_rank_fits("TTALS", "ranks[2] (r3)", r3, "r2·kw", r2 * kw, kernel_shape)

    def core_shapes(self, kernel_shape: tuple) -> tuple:
        kh, kw, cin, cout = kernel_dims(kernel_shape)
        r1, r2, r3 = self.ranks
        return ((cin, r1), (r1, kh, r2), (r2, kw, r3), (r3, cout))

    def contract(self, cores: tuple, kernel_shape: tuple):
        w = jnp.einsum("ca,aib,bje,eo->ocij", *cores, precision=HIGHEST)
        return w.reshape(w.shape[0], -1)

    def initialise(self, matrix, kernel_shape: tuple, key) -> tuple:
        """TT-SVD: peel one mode at a time off the leading left singular subspace."""
        del key
        kh, kw, cin, cout = kernel_dims(kernel_shape)
        r1, r2, r3 = self.ranks
        rest = kernel_tensor(matrix, kernel_shape).reshape(cin, -1)
        x_in = left_basis(rest, r1)
        rest = mm(x_in.T, rest).reshape(r1 * kh, kw * cout)
        x_kh = left_basis(rest, r2)
        rest = mm(x_kh.T, rest).reshape(r2 * kw, cout)
        x_kw = left_basis(rest, r3)
        return (x_in, x_kh.reshape(r1, kh, r2), x_kw.reshape(r2, kw, r3), mm(x_kw.T, rest))

    def to_factorized(self, cores: tuple, kernel_shape: tuple) -> TT:
        return TT(*cores, kernel_shape=tuple(kernel_shape))

    def from_factorized(self, value: TT) -> tuple:
        return (value.in_core, value.kh_core, value.kw_core, value.out_core)
