"""Functional conv primitives of the factorized layers, each lowered the way that is fast on the
backend it runs on.

Measured on the 2-core CPU machine (XLA:CPU, batch 128, ResNet-56 shapes; ``benchmarks/latency.py``):

* grouped (depthwise) ``lax.conv_general_dilated`` is 6–25× slower than the dense conv it replaces,
  while the same depthwise conv written as a sum over the ``kh·kw`` taps of strided slices times a
  per-channel weight ("shift-and-add") fuses into one loop and is faster than the dense conv;
* a 1×1 conv with stride 1 is a plain matrix product over channels (``dot_general``), slightly
  faster than the conv op and free of its layout handling;
* full ``kh×kw`` convs are fastest as XLA's own conv (im2col and per-tap matmuls were 2–10× slower).

So on CPU :func:`depthwise` uses shift-and-add and :func:`pointwise` a ``dot_general``; on other
backends (GPU/TPU, whose conv libraries handle depthwise convs well) both use the conv op. Every
primitive follows :class:`flax.nnx.Conv`: NHWC inputs with any number of leading batch dimensions
(or none), the same padding rules (``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``, explicit
pairs), the same dtype promotion and ``precision``.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax.nnx.nn import dtypes
from jax import lax

from sigmadecomp.layers._config import ConvConfig

__all__ = ["LOWERINGS", "conv", "default_lowering", "depthwise", "pointwise", "use_lowering"]

LOWERINGS = ("cpu", "conv")
_DIMS = ("NHWC", "HWIO", "NHWC")
_forced: list = []  # stack of use_lowering() overrides, read at trace time


def default_lowering() -> str:
    """``"cpu"`` (shift-and-add depthwise, ``dot_general`` 1×1) on the CPU backend, else ``"conv"``;
    inside :func:`use_lowering`, the lowering it names."""
    if _forced:
        return _forced[-1]
    return "cpu" if jax.default_backend() == "cpu" else "conv"


@contextlib.contextmanager
def use_lowering(lowering: str):
    """Trace the factorized layers with ``lowering`` (``"cpu"`` or ``"conv"``) whatever the backend:
    to compare lowerings on one machine, or to test both. It acts when a function is traced (a
    jitted function already compiled keeps the lowering it was traced with).

    >>> import jax.numpy as jnp
    >>> with use_lowering("conv"):
    ...     default_lowering()
    'conv'
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {LOWERINGS}; got {lowering!r}")
    _forced.append(lowering)
    try:
        yield
    finally:
        _forced.pop()


def _flatten_batch(x):
    """``(..., H, W, C)`` → ``(N, H, W, C)`` and the leading shape to restore (Flax's rule)."""
    if x.ndim < 3:
        raise ValueError(f"a 2-D conv needs inputs (..., H, W, C); got shape {x.shape}")
    lead = x.shape[:-3]
    return x.reshape((-1,) + x.shape[-3:]), lead


def _restore_batch(y, lead):
    return y.reshape(lead + y.shape[1:])


def _pad(x, config: ConvConfig, kernel_size) -> tuple:
    """Pad ``x`` (N, H, W, C) as :class:`flax.nnx.Conv` does; returns ``(x, lax_padding)`` where
    ``lax_padding`` is what is left for the conv itself (``'VALID'`` after explicit padding)."""
    padding = config.padding
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, config.kernel_dilation)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        return jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]), "VALID"
    return x, padding


def _explicit_pad(x, config: ConvConfig, kernel_size):
    """Pad ``x`` (N, H, W, C) so that a ``'VALID'`` window loop computes the configured conv."""
    x, padding = _pad(x, config, kernel_size)
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, config.kernel_dilation)]
        padding = lax.padtype_to_pads(x.shape[1:3], dilated, config.strides, padding)
    # lax.pad takes (low, high, interior) and accepts negative (cropping) pads, as the conv does.
    zero = jnp.zeros((), x.dtype)
    return lax.pad(x, zero, [(0, 0, 0)] + [(int(lo), int(hi), 0) for lo, hi in padding] + [(0, 0, 0)])


def _add_bias(y, bias):
    return y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)


def conv(x, kernel, *, config: ConvConfig, bias=None, dtype=None, precision=None):
    """``nnx.Conv`` as a function: ``kernel`` ``(kh, kw, cin // groups, cout)`` with the strides,
    padding, dilation and feature groups of ``config``.

    >>> import jax.numpy as jnp
    >>> conv(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5)), config=ConvConfig(2, "SAME")).shape
    (2, 4, 4, 5)
    """
    x, lead = _flatten_batch(x)
    x, kernel, bias = dtypes.promote_dtype((x, kernel, bias), dtype=dtype)
    x, padding = _pad(x, config, kernel.shape[:2])
    y = lax.conv_general_dilated(
        x, kernel, config.strides, padding, rhs_dilation=config.kernel_dilation,
        dimension_numbers=_DIMS, feature_group_count=config.groups, precision=precision)
    return _restore_batch(_add_bias(y, bias), lead)


def pointwise(x, kernel, *, groups: int = 1, bias=None, dtype=None, precision=None, lowering=None):
    """A 1×1 conv with stride 1 and no padding: ``kernel`` ``(cin // groups, cout)``, the output
    channels of group ``g`` read only input group ``g`` (as a grouped conv). On CPU a
    ``dot_general`` over the channels; otherwise the conv op.

    >>> import jax.numpy as jnp
    >>> pointwise(jnp.ones((2, 5, 5, 4)), jnp.ones((2, 6)), groups=2).shape
    (2, 5, 5, 6)
    """
    lowering = lowering or default_lowering()
    if lowering == "conv":
        return conv(x, kernel[None, None], config=ConvConfig(1, "VALID", 1, groups), bias=bias,
                    dtype=dtype, precision=precision)
    x, kernel, bias = dtypes.promote_dtype((x, kernel, bias), dtype=dtype)
    if groups == 1:
        return _add_bias(jnp.einsum("...c,co->...o", x, kernel, precision=precision), bias)
    cin_g, cout = kernel.shape
    xg = x.reshape(x.shape[:-1] + (groups, cin_g))
    kg = kernel.reshape(cin_g, groups, cout // groups)
    y = jnp.einsum("...gc,cgo->...go", xg, kg, precision=precision)
    return _add_bias(y.reshape(x.shape[:-1] + (cout,)), bias)


def depthwise(x, kernel, *, config: ConvConfig, bias=None, dtype=None, precision=None, lowering=None):
    """A depthwise conv, one ``(kh, kw)`` filter per channel (``kernel`` ``(kh, kw, C)``), with the
    strides, padding and dilation of ``config`` (its ``groups`` is ignored). On CPU a sum over the
    taps of strided slices of the padded input (shift-and-add); otherwise a grouped conv.

    >>> import jax.numpy as jnp
    >>> depthwise(jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3)), config=ConvConfig(1, "SAME")).shape
    (1, 6, 6, 3)
    """
    lowering = lowering or default_lowering()
    channels = kernel.shape[-1]
    if lowering == "conv":
        grouped = ConvConfig(config.strides, config.padding, config.kernel_dilation, channels)
        return conv(x, kernel[:, :, None, :], config=grouped, bias=bias, dtype=dtype, precision=precision)
    x, lead = _flatten_batch(x)
    if x.shape[-1] != channels:
        raise ValueError(f"depthwise kernel {kernel.shape} has {channels} channels; input has {x.shape[-1]}")
    x, kernel, bias = dtypes.promote_dtype((x, kernel, bias), dtype=dtype)
    y = _shift_and_add(_explicit_pad(x, config, kernel.shape[:2]), kernel, config)
    return _restore_batch(_add_bias(y, bias), lead)


def _shift_and_add(x, kernel, config: ConvConfig):
    """VALID depthwise window sum on an already padded ``x``: one strided slice per tap."""
    (kh, kw, c), (sh, sw), (dh, dw) = kernel.shape, config.strides, config.kernel_dilation
    n, hp, wp, _ = x.shape
    ho, wo = (hp - (kh - 1) * dh - 1) // sh + 1, (wp - (kw - 1) * dw - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"input {x.shape[1:3]} (padded) is smaller than the dilated kernel {(kh, kw)}")
    out = None
    for i in range(kh):
        for j in range(kw):
            start = (0, i * dh, j * dw, 0)
            stop = (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c)
            term = lax.slice(x, start, stop, (1, sh, sw, 1)) * kernel[i, j][None, None, None, :]
            out = term if out is None else out + term
    return out
