"""Registry entry ``tt-matrix``: dense layers (``nnx.Linear``) as TT-matrices with 3 cores.

Plans store only ranks, so the modes are the deterministic :func:`balanced_modes` of ``in`` and
``out`` with ``len(ranks) + 1`` factors (``ranks`` ``(r1, r2)``, or one int for both). Fits with
other modes go through :func:`sigmadecomp.to_tt`; their layers cannot be re-planned from ranks.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from sigmadecomp._ttmatrix import TTMatrix, balanced_modes, check_tt_config, tt_rank_for_ratio
from sigmadecomp.formats._registry import FormatSpec, register
from sigmadecomp.layers._ttmatrix import TTLinear, count_tt_matrix
from sigmadecomp.solvers._ttmatrix import TTMatrixALS

NUM_CORES = 3


def _modes(kernel_shape, num_cores=NUM_CORES):
    if len(kernel_shape) != 2:
        raise ValueError(f"format 'tt-matrix' is for dense layers (nnx.Linear, kernel (in, out)); got kernel shape {tuple(kernel_shape)}")
    return balanced_modes(int(kernel_shape[0]), num_cores), balanced_modes(int(kernel_shape[1]), num_cores)


def _check(kernel_shape, ranks):
    check_tt_config("tt-matrix", tuple(kernel_shape), *_modes(kernel_shape, len(ranks) + 1), tuple(ranks))


def _shapes(kernel_shape, ranks):
    in_modes, out_modes = _modes(kernel_shape, len(ranks) + 1)
    full = (1, *ranks, 1)
    return {f"core_{k}": (full[k], m, n, full[k + 1]) for k, (m, n) in enumerate(zip(in_modes, out_modes))}


def _count(kernel_shape, ranks, *, groups=1, bias=True, in_spatial=None, out_spatial=()):
    del groups, in_spatial
    in_modes, out_modes = _modes(kernel_shape, len(ranks) + 1)
    return count_tt_matrix(in_modes, out_modes, ranks, bias=bias, tokens=math.prod(out_spatial or ()))


def _rank_for_ratio(kernel_shape, ratio, *, groups=1, kernel=None):
    return tt_rank_for_ratio(*_modes(kernel_shape), ratio)


class TTMatrixSpec(FormatSpec):
    def placeholder(self, kernel_shape, ranks, dtype):
        in_modes, out_modes = _modes(kernel_shape, len(ranks) + 1)
        cores = tuple(jnp.zeros(s, dtype) for s in _shapes(kernel_shape, ranks).values())
        return TTMatrix(cores, in_modes, out_modes)


register(TTMatrixSpec(
    name="tt-matrix", factorized=TTMatrix, layer=TTLinear, dense_layer=TTLinear, rank_names=("r1", "r2"),
    factor_shapes=_shapes, count=_count, rank_for_ratio=_rank_for_ratio,
    solver=lambda ranks, **options: TTMatrixALS(ranks=tuple(ranks), num_cores=len(ranks) + 1, **options),
    check_ranks=_check, expand_rank=lambda r: (r, r),
    description="TT-matrix of a dense (in, out) kernel, 3 cores, balanced modes (dense layers only)",
))
