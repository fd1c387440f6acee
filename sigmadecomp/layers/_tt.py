"""Tensor-train layer: 1×1 ``cin → r1``, ``kh×1`` ``r1 → r2``, ``1×kw`` ``r2 → r3``, 1×1 ``r3 → cout``;
and its counts."""

from __future__ import annotations

import jax.numpy as jnp

from sigmadecomp._factorized import TT
from sigmadecomp.layers._common import (
    FactorizedLayer, cat, check_bias, conv_groups, full_kernel_shape, make_conv, split,
)
from sigmadecomp.layers._config import ConvConfig
from sigmadecomp.layers._counts import Counts, _counts, _positions, _split

__all__ = ["TTConv", "count_tt"]


class TTConv(FactorizedLayer):
    """Tensor-train conv: the ``kh×1`` conv takes the row stride/padding/dilation, the ``1×kw`` conv
    the column ones (they act on separate axes, so the product is the original conv exactly); the
    bias sits on the last 1×1. Grouped convs: one ``TT`` per group, grouped sub-convs.

    >>> import jax.numpy as jnp
    >>> from sigmadecomp import TT
    >>> f = TT(jnp.ones((4, 2)), jnp.ones((2, 3, 3)), jnp.ones((3, 3, 2)), jnp.ones((2, 5)),
    ...        kernel_shape=(3, 3, 4, 5))
    >>> TTConv(f, strides=2)(jnp.ones((1, 8, 8, 4))).shape
    (1, 4, 4, 5)
    """

    format = "tt"
    factorized_type = TT

    def __init__(self, factorized, *, bias=None, strides=1, padding="SAME", kernel_dilation=1,
                 dtype=None, precision=None, implementation="factorized"):
        self._set_runtime(dtype, precision, implementation)
        parts = conv_groups(factorized, TT)
        self.groups, self.kernel_shape = len(parts), full_kernel_shape(parts)
        self.config = ConvConfig(strides, padding, kernel_dilation, self.groups)
        self.ranks, self.use_bias = tuple(parts[0].ranks), bias is not None
        pdtype = parts[0].in_core.dtype
        common = dict(groups=self.groups, dtype=dtype, precision=precision)
        self.in_conv = make_conv(cat([p.in_core for p in parts], pdtype)[None, None], **common)
        rows = cat([jnp.transpose(p.kh_core, (1, 0, 2))[:, None] for p in parts], pdtype)
        self.kh_conv = make_conv(rows, **self.config.rows(), **common)
        cols = cat([jnp.transpose(p.kw_core, (1, 0, 2))[None] for p in parts], pdtype)
        self.kw_conv = make_conv(cols, **self.config.cols(), **common)
        out_kernel = cat([p.out_core for p in parts], pdtype)[None, None]
        self.out_conv = make_conv(out_kernel, bias=check_bias(bias, self.kernel_shape[-1], pdtype), **common)

    def factorized_call(self, x):
        return self.out_conv(self.kw_conv(self.kh_conv(self.in_conv(x))))

    def to_factorized(self):
        """The :class:`TT` kernel (a list, one per group, for a grouped conv)."""
        g = self.groups
        shape = self.kernel_shape[:-1] + (self.kernel_shape[-1] // g,)
        ins = split(self.in_conv.kernel[...][0, 0], g)
        rows = split(self.kh_conv.kernel[...][:, 0], g)
        cols = split(self.kw_conv.kernel[...][0], g)
        outs = split(self.out_conv.kernel[...][0, 0], g)
        parts = [TT(i, jnp.transpose(r, (1, 0, 2)), jnp.transpose(c, (1, 0, 2)), o, kernel_shape=shape)
                 for i, r, c, o in zip(ins, rows, cols, outs)]
        return parts[0] if g == 1 else parts


def count_tt(kernel_shape, ranks, *, groups: int = 1, bias: bool = False,
             in_spatial=None, out_spatial=None) -> Counts:
    """Tensor-train layer, ``ranks = (r1, r2, r3)``.

    >>> count_tt((3, 3, 16, 32), (4, 6, 8), in_spatial=(8, 8), out_spatial=(8, 8))
    Counts(params=536, flops=34304)
    """
    kh, kw, cin_g, cout, _ = _split(kernel_shape, groups)
    r1, r2, r3 = ranks
    g = groups
    first, rows, cols, last = g * cin_g * r1, g * r1 * kh * r2, g * r2 * kw * r3, r3 * cout
    pos = _positions(kernel_shape, in_spatial, out_spatial)
    macs = pos and pos[0] * first + pos[1] * rows + pos[2] * (cols + last)
    return _counts([first, rows, cols, last], macs, cout, bias)
