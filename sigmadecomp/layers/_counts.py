"""Parameter and FLOP counts: one function per format, the only place these numbers come from.

Conventions shared by every function:

* ``kernel_shape`` is the layer's kernel as Flax stores it: ``(kh, kw, cin // groups, cout)`` for
  a conv, ``(in_features, out_features)`` for a dense layer; ranks are **per group**.
* ``params`` counts every stored weight, the bias included when ``bias=True``.
* ``flops`` are multiply-accumulates (MACs) for ONE example; bias additions are not counted.
  A conv needs its input and output spatial sizes ``in_spatial=(H, W)`` and
  ``out_spatial=(H', W')`` (1×1 convs run at the input resolution, before the strided conv);
  without them ``flops`` is ``None``. A dense layer defaults to one input vector
  (``out_spatial=()``); pass e.g. ``out_spatial=(T,)`` for ``T`` tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional

__all__ = [
    "Counts",
    "count_cp",
    "count_cp3",
    "count_dense",
    "count_format",
    "count_lowrank",
    "count_tucker2",
]


@dataclasses.dataclass(frozen=True)
class Counts:
    """``params`` (stored weights, bias included) and ``flops`` (MACs per example, or ``None``)."""

    params: int
    flops: Optional[int]


def _split(kernel_shape: Sequence[int], groups: int):
    """``(kh, kw, cin_g, cout, cout_g)``; a dense kernel is a 1×1 conv."""
    shape = tuple(int(s) for s in kernel_shape)
    if len(shape) == 2:
        shape = (1, 1) + shape
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"kernel_shape must be (kh, kw, cin // groups, cout) or (in, out); got {kernel_shape}")
    kh, kw, cin_g, cout = shape
    if cout % groups:
        raise ValueError(f"cout={cout} is not divisible by groups={groups}")
    return kh, kw, cin_g, cout, cout // groups


def _positions(kernel_shape, in_spatial, out_spatial):
    """``(P_in, P_mid, P_out)`` output positions, ``P_mid = H'·W`` (after the rows half of CP)."""
    if len(kernel_shape) == 2 and out_spatial is None:
        out_spatial = ()
    if len(kernel_shape) == 2:
        p = math.prod(out_spatial)
        return p, p, p
    if in_spatial is None or out_spatial is None:
        return None
    (h, w), (ho, wo) = in_spatial, out_spatial
    return h * w, ho * w, ho * wo


def _counts(sizes, macs, bias_size: int, bias: bool):
    params = sum(sizes) + (bias_size if bias else 0)
    return Counts(int(params), None if macs is None else int(macs))


def count_dense(kernel_shape, *, groups: int = 1, bias: bool = False,
                in_spatial=None, out_spatial=None) -> Counts:
    """The original (uncompressed) layer.

    >>> count_dense((3, 3, 16, 32), bias=True, in_spatial=(8, 8), out_spatial=(8, 8))
    Counts(params=4640, flops=294912)
    """
    kh, kw, cin_g, cout, _ = _split(kernel_shape, groups)
    pos = _positions(kernel_shape, in_spatial, out_spatial)
    size = kh * kw * cin_g * cout
    return _counts([size], pos and pos[2] * size, cout, bias)


def count_lowrank(kernel_shape, rank: int, *, groups: int = 1, bias: bool = False,
                  in_spatial=None, out_spatial=None) -> Counts:
    """SVD layer: ``kh×kw`` conv to ``rank`` channels (per group), then 1×1 to ``cout``.

    >>> count_lowrank((3, 3, 16, 32), 8, in_spatial=(8, 8), out_spatial=(8, 8))
    Counts(params=1408, flops=90112)
    """
    kh, kw, cin_g, cout, _ = _split(kernel_shape, groups)
    first, last = kh * kw * cin_g * groups * rank, rank * cout
    pos = _positions(kernel_shape, in_spatial, out_spatial)
    return _counts([first, last], pos and pos[2] * (first + last), cout, bias)


def count_tucker2(kernel_shape, ranks: Sequence[int], *, groups: int = 1, bias: bool = False,
                  in_spatial=None, out_spatial=None) -> Counts:
    """Tucker-2 layer, ``ranks = (r_out, r_in)``: 1×1 to ``r_in``, ``kh×kw`` core, 1×1 to ``cout``.

    >>> count_tucker2((3, 3, 16, 32), (8, 4), in_spatial=(8, 8), out_spatial=(8, 8))
    Counts(params=608, flops=38912)
    """
    kh, kw, cin_g, cout, _ = _split(kernel_shape, groups)
    r_out, r_in = ranks
    first, core, last = cin_g * groups * r_in, kh * kw * r_in * groups * r_out, r_out * cout
    pos = _positions(kernel_shape, in_spatial, out_spatial)
    macs = pos and pos[0] * first + pos[2] * (core + last)
    return _counts([first, core, last], macs, cout, bias)


def count_cp(kernel_shape, rank: int, *, groups: int = 1, bias: bool = False,
             in_spatial=None, out_spatial=None) -> Counts:
    """CP layer: 1×1 to ``rank``, depthwise ``kh×1``, depthwise ``1×kw``, 1×1 to ``cout``.

    >>> count_cp((3, 3, 16, 32), 8, in_spatial=(8, 8), out_spatial=(4, 4))
    Counts(params=432, flops=13440)
    """
    kh, kw, cin_g, cout, _ = _split(kernel_shape, groups)
    first, rows, cols, last = cin_g * groups * rank, kh * groups * rank, kw * groups * rank, rank * cout
    pos = _positions(kernel_shape, in_spatial, out_spatial)
    macs = pos and pos[0] * first + pos[1] * rows + pos[2] * (cols + last)
    return _counts([first, rows, cols, last], macs, cout, bias)


def count_cp3(kernel_shape, rank: int, *, groups: int = 1, bias: bool = False,
              in_spatial=None, out_spatial=None) -> Counts:
    """CP-3 layer: 1×1 to ``rank``, depthwise ``kh×kw``, 1×1 to ``cout``.

    >>> count_cp3((3, 3, 16, 32), 8, in_spatial=(8, 8), out_spatial=(8, 8))
    Counts(params=456, flops=29184)
    """
    kh, kw, cin_g, cout, _ = _split(kernel_shape, groups)
    first, spatial, last = cin_g * groups * rank, kh * kw * groups * rank, rank * cout
    pos = _positions(kernel_shape, in_spatial, out_spatial)
    macs = pos and pos[0] * first + pos[2] * (spatial + last)
    return _counts([first, spatial, last], macs, cout, bias)


def count_format(format: str, kernel_shape, ranks=None, **kwargs) -> Counts:
    """Dispatch on ``format``: ``"dense"`` for the original layer, or any registered format
    (:mod:`sigmadecomp.formats`); ``ranks`` is an int or a tuple as the format expects.

    >>> count_format("svd", (64, 10), (4,), bias=True)
    Counts(params=306, flops=296)
    """
    if format == "dense":
        return count_dense(kernel_shape, **kwargs)
    from sigmadecomp.formats._registry import get  # the registry's entries import this module

    spec = get(format)
    return spec.count(kernel_shape, spec.normalize_ranks(ranks), **kwargs)
