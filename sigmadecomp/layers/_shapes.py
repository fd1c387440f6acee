"""Factor shapes of each format, derived from a kernel shape and ranks (read from the format
registry): used to check the factorized kernels a layer receives and to build placeholders when
loading a saved model."""

from __future__ import annotations

import jax.numpy as jnp

from sigmadecomp.formats._registry import get, spec_of

__all__ = ["check_factorized", "factor_shapes", "format_of", "placeholder", "ranks_of"]


def factor_shapes(format: str, kernel_shape, ranks) -> dict:
    """Field name → shape of every factor of ``format`` for ``kernel_shape`` (one group) and ``ranks``.

    >>> factor_shapes("tucker2", (3, 3, 16, 32), (8, 4))["core"]
    (3, 3, 4, 8)
    """
    spec = get(format)
    return spec.factor_shapes(tuple(kernel_shape), spec.normalize_ranks(ranks))


def format_of(factorized) -> str:
    return spec_of(factorized).name


def ranks_of(factorized) -> tuple:
    """``(r,)`` for LowRank/CP/CP3, ``(r_out, r_in)`` for Tucker2, the rank tuple otherwise."""
    return spec_of(factorized).ranks_of(factorized)


def check_factorized(factorized) -> None:
    """``ValueError`` when the factor shapes do not fit ``kernel_shape`` and the format."""
    fmt = format_of(factorized)
    want = factor_shapes(fmt, factorized.kernel_shape, ranks_of(factorized))
    got = {k: tuple(getattr(factorized, k).shape) for k in want}
    if got != want:
        raise ValueError(
            f"{type(factorized).__name__} with kernel_shape {tuple(factorized.kernel_shape)} and ranks "
            f"{ranks_of(factorized)} needs factors {want}; got {got}"
        )


def placeholder(format: str, kernel_shape, ranks, dtype=jnp.float32):
    """A factorized kernel of zeros with the right shapes (to be overwritten by loaded weights)."""
    spec = get(format)
    return spec.placeholder(kernel_shape, spec.normalize_ranks(ranks), dtype)
