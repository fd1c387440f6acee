"""Registry entries ``r-cp``, ``r-tucker``, ``r-tt``, ``r-tr``: reshaped conv kernels (issue 15).

Plans store only ranks, so planned layers use the deterministic :func:`default_modes` (``m = 3``
balanced channel modes; the number of ranks fixes the rest). Fits with other modes go through
the solvers' ``in_modes``/``out_modes`` and the layers directly; such layers cannot be re-planned
from ranks (save/load of a plan uses the default modes).

Rank for a ratio: one rank ``r`` for every bond (clipped to what each bond can hold), the
largest whose parameter count is at most ``ratio`` × the dense kernel's; at least 1.
"""

from __future__ import annotations

import math

from sigmadecomp import _reshaped as rs
from sigmadecomp.formats._registry import FormatSpec, register
from sigmadecomp.layers._reshaped import RCPConv, RTRConv, RTTConv, RTuckerConv, count_reshaped
from sigmadecomp.solvers._reshaped import RCPALS, RTRALS, RTTALS, RTuckerALS

__all__ = ["reshaped_ranks_for_ratio"]

SOLVERS = {"r-cp": RCPALS, "r-tucker": RTuckerALS, "r-tt": RTTALS, "r-tr": RTRALS}
LAYERS = {"r-cp": RCPConv, "r-tucker": RTuckerConv, "r-tt": RTTConv, "r-tr": RTRConv}
RANK_NAMES = {"r-cp": ("R",), "r-tucker": ("r0", "r1", "r2", "r3"), "r-tt": ("r1", "r2", "r3"),
              "r-tr": ("r0", "r1", "r2", "r3")}
DESCRIPTIONS = {
    "r-cp": "reshaped CP: cin, cout as 3 balanced modes each, CP of (kh·kw, s1t1, s2t2, s3t3)",
    "r-tucker": "reshaped Tucker of (kh·kw, s1t1, s2t2, s3t3), ranks (r0, r1, r2, r3)",
    "r-tt": "reshaped TT, spatial core first (Garipov TT-conv) over (kh·kw, s1t1, s2t2, s3t3)",
    "r-tr": "reshaped tensor ring over (kh·kw, s1t1, s2t2, s3t3), closing rank r0",
}


def _modes(kind, kernel_shape, modes):
    """``(in_modes, out_modes)``: the given ones, or the registry's defaults (m = 3)."""
    if modes is not None:
        return rs.check_modes(kernel_shape, *modes)
    z = rs.zeros(kind, kernel_shape, (1,) * len(RANK_NAMES[kind]))
    return z.in_modes, z.out_modes


def _caps(kind, kernel_shape, modes) -> tuple:
    """The largest useful value of each rank (the bond's smaller side; r-CP and r-TR: none)."""
    kh, kw, _, _ = rs.kernel_dims(kernel_shape)
    in_modes, out_modes = modes
    dims = (kh * kw,) + tuple(s * t for s, t in zip(in_modes, out_modes))
    if kind == "r-tt":
        return tuple(min(math.prod(dims[: j + 1]), math.prod(dims[j + 1:])) for j in range(len(dims) - 1))
    if kind == "r-tucker":
        return dims
    return (math.inf,) * (1 if kind == "r-cp" else len(dims))  # r-TR: one rank per core


def _ranks_at(kind, kernel_shape, modes, r: int) -> tuple:
    return tuple(int(min(r, c)) for c in _caps(kind, kernel_shape, modes))


def _fits(kind, kernel_shape, modes, ranks, budget) -> bool:
    caps = _caps(kind, kernel_shape, modes)
    in_modes, out_modes = modes
    if any(r > c for r, c in zip(ranks, caps)) or count_reshaped(
            kind, tuple(kernel_shape), tuple(ranks), in_modes=in_modes, out_modes=out_modes).params > budget:
        return False
    try:
        SOLVERS[kind](tuple(ranks), in_modes=in_modes, out_modes=out_modes).check(tuple(kernel_shape))
    except ValueError:
        return False
    return True


def reshaped_ranks_for_ratio(kind: str, kernel_shape, ratio: float, *, groups: int = 1, kernel=None,
                             in_modes=None, out_modes=None) -> tuple:
    """The largest uniform rank (clipped to each bond) with at most ``ratio`` of the kernel's
    parameters, then single bonds raised by one in turn while the budget allows; at least 1.
    ``in_modes`` / ``out_modes`` (both or neither): another factorisation of the channels than the
    default (e.g. m = 2 modes), for the solvers' and layers' modes of the same names; the number
    of ranks follows from m.

    >>> reshaped_ranks_for_ratio("r-tt", (3, 3, 64, 64), 0.1)
    (9, 11, 10)
    >>> reshaped_ranks_for_ratio("r-tt", (3, 3, 64, 64), 0.1, in_modes=(8, 8), out_modes=(8, 8))
    (7, 7)
    """
    del kernel
    if groups != 1:
        raise ValueError(f"{kind}: reshaped formats do not support grouped convs (groups={groups})")
    if (in_modes is None) != (out_modes is None):
        raise ValueError(f"{kind}: give both in_modes and out_modes, or neither")
    modes = _modes(kind, kernel_shape, None if in_modes is None else (in_modes, out_modes))
    budget = ratio * math.prod(kernel_shape)

    def at(r):
        return _ranks_at(kind, kernel_shape, modes, r)

    r = 1
    while at(r + 1) != at(r) and _fits(kind, kernel_shape, modes, at(r + 1), budget):
        r += 1
    ranks, grown = list(at(r)), True
    while grown:
        grown = False
        for j in range(len(ranks)):
            trial = ranks[:j] + [ranks[j] + 1] + ranks[j + 1:]
            if _fits(kind, kernel_shape, modes, tuple(trial), budget):
                ranks, grown = trial, True
    return tuple(ranks)


class ReshapedSpec(FormatSpec):
    """Placeholders carry the default modes (plans store ranks only)."""

    def placeholder(self, kernel_shape, ranks, dtype):
        return rs.zeros(self.name, tuple(kernel_shape), tuple(ranks), dtype)


def _spec(kind: str) -> FormatSpec:
    def shapes(kernel_shape, ranks):
        z = rs.zeros(kind, kernel_shape, ranks)
        return {f"core_{k}": tuple(c.shape) for k, c in enumerate(z.cores)}

    def count(kernel_shape, ranks, *, groups=1, bias=False, in_spatial=None, out_spatial=None):
        return count_reshaped(kind, tuple(kernel_shape), tuple(ranks), groups=groups, bias=bias,
                              in_spatial=in_spatial, out_spatial=out_spatial)

    def check(kernel_shape, ranks):
        if len(tuple(kernel_shape)) != 4:
            raise ValueError(f"format {kind!r} is for conv kernels (kh, kw, cin, cout); got {tuple(kernel_shape)}")
        SOLVERS[kind](tuple(ranks)).check(tuple(kernel_shape))

    return ReshapedSpec(
        name=kind, factorized=rs.CLASSES[kind], layer=LAYERS[kind], rank_names=RANK_NAMES[kind],
        factor_shapes=shapes, count=count,
        rank_for_ratio=lambda kernel_shape, ratio, *, groups=1, kernel=None: reshaped_ranks_for_ratio(
            kind, kernel_shape, ratio, groups=groups),
        solver=lambda ranks, **options: SOLVERS[kind](tuple(ranks), **options), check_ranks=check,
        expand_rank=None if kind == "r-cp" else (lambda r, n=len(RANK_NAMES[kind]): (r,) * n),
        description=DESCRIPTIONS[kind],
    )


for _kind in ("r-cp", "r-tucker", "r-tt", "r-tr"):
    register(_spec(_kind))
