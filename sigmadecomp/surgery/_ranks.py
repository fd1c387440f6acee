"""Ranks that meet a target parameter ratio, one documented rule per format.

``ratio`` is the parameter count of the factorized kernel over that of the dense kernel (biases
are left out: they are kept unchanged). ``kernel_shape`` is the layer's Flax kernel
``(kh, kw, cin // groups, cout)`` or ``(in, out)``; ranks are per group. Every rule rounds
**down** (the result never exceeds the target) and returns at least rank 1, so a tiny ratio on a
small layer can overshoot; :func:`sigmadecomp.surgery.plan` records the exact counts.
"""

from __future__ import annotations

import math

__all__ = ["cp3_rank_for_ratio", "cp_rank_for_ratio", "rank_for_ratio", "svd_rank_for_ratio",
           "tucker2_ranks_for_ratio"]

_EPS = 1e-9  # keeps floor() from losing a whole rank to rounding when the target is hit exactly


def _dims(kernel_shape, ratio, groups):
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1] (factorized / dense parameters); got {ratio!r}")
    shape = tuple(int(s) for s in kernel_shape)
    if len(shape) == 2:
        shape = (1, 1) + shape
    if len(shape) != 4 or min(shape) < 1 or shape[3] % groups:
        raise ValueError(f"kernel_shape must be (kh, kw, cin // groups, cout) with cout divisible by "
                         f"groups={groups}, or (in, out); got {tuple(kernel_shape)}")
    kh, kw, cin, cout = shape
    return kh, kw, cin, cout // groups


def svd_rank_for_ratio(kernel_shape, ratio: float, *, groups: int = 1) -> int:
    """``r = ⌊ratio · kh·kw·cin·cout / (kh·kw·cin + cout)⌋``, clipped to
    ``[1, min(cout, kh·kw·cin)]`` (the full rank).

    >>> svd_rank_for_ratio((3, 3, 64, 64), 0.5)
    28
    """
    kh, kw, cin, cout = _dims(kernel_shape, ratio, groups)
    d = kh * kw * cin
    return max(1, min(math.floor(ratio * d * cout / (d + cout) + _EPS), min(d, cout)))


def tucker2_ranks_for_ratio(kernel_shape, ratio: float, *, groups: int = 1) -> tuple[int, int]:
    """``(r_out, r_in) = ⌊α·(cout, cin)⌋`` (ranks proportional to the channel counts), with ``α``
    the largest value for which the Tucker-2 count ``α·(cin² + cout²) + α²·kh·kw·cin·cout`` stays
    within ``ratio · kh·kw·cin·cout`` (the positive root of that quadratic); each clipped to
    ``[1, mode size]`` and to at most the other rank times ``kh·kw``.

    >>> tucker2_ranks_for_ratio((3, 3, 64, 64), 0.5)
    (38, 38)
    """
    kh, kw, cin, cout = _dims(kernel_shape, ratio, groups)
    dense = kh * kw * cin * cout
    b = cin * cin + cout * cout
    alpha = (-b + math.sqrt(b * b + 4.0 * dense * ratio * dense)) / (2.0 * dense)
    r_out = max(1, min(math.floor(alpha * cout + _EPS), cout))
    r_in = max(1, min(math.floor(alpha * cin + _EPS), cin))
    # Neither rank may exceed the other times kh·kw (the core unfolding): the excess would make
    # an ALS step singular and store parameters that change nothing (Tucker2ALS rejects it).
    return min(r_out, r_in * kh * kw), min(r_in, r_out * kh * kw)


def cp_rank_for_ratio(kernel_shape, ratio: float, *, groups: int = 1) -> int:
    """``R = ⌊ratio · kh·kw·cin·cout / (cout + cin + kh + kw)⌋``, at least 1.

    >>> cp_rank_for_ratio((3, 3, 64, 64), 0.1)
    27
    """
    kh, kw, cin, cout = _dims(kernel_shape, ratio, groups)
    return max(1, math.floor(ratio * kh * kw * cin * cout / (cout + cin + kh + kw) + _EPS))


def cp3_rank_for_ratio(kernel_shape, ratio: float, *, groups: int = 1) -> int:
    """``R = ⌊ratio · kh·kw·cin·cout / (cout + cin + kh·kw)⌋``, at least 1.

    >>> cp3_rank_for_ratio((3, 3, 64, 64), 0.1)
    26
    """
    kh, kw, cin, cout = _dims(kernel_shape, ratio, groups)
    return max(1, math.floor(ratio * kh * kw * cin * cout / (cout + cin + kh * kw) + _EPS))


_RULES = {"svd": svd_rank_for_ratio, "tucker2": tucker2_ranks_for_ratio,
          "cp": cp_rank_for_ratio, "cp3": cp3_rank_for_ratio}


def rank_for_ratio(format: str, kernel_shape, ratio: float, *, groups: int = 1) -> tuple[int, ...]:
    """The rule of ``format`` as a tuple: ``(r,)``, or ``(r_out, r_in)`` for Tucker-2.

    >>> rank_for_ratio("tucker2", (3, 3, 16, 32), 0.25)
    (12, 6)
    """
    if format not in _RULES:
        raise ValueError(f"unknown format {format!r}; expected one of {sorted(_RULES)}")
    ranks = _RULES[format](kernel_shape, ratio, groups=groups)
    return tuple(ranks) if isinstance(ranks, tuple) else (ranks,)
