"""Shared pieces of the factorized layers: validation of factor groups, building sub-convs
from given kernels, and the :class:`FactorizedLayer` base with ``from_layer``."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sigmadecomp._factorized import to_dense
from sigmadecomp.layers import _ops
from sigmadecomp.layers._config import ConvConfig
from sigmadecomp.layers._counts import Counts, count_format
from sigmadecomp.layers._shapes import check_factorized

__all__ = ["IMPLEMENTATIONS", "FactorizedLayer"]

IMPLEMENTATIONS = ("factorized", "dense")


def check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} ('factorized': the chain of "
                         f"small layers; 'dense': one conv with the kernel rebuilt from the factors); "
                         f"got {implementation!r}")
    return implementation


def _const(value):
    """An initializer returning ``value``: the sub-layers are built from known weights, not drawn."""

    def init(key, shape, dtype):
        del key
        if tuple(shape) != tuple(value.shape):
            raise ValueError(f"internal shape mismatch: layer wants {tuple(shape)}, got {tuple(value.shape)}")
        return jnp.asarray(value, dtype)

    return init


def make_conv(kernel, *, groups=1, bias=None, strides=(1, 1), padding="VALID",
              kernel_dilation=(1, 1), dtype=None, precision=None) -> nnx.Conv:
    """An ``nnx.Conv`` holding exactly ``kernel`` (and ``bias``), parameters in ``kernel.dtype``."""
    kh, kw, cin_g, cout = kernel.shape
    return nnx.Conv(
        cin_g * groups, cout, (kh, kw), strides, padding=padding, kernel_dilation=kernel_dilation,
        feature_group_count=groups, use_bias=bias is not None, dtype=dtype, param_dtype=kernel.dtype,
        precision=precision, kernel_init=_const(kernel),
        bias_init=_const(bias) if bias is not None else nnx.initializers.zeros_init(),
        rngs=nnx.Rngs(0),
    )


def make_linear(kernel, *, bias=None, dtype=None, precision=None) -> nnx.Linear:
    """An ``nnx.Linear`` holding exactly ``kernel`` ``(in, out)`` (and ``bias``)."""
    return nnx.Linear(
        kernel.shape[0], kernel.shape[1], use_bias=bias is not None, dtype=dtype,
        param_dtype=kernel.dtype, precision=precision, kernel_init=_const(kernel),
        bias_init=_const(bias) if bias is not None else nnx.initializers.zeros_init(),
        rngs=nnx.Rngs(0),
    )


def as_groups(factorized, cls) -> list:
    """One factorized kernel, or one per feature group (all the same shape and ranks) → list."""
    groups = list(factorized) if isinstance(factorized, (list, tuple)) else [factorized]
    if not groups or not all(isinstance(f, cls) for f in groups):
        got = [type(f).__name__ for f in groups]
        raise ValueError(f"expected a {cls.__name__} or a list of them (one per feature group); got {got}")
    shapes = {(tuple(f.kernel_shape), tuple(jnp.shape(x) for x in _leaves(f))) for f in groups}
    if len(shapes) != 1:
        raise ValueError(
            f"all {len(groups)} per-group {cls.__name__} kernels must have the same kernel_shape and "
            f"factor shapes (one rank for every group); got {sorted(shapes)}"
        )
    for f in groups:
        check_factorized(f)
    dtypes = {x.dtype for f in groups for x in _leaves(f)}
    if len(dtypes) != 1:
        raise ValueError(f"all factors must share one dtype; got {sorted(str(d) for d in dtypes)}")
    return groups


def conv_groups(factorized, cls) -> list:
    """:func:`as_groups` for the conv layers: the kernel must be a 4-D conv kernel."""
    parts = as_groups(factorized, cls)
    if len(parts[0].kernel_shape) != 4:
        raise ValueError(
            f"got a {cls.__name__} with dense kernel_shape {tuple(parts[0].kernel_shape)}; only the 'svd' "
            "format (LowRankDense) applies to dense layers"
        )
    return parts


def _leaves(f):
    return jax.tree_util.tree_leaves(f)


def cat(arrays: Sequence, dtype) -> jnp.ndarray:
    """Concatenate per-group weights along the output-channel (last) axis, as grouped convs expect."""
    return jnp.concatenate([jnp.asarray(a, dtype) for a in arrays], axis=-1)


def split(array, groups: int) -> list:
    """Inverse of :func:`cat`."""
    return jnp.split(array, groups, axis=-1)


class FactorizedLayer(nnx.Module):
    """Base of the factorized layers.

    Attributes set by every subclass: ``format`` (``"svd"``, ``"tucker2"``, ``"cp"``, ``"cp3"``),
    ``kernel_shape`` (the full kernel of the layer it replaces, ``(kh, kw, cin // groups, cout)``
    or ``(in, out)``), ``groups``, ``ranks`` (a tuple, per group), ``use_bias``, the computation
    ``dtype`` and ``precision``, and ``implementation``:

    * ``"factorized"`` (default): the chain of small layers, each lowered the fast way for the
      backend (:mod:`sigmadecomp.layers._ops`: shift-and-add depthwise and ``dot_general`` 1×1
      convs on CPU, CP's two depthwise convs merged into one ``kh×kw`` pass there);
    * ``"dense"``: one conv with the dense kernel rebuilt from the factors at every call. Same
      parameters (the factors are what is stored), same outputs to float tolerance, the speed of
      the dense layer: for layers whose factorized chain is slower than the dense conv.

    Both compute the same function; :meth:`reference` is the literal chain of the ``nnx.Conv``
    sub-layers (what the counts describe). The attribute may be changed after construction.
    """

    format: str = ""
    factorized_type: type = type(None)
    implementation: str = "factorized"

    def _set_runtime(self, dtype, precision, implementation) -> None:
        self.dtype, self.precision = dtype, precision
        self.implementation = check_implementation(implementation)

    def __call__(self, x):
        if check_implementation(self.implementation) == "dense":
            return self.dense_call(x)
        return self.factorized_call(x)

    def reference(self, x):
        """The literal chain of sub-layers; layers with fast lowerings override it."""
        return self.factorized_call(x)

    def dense_call(self, x):
        """The layer as one conv with :meth:`dense_kernel`, the original configuration and bias."""
        bias = None if self.out_conv.bias is None else self.out_conv.bias[...]
        return _ops.conv(x, self.dense_kernel(), config=self.config, bias=bias, dtype=self.dtype,
                         precision=self.precision)

    def _runtime(self) -> dict:
        return dict(dtype=self.dtype, precision=self.precision)

    def counts(self, in_spatial=None, out_spatial=None) -> Counts:
        """Parameters and MACs per example (see :mod:`sigmadecomp.layers._counts`)."""
        return count_format(self.format, self.kernel_shape, self.ranks, groups=self.groups,
                            bias=self.use_bias, in_spatial=in_spatial, out_spatial=out_spatial)

    def dense_kernel(self):
        """The dense kernel this layer computes, in the original layer's layout."""
        parts = self.to_factorized()
        if not isinstance(parts, list):
            return to_dense(parts)
        return jnp.concatenate([to_dense(p) for p in parts], axis=-1)

    @classmethod
    def from_layer(cls, layer, factorized, **kwargs):
        """The factorized replacement of ``layer`` (an ``nnx.Conv``, or ``nnx.Linear`` for
        :class:`LowRankDense`): strides, padding, dilation, groups, bias, computation dtype and
        precision are copied from ``layer``; the factors are cast to the dtype of its kernel."""
        if not isinstance(layer, nnx.Conv):
            raise ValueError(
                f"{cls.__name__}.from_layer needs an nnx.Conv; got {type(layer).__name__}. "
                "Dense layers can only use the 'svd' format (LowRankDense)."
            )
        config = ConvConfig.from_conv(layer)
        groups = as_groups(factorized, cls.factorized_type)
        check_layer_match(layer.kernel.shape, config.groups, groups, cls.__name__)
        dtype = layer.kernel[...].dtype
        return cls(
            [_cast(f, dtype) for f in groups], bias=_bias(layer), strides=config.strides,
            padding=config.padding, kernel_dilation=config.kernel_dilation,
            dtype=layer.dtype, precision=layer.precision, **kwargs,
        )


def check_layer_match(layer_shape, groups: int, parts: list, name: str) -> None:
    """The per-group factorized kernels must tile the layer's kernel exactly."""
    kh, kw, cin_g, cout = layer_shape
    want = (kh, kw, cin_g, cout // groups)
    if len(parts) != groups or tuple(parts[0].kernel_shape) != want:
        raise ValueError(
            f"{name}: the layer has kernel {tuple(layer_shape)} with {groups} feature group(s), so it "
            f"needs {groups} factorized kernel(s) of kernel_shape {want}; got {len(parts)} of "
            f"kernel_shape {tuple(parts[0].kernel_shape)}"
        )


def _cast(factorized, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), factorized)


def _bias(layer):
    return None if layer.bias is None else layer.bias[...]


def full_kernel_shape(parts: list) -> tuple:
    """Kernel shape of the layer that the per-group kernels ``parts`` make up together."""
    shape = tuple(parts[0].kernel_shape)
    return shape[:-1] + (shape[-1] * len(parts),)


def check_bias(bias, cout: int, dtype):
    if bias is None:
        return None
    bias = jnp.asarray(bias, dtype)
    if bias.shape != (cout,):
        raise ValueError(f"bias must have shape ({cout},) to match the kernel; got {bias.shape}")
    return bias
