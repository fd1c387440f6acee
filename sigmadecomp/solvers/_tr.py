"""Tensor ring of the kernel over ``cin → kh → kw → cout → (back to cin)``, an engine format.

``W̃[o, (c, i, j)] = Σ_zabe X_in[z, c, a] X_kh[a, i, b] X_kw[b, j, e] X_out[e, o, z]``, ranks
``(r0, r1, r2, r3)`` with ``r0`` the closing rank. Frobenius start: TR-SVD (the first unfolding's
rank ``r0·r1`` split into the closing and the first bond, then TT-SVD carrying the closing index);
then the engine's block ALS (:mod:`sigmadecomp.solvers._engine`) under either norm.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sigmadecomp._factorized import TR
from sigmadecomp.solvers._engine import MultilinearALS, kernel_dims
from sigmadecomp.solvers._numerics import HIGHEST, mm
from sigmadecomp.solvers._subspace import left_basis
from sigmadecomp.solvers._tt import kernel_tensor
from sigmadecomp.solvers._validation import check_rank_fits

__all__ = ["TRALS"]


@dataclasses.dataclass(frozen=True)
class TRALS(MultilinearALS):
    """Tensor-ring kernel by the multilinear engine → ``TR``; ``ranks = (r0, r1, r2, r3)``.

    Cores ``r0×cin×r1``, ``r1×kh×r2``, ``r2×kw×r3``, ``r3×cout×r0``; the layer folds the closing
    index into channels. Needs ``r0·r1 <= cin``, ``r2 <= r1·kh``, ``r3 <= r2·kw`` and
    ``r3 <= cout·r0`` (the TR-SVD start). Options: :class:`MultilinearALS`.

    >>> import jax, sigmadecomp as sd
    >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))
    >>> sol = sd.decompose(kernel, sd.TRALS((2, 4, 6, 6), max_steps=5))
    >>> sol.value.in_core.shape, sol.value.out_core.shape
    ((2, 16, 4), (6, 32, 2))
    """

    bonds = ((0, 2, 1, 0), (1, 2, 2, 0), (2, 2, 3, 0), (3, 2, 0, 0))
    output = (3, 1)
    input = (0, 1)

    def __post_init__(self):
        if isinstance(self.ranks, (int, str)) or len(tuple(self.ranks)) != 4:
            raise ValueError(f"TRALS: ranks must be (r0, r1, r2, r3); got {self.ranks!r}.")
        super().__post_init__()

    def check(self, kernel_shape: tuple) -> None:
        kh, kw, cin, cout = kernel_dims(kernel_shape)
        r0, r1, r2, r3 = self.ranks
        check_rank_fits("TRALS", "r0·r1", r0 * r1, "cin", cin, kernel_shape)
        check_rank_fits("TRALS", "r0·r1", r0 * r1, "kh·kw·cout", kh * kw * cout, kernel_shape)
        check_rank_fits("TRALS", "ranks[2] (r2)", r2, "r1·kh", r1 * kh, kernel_shape)
        check_rank_fits("TRALS", "ranks[2] (r2)", r2, "kw·cout·r0", kw * cout * r0, kernel_shape)
        check_rank_fits("TRALS", "ranks[3] (r3)", r3, "r2·kw", r2 * kw, kernel_shape)
        check_rank_fits("TRALS", "ranks[3] (r3)", r3, "cout·r0", cout * r0, kernel_shape)

    def core_shapes(self, kernel_shape: tuple) -> tuple:
        kh, kw, cin, cout = kernel_dims(kernel_shape)
        r0, r1, r2, r3 = self.ranks
        return ((r0, cin, r1), (r1, kh, r2), (r2, kw, r3), (r3, cout, r0))

    def contract(self, cores: tuple, kernel_shape: tuple):
        w = jnp.einsum("zca,aib,bje,eoz->ocij", *cores, precision=HIGHEST)
        return w.reshape(w.shape[0], -1)

    def initialise(self, matrix, kernel_shape: tuple, key) -> tuple:
        """TR-SVD: split the first unfolding's rank ``r0·r1`` into (closing, first) bonds."""
        del key
        kh, kw, cin, cout = kernel_dims(kernel_shape)
        r0, r1, r2, r3 = self.ranks
        rest = kernel_tensor(matrix, kernel_shape).reshape(cin, -1)
        u = left_basis(rest, r0 * r1)
        x_in = jnp.transpose(u.reshape(cin, r0, r1), (1, 0, 2))
        rest = mm(u.T, rest).reshape(r0, r1, kh, kw, cout)
        rest = jnp.transpose(rest, (1, 2, 3, 4, 0)).reshape(r1 * kh, kw * cout * r0)
        x_kh = left_basis(rest, r2)
        rest = mm(x_kh.T, rest).reshape(r2 * kw, cout * r0)
        x_kw = left_basis(rest, r3)
        x_out = mm(x_kw.T, rest).reshape(r3, cout, r0)
        return (x_in, x_kh.reshape(r1, kh, r2), x_kw.reshape(r2, kw, r3), x_out)

    def to_factorized(self, cores: tuple, kernel_shape: tuple) -> TR:
        return TR(*cores, kernel_shape=tuple(kernel_shape))

    def from_factorized(self, value: TR) -> tuple:
        return (value.in_core, value.kh_core, value.kw_core, value.out_core)
