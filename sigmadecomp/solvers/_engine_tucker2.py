"""Tucker-2 declared as an engine format: the reference that the engine reproduces the
hand-written :class:`~sigmadecomp.Tucker2ALS` (the fast path), and the shortest example of a
declaration (cores ``U_out (cout, r_out)``, ``G (r_out, r_in, kh·kw)``, ``U_in (cin, r_in)``)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sigmadecomp._factorized import Tucker2
from sigmadecomp.solvers._engine import MultilinearALS, kernel_dims
from sigmadecomp.solvers._numerics import HIGHEST
from sigmadecomp.solvers._subspace import left_basis
from sigmadecomp.solvers._validation import check_rank_fits

__all__ = ["Tucker2Engine"]


@dataclasses.dataclass(frozen=True)
class Tucker2Engine(MultilinearALS):
    """Tucker-2 ``ranks = (r_out, r_in)`` through the generic engine → ``Tucker2`` (use
    :class:`~sigmadecomp.Tucker2ALS` in practice; this one exists to check the engine).

    >>> import jax, sigmadecomp as sd
    >>> from sigmadecomp.solvers import Tucker2Engine
    >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))
    >>> sd.decompose(kernel, Tucker2Engine((8, 4), max_steps=5)).value.core.shape
    (3, 3, 4, 8)
    """

    bonds = ((0, 1, 1, 0), (1, 1, 2, 1))
    output = (0, 0)
    input = (2, 0)

    def check(self, kernel_shape: tuple) -> None:
        kh, kw, cin, cout = kernel_dims(kernel_shape)
        check_rank_fits("Tucker2Engine", "ranks[0] (r_out)", self.ranks[0], "cout", cout, kernel_shape)
        check_rank_fits("Tucker2Engine", "ranks[1] (r_in)", self.ranks[1], "cin", cin, kernel_shape)

    def core_shapes(self, kernel_shape: tuple) -> tuple:
        kh, kw, cin, cout = kernel_dims(kernel_shape)
        r_out, r_in = self.ranks
        return ((cout, r_out), (r_out, r_in, kh * kw), (cin, r_in))

    def contract(self, cores: tuple, kernel_shape: tuple):
        w = jnp.einsum("oa,abp,cb->ocp", *cores, precision=HIGHEST)
        return w.reshape(w.shape[0], -1)

    def initialise(self, matrix, kernel_shape: tuple, key) -> tuple:
        """HOSVD of the channel modes (as :class:`~sigmadecomp.Tucker2ALS`'s ``init="svd"``)."""
        del key
        kh, kw, cin, cout = kernel_dims(kernel_shape)
        t = matrix.reshape(cout, cin, kh * kw)
        u_out = left_basis(matrix, self.ranks[0])
        u_in = left_basis(jnp.moveaxis(t, 1, 0).reshape(cin, -1), self.ranks[1])
        return (u_out, jnp.einsum("ocp,oa,cb->abp", t, u_out, u_in, precision=HIGHEST), u_in)

    def to_factorized(self, cores: tuple, kernel_shape: tuple) -> Tucker2:
        out, core, inp = cores
        kh, kw = kernel_dims(kernel_shape)[:2]
        if isinstance(core, tuple):  # shapes only (init_shapes)
            return Tucker2((kh, kw, core[1], core[0]), inp, out, tuple(kernel_shape))
        r_out, r_in = core.shape[:2]
        core = jnp.transpose(core.reshape(r_out, r_in, kh, kw), (2, 3, 1, 0))
        return Tucker2(core, inp, out, kernel_shape=tuple(kernel_shape))

    def from_factorized(self, value: Tucker2) -> tuple:
        kh, kw, r_in, r_out = value.core.shape
        core = jnp.transpose(value.core, (3, 2, 0, 1)).reshape(r_out, r_in, kh * kw)
        return (value.out_factor, core, value.in_factor)
