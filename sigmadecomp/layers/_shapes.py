"""Factor shapes of each format, derived from a kernel shape and ranks: used to check the
factorized kernels a layer receives and to build placeholders when loading a saved model."""

from __future__ import annotations

import jax.numpy as jnp

from sigmadecomp._factorized import CP, CP3, LowRank, Tucker2

__all__ = ["FORMATS", "check_factorized", "factor_shapes", "placeholder", "ranks_of"]

FORMATS = {"svd": LowRank, "tucker2": Tucker2, "cp": CP, "cp3": CP3}


def factor_shapes(format: str, kernel_shape, ranks) -> dict:
    """Field name → shape of every factor of ``format`` for ``kernel_shape`` (one group) and ``ranks``.

    >>> factor_shapes("tucker2", (3, 3, 16, 32), (8, 4))["core"]
    (3, 3, 4, 8)
    """
    shape = tuple(kernel_shape)
    kh, kw, cin, cout = (1, 1) + shape if len(shape) == 2 else shape
    if format == "svd":
        (r,) = ranks
        return dict(in_kernel=(kh, kw, cin, r), out_factor=(r, cout))
    if format == "tucker2":
        r_out, r_in = ranks
        return dict(core=(kh, kw, r_in, r_out), in_factor=(cin, r_in), out_factor=(cout, r_out))
    (r,) = ranks
    if format == "cp":
        return dict(out_factor=(cout, r), in_factor=(cin, r), kh_factor=(kh, r), kw_factor=(kw, r))
    if format == "cp3":
        return dict(out_factor=(cout, r), in_factor=(cin, r), spatial_factor=(kh, kw, r))
    raise ValueError(f"unknown format {format!r}; expected one of {sorted(FORMATS)}")


def format_of(factorized) -> str:
    for name, cls in FORMATS.items():
        if isinstance(factorized, cls):
            return name
    raise ValueError(f"expected LowRank, Tucker2, CP or CP3; got {type(factorized).__name__}")


def ranks_of(factorized) -> tuple:
    """``(r,)`` for LowRank/CP/CP3, ``(r_out, r_in)`` for Tucker2."""
    if isinstance(factorized, Tucker2):
        return tuple(factorized.ranks)
    return (factorized.rank,)


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
    shapes = factor_shapes(format, kernel_shape, ranks)
    arrays = {k: jnp.zeros(s, dtype) for k, s in shapes.items()}
    return FORMATS[format](**arrays, kernel_shape=tuple(kernel_shape))

