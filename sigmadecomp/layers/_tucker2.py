"""Tucker-2 layer: 1×1 conv to ``r_in``, ``kh×kw`` core conv ``r_in → r_out``, 1×1 conv to ``cout``."""

from __future__ import annotations

import jax.numpy as jnp

from sigmadecomp._factorized import Tucker2
from sigmadecomp.layers import _ops
from sigmadecomp.layers._common import (
    FactorizedLayer, conv_groups, cat, check_bias, full_kernel_shape, make_conv, split,
)
from sigmadecomp.layers._config import ConvConfig

__all__ = ["Tucker2Conv"]


class Tucker2Conv(FactorizedLayer):
    """Tucker-2 factorized conv. The core conv has the original strides, padding and dilation;
    the 1×1 convs carry no stride (the first runs at the input resolution); the bias sits on the
    last. A grouped conv takes one :class:`Tucker2` per group and uses grouped sub-convs.

    >>> import jax.numpy as jnp
    >>> from sigmadecomp import Tucker2
    >>> f = Tucker2(jnp.ones((3, 3, 2, 3)), jnp.ones((4, 2)), jnp.ones((5, 3)), kernel_shape=(3, 3, 4, 5))
    >>> Tucker2Conv(f, strides=2)(jnp.ones((1, 8, 8, 4))).shape
    (1, 4, 4, 5)
    """

    format = "tucker2"
    factorized_type = Tucker2

    def __init__(self, factorized, *, bias=None, strides=1, padding="SAME", kernel_dilation=1,
                 dtype=None, precision=None, implementation="factorized"):
        self._set_runtime(dtype, precision, implementation)
        parts = conv_groups(factorized, Tucker2)
        self.groups, self.kernel_shape = len(parts), full_kernel_shape(parts)
        self.config = ConvConfig(strides, padding, kernel_dilation, self.groups)
        self.ranks, self.use_bias = tuple(parts[0].ranks), bias is not None
        pdtype = parts[0].core.dtype
        common = dict(groups=self.groups, dtype=dtype, precision=precision)
        self.in_conv = make_conv(cat([p.in_factor for p in parts], pdtype)[None, None], **common)
        self.core_conv = make_conv(cat([p.core for p in parts], pdtype), **self.config.spatial(), **common)
        out_kernel = cat([p.out_factor.T for p in parts], pdtype)[None, None]
        self.out_conv = make_conv(out_kernel, bias=check_bias(bias, self.kernel_shape[-1], pdtype), **common)

    def reference(self, x):
        """The chain of ``nnx.Conv`` sub-layers."""
        return self.out_conv(self.core_conv(self.in_conv(x)))

    def factorized_call(self, x):
        g, run = self.groups, self._runtime()
        y = _ops.pointwise(x, self.in_conv.kernel[...][0, 0], groups=g, **run)
        y = _ops.conv(y, self.core_conv.kernel[...], config=self.config, **run)
        bias = None if self.out_conv.bias is None else self.out_conv.bias[...]
        return _ops.pointwise(y, self.out_conv.kernel[...][0, 0], groups=g, bias=bias, **run)

    def to_factorized(self):
        """The :class:`Tucker2` kernel (a list, one per group, for a grouped conv)."""
        g = self.groups
        shape = self.kernel_shape[:-1] + (self.kernel_shape[-1] // g,)
        ins = split(self.in_conv.kernel[...][0, 0], g)
        cores = split(self.core_conv.kernel[...], g)
        outs = split(self.out_conv.kernel[...][0, 0], g)
        parts = [Tucker2(c, i, jnp.transpose(o), kernel_shape=shape) for c, i, o in zip(cores, ins, outs)]
        return parts[0] if g == 1 else parts
