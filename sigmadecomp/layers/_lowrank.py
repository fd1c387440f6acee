"""SVD (rank-``r``) layers: a dense or ``kh×kw`` map to ``r`` channels, then a 1×1 map to ``cout``."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from sigmadecomp._factorized import LowRank
from sigmadecomp.layers import _ops
from sigmadecomp.layers._common import (
    FactorizedLayer, _bias, _cast, as_groups, conv_groups, cat, check_bias, full_kernel_shape,
    make_conv, make_linear, split,
)
from sigmadecomp.layers._config import ConvConfig

__all__ = ["LowRankConv", "LowRankDense"]


class LowRankConv(FactorizedLayer):
    """``kh×kw`` conv to ``r`` channels (the original strides, padding, dilation), then a 1×1 conv
    to ``cout`` carrying the bias. A grouped conv takes one :class:`LowRank` per group.

    >>> import jax, jax.numpy as jnp
    >>> from sigmadecomp import LowRank, to_dense
    >>> f = LowRank(jnp.ones((3, 3, 4, 2)), jnp.ones((2, 5)), kernel_shape=(3, 3, 4, 5))
    >>> layer = LowRankConv(f, strides=2, padding="SAME")
    >>> layer(jnp.ones((1, 8, 8, 4))).shape
    (1, 4, 4, 5)
    """

    format = "svd"
    factorized_type = LowRank

    def __init__(self, factorized, *, bias=None, strides=1, padding="SAME", kernel_dilation=1,
                 dtype=None, precision=None, implementation="factorized"):
        self._set_runtime(dtype, precision, implementation)
        parts = conv_groups(factorized, LowRank)
        self.groups, self.kernel_shape = len(parts), full_kernel_shape(parts)
        if len(self.kernel_shape) != 4:
            raise ValueError(f"LowRankConv needs a conv kernel_shape (kh, kw, cin, cout); got "
                             f"{self.kernel_shape}: use LowRankDense for dense layers")
        self.config = ConvConfig(strides, padding, kernel_dilation, self.groups)
        self.ranks, self.use_bias = (parts[0].rank,), bias is not None
        pdtype = parts[0].out_factor.dtype
        common = dict(groups=self.groups, dtype=dtype, precision=precision)
        self.in_conv = make_conv(cat([p.in_kernel for p in parts], pdtype), **self.config.spatial(), **common)
        out_kernel = cat([p.out_factor for p in parts], pdtype)[None, None]
        self.out_conv = make_conv(out_kernel, bias=check_bias(bias, self.kernel_shape[-1], pdtype), **common)

    def reference(self, x):
        """The chain of ``nnx.Conv`` sub-layers."""
        return self.out_conv(self.in_conv(x))

    def factorized_call(self, x):
        y = _ops.conv(x, self.in_conv.kernel[...], config=self.config, **self._runtime())
        return _ops.pointwise(y, self.out_conv.kernel[...][0, 0], groups=self.groups,
                              bias=_value(self.out_conv.bias), **self._runtime())

    def to_factorized(self):
        """The :class:`LowRank` kernel (a list, one per group, for a grouped conv)."""
        shape = self.kernel_shape[:-1] + (self.kernel_shape[-1] // self.groups,)
        ins = split(self.in_conv.kernel[...], self.groups)
        outs = split(self.out_conv.kernel[...][0, 0], self.groups)
        parts = [LowRank(i, o, kernel_shape=shape) for i, o in zip(ins, outs)]
        return parts[0] if self.groups == 1 else parts


class LowRankDense(FactorizedLayer):
    """Dense ``in → r`` (no bias) then dense ``r → out`` (with the original bias), from a
    :class:`LowRank` whose ``kernel_shape`` is ``(in, out)`` (``in_kernel`` of shape ``(1, 1, in, r)``).

    >>> import jax.numpy as jnp
    >>> from sigmadecomp import LowRank
    >>> f = LowRank(jnp.ones((1, 1, 6, 2)), jnp.ones((2, 3)), kernel_shape=(6, 3))
    >>> LowRankDense(f, bias=jnp.zeros(3))(jnp.ones((4, 6))).shape
    (4, 3)
    """

    format = "svd"
    factorized_type = LowRank

    def __init__(self, factorized, *, bias=None, dtype=None, precision=None, implementation="factorized"):
        self._set_runtime(dtype, precision, implementation)
        (f,) = as_groups(factorized, LowRank)
        if len(f.kernel_shape) != 2 or f.in_kernel.shape[:2] != (1, 1):
            raise ValueError(
                f"LowRankDense needs a LowRank with kernel_shape (in, out) and in_kernel (1, 1, in, r); "
                f"got kernel_shape {f.kernel_shape}, in_kernel {f.in_kernel.shape}: use LowRankConv for convs"
            )
        self.groups, self.kernel_shape = 1, tuple(f.kernel_shape)
        self.ranks, self.use_bias = (f.rank,), bias is not None
        pdtype = f.out_factor.dtype
        self.in_dense = make_linear(f.in_kernel[0, 0], dtype=dtype, precision=precision)
        bias = check_bias(bias, self.kernel_shape[-1], pdtype)
        self.out_dense = make_linear(f.out_factor, bias=bias, dtype=dtype, precision=precision)

    def reference(self, x):
        """The chain of ``nnx.Linear`` sub-layers."""
        return self.out_dense(self.in_dense(x))

    def factorized_call(self, x):
        return self.reference(x)  # two matrix products already: nothing faster to lower to

    def dense_call(self, x):
        x, kernel, bias = dtypes.promote_dtype((x, self.dense_kernel(), _value(self.out_dense.bias)),
                                               dtype=self.dtype)
        y = jnp.einsum("...i,io->...o", x, kernel, precision=self.precision)
        return y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)

    def to_factorized(self) -> LowRank:
        """The :class:`LowRank` kernel."""
        in_kernel = self.in_dense.kernel[...][None, None]
        return LowRank(in_kernel, self.out_dense.kernel[...], kernel_shape=self.kernel_shape)

    @classmethod
    def from_layer(cls, layer, factorized, **kwargs):
        """The replacement of ``layer`` (an ``nnx.Linear``): bias, dtype and precision copied,
        factors cast to the dtype of its kernel; ``kwargs`` (``implementation``) go to the layer."""
        if not isinstance(layer, nnx.Linear):
            raise ValueError(f"LowRankDense.from_layer needs an nnx.Linear; got {type(layer).__name__}")
        (f,) = as_groups(factorized, LowRank)
        if tuple(f.kernel_shape) != tuple(layer.kernel.shape):
            raise ValueError(f"LowRankDense: the layer's kernel is {tuple(layer.kernel.shape)} but the "
                             f"factorized kernel_shape is {tuple(f.kernel_shape)}")
        f = _cast(f, layer.kernel[...].dtype)
        return cls(f, bias=_bias(layer), dtype=layer.dtype, precision=layer.precision, **kwargs)


def _value(variable):
    return None if variable is None else variable[...]
