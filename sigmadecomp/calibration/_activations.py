"""Run a model stage by stage, find the order in which its layers are called, and gather the
cross statistics of one layer's inputs in two networks that see the same images.

**Stages.** A model's forward pass is a composition ``model(x) = s_K(… s_2(s_1(x)))`` of stages,
each a hashable callable ``stage(model, h) -> h`` that reads the layers of the ``model`` it is
given (so the same stage runs the original network and the compressed copy). Sequential
calibration keeps the activations of both networks at the current stage boundary and advances
them one stage at a time, so every layer costs one run of its own stage instead of a forward
pass from the input. :func:`forward_stages` finds them:

1. a model with a ``forward_stages()`` method returning such callables (the protocol);
2. :class:`~sigmadecomp.models.CifarResNet`: the stem, every residual block, the head;
3. anything else: one stage, the whole model — every layer then costs a full forward pass.

The stages are checked against ``model(x)`` on the first batch (:func:`check_stages`), so a model
whose ``__call__`` changed cannot silently diverge from them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmadecomp.covariance._collect import LayerTap, _layer_inputs, layer_chunks
from sigmadecomp._paths import find_layers, get_by_path
from sigmadecomp._patches import kernel_to_matrix
from sigmadecomp.covariance._stats import MomentState, accumulate_chunks
from sigmadecomp.models._resnet import CifarResNet
from sigmadecomp.surgery._plan import eligible_layers
from sigmadecomp.surgery._tap import intercept

__all__ = [
    "advance_stage", "check_stages", "execution_order", "forward_stages", "stage_layers", "stage_split",
]


def whole_model(model, x):
    """The one-stage fallback: the model's own forward pass."""
    return model(x)


def _resnet_stem(model, x):
    return nnx.relu(model.bn1(model.conv1(x)))


@dataclasses.dataclass(frozen=True)
class _ResNetBlock:
    """Block ``index`` of stage ``name`` (``"layer1"``…) of a CifarResNet; hashable by value, so
    the jitted stage functions are reused across calls."""

    name: str
    index: int

    def __call__(self, model, h):
        return self.submodule(model)(h)

    def submodule(self, model):
        """The block this stage runs: jitted work is keyed on its own graphdef (below)."""
        return getattr(model, self.name)[self.index]


def _resnet_head(model, h):
    return model.linear(jnp.mean(h, axis=(1, 2)))


def _resnet_stages(model: CifarResNet) -> tuple:
    blocks = [_ResNetBlock(name, i) for name in ("layer1", "layer2", "layer3")
              for i in range(len(getattr(model, name)))]
    return (_resnet_stem, *blocks, _resnet_head)


def forward_stages(model: nnx.Module) -> tuple[Callable, ...]:
    """The stages whose composition is ``model``'s forward pass (see the module docstring).

    >>> from sigmadecomp.models import CifarResNet
    >>> len(forward_stages(CifarResNet(20, rngs=nnx.Rngs(0))))  # stem, 9 blocks, head
    11
    >>> forward_stages(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))) == (whole_model,)
    True
    """
    method = getattr(model, "forward_stages", None)
    if callable(method):
        stages = tuple(method())
        if not stages or not all(callable(s) for s in stages):
            raise ValueError(f"{type(model).__name__}.forward_stages() must return a non-empty sequence of "
                             f"callables stage(model, h) -> h; got {stages!r}")
        return stages
    if isinstance(model, CifarResNet):
        return _resnet_stages(model)
    return (whole_model,)


@functools.partial(jax.jit, static_argnums=(0, 1))
def advance(graphdef, stage: Callable, state, h):
    """Run one stage of the model ``nnx.merge(graphdef, state)`` on ``h`` (on a copy, in jit)."""
    return stage(nnx.merge(graphdef, state), h)


def _call_module(module, h):
    return module(h)


def stage_split(stage: Callable, model: nnx.Module):
    """``(runner, graphdef, state)`` with ``advance(graphdef, runner, state, h) == stage(model, h)``.

    Why: a stage with a ``submodule(model)`` method (a CifarResNet block) reads only that module,
    so it is split and run alone. Its graphdef is the block's own, the same for every block of
    one structure and unchanged when layers elsewhere in the model are replaced, so identical
    blocks share one compilation. Any other stage is keyed on the whole model, as before.
    """
    submodule = getattr(stage, "submodule", None)
    if submodule is None:
        return (stage, *nnx.split(model))
    return (_call_module, *nnx.split(submodule(model)))


def advance_stage(stage: Callable, model: nnx.Module, h):
    """``stage(model, h)`` in jit, compiled once per module structure (:func:`stage_split`)."""
    runner, graphdef, state = stage_split(stage, model)
    return advance(graphdef, runner, state, h)


def run_stages(model: nnx.Module, stages: Sequence[Callable], x):
    """``x`` through every stage in turn (what sequential calibration computes)."""
    for stage in stages:
        x = advance_stage(stage, model, x)
    return x


def check_stages(model: nnx.Module, stages: Sequence[Callable], x, *, rtol: float = 1e-4) -> bool:
    """Whether the stages compose to ``model(x)`` on ``x`` (relative max-abs difference ≤ rtol)."""
    if tuple(stages) == (whole_model,):
        return True
    graphdef, state = nnx.split(model)
    want = advance(graphdef, whole_model, state, x)
    got = run_stages(model, stages, x)
    if got.shape != want.shape:
        return False
    scale = float(jnp.max(jnp.abs(want))) or 1.0
    return float(jnp.max(jnp.abs(got - want))) <= rtol * scale


# ----------------------------------------------------------------------------- execution order


def _trace_stage(model: nnx.Module, stage: Callable, spec) -> tuple[list, object]:
    """Paths of the eligible layers in the order their calls finish, and the stage's output spec."""
    graphdef, state = nnx.split(model)
    order: list = []

    def run(state, h):
        copy = nnx.merge(graphdef, state)
        taps = [(layer, functools.partial(_record, order, path))
                for path, layer in eligible_layers(copy).items()]
        with intercept(taps):
            return stage(copy, h)

    return order, jax.eval_shape(run, state, spec)


def _record(order: list, path: str, layer, x, y) -> None:
    del layer, x, y
    order.append(path)


def stage_layers(model: nnx.Module, stages: Sequence[Callable], spec) -> list[tuple[str, ...]]:
    """For each stage, the eligible layers it calls, in first-call order (traced, no compute).

    ``spec`` is the model input (an array or a ``jax.ShapeDtypeStruct``). A layer called by two
    different stages raises ``ValueError``: its input cannot be gathered from one stage's cache.
    """
    spec = jax.ShapeDtypeStruct(tuple(spec.shape), spec.dtype)
    seen: dict = {}
    per_stage = []
    for k, stage in enumerate(stages):
        order, spec = _trace_stage(model, stage, spec)
        paths = tuple(dict.fromkeys(order))
        for path in paths:
            if path in seen:
                raise ValueError(f"layer {path!r} is called in stages {seen[path]} and {k} of the model's "
                                 "forward_stages(); a layer must belong to one stage (merge the two)")
            seen[path] = k
        per_stage.append(paths)
    return per_stage


def execution_order(model: nnx.Module, x, *, stages: Sequence[Callable] | None = None) -> tuple[str, ...]:
    """Paths of ``model``'s eligible ``nnx.Conv`` / ``nnx.Linear`` layers in the order a forward
    pass on ``x`` (an input array or ``jax.ShapeDtypeStruct``) first calls them — not the
    attribute order. Traced with ``jax.eval_shape``: no compute, the model is not modified.

    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.head = nnx.Linear(4, 2, rngs=rngs)  # defined first, called last
    ...         self.body = nnx.Linear(3, 4, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.head(self.body(x))
    >>> execution_order(Net(nnx.Rngs(0)), jnp.ones((1, 3)))
    ('body', 'head')
    """
    stages = forward_stages(model) if stages is None else tuple(stages)
    return tuple(p for paths in stage_layers(model, stages, x) for p in paths)


# ----------------------------------------------------------------------------- cross statistics


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _cross_update(runner, tap: LayerTap, graph_orig, graph_comp, state_orig, state_comp,
                  stats: MomentState, h, h_hat) -> MomentState:
    """Add the patches of ``tap``'s input in the original (``x``) and compressed (``y = x̂``)
    networks, both running ``runner`` on their cached activations; calls are paired in order.
    ``tap.path`` is relative to the split module (:func:`stage_split`), so the same layer of
    identical blocks shares one compilation."""
    xs = _layer_inputs(graph_orig, (tap.path,), runner, state_orig, h)[tap.path]
    ys = _layer_inputs(graph_comp, (tap.path,), runner, state_comp, h_hat)[tap.path]
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"layer {tap.path!r} was called {len(xs)} time(s) in the original network and "
                         f"{len(ys)} in the compressed one; sequential calibration pairs the calls")
    weight = None
    if "ww" in stats.sums:  # E‖W x‖² of the original layer, instead of the x xᵀ gram
        kernel = get_by_path(nnx.merge(graph_orig, state_orig), tap.path).kernel[...]
        weight = kernel_to_matrix(kernel)[None]
    for x, y in zip(xs, ys):
        chunk, num, rows = layer_chunks(tap, x, y, dtype=stats.dtype)
        stats = accumulate_chunks(stats, chunk, num, rows, weight=weight)
    return stats


def _relative_path(module: nnx.Module, layer: nnx.Module, path: str) -> str:
    """The path of ``layer`` inside ``module`` (found by identity)."""
    if module is layer:
        raise ValueError(f"stage submodule is the tapped layer {path!r} itself; return its parent")
    for rel, node in find_layers(module):
        if node is layer:
            return rel
    raise ValueError(f"layer {path!r} is not inside the module its stage runs; check forward_stages()")


def cross_statistics(stage, tap: LayerTap, original, compressed, stats: MomentState, cache) -> MomentState:
    """Accumulate ``tap``'s cross statistics over every cached batch ``(h, h_hat)`` of ``cache``."""
    runner, graph_orig, state_orig = stage_split(stage, original)
    _, graph_comp, state_comp = stage_split(stage, compressed)
    if runner is not stage:  # the stage runs one submodule: tap the layer by its path inside it
        sub = stage.submodule(original)
        rel = _relative_path(sub, get_by_path(original, tap.path), tap.path)
        tap = dataclasses.replace(tap, path=rel)
    for h, h_hat in cache:
        stats = _cross_update(runner, tap, graph_orig, graph_comp, state_orig, state_comp, stats, h, h_hat)
    return stats


def input_batches(images, batch_size: int, dtype) -> list:
    """``images`` as a list of device arrays of ``batch_size`` (the last may be smaller)."""
    images = np.asarray(images)
    if images.ndim < 2 or images.shape[0] < 1:
        raise ValueError(f"calib_images must be a batch of inputs (N, ...) with N >= 1; got shape {images.shape}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    n = math.ceil(images.shape[0] / batch_size)
    return [jnp.asarray(images[k * batch_size:(k + 1) * batch_size], dtype) for k in range(n)]
