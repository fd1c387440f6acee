"""Tucker-3 with the spatial modes merged (modes ``cout``, ``cin``, ``kh·kw``), an engine format.

``W̃[o, (c, p)] = Σ_abs U_out[o, a] G[a, b, s] U_in[c, b] U_space[p, s]``, ``p = i·kw + j``.
Frobenius start: HOSVD (top eigenvectors of the three mode Gram matrices) refined by ``hooi_steps``
HOOI iterations; then the engine's block ALS (:mod:`sigmadecomp.solvers._engine`) under either norm.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sigmadecomp._factorized import Tucker3
from sigmadecomp.solvers._engine import MultilinearALS, kernel_dims
from sigmadecomp.solvers._numerics import HIGHEST
from sigmadecomp.solvers._subspace import left_basis
from sigmadecomp.solvers._validation import check_positive_int, check_rank_fits

__all__ = ["Tucker3ALS"]


@dataclasses.dataclass(frozen=True)
class Tucker3ALS(MultilinearALS):
    """Tucker-3 (modes ``cout``, ``cin``, ``kh·kw``) by the multilinear engine → ``Tucker3``.

    Layer: 1×1 to ``r_in``, ``r_space`` basis filters of size ``kh×kw`` per channel, 1×1 mixing to
    ``r_out``, 1×1 to ``cout``. ``ranks = (r_out, r_in, r_space)`` with ``r_space <= kh·kw``; the
    other options are :class:`MultilinearALS`'s, plus ``hooi_steps`` (HOOI iterations of the
    Frobenius start).

    >>> import jax, sigmadecomp as sd
    >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))
    >>> sol = sd.decompose(kernel, sd.Tucker3ALS((8, 6, 4), max_steps=5))
    >>> sol.value.core.shape, sol.value.spatial_factor.shape
    ((8, 6, 4), (3, 3, 4))
    """

    hooi_steps: int = 5

    bonds = ((0, 1, 1, 0), (1, 1, 2, 1), (1, 2, 3, 1))
    output = (0, 0)
    input = (2, 0)

    def __post_init__(self):
        if isinstance(self.ranks, (int, str)) or len(tuple(self.ranks)) != 3:
            raise ValueError(f"Tucker3ALS: ranks must be (r_out, r_in, r_space); got {self.ranks!r}.")
        super().__post_init__()
        check_positive_int("Tucker3ALS", "hooi_steps", self.hooi_steps, minimum=0)

    def check(self, kernel_shape: tuple) -> None:
        kh, kw, cin, cout = kernel_dims(kernel_shape)
        names = ("r_out", "r_in", "r_space")
        for name, rank, mode, size in zip(names, self.ranks, ("cout", "cin", "kh·kw"), (cout, cin, kh * kw)):
            check_rank_fits("Tucker3ALS", f"ranks ({name})", rank, mode, size, kernel_shape)
        # A rank above the product of the other two cannot be reached by the core (its unfolding
        # has fewer columns): it stores factor columns that change nothing, as in Tucker2ALS.
        for k, name in enumerate(names):
            (a, ra), (b, rb) = [(n, r) for j, (n, r) in enumerate(zip(names, self.ranks)) if j != k]
            check_rank_fits("Tucker3ALS", f"ranks ({name})", self.ranks[k], f"{a}·{b} (core unfolding)", ra * rb,
                            kernel_shape)

    def core_shapes(self, kernel_shape: tuple) -> tuple:
        kh, kw, cin, cout = kernel_dims(kernel_shape)
        r_out, r_in, r_space = self.ranks
        return ((cout, r_out), (r_out, r_in, r_space), (cin, r_in), (kh * kw, r_space))

    def contract(self, cores: tuple, kernel_shape: tuple):
        out, core, inp, space = cores
        w = jnp.einsum("oa,abs,cb,ps->ocp", out, core, inp, space, precision=HIGHEST)
        return w.reshape(w.shape[0], -1)

    def initialise(self, matrix, kernel_shape: tuple, key) -> tuple:
        del key
        kh, kw, cin, cout = kernel_dims(kernel_shape)
        t = matrix.reshape(cout, cin, kh * kw)
        r_out, r_in, r_space = self.ranks
        unfold = lambda x, mode: jnp.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)  # noqa: E731
        factors = [left_basis(unfold(t, m), r) for m, r in enumerate(self.ranks)]

        def hooi(_, factors):
            for mode, rank in enumerate(self.ranks):
                y = t
                for other in range(3):
                    if other != mode:
                        y = jnp.moveaxis(jnp.tensordot(y, factors[other], axes=(other, 0),
                                                       precision=HIGHEST), -1, other)
                factors[mode] = left_basis(unfold(y, mode), rank)
            return factors

        u_out, u_in, u_space = jax.lax.fori_loop(0, self.hooi_steps, hooi, factors)
        core = jnp.einsum("ocp,oa,cb,ps->abs", t, u_out, u_in, u_space, precision=HIGHEST)
        return (u_out, core, u_in, u_space)

    def to_factorized(self, cores: tuple, kernel_shape: tuple) -> Tucker3:
        out, core, inp, space = cores
        kh, kw = kernel_dims(kernel_shape)[:2]
        space = tuple(space) if isinstance(space, tuple) else space.reshape(kh, kw, -1)
        if isinstance(space, tuple):  # shapes only (init_shapes)
            space = (kh, kw, space[1])
        return Tucker3(core, inp, space, out, kernel_shape=tuple(kernel_shape))

    def from_factorized(self, value: Tucker3) -> tuple:
        space = value.spatial_factor
        return (value.out_factor, value.core, value.in_factor, space.reshape(-1, space.shape[-1]))
