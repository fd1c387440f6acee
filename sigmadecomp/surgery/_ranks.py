"""Ranks that meet a target parameter ratio, one documented rule per format.

``ratio`` is the parameter count of the factorized kernel over that of the dense kernel (biases
are left out: they are kept unchanged). ``kernel_shape`` is the layer's Flax kernel
``(kh, kw, cin // groups, cout)`` or ``(in, out)``; ranks are per group. Every rule rounds
**down** (the result never exceeds the target) and returns at least rank 1, so a tiny ratio on a
small layer can overshoot; :func:`sigmadecomp.surgery.plan` records the exact counts.
"""

from __future__ import annotations

import math

import numpy as np

from sigmadecomp.formats._registry import floor_rank, get, largest_scale

__all__ = ["cp3_rank_for_ratio", "cp_rank_for_ratio", "rank_for_ratio", "svd_rank_for_ratio",
           "tr_ranks_for_ratio", "tt_ranks_for_ratio", "tucker2_ranks_for_ratio",
           "tucker3_ranks_for_ratio"]

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


def _mode_spectra(kernel, kh, kw, cin, cout):
    """Squared singular values of the ``cout``, ``cin`` and ``kh·kw`` unfoldings (descending)."""
    t = np.asarray(kernel, np.float64).reshape(kh * kw, cin, cout)
    t = np.transpose(t, (2, 1, 0))  # (cout, cin, P)
    return [np.sort(np.clip(np.linalg.eigvalsh(np.tensordot(t, t, axes=(others, others))), 0, None))[::-1]
            for others in ((1, 2), (0, 2), (0, 1))]


def _energy_rank(spectrum, fraction: float) -> int:
    """The fewest leading singular values holding ``fraction`` of the mode's energy."""
    total = float(spectrum.sum())
    if total <= 0:
        return 1
    return int(min(len(spectrum), 1 + np.searchsorted(np.cumsum(spectrum) / total, fraction - 1e-12)))


def tucker3_ranks_for_ratio(kernel_shape, ratio: float, *, groups: int = 1, kernel=None) -> tuple[int, int, int]:
    """``(r_out, r_in, r_space)`` for Tucker-3 (modes ``cout``, ``cin``, ``kh·kw``).

    With ``kernel`` (the layer's weights, one group; the Tucker seed's rule) each mode's rank is
    read from its singular values: the fewest that keep a fraction ``τ`` of that mode's energy,
    with ``τ`` the largest value whose count ``cin·r_in + kh·kw·r_space + r_out·r_in·r_space +
    cout·r_out`` fits ``ratio · kh·kw·cin·cout``. Without it, ranks ``⌊α·(cout, cin, kh·kw)⌋``
    with the largest such ``α``. Each rank is at least 1 and at most its mode.

    >>> tucker3_ranks_for_ratio((3, 3, 64, 64), 0.5)
    (45, 45, 6)
    """
    kh, kw, cin, cout = _dims(kernel_shape, ratio, groups)
    p = kh * kw

    def params(r):
        return cin * r[1] + p * r[2] + r[0] * r[1] * r[2] + cout * r[0]

    if kernel is None:
        ranks = lambda a: (floor_rank(a * cout, cout), floor_rank(a * cin, cin), floor_rank(a * p, p))  # noqa: E731
    else:
        spectra = _mode_spectra(kernel, kh, kw, cin, cout)
        ranks = lambda a: tuple(_energy_rank(s, a) for s in spectra)  # noqa: E731
    budget = ratio * p * cin * cout
    return _core_reachable(ranks(largest_scale(lambda a: params(_core_reachable(ranks(a))), budget)))


def _core_reachable(ranks: tuple) -> tuple:
    """Tucker ranks with none above the product of the others (Tucker3ALS rejects the excess:
    the core cannot reach it); lowering one never raises another, so this settles in a few passes."""
    ranks = list(ranks)
    while True:
        lowered = [min(r, math.prod(ranks[:k] + ranks[k + 1:])) for k, r in enumerate(ranks)]
        if lowered == ranks:
            return tuple(ranks)
        ranks = lowered


def tt_ranks_for_ratio(kernel_shape, ratio: float, *, groups: int = 1, kernel=None) -> tuple[int, int, int]:
    """``(r1, r2, r3) = ⌊α·(cin, √(cin·cout), cout)⌋`` with ``r2 <= min(r1·kh, r3·kw)``, ``α``
    the largest value whose count ``cin·r1 + r1·kh·r2 + r2·kw·r3 + r3·cout`` fits
    ``ratio · kh·kw·cin·cout`` (``kernel`` is not used).

    >>> tt_ranks_for_ratio((3, 3, 64, 64), 0.5)
    (45, 45, 45)
    """
    del kernel
    kh, kw, cin, cout = _dims(kernel_shape, ratio, groups)

    def ranks(a):
        r1, r3 = floor_rank(a * cin, cin), floor_rank(a * cout, cout)
        return r1, floor_rank(a * math.sqrt(cin * cout), min(r1 * kh, r3 * kw)), r3

    def params(r):
        return cin * r[0] + r[0] * kh * r[1] + r[1] * kw * r[2] + r[2] * cout

    return ranks(largest_scale(lambda a: params(ranks(a)), ratio * kh * kw * cin * cout))


def tr_ranks_for_ratio(kernel_shape, ratio: float, *, groups: int = 1, kernel=None) -> tuple[int, int, int, int]:
    """``(r0, r1, r2, r3)``: closing rank ``r0 = min(2, cin)``, then ``⌊α·(cin/r0, √(cin·cout),
    cout)⌋`` as for TT (clipped to the TR-SVD limits ``r0·r1 <= cin``, ``r2 <= r1·kh``,
    ``r3 <= r2·kw``), ``α`` the largest value whose count ``r0·cin·r1 + r1·kh·r2 + r2·kw·r3 +
    r3·cout·r0`` fits ``ratio · kh·kw·cin·cout`` (``kernel`` is not used).

    >>> tr_ranks_for_ratio((3, 3, 64, 64), 0.5)
    (2, 23, 46, 46)
    """
    del kernel
    kh, kw, cin, cout = _dims(kernel_shape, ratio, groups)
    r0 = min(2, cin)

    def ranks(a):
        r1, r3 = floor_rank(a * cin / r0, cin // r0), floor_rank(a * cout, cout * r0)
        r2 = floor_rank(a * math.sqrt(cin * cout), min(r1 * kh, r3 * kw))
        return r0, r1, r2, min(r3, r2 * kw)

    def params(r):
        return r[0] * cin * r[1] + r[1] * kh * r[2] + r[2] * kw * r[3] + r[3] * cout * r[0]

    return ranks(largest_scale(lambda a: params(ranks(a)), ratio * kh * kw * cin * cout))


def rank_for_ratio(format: str, kernel_shape, ratio: float, *, groups: int = 1, kernel=None) -> tuple[int, ...]:
    """The rule of ``format`` (from the format registry) as a tuple: ``(r,)``, ``(r_out, r_in)``
    for Tucker-2, ... ``kernel`` (one group's weights) is used by rules that read the spectrum
    (Tucker-3) and ignored by the others.

    >>> rank_for_ratio("tucker2", (3, 3, 16, 32), 0.25)
    (12, 6)
    """
    ranks = get(format).rank_for_ratio(kernel_shape, ratio, groups=groups, kernel=kernel)
    return tuple(ranks) if isinstance(ranks, tuple) else (ranks,)
