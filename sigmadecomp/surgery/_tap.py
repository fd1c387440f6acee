"""Watch chosen sub-modules of a model while it runs, without editing the model's code.

:func:`intercept` temporarily wraps ``__call__`` of the classes of the watched modules; the wrapper
calls ``callback(module, input, output)`` for the watched instances only (looked up by identity)
and passes every other instance straight through; a callback's non-``None`` return value replaces
the output (used to inject noise when measuring a layer's sensitivity). It is meant for use inside a function traced by
``jax.eval_shape`` / ``jax.jit`` on a model merged from ``nnx.split`` state, so nothing the model
mutates (batch statistics, RNG counters) leaks back to the caller. Not thread-safe: the patch is
on the class for the duration of the ``with`` block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sigmadecomp._paths import path_to_str
from sigmadecomp.layers._common import FactorizedLayer

__all__ = ["count_macs", "input_spec", "intercept", "leaf_layers", "num_params"]

_MISSING = object()


def _wrap(original, callbacks: dict, active: set):
    def wrapper(self, *args, **kwargs):
        callback = callbacks.get(id(self))
        if callback is None or id(self) in active:  # unwatched, or a super().__call__ of a watched one
            return original(self, *args, **kwargs)
        active.add(id(self))
        try:
            out = original(self, *args, **kwargs)
        finally:
            active.discard(id(self))
        for fn in callback:  # a callback's non-None result replaces the output seen by the next
            replaced = fn(self, args[0] if args else kwargs.get("inputs"), out)
            out = out if replaced is None else replaced
        return out

    return wrapper


@contextlib.contextmanager
def intercept(taps: Sequence[tuple[nnx.Module, Callable]]) -> Iterator[None]:
    """Within the block, ``callback(module, x, y)`` runs after each call of each watched module;
    a callback that returns something other than ``None`` replaces the module's output with it."""
    callbacks: dict = {}
    for module, fn in taps:  # a module may be watched by several taps
        callbacks.setdefault(id(module), []).append(fn)
    active: set = set()
    saved = {}
    try:
        for cls in {type(module) for module, _ in taps}:
            saved[cls] = cls.__dict__.get("__call__", _MISSING)
            cls.__call__ = _wrap(cls.__call__, callbacks, active)
        yield
    finally:
        for cls, original in saved.items():
            if original is _MISSING:
                delattr(cls, "__call__")
            else:
                cls.__call__ = original


def leaf_layers(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
    """Every ``nnx.Conv`` / ``nnx.Linear`` at any depth, and every factorized layer as one leaf
    (its sub-layers hold its weights but are not called by its fast implementations)."""
    nodes = [(path_to_str(p), node) for p, node in nnx.iter_graph(model)]
    inside = [name + "." for name, node in nodes if isinstance(node, FactorizedLayer)]
    for name, node in nodes:
        if isinstance(node, (FactorizedLayer, nnx.Conv, nnx.Linear)) and not any(
                name.startswith(q) for q in inside):
            yield name, node


def macs_of(layer, x, y) -> int:
    """Multiply-accumulates per example of one call: kernel size × output positions for a
    conv/dense layer; the format's count (:meth:`FactorizedLayer.counts`) for a factorized one."""
    if isinstance(layer, FactorizedLayer):
        return int(layer.counts(in_spatial=tuple(x.shape[1:-1]), out_spatial=tuple(y.shape[1:-1])).flops)
    return int(math.prod(layer.kernel.shape) * math.prod(y.shape[1:-1]))


def count_macs(model: nnx.Module, record: dict) -> list:
    """Taps that store ``record[path] = MACs per example`` for every leaf conv/dense layer."""

    def tap(path):
        return lambda layer, x, y: record.__setitem__(path, macs_of(layer, x, y))

    return [(layer, tap(path)) for path, layer in leaf_layers(model)]


def num_params(module: nnx.Module) -> int:
    """Number of scalars in the module's ``nnx.Param`` variables."""
    leaves = jax.tree_util.tree_leaves(nnx.state(module, nnx.Param))
    return int(sum(math.prod(jnp.shape(x)) for x in leaves))


def input_spec(model: nnx.Module, input_shape) -> jax.ShapeDtypeStruct:
    """``input_shape`` (a shape, an array or a ShapeDtypeStruct) → a ShapeDtypeStruct whose dtype
    is the model's parameter dtype (strict dtype promotion forbids mixing float widths)."""
    if hasattr(input_shape, "shape") and hasattr(input_shape, "dtype"):
        return jax.ShapeDtypeStruct(tuple(input_shape.shape), input_shape.dtype)
    shape = tuple(input_shape)
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be a shape with a batch axis, e.g. (1, 32, 32, 3); "
                         f"got {input_shape!r}")
    floats = [x.dtype for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jax.ShapeDtypeStruct(shape, floats[0] if floats else jnp.float32)
