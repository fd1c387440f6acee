"""Leading subspaces for the engine formats' Frobenius starts (HOSVD, HOOI, TT-SVD, TR-SVD)."""

from __future__ import annotations

import jax.numpy as jnp

from sigmadecomp.solvers._numerics import mm

__all__ = ["left_basis"]


def left_basis(a, rank: int):
    """Orthonormal basis ``(m, rank)`` of the top-``rank`` left singular subspace of ``a (m, n)``.

    Why eigh of the smaller Gram matrix: only the leading subspace is needed, and it is much
    cheaper than an SVD of a wide unfolding. ``rank`` must be ``<= m``."""
    rows, cols = a.shape
    if rows <= cols or rank > cols:  # (rank > cols: a·aᵀ's eigenvectors complete the basis)
        return jnp.linalg.eigh(mm(a, a.T))[1][:, ::-1][:, :rank]
    vecs = jnp.linalg.eigh(mm(a.T, a))[1][:, ::-1][:, :rank]
    return jnp.linalg.qr(mm(a, vecs))[0]
