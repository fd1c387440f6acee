"""Tucker-3 layer: 1×1 to ``r_in``, ``r_space`` basis filters ``kh×kw`` per channel, 1×1 mixing
to ``r_out`` (the core), 1×1 to ``cout``; and its counts."""

from __future__ import annotations

import jax.numpy as jnp

from sigmadecomp._factorized import Tucker3
from sigmadecomp.layers._common import (
    FactorizedLayer, cat, check_bias, conv_groups, full_kernel_shape, make_conv, split,
)
from sigmadecomp.layers._config import ConvConfig
from sigmadecomp.layers._counts import Counts, _counts, _positions, _split

__all__ = ["Tucker3Conv", "count_tucker3", "fold_channels", "unfold_channels"]


def fold_channels(x, groups: int, inner: int):
    """``(N, H, W, g·m·inner)`` → ``(N·m, H, W, g·inner)``: the middle index ``m`` moved into the
    batch, so a small conv shared across it is stored once (not ``m`` times)."""
    n, h, w, c = x.shape
    m = c // (groups * inner)
    x = jnp.transpose(x.reshape(n, h, w, groups, m, inner), (0, 4, 1, 2, 3, 5))
    return x.reshape(n * m, h, w, groups * inner)


def unfold_channels(y, batch: int, groups: int):
    """Inverse of :func:`fold_channels` on the conv's output ``(N·m, H', W', g·inner')``."""
    nm, h, w, c = y.shape
    y = y.reshape(batch, nm // batch, h, w, groups, c // groups)
    return jnp.transpose(y, (0, 2, 3, 4, 1, 5)).reshape(batch, h, w, -1)


def _with_batch(x, fn):
    """Apply ``fn`` to an NHWC array, allowing unbatched ``(H, W, C)`` input like ``nnx.Conv``."""
    return fn(x[None])[0] if x.ndim == 3 else fn(x)


class Tucker3Conv(FactorizedLayer):
    """Tucker-3 factorized conv (spatial modes merged). The basis filters carry the original
    strides, padding and dilation and are stored once (applied to every channel by folding the
    channels into the batch); the bias sits on the last 1×1. Grouped convs: one ``Tucker3`` per group.

    >>> import jax.numpy as jnp
    >>> from sigmadecomp import Tucker3
    >>> f = Tucker3(jnp.ones((3, 2, 2)), jnp.ones((4, 2)), jnp.ones((3, 3, 2)), jnp.ones((5, 3)),
    ...             kernel_shape=(3, 3, 4, 5))
    >>> Tucker3Conv(f, strides=2)(jnp.ones((1, 8, 8, 4))).shape
    (1, 4, 4, 5)
    """

    format = "tucker3"
    factorized_type = Tucker3

    def __init__(self, factorized, *, bias=None, strides=1, padding="SAME", kernel_dilation=1,
                 dtype=None, precision=None, implementation="factorized"):
        self._set_runtime(dtype, precision, implementation)
        parts = conv_groups(factorized, Tucker3)
        self.groups, self.kernel_shape = len(parts), full_kernel_shape(parts)
        self.config = ConvConfig(strides, padding, kernel_dilation, self.groups)
        self.ranks, self.use_bias = tuple(parts[0].ranks), bias is not None
        r_out, r_in, r_space = self.ranks
        pdtype = parts[0].core.dtype
        common = dict(groups=self.groups, dtype=dtype, precision=precision)
        self.in_conv = make_conv(cat([p.in_factor for p in parts], pdtype)[None, None], **common)
        spatial = cat([p.spatial_factor[:, :, None, :] for p in parts], pdtype)
        self.spatial_conv = make_conv(spatial, **self.config.spatial(), **common)
        mix = [jnp.transpose(p.core, (1, 2, 0)).reshape(r_in * r_space, r_out) for p in parts]
        self.mix_conv = make_conv(cat(mix, pdtype)[None, None], **common)
        out_kernel = cat([p.out_factor.T for p in parts], pdtype)[None, None]
        self.out_conv = make_conv(out_kernel, bias=check_bias(bias, self.kernel_shape[-1], pdtype), **common)

    def _spatial(self, x):
        y = self.spatial_conv(fold_channels(x, self.groups, 1))
        return unfold_channels(y, x.shape[0], self.groups)

    def factorized_call(self, x):
        x = self.in_conv(x)
        x = _with_batch(x, self._spatial)
        return self.out_conv(self.mix_conv(x))

    def to_factorized(self):
        """The :class:`Tucker3` kernel (a list, one per group, for a grouped conv)."""
        g = self.groups
        r_out, r_in, r_space = self.ranks
        shape = self.kernel_shape[:-1] + (self.kernel_shape[-1] // g,)
        ins = split(self.in_conv.kernel[...][0, 0], g)
        spatial = split(self.spatial_conv.kernel[...][:, :, 0], g)
        mix = split(self.mix_conv.kernel[...][0, 0], g)
        outs = split(self.out_conv.kernel[...][0, 0], g)
        parts = [Tucker3(jnp.transpose(m.reshape(r_in, r_space, r_out), (2, 0, 1)), i, s, o.T, kernel_shape=shape)
                 for i, s, m, o in zip(ins, spatial, mix, outs)]
        return parts[0] if g == 1 else parts


def count_tucker3(kernel_shape, ranks, *, groups: int = 1, bias: bool = False,
                  in_spatial=None, out_spatial=None) -> Counts:
    """Tucker-3 layer, ``ranks = (r_out, r_in, r_space)``.

    >>> count_tucker3((3, 3, 16, 32), (8, 4, 3), in_spatial=(8, 8), out_spatial=(8, 8))
    Counts(params=443, flops=33536)
    """
    kh, kw, cin_g, cout, _ = _split(kernel_shape, groups)
    r_out, r_in, r_space = ranks
    g = groups
    first, spatial, mix, last = g * cin_g * r_in, g * kh * kw * r_space, g * r_in * r_space * r_out, r_out * cout
    pos = _positions(kernel_shape, in_spatial, out_spatial)
    macs = pos and pos[0] * first + pos[2] * (g * r_in * r_space * kh * kw + mix + last)
    return _counts([first, spatial, mix, last], macs, cout, bias)
