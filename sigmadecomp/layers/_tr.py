"""Tensor-ring layer: 1×1 ``cin → r0·r1``, ``kh×1`` and ``1×kw`` convs shared across the closing
index (folded into the batch), 1×1 ``r0·r3 → cout`` summing over it; and its counts."""

from __future__ import annotations

import jax.numpy as jnp

from sigmadecomp._factorized import TR
from sigmadecomp.layers._common import (
    FactorizedLayer, cat, check_bias, conv_groups, full_kernel_shape, make_conv, split,
)
from sigmadecomp.layers._config import ConvConfig
from sigmadecomp.layers._counts import Counts, _counts, _positions, _split
from sigmadecomp.layers._tucker3 import _with_batch, fold_channels, unfold_channels

__all__ = ["TRConv", "count_tr"]


class TRConv(FactorizedLayer):
    """Tensor-ring conv. The closing index ``z`` rides along as channels ``(z, a)`` after the first
    1×1; the two spatial convs (row / column stride, padding, dilation as in :class:`TTConv`) are
    shared across ``z``, so ``z`` is folded into the batch for them; the last 1×1 sums over
    ``(z, e)`` and carries the bias. Grouped convs: one ``TR`` per group.

    >>> import jax.numpy as jnp
    >>> from sigmadecomp import TR
    >>> f = TR(jnp.ones((2, 4, 2)), jnp.ones((2, 3, 3)), jnp.ones((3, 3, 2)), jnp.ones((2, 5, 2)),
    ...        kernel_shape=(3, 3, 4, 5))
    >>> TRConv(f, strides=2)(jnp.ones((1, 8, 8, 4))).shape
    (1, 4, 4, 5)
    """

    format = "tr"
    factorized_type = TR

    def __init__(self, factorized, *, bias=None, strides=1, padding="SAME", kernel_dilation=1,
                 dtype=None, precision=None, implementation="factorized"):
        self._set_runtime(dtype, precision, implementation)
        parts = conv_groups(factorized, TR)
        self.groups, self.kernel_shape = len(parts), full_kernel_shape(parts)
        self.config = ConvConfig(strides, padding, kernel_dilation, self.groups)
        self.ranks, self.use_bias = tuple(parts[0].ranks), bias is not None
        r0, r1, r2, r3 = self.ranks
        pdtype = parts[0].in_core.dtype
        common = dict(groups=self.groups, dtype=dtype, precision=precision)
        ins = [jnp.transpose(p.in_core, (1, 0, 2)).reshape(-1, r0 * r1) for p in parts]
        self.in_conv = make_conv(cat(ins, pdtype)[None, None], **common)
        rows = cat([jnp.transpose(p.kh_core, (1, 0, 2))[:, None] for p in parts], pdtype)
        self.kh_conv = make_conv(rows, **self.config.rows(), **common)
        cols = cat([jnp.transpose(p.kw_core, (1, 0, 2))[None] for p in parts], pdtype)
        self.kw_conv = make_conv(cols, **self.config.cols(), **common)
        outs = [jnp.transpose(p.out_core, (2, 0, 1)).reshape(r0 * r3, -1) for p in parts]
        self.out_conv = make_conv(cat(outs, pdtype)[None, None],
                                  bias=check_bias(bias, self.kernel_shape[-1], pdtype), **common)

    def _middle(self, x):
        y = self.kw_conv(self.kh_conv(fold_channels(x, self.groups, self.ranks[1])))
        return unfold_channels(y, x.shape[0], self.groups)

    def factorized_call(self, x):
        return self.out_conv(_with_batch(self.in_conv(x), self._middle))

    def to_factorized(self):
        """The :class:`TR` kernel (a list, one per group, for a grouped conv)."""
        g = self.groups
        r0, r1, r2, r3 = self.ranks
        shape = self.kernel_shape[:-1] + (self.kernel_shape[-1] // g,)
        ins = split(self.in_conv.kernel[...][0, 0], g)
        rows = split(self.kh_conv.kernel[...][:, 0], g)
        cols = split(self.kw_conv.kernel[...][0], g)
        outs = split(self.out_conv.kernel[...][0, 0], g)
        parts = [TR(jnp.transpose(i.reshape(-1, r0, r1), (1, 0, 2)), jnp.transpose(r, (1, 0, 2)),
                    jnp.transpose(c, (1, 0, 2)), jnp.transpose(o.reshape(r0, r3, -1), (1, 2, 0)),
                    kernel_shape=shape)
                 for i, r, c, o in zip(ins, rows, cols, outs)]
        return parts[0] if g == 1 else parts


def count_tr(kernel_shape, ranks, *, groups: int = 1, bias: bool = False,
             in_spatial=None, out_spatial=None) -> Counts:
    """Tensor-ring layer, ``ranks = (r0, r1, r2, r3)``.

    >>> count_tr((3, 3, 16, 32), (2, 4, 6, 6), in_spatial=(8, 8), out_spatial=(8, 8))
    Counts(params=692, flops=55808)
    """
    kh, kw, cin_g, cout, _ = _split(kernel_shape, groups)
    r0, r1, r2, r3 = ranks
    g = groups
    first, rows, cols, last = g * cin_g * r0 * r1, g * r1 * kh * r2, g * r2 * kw * r3, r0 * r3 * cout
    pos = _positions(kernel_shape, in_spatial, out_spatial)
    macs = pos and pos[0] * first + pos[1] * r0 * rows + pos[2] * (r0 * cols + last)
    return _counts([first, rows, cols, last], macs, cout, bias)
