"""Which implementation each factorized layer trains with: the factorized chain or the dense kernel
rebuilt from the factors at every step, whichever takes the shorter training step on this machine.

Both compute the same function of the same parameters (the factors); only the speed differs, and
it differs a lot. Measured on the 2-core CPU, distilling ResNet-32 at 10% of the conv parameters
(`benchmarks/training_implementations.py`): the r-CP chain trains about 20× slower than its
rebuilt dense kernel, because its intermediate ``(N, H, W, cout, R)`` tensor is large at the
ranks a parameter budget gives, while plain CP's chain is the faster one. An inference-time MAC
count does not predict this (r-CP's first-stage layers have fewer MACs than the dense conv and are
still slower), so the choice is timed: one jitted forward + backward of each layer alone, on
random inputs of the layer's real input shape at the training batch size, both implementations
interleaved (:func:`sigmadecomp.latency.time_interleaved`). Layers with the same signature are
timed once. A layer switches only when the other implementation is at least ``MARGIN`` (2×)
faster and saves at least ``MIN_SAVING_MS`` (1 ms) per step: the layers where it matters differ
by far more, and a near tie (or a sub-millisecond layer, whose timing a busy machine can double)
keeps the layer's own setting, so timing noise does not make two runs of the same key train
differently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmadecomp._paths import path_to_str
from sigmadecomp.latency import time_interleaved
from sigmadecomp.layers._common import IMPLEMENTATIONS, FactorizedLayer
from sigmadecomp.surgery._tap import intercept

__all__ = ["MARGIN", "MIN_SAVING_MS", "apply_implementations", "factorized_layers", "training_implementations"]

MARGIN = 2.0
MIN_SAVING_MS = 1.0


def factorized_layers(model: nnx.Module) -> dict:
    """``{path: layer}`` of every factorized layer of ``model``."""
    return {path_to_str(p): node for p, node in nnx.iter_graph(model) if isinstance(node, FactorizedLayer)}


def _input_shapes(model: nnx.Module, layers: dict, x: jax.ShapeDtypeStruct) -> dict:
    """Each layer's input shape for a model input of shape ``x`` (abstract evaluation)."""
    graphdef, state = nnx.split(model)
    shapes = {}

    def forward(state, x):
        m = nnx.merge(graphdef, state)
        inner = factorized_layers(m)
        taps = [(inner[p], lambda layer, xi, y, p=p: shapes.__setitem__(p, (tuple(xi.shape), xi.dtype)))
                for p in layers]
        with intercept(taps):
            return m(x)

    jax.eval_shape(forward, state, x)
    return shapes


def _signature(layer: FactorizedLayer, shape) -> tuple:
    params = tuple((jax.tree_util.keystr(k), np.shape(v), str(v.dtype))
                   for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(layer, nnx.Param)))
    return type(layer).__name__, shape, params, repr(getattr(layer, "config", None))


def _step_time(layer: FactorizedLayer, shape, dtype, repeats: int) -> dict:
    """Median ms of one forward + backward of ``layer`` alone, per implementation."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)
    calls = {}
    for mode in IMPLEMENTATIONS:
        variant = nnx.clone(layer)
        variant.implementation = mode
        graphdef, params, rest = nnx.split(variant, nnx.Param, ...)

        def loss(params, x, graphdef=graphdef, rest=rest):
            return jnp.sum(jnp.square(nnx.merge(graphdef, params, rest)(x)))

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        calls[mode] = lambda step=step, params=params: step(params, x)
    timings = time_interleaved(calls, repeats=repeats)
    return {mode: t.median_ms for mode, t in timings.items()}


def training_implementations(model: nnx.Module, input_shape, *, repeats: int = 3) -> dict:
    """``{path: {"implementation", "ms"}}`` for every factorized layer of ``model``: the
    implementation of one training step of that layer at model input shape ``input_shape`` (batch
    first) that is ``MARGIN`` times and ``MIN_SAVING_MS`` faster than the other, else the layer's
    own, and the measured
    milliseconds of both.

    >>> from flax import nnx
    >>> from sigmadecomp.layers import factorize_layer, placeholder
    >>> class Net(nnx.Module):
    ...     def __init__(self):
    ...         conv = nnx.Conv(4, 4, (3, 3), rngs=nnx.Rngs(0))
    ...         self.conv = factorize_layer(conv, placeholder("cp", (3, 3, 4, 4), (2,)))
    ...     def __call__(self, x):
    ...         return self.conv(x)
    >>> chosen = training_implementations(Net(), (2, 8, 8, 4), repeats=1)
    >>> chosen["conv"]["implementation"] in ("factorized", "dense")
    True
    """
    layers = factorized_layers(model)
    if not layers:
        return {}
    floats = [v.dtype for v in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))]
    shapes = _input_shapes(model, layers, jax.ShapeDtypeStruct(tuple(input_shape), floats[0]))
    measured: dict = {}
    chosen = {}
    for path, layer in layers.items():
        if path not in shapes:  # not called by the model's forward pass
            continue
        shape, dtype = shapes[path]
        key = _signature(layer, shape)
        if key not in measured:
            measured[key] = _step_time(layer, shape, dtype, repeats)
        ms = measured[key]
        own, other = layer.implementation, next(m for m in IMPLEMENTATIONS if m != layer.implementation)
        pick = other if ms[own] > MARGIN * ms[other] and ms[own] - ms[other] >= MIN_SAVING_MS else own
        chosen[path] = dict(implementation=pick, ms={k: round(v, 3) for k, v in ms.items()})
    return chosen


def apply_implementations(model: nnx.Module, implementations: dict) -> dict:
    """Set ``model``'s factorized layers' implementations in place from ``{path: name}`` (or the
    dicts of :func:`training_implementations`); returns the previous ``{path: name}``."""
    layers = factorized_layers(model)
    previous = {}
    for path, choice in implementations.items():
        name = choice["implementation"] if isinstance(choice, dict) else choice
        if path not in layers:
            raise ValueError(f"{path!r} is not a factorized layer of the model")
        previous[path] = layers[path].implementation
        layers[path].implementation = name
    return previous
