"""The built-in formats: one :func:`register` call each (imported lazily by the registry)."""

from __future__ import annotations

from sigmadecomp._factorized import CP, CP3, TR, TT, LowRank, Tucker2, Tucker3
from sigmadecomp.formats._registry import FormatSpec, register
from sigmadecomp.layers._counts import count_cp, count_cp3, count_lowrank, count_tucker2
from sigmadecomp.layers._cp import CP3Conv, CPConv
from sigmadecomp.layers._lowrank import LowRankConv, LowRankDense
from sigmadecomp.layers._tr import TRConv, count_tr
from sigmadecomp.layers._tt import TTConv, count_tt
from sigmadecomp.layers._tucker2 import Tucker2Conv
from sigmadecomp.layers._tucker3 import Tucker3Conv, count_tucker3
from sigmadecomp.solvers import CPALS, SVD, TRALS, TTALS, Tucker2ALS, Tucker3ALS
from sigmadecomp.surgery import _ranks


def _dims(kernel_shape):
    shape = tuple(kernel_shape)
    return (1, 1) + shape if len(shape) == 2 else shape


def _single(count):
    """The single-rank count functions take an int rank."""
    return lambda kernel_shape, ranks, **kw: count(kernel_shape, ranks[0], **kw)


def _no_kernel(rule):
    return lambda kernel_shape, ratio, *, groups=1, kernel=None: rule(kernel_shape, ratio, groups=groups)


def _solver_check(make):
    """Rank bounds checked by the format's own solver configuration (its messages name the mode)."""
    return lambda kernel_shape, ranks: make(tuple(ranks)).check(tuple(kernel_shape))


def _check_svd(kernel_shape, ranks):
    kh, kw, cin, cout = _dims(kernel_shape)
    if ranks[0] > min(cout, kh * kw * cin):
        raise ValueError(f"rank {ranks[0]} exceeds the full rank min(cout, kh·kw·cin) = "
                         f"{min(cout, kh * kw * cin)} of the kernel {tuple(kernel_shape)} (per group)")


def _check_tucker2(kernel_shape, ranks):
    kh, kw, cin, cout = _dims(kernel_shape)
    if ranks[0] > cout or ranks[1] > cin:
        raise ValueError(f"Tucker-2 ranks (r_out, r_in) = {tuple(ranks)} exceed the mode sizes "
                         f"(cout, cin) = {(cout, cin)} of the kernel {tuple(kernel_shape)} (per group)")
    if ranks[0] > ranks[1] * kh * kw or ranks[1] > ranks[0] * kh * kw:
        raise ValueError(f"Tucker-2 ranks (r_out, r_in) = {tuple(ranks)}: neither may exceed the other "
                         f"times kh·kw = {kh * kw} (the core unfolding; the excess is wasted and makes "
                         f"the fit singular); lower the larger one")


def _shapes(fn):
    return lambda kernel_shape, ranks: fn(*_dims(kernel_shape), *ranks)


register(FormatSpec(
    name="svd", factorized=LowRank, layer=LowRankConv, dense_layer=LowRankDense, rank_names=("r",),
    factor_shapes=_shapes(lambda kh, kw, cin, cout, r: dict(in_kernel=(kh, kw, cin, r), out_factor=(r, cout))),
    count=_single(count_lowrank), rank_for_ratio=_no_kernel(_ranks.svd_rank_for_ratio),
    solver=lambda ranks, **options: SVD(ranks[0]), check_ranks=_check_svd,
    description="truncated SVD of the cout × (kh·kw·cin) matrix: kh×kw conv to r, 1×1 to cout",
))
register(FormatSpec(
    name="tucker2", factorized=Tucker2, layer=Tucker2Conv, rank_names=("r_out", "r_in"),
    factor_shapes=_shapes(lambda kh, kw, cin, cout, r_out, r_in: dict(
        core=(kh, kw, r_in, r_out), in_factor=(cin, r_in), out_factor=(cout, r_out))),
    count=count_tucker2, rank_for_ratio=_no_kernel(_ranks.tucker2_ranks_for_ratio),
    solver=lambda ranks, **options: Tucker2ALS(tuple(ranks), **options), check_ranks=_check_tucker2,
    expand_rank=lambda r: (r, r),
    description="Tucker-2 over cout, cin: 1×1, kh×kw core, 1×1",
))
register(FormatSpec(
    name="cp", factorized=CP, layer=CPConv, rank_names=("R",),
    factor_shapes=_shapes(lambda kh, kw, cin, cout, r: dict(
        out_factor=(cout, r), in_factor=(cin, r), kh_factor=(kh, r), kw_factor=(kw, r))),
    count=_single(count_cp), rank_for_ratio=_no_kernel(_ranks.cp_rank_for_ratio),
    solver=lambda ranks, **options: CPALS(ranks[0], **options),
    check_ranks=_solver_check(lambda r: CPALS(r[0])),
    description="CP over cout, cin, kh, kw: 1×1, depthwise kh×1 and 1×kw, 1×1",
))
register(FormatSpec(
    name="cp3", factorized=CP3, layer=CP3Conv, rank_names=("R",),
    factor_shapes=_shapes(lambda kh, kw, cin, cout, r: dict(
        out_factor=(cout, r), in_factor=(cin, r), spatial_factor=(kh, kw, r))),
    count=_single(count_cp3), rank_for_ratio=_no_kernel(_ranks.cp3_rank_for_ratio),
    solver=lambda ranks, **options: CPALS(ranks[0], merge_spatial=True, **options),
    check_ranks=_solver_check(lambda r: CPALS(r[0], merge_spatial=True)),
    description="CP with the spatial modes merged: 1×1, depthwise kh×kw, 1×1",
))
register(FormatSpec(
    name="tucker3", factorized=Tucker3, layer=Tucker3Conv, rank_names=("r_out", "r_in", "r_space"),
    factor_shapes=_shapes(lambda kh, kw, cin, cout, r_out, r_in, r_space: dict(
        core=(r_out, r_in, r_space), in_factor=(cin, r_in), spatial_factor=(kh, kw, r_space),
        out_factor=(cout, r_out))),
    count=count_tucker3, rank_for_ratio=_ranks.tucker3_ranks_for_ratio,
    solver=lambda ranks, **options: Tucker3ALS(tuple(ranks), **options),
    check_ranks=_solver_check(Tucker3ALS),
    description="Tucker-3 over cout, cin, kh·kw: 1×1, r_space kh×kw basis filters, 1×1 mix, 1×1",
))
register(FormatSpec(
    name="tt", factorized=TT, layer=TTConv, rank_names=("r1", "r2", "r3"),
    factor_shapes=_shapes(lambda kh, kw, cin, cout, r1, r2, r3: dict(
        in_core=(cin, r1), kh_core=(r1, kh, r2), kw_core=(r2, kw, r3), out_core=(r3, cout))),
    count=count_tt, rank_for_ratio=_ranks.tt_ranks_for_ratio,
    solver=lambda ranks, **options: TTALS(tuple(ranks), **options), check_ranks=_solver_check(TTALS),
    description="tensor train cin → kh → kw → cout: 1×1, kh×1, 1×kw, 1×1",
))
register(FormatSpec(
    name="tr", factorized=TR, layer=TRConv, rank_names=("r0", "r1", "r2", "r3"),
    factor_shapes=_shapes(lambda kh, kw, cin, cout, r0, r1, r2, r3: dict(
        in_core=(r0, cin, r1), kh_core=(r1, kh, r2), kw_core=(r2, kw, r3), out_core=(r3, cout, r0))),
    count=count_tr, rank_for_ratio=_ranks.tr_ranks_for_ratio,
    solver=lambda ranks, **options: TRALS(tuple(ranks), **options), check_ranks=_solver_check(TRALS),
    description="tensor ring (closing rank r0): 1×1 to r0·r1, kh×1, 1×kw shared over r0, 1×1",
))
from sigmadecomp.formats import _ttmatrix  # noqa: E402,F401  (tt-matrix: dense layers, issue 16)
from sigmadecomp.formats import _reshaped  # noqa: E402,F401  (r-cp, r-tucker, r-tt, r-tr: issue 15)
