"""Tap the ``nn.Conv`` / ``nn.Dense`` layers of a Flax **linen** model with ``nn.intercept_methods``.

Linen modules are stateless descriptions applied to a ``variables`` dict, so nothing needs copying:
an interceptor sees every method call of every sub-module during ``module.apply(variables, x)``;
for the ``__call__`` of a 2-D ``nn.Conv`` or an ``nn.Dense`` it records the input (to accumulate
``cov``) or describes the layer (to plan). A layer's path is its scope path joined with dots, e.g.
``"Conv_0"`` or ``"block.conv"`` — the same keys as ``variables["params"]``, and the convention of
NNX paths in the rest of the package. The user's module code is never edited.

The patch statistics reuse the NNX machinery: a :class:`sigmadecomp.covariance.LayerTap` per layer
(built from the linen attributes plus the input's feature count) and the same per-geometry jitted
update, so a linen model and an NNX model with the same weights give identical ``cov``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from sigmadecomp.covariance._collect import (
    LayerTap, _as_input, _data_parallel, _layer_update, _layer_update_jit, _length,
)
from sigmadecomp.covariance._stats import LayerCovariance, _check_dtype, _default_dtype, finalize, init
from sigmadecomp.distributed._covariance import batch_pieces
from sigmadecomp.layers._config import ConvConfig

__all__ = ["LinenLayer", "collect_covariances", "describe_layers", "is_tapped", "layer_path"]


def layer_path(module: nn.Module) -> str:
    """``"block.conv"``: the module's scope path joined with dots (its key in ``variables``)."""
    return ".".join(str(p) for p in module.scope.path)


def is_tapped(context) -> bool:
    """Is this intercepted call the forward pass of a decomposable linen layer?"""
    return context.method_name == "__call__" and type(context.module) in (nn.Conv, nn.Dense)


@dataclasses.dataclass(frozen=True)
class LinenLayer:
    """A decomposable linen layer as seen in one forward pass: its :class:`LayerTap` geometry,
    kernel shape, bias, compute dtype / precision and the shapes of its input and output."""

    tap: LayerTap
    kernel_shape: tuple
    use_bias: bool
    dtype: object = None
    precision: object = None
    in_shape: tuple = ()
    out_shape: tuple = ()

    @property
    def path(self) -> str:
        return self.tap.path

    @property
    def kind(self) -> str:
        return "dense" if self.tap.dense else "conv"


def _conv_tap(path: str, layer: nn.Conv, in_features: int) -> LayerTap:
    """The conv's geometry through the package's one normaliser (:class:`ConvConfig`), which reads
    the same attribute names on linen's ``nn.Conv`` as on NNX's."""
    kernel_size = (layer.kernel_size,) if isinstance(layer.kernel_size, int) else tuple(layer.kernel_size)
    try:
        if len(kernel_size) != 2:
            raise ValueError(f"only 2-D convs can be factorized; got kernel_size {layer.kernel_size}")
        config = ConvConfig.from_conv(layer)
    except ValueError as error:
        raise ValueError(f"linen layer {path!r}: {error}; leave it out with layers=[...] / skip") from None
    return LayerTap(path, int(in_features), kernel_size=tuple(int(k) for k in kernel_size),
                    strides=config.strides, padding=config.padding, dilation=config.kernel_dilation,
                    groups=config.groups)


def _describe(module: nn.Module, x, y) -> LinenLayer:
    path = layer_path(module)
    cin = int(x.shape[-1])
    if isinstance(module, nn.Dense):
        tap, kernel_shape = LayerTap(path, cin, dense=True), (cin, int(module.features))
    else:
        tap = _conv_tap(path, module, cin)
        kernel_shape = (*tap.kernel_size, cin // tap.groups, int(module.features))
    return LinenLayer(tap, kernel_shape, bool(module.use_bias), module.dtype, module.precision,
                      tuple(x.shape), tuple(y.shape))


def describe_layers(module: nn.Module, variables, x, *, method=None, **apply_kwargs) -> dict[str, LinenLayer]:
    """``{path: LinenLayer}`` of every 2-D ``nn.Conv`` / ``nn.Dense`` called by ``module.apply(
    variables, x)``, in execution order, traced with ``jax.eval_shape`` (nothing is computed).
    A layer called twice with different shapes raises ``ValueError``.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> net = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, nn.Dense(2)])
    >>> variables = net.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    >>> {p: layer.kernel_shape for p, layer in describe_layers(net, variables, jnp.ones((1, 8, 8, 3))).items()}
    {'layers_0': (3, 3, 3, 4), 'layers_2': (4, 2)}
    """
    found: dict[str, LinenLayer] = {}

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if is_tapped(context):
            layer = _describe(context.module, args[0], y)
            if found.get(layer.path, layer) != layer:
                raise ValueError(f"linen layer {layer.path!r} is called with different input shapes; "
                                 "it cannot be planned as one layer")
            found[layer.path] = layer
        return y

    def run(variables, x):
        with nn.intercept_methods(interceptor):
            return module.apply(variables, x, method=method, **apply_kwargs)

    jax.eval_shape(run, variables, jax.ShapeDtypeStruct(jnp.shape(x), x.dtype))
    return found


def _recorder(paths: frozenset, calls: dict) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        if is_tapped(context):
            path = layer_path(context.module)
            if path in paths:
                calls.setdefault(path, []).append(args[0])
        return next_fun(*args, **kwargs)

    return interceptor


def _layer_inputs(module, paths: frozenset, apply_kwargs: tuple, variables, x) -> dict[str, list]:
    calls: dict[str, list] = {}
    with nn.intercept_methods(_recorder(paths, calls)):
        module.apply(variables, x, **dict(apply_kwargs))
    return calls


def _select(found: dict, layers) -> dict:
    if layers is None:
        return found
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [p for p in layers if p not in found]
    if unknown or not layers:
        raise ValueError(f"unknown linen layer path(s) {unknown or layers}; the model's nn.Conv / nn.Dense "
                         f"layers are: {', '.join(found) or '(none)'}")
    return {p: found[p] for p in dict.fromkeys(layers)}


def collect_covariances(
    module: nn.Module,
    variables,
    batches: Iterable,
    *,
    layers: Sequence[str] | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    dtype=None,
    jit: bool = True,
    apply_kwargs: dict | None = None,
    devices=None,
) -> dict[str, LayerCovariance]:
    """Input-patch statistics ``cov = E[x xᵀ]`` of every 2-D ``nn.Conv`` / ``nn.Dense`` of a linen
    model, the linen twin of :func:`sigmadecomp.collect_covariances` (same arguments, same result
    for the same weights).

    Args:
      module, variables: the linen module and its variables (``{"params": ..., "batch_stats": ...}``).
      batches: iterable of input arrays, or of ``(x, y, ...)`` tuples.
      layers: layer paths (see :func:`describe_layers`); default all of them.
      apply_kwargs: extra keyword arguments of ``module.apply``, e.g. ``{"train": False}``
        (hashable values: they are static under jit). Mutable collections are not updated.
      devices: as in :func:`sigmadecomp.collect_covariances` (data-parallel over devices).

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> net = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, nn.Dense(2)])
    >>> variables = net.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    >>> covs = collect_covariances(net, variables, [jnp.ones((2, 8, 8, 3))], progress=False)
    >>> covs["layers_0"].cov.shape, covs["layers_2"].cov.shape
    ((27, 27), (4, 4))
    """
    if max_batches is not None and int(max_batches) < 1:
        raise ValueError(f"max_batches must be a positive int or None; got {max_batches!r}.")
    dtype = _check_dtype(_default_dtype() if dtype is None else jnp.dtype(dtype))
    kwargs = tuple(sorted((apply_kwargs or {}).items()))
    update = _layer_update_jit if jit else _layer_update
    total = _length(batches)
    total = max_batches if total is None else min(total, max_batches or total)
    taps, stats = None, None
    for batch in tqdm(itertools.islice(batches, max_batches), total=total, disable=not progress,
                      desc="covariance (linen)"):
        x = _as_input(batch)
        if taps is None:
            found = describe_layers(module, variables, x, **dict(kwargs))
            taps = {p: layer.tap for p, layer in _select(found, layers).items()}
            stats = {p: init(t.dim, groups=t.groups, dtype=dtype) for p, t in taps.items()}
            # one compilation per call and batch shape (linen modules holding lists are unhashable)
            inputs_fn = functools.partial(_layer_inputs, module, frozenset(taps), kwargs)
            single = functools.partial(jax.jit(inputs_fn) if jit else inputs_fn, variables)
            parallel = _data_parallel(devices, inputs_fn, variables)
        for inputs, layer_update in batch_pieces(x, parallel, single, update):
            for path, tap in taps.items():
                geometry = dataclasses.replace(tap, path="")
                for value in inputs[path]:
                    stats[path] = layer_update(geometry, stats[path], value)
    if stats is None:
        raise ValueError("batches was empty: give at least one batch of inputs.")
    return {path: finalize(s) for path, s in stats.items()}
