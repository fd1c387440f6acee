"""CP layers: 1×1 conv to ``R``, depthwise spatial conv(s) on the ``R`` channels, 1×1 conv to ``cout``."""

from __future__ import annotations

import jax.numpy as jnp

from sigmadecomp._factorized import CP, CP3
from sigmadecomp.layers import _ops
from sigmadecomp.layers._common import (
    FactorizedLayer, conv_groups, cat, check_bias, full_kernel_shape, make_conv, split,
)
from sigmadecomp.layers._config import ConvConfig

__all__ = ["CP3Conv", "CPConv"]


def _ends(layer, parts, pdtype, bias, dtype, precision):
    """The 1×1 convs shared by CP and CP-3: ``cin → R`` per group, and ``R → cout`` with the bias."""
    common = dict(groups=layer.groups, dtype=dtype, precision=precision)
    layer.in_conv = make_conv(cat([p.in_factor for p in parts], pdtype)[None, None], **common)
    out_kernel = cat([p.out_factor.T for p in parts], pdtype)[None, None]
    layer.out_conv = make_conv(out_kernel, bias=check_bias(bias, layer.kernel_shape[-1], pdtype), **common)


def _ends_call(layer, x, middle):
    """``in_conv``, then ``middle`` on the ``R`` channels, then ``out_conv``, all as fast primitives."""
    run = layer._runtime()
    y = middle(_ops.pointwise(x, layer.in_conv.kernel[...][0, 0], groups=layer.groups, **run))
    bias = None if layer.out_conv.bias is None else layer.out_conv.bias[...]
    return _ops.pointwise(y, layer.out_conv.kernel[...][0, 0], groups=layer.groups, bias=bias, **run)


def _depthwise(kernel, **kwargs):
    """Depthwise conv: one ``(kh, kw)`` filter per channel (``kernel`` is ``(kh, kw, channels)``)."""
    return make_conv(kernel[:, :, None, :], groups=kernel.shape[-1], **kwargs)


class CPConv(FactorizedLayer):
    """Rank-``R`` CP conv: 1×1 to ``R``, depthwise ``kh×1`` (row stride, padding, dilation),
    depthwise ``1×kw`` (column stride, padding, dilation), 1×1 to ``cout`` with the bias. The two
    depthwise convs act on separate spatial axes, so together they equal the original conv exactly.

    >>> import jax.numpy as jnp
    >>> from sigmadecomp import CP
    >>> f = CP(jnp.ones((5, 2)), jnp.ones((4, 2)), jnp.ones((3, 2)), jnp.ones((3, 2)),
    ...        kernel_shape=(3, 3, 4, 5))
    >>> CPConv(f, strides=2, padding="VALID")(jnp.ones((1, 9, 9, 4))).shape
    (1, 4, 4, 5)
    """

    format = "cp"
    factorized_type = CP

    def __init__(self, factorized, *, bias=None, strides=1, padding="SAME", kernel_dilation=1,
                 dtype=None, precision=None, implementation="factorized"):
        self._set_runtime(dtype, precision, implementation)
        parts = conv_groups(factorized, CP)
        self.groups, self.kernel_shape = len(parts), full_kernel_shape(parts)
        self.config = ConvConfig(strides, padding, kernel_dilation, self.groups)
        self.ranks, self.use_bias = (parts[0].rank,), bias is not None
        pdtype = parts[0].out_factor.dtype
        _ends(self, parts, pdtype, bias, dtype, precision)
        rows = cat([p.kh_factor for p in parts], pdtype)[:, None, :]
        cols = cat([p.kw_factor for p in parts], pdtype)[None, :, :]
        self.kh_conv = _depthwise(rows, **self.config.rows(), dtype=dtype, precision=precision)
        self.kw_conv = _depthwise(cols, **self.config.cols(), dtype=dtype, precision=precision)

    def reference(self, x):
        """The chain of ``nnx.Conv`` sub-layers."""
        return self.out_conv(self.kw_conv(self.kh_conv(self.in_conv(x))))

    def factorized_call(self, x):
        return _ends_call(self, x, self._spatial)

    def _spatial(self, y):
        rows, cols = self.kh_conv.kernel[...][:, 0, 0], self.kw_conv.kernel[...][0, :, 0]
        run, lowering = self._runtime(), _ops.default_lowering()
        if lowering == "cpu":
            # Merged into one kh×kw shift-and-add: one pass over the R-channel map instead of two
            # (the map is what costs on CPU; kh·kw taps instead of kh + kw are cheap beside it).
            return _ops.depthwise(y, rows[:, None, :] * cols[None, :, :], config=self.config,
                                  lowering=lowering, **run)
        y = _ops.depthwise(y, rows[:, None, :], config=ConvConfig(**self.config.rows()), lowering=lowering, **run)
        return _ops.depthwise(y, cols[None], config=ConvConfig(**self.config.cols()), lowering=lowering, **run)

    def to_factorized(self):
        """The :class:`CP` kernel (a list, one per group, for a grouped conv)."""
        g = self.groups
        shape = self.kernel_shape[:-1] + (self.kernel_shape[-1] // g,)
        ins = split(self.in_conv.kernel[...][0, 0], g)
        outs = split(self.out_conv.kernel[...][0, 0], g)
        rows = split(self.kh_conv.kernel[...][:, 0, 0], g)
        cols = split(self.kw_conv.kernel[...][0, :, 0], g)
        parts = [CP(jnp.transpose(o), i, r, c, kernel_shape=shape) for i, o, r, c in zip(ins, outs, rows, cols)]
        return parts[0] if g == 1 else parts


class CP3Conv(FactorizedLayer):
    """Rank-``R`` CP-3 conv (spatial modes merged): 1×1 to ``R``, depthwise ``kh×kw`` with the
    original strides, padding and dilation, 1×1 to ``cout`` with the bias.

    >>> import jax.numpy as jnp
    >>> from sigmadecomp import CP3
    >>> f = CP3(jnp.ones((5, 2)), jnp.ones((4, 2)), jnp.ones((3, 3, 2)), kernel_shape=(3, 3, 4, 5))
    >>> CP3Conv(f)(jnp.ones((1, 8, 8, 4))).shape
    (1, 8, 8, 5)
    """

    format = "cp3"
    factorized_type = CP3

    def __init__(self, factorized, *, bias=None, strides=1, padding="SAME", kernel_dilation=1,
                 dtype=None, precision=None, implementation="factorized"):
        self._set_runtime(dtype, precision, implementation)
        parts = conv_groups(factorized, CP3)
        self.groups, self.kernel_shape = len(parts), full_kernel_shape(parts)
        self.config = ConvConfig(strides, padding, kernel_dilation, self.groups)
        self.ranks, self.use_bias = (parts[0].rank,), bias is not None
        pdtype = parts[0].out_factor.dtype
        _ends(self, parts, pdtype, bias, dtype, precision)
        spatial = cat([p.spatial_factor for p in parts], pdtype)
        self.spatial_conv = _depthwise(spatial, **self.config.spatial(), dtype=dtype, precision=precision)

    def reference(self, x):
        """The chain of ``nnx.Conv`` sub-layers."""
        return self.out_conv(self.spatial_conv(self.in_conv(x)))

    def factorized_call(self, x):
        spatial = self.spatial_conv.kernel[...][:, :, 0]
        return _ends_call(self, x, lambda y: _ops.depthwise(y, spatial, config=self.config, **self._runtime()))

    def to_factorized(self):
        """The :class:`CP3` kernel (a list, one per group, for a grouped conv)."""
        g = self.groups
        shape = self.kernel_shape[:-1] + (self.kernel_shape[-1] // g,)
        ins = split(self.in_conv.kernel[...][0, 0], g)
        outs = split(self.out_conv.kernel[...][0, 0], g)
        spatial = split(self.spatial_conv.kernel[...][:, :, 0], g)
        parts = [CP3(jnp.transpose(o), i, s, kernel_shape=shape) for i, o, s in zip(ins, outs, spatial)]
        return parts[0] if g == 1 else parts
