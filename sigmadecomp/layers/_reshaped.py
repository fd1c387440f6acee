"""Reshaped conv layers (r-CP, r-Tucker, r-TT, r-TR): the TNN seed's generalised tensor operations.

The input is viewed as ``(N, H, W, s₁, …, s_m)`` and the kernel is never formed. The cores split
into the spatial core ``S[p, α]`` (``α`` its rank letters) and the channel cores; the layer runs
one of two contraction orders, whichever costs fewer MACs for the input's shape:

* ``"channels-first"``: one einsum of the input with the channel cores (``s → t``, carrying
  ``α``) at input resolution, then ONE spatial conv ``α → 1`` with the ``cout`` outputs folded into
  the batch;
* ``"spatial-first"``: ONE spatial conv ``1 → α`` with the ``cin`` inputs folded into the batch
  (strides, padding, dilation applied here), then the einsum ``(s, α) → t`` at output resolution.

The channel einsum is a sequence of pairwise contractions whose order is chosen by opt_einsum
(``"optimal"``: fewest operations); the MAC count (:func:`contraction_plan`) is summed over exactly
that sequence plus the conv, and the path found is the one executed. Channel maps are per pixel and
linear, so they commute with the conv's zero (or circular / reflect) padding: every stride,
padding and dilation is exact. Grouped convs are not supported (one ``cin``/``cout`` factorisation).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import opt_einsum
from flax import nnx
from flax.nnx.nn import dtypes

from sigmadecomp import _reshaped as rs
from sigmadecomp.layers import _ops
from sigmadecomp.layers._common import FactorizedLayer, check_bias, check_layer_match
from sigmadecomp.layers._config import ConvConfig
from sigmadecomp.layers._counts import Counts

__all__ = ["RCPConv", "RTRConv", "RTTConv", "RTuckerConv", "ReshapedConv", "contraction_plan", "count_reshaped"]

ORDERS = ("channels-first", "spatial-first")
_N, _H, _W = "NHW"  # batch and position letters (upper case: never a core label)


def _split_spatial(kind: str, m: int):
    """``(spatial label, alpha letters, channel labels)``: the spatial core is core 0."""
    labels = rs.reshaped_labels(kind, m)
    alpha = "".join(c for c in labels[0] if c != rs.SPATIAL)
    return labels[0], alpha, labels[1:]


def _einsum_spec(kind: str, m: int, order: str) -> str:
    _, alpha, channel = _split_spatial(kind, m)
    s, t = rs.S_LETTERS[:m], rs.T_LETTERS[:m]
    if order == "channels-first":
        return ",".join((_N + _H + _W + s,) + channel) + "->" + _N + _H + _W + t + alpha
    return ",".join((_N + s + _H + _W + alpha,) + channel) + "->" + _N + _H + _W + t


def _macs(einsum_str: str, size: dict) -> int:
    """MACs of one contraction step: the product of the sizes of all its distinct letters."""
    inputs = einsum_str.split("->")[0].split(",")
    letters = set("".join(inputs))
    return math.prod(size[c] for c in letters) * max(1, len(inputs) - 1)


@functools.lru_cache(maxsize=256)
def contraction_plan(kind: str, kernel_shape: tuple, in_modes: tuple, out_modes: tuple, ranks: tuple,
                     batch: int, in_spatial: tuple, out_spatial: tuple, orders: tuple = ORDERS) -> dict:
    """The cheapest of ``orders`` for this shape: ``{"order", "spec", "path", "macs", "conv_macs",
    "einsum_macs", "steps"}`` with MACs summed over the executed contraction sequence.

    >>> plan = contraction_plan("r-tt", (3, 3, 16, 32), (2, 2, 4), (2, 4, 4), (4, 4, 4), 1, (8, 8), (8, 8))
    >>> plan["order"], plan["macs"] == plan["conv_macs"] + plan["einsum_macs"]
    ('spatial-first', True)
    """
    m = len(in_modes)
    size = rs.sizes(kind, kernel_shape, in_modes, out_modes, ranks)
    _, alpha, channel = _split_spatial(kind, m)
    n_alpha = math.prod(size[c] for c in alpha)
    kh, kw, cin, cout = rs.kernel_dims(kernel_shape)
    best = None
    for order in orders:
        h, w = in_spatial if order == "channels-first" else out_spatial
        dims = dict(size, **{_N: batch, _H: h, _W: w})
        spec = _einsum_spec(kind, m, order)
        shapes = [tuple(dims[c] for c in term) for term in spec.split("->")[0].split(",")]
        path, info = opt_einsum.contract_path(spec, *shapes, shapes=True, optimize="optimal")
        steps = tuple(c[2] for c in info.contraction_list)
        einsum_macs = sum(_macs(s, dims) for s in steps)
        conv_macs = batch * (cout if order == "channels-first" else cin) * math.prod(out_spatial) * kh * kw * n_alpha
        plan = dict(order=order, spec=spec, path=tuple(path), steps=steps, conv_macs=conv_macs,
                    einsum_macs=einsum_macs, macs=conv_macs + einsum_macs)
        best = plan if best is None or plan["macs"] < best["macs"] else best
    return best


@functools.lru_cache(maxsize=256)
def _out_spatial(config: ConvConfig, kernel_size: tuple, in_spatial: tuple) -> tuple:
    x = jax.ShapeDtypeStruct((1, *in_spatial, 1), jnp.float32)
    k = jax.ShapeDtypeStruct((*kernel_size, 1, 1), jnp.float32)
    return tuple(jax.eval_shape(lambda a, b: _ops.conv(a, b, config=config), x, k).shape[1:3])


def count_reshaped(kind: str, kernel_shape, ranks, *, in_modes=None, out_modes=None, groups: int = 1,
                   bias: bool = False, in_spatial=None, out_spatial=None) -> Counts:
    """Parameters and MACs per example of a reshaped layer (MACs of its executed contractions).

    >>> count_reshaped("r-tt", (3, 3, 16, 32), (4, 4, 4), in_spatial=(8, 8), out_spatial=(8, 8)).params
    292
    """
    if groups != 1:
        raise ValueError(f"{kind}: reshaped formats do not support grouped convs (groups={groups})")
    if in_modes is None:
        default = rs.zeros(kind, kernel_shape, ranks)
        in_modes, out_modes = default.in_modes, default.out_modes
    shapes = rs.core_shapes(kind, kernel_shape, in_modes, out_modes, tuple(ranks))
    params = sum(math.prod(s) for s in shapes) + (kernel_shape[-1] if bias else 0)
    if in_spatial is None or out_spatial is None:
        return Counts(int(params), None)
    plan = contraction_plan(kind, tuple(kernel_shape), tuple(in_modes), tuple(out_modes), tuple(ranks), 1,
                            tuple(in_spatial), tuple(out_spatial))
    return Counts(int(params), int(plan["macs"]))


class ReshapedConv(FactorizedLayer):
    """A reshaped conv layer (base of :class:`RCPConv`, :class:`RTuckerConv`, :class:`RTTConv`,
    :class:`RTRConv`): the cores are ``nnx.Param`` attributes ``core_0``, ``core_1``, … (trainable
    as they are; the bias is ``bias``). ``order`` is ``"auto"`` (fewest MACs for the input's
    shape, see :func:`contraction_plan`) or one of :data:`ORDERS`.

    >>> import jax.numpy as jnp
    >>> from sigmadecomp._reshaped import zeros
    >>> f = zeros("r-tt", (3, 3, 16, 32), (4, 4, 4))
    >>> RTTConv(f, strides=2)(jnp.ones((2, 8, 8, 16))).shape
    (2, 4, 4, 32)
    """

    def __init__(self, factorized, *, bias=None, strides=1, padding="SAME", kernel_dilation=1, dtype=None,
                 precision=None, implementation="factorized", order: str = "auto"):
        self._set_runtime(dtype, precision, implementation)
        f = self._single(factorized)
        self.kernel_shape, self.groups = tuple(f.kernel_shape), 1
        self.in_modes, self.out_modes = rs.check_modes(f.kernel_shape, f.in_modes, f.out_modes)
        self.ranks, self.use_bias = tuple(f.ranks), bias is not None
        want = rs.core_shapes(self.format, self.kernel_shape, self.in_modes, self.out_modes, self.ranks)
        got = tuple(tuple(c.shape) for c in f.cores)
        if got != want:
            raise ValueError(f"{type(self).__name__}: cores of shapes {got} do not fit {self.format} with kernel "
                             f"{self.kernel_shape}, modes {self.in_modes}/{self.out_modes}, ranks {self.ranks}; "
                             f"expected {want}")
        self.config = ConvConfig(strides, padding, kernel_dilation, 1)
        if order not in ("auto",) + ORDERS:
            raise ValueError(f"order must be 'auto' or one of {ORDERS}; got {order!r}")
        self.order, self.num_cores = order, len(f.cores)
        for k, core in enumerate(f.cores):
            setattr(self, f"core_{k}", nnx.Param(jnp.asarray(core)))
        bias = check_bias(bias, self.kernel_shape[-1], f.cores[0].dtype)
        self.bias = None if bias is None else nnx.Param(bias)

    @classmethod
    def _single(cls, factorized):
        parts = list(factorized) if isinstance(factorized, (list, tuple)) else [factorized]
        if len(parts) != 1:
            raise ValueError(f"{cls.__name__}: reshaped formats do not support grouped convs; got "
                             f"{len(parts)} per-group kernels")
        if not isinstance(parts[0], cls.factorized_type):
            raise ValueError(f"{cls.__name__} needs a {cls.factorized_type.__name__}; got "
                             f"{type(parts[0]).__name__}")
        return parts[0]

    def cores(self) -> tuple:
        return tuple(getattr(self, f"core_{k}")[...] for k in range(self.num_cores))

    def to_factorized(self):
        return rs.CLASSES[self.format](self.cores(), self.in_modes, self.out_modes, self.kernel_shape)

    def plan(self, x_shape) -> dict:
        """The contraction plan used for an input of shape ``x_shape`` ``(N, H, W, cin)``."""
        kh, kw, _, _ = self.kernel_shape
        in_spatial = tuple(x_shape[-3:-1])
        out_spatial = _out_spatial(self.config, (kh, kw), in_spatial)
        batch = math.prod(x_shape[:-3])
        orders = ORDERS if self.order == "auto" else (self.order,)
        return contraction_plan(self.format, self.kernel_shape, self.in_modes, self.out_modes, self.ranks,
                                batch, in_spatial, out_spatial, orders)

    def counts(self, in_spatial=None, out_spatial=None) -> Counts:
        return count_reshaped(self.format, self.kernel_shape, self.ranks, in_modes=self.in_modes,
                              out_modes=self.out_modes, bias=self.use_bias, in_spatial=in_spatial,
                              out_spatial=out_spatial)

    def factorized_call(self, x):
        lead = x.shape[:-3]
        x = x.reshape((-1,) + x.shape[-3:])
        bias = None if self.bias is None else self.bias[...]
        x, bias, *cores = dtypes.promote_dtype((x, bias, *self.cores()), dtype=self.dtype)
        plan = self.plan(x.shape)
        spatial, channel = self._spatial_kernel(cores[0]), cores[1:]
        n, h, w, _ = x.shape
        cin, cout, n_alpha = self.kernel_shape[2], self.kernel_shape[3], spatial.shape[-1]
        einsum = functools.partial(jnp.einsum, optimize=list(plan["path"]), precision=self.precision)
        if plan["order"] == "channels-first":
            z = einsum(plan["spec"], x.reshape(n, h, w, *self.in_modes), *channel)  # (n, h, w, t…, α…)
            z = jnp.moveaxis(z.reshape(n, h, w, cout, n_alpha), 3, 1).reshape(n * cout, h, w, n_alpha)
            y = self._conv(z, spatial[..., None])  # (n·cout, h', w', 1)
            y = jnp.moveaxis(y.reshape(n, cout, *y.shape[1:3]), 1, -1)
        else:
            u = jnp.moveaxis(x, -1, 1).reshape(n * cin, h, w, 1)
            u = self._conv(u, spatial[:, :, None, :])  # (n·cin, h', w', α)
            ho, wo = u.shape[1:3]
            u = u.reshape(n, *self.in_modes, ho, wo, *spatial_alpha_shape(cores[0], self.format, len(self.in_modes)))
            y = einsum(plan["spec"], u, *channel).reshape(n, ho, wo, cout)
        if bias is not None:
            y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
        return y.reshape(lead + y.shape[1:])

    def _spatial_kernel(self, core):
        """The spatial core as ``(kh, kw, |α|)`` (its ``p`` axis moved first, ``α`` flattened)."""
        label = rs.reshaped_labels(self.format, len(self.in_modes))[0]
        kh, kw = self.kernel_shape[:2]
        return jnp.moveaxis(core, label.index(rs.SPATIAL), 0).reshape(kh, kw, -1)

    def _conv(self, x, kernel):
        return _ops.conv(x, kernel, config=self.config, precision=self.precision)

    def dense_call(self, x):
        bias = None if self.bias is None else self.bias[...]
        return _ops.conv(x, self.dense_kernel(), config=self.config, bias=bias, dtype=self.dtype,
                         precision=self.precision)

    @classmethod
    def from_layer(cls, layer, factorized, **kwargs):
        """The reshaped replacement of ``layer`` (an ungrouped ``nnx.Conv``): strides, padding,
        dilation, bias, dtype and precision are copied; the cores are cast to the kernel's dtype."""
        if not isinstance(layer, nnx.Conv):
            raise ValueError(f"{cls.__name__}.from_layer needs an nnx.Conv; got {type(layer).__name__} "
                             "(reshaped formats are for conv layers)")
        config = ConvConfig.from_conv(layer)
        f = cls._single(factorized)
        check_layer_match(layer.kernel.shape, config.groups, [f], cls.__name__)
        dtype = layer.kernel[...].dtype
        f = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), f)
        bias = None if layer.bias is None else layer.bias[...]
        return cls(f, bias=bias, strides=config.strides, padding=config.padding,
                   kernel_dilation=config.kernel_dilation, dtype=layer.dtype, precision=layer.precision, **kwargs)


def spatial_alpha_shape(core, kind: str, m: int) -> tuple:
    """The sizes of the spatial core's rank axes, in label order."""
    label = rs.reshaped_labels(kind, m)[0]
    return tuple(n for c, n in zip(label, core.shape) if c != rs.SPATIAL)


class RCPConv(ReshapedConv):
    """Reshaped CP conv (``r-cp``); see :class:`ReshapedConv`."""

    format = "r-cp"
    factorized_type = rs.RCP


class RTuckerConv(ReshapedConv):
    """Reshaped Tucker conv (``r-tucker``); see :class:`ReshapedConv`."""

    format = "r-tucker"
    factorized_type = rs.RTucker


class RTTConv(ReshapedConv):
    """Reshaped TT conv (``r-tt``, Garipov's TT-conv); see :class:`ReshapedConv`."""

    format = "r-tt"
    factorized_type = rs.RTT


class RTRConv(ReshapedConv):
    """Reshaped tensor-ring conv (``r-tr``); see :class:`ReshapedConv`."""

    format = "r-tr"
    factorized_type = rs.RTR
