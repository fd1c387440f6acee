"""Tap the inputs of a Flax NNX model's Conv / Linear layers and accumulate their patch statistics.

How the tap works, and why the user's model is never modified: each batch runs one jitted forward
pass that rebuilds a throw-away copy of the model with ``nnx.merge(graphdef, state)`` and switches
the selected layers *of that copy* to a recording subclass (same ``__call__``, plus one line that
records the input); it returns every tapped layer's input, which stays on the device. State
updates made by the forward pass (BatchNorm statistics in training mode, RNG counters) are
discarded with the copy, and an exception leaves nothing to restore. Each layer's statistics are
then updated by a jitted function compiled once per layer geometry and input shape, so compile time
does not grow with depth. Memory: the inputs of all tapped layers for one batch are alive at once;
lower the batch size for large models.

Patches are built chunk by chunk in a row-last ``(d, rows)`` layout — per channel, the ``kh·kw``
shifted windows are contiguous copies — which is the package's channel-major patch order
(:func:`sigmadecomp._patches.extract_patches`, checked in the tests) at 2–3× its speed on CPU,
and keeps each chunk's patches in cache.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import itertools
import warnings
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from tqdm.auto import tqdm

from sigmadecomp._paths import find_layers, get_by_path
from sigmadecomp.layers._config import ConvConfig, canonical_convs
from sigmadecomp.covariance._stats import (
    LayerCovariance,
    MomentState,
    _check_dtype,
    _default_dtype,
    _row_chunks,
    accumulate_chunks,
    chunk_rows,
    finalize,
    init,
)
from sigmadecomp.distributed._covariance import batch_pieces

__all__ = ["LayerTap", "collect_covariances", "layer_tap"]


@dataclasses.dataclass(frozen=True)
class LayerTap:
    """What the covariance needs to know about one layer (hashable: a static jit argument).

    ``padding`` is ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"`` or explicit
    ``((top, bottom), (left, right))``. A dense layer has ``kernel_size == (1, 1)`` and ``dense``.
    """

    path: str
    in_features: int
    kernel_size: tuple = (1, 1)
    strides: tuple = (1, 1)
    padding: str | tuple = "VALID"
    dilation: tuple = (1, 1)
    groups: int = 1
    dense: bool = False

    @property
    def dim(self) -> int:
        """Patch length per group: ``(in_features / groups)·kh·kw``."""
        return self.in_features // self.groups * self.kernel_size[0] * self.kernel_size[1]


def layer_tap(path: str, layer: nnx.Module) -> LayerTap:
    """The :class:`LayerTap` of an ``nnx.Conv`` (2-D) or ``nnx.Linear``; ``ValueError`` otherwise."""
    if isinstance(layer, nnx.Linear):
        return LayerTap(path, int(layer.in_features), dense=True)
    if not isinstance(layer, nnx.Conv):
        raise ValueError(f"layer {path!r} is a {type(layer).__name__}; expected nnx.Conv or nnx.Linear.")
    try:  # the package's one conv-configuration normaliser (also used by surgery and layers)
        config = ConvConfig.from_conv(layer)
    except ValueError as error:
        raise ValueError(f"layer {path!r}: {error}; leave it out with layers=[...].") from None
    return LayerTap(
        path,
        int(layer.in_features),
        kernel_size=tuple(int(k) for k in layer.kernel_size),
        strides=config.strides,
        padding=config.padding,
        dilation=config.kernel_dilation,
        groups=config.groups,
    )


# ----------------------------------------------------------------------------- patches by chunks


def _pad_input(tap: LayerTap, x):
    """Apply the layer's padding to NHWC ``x`` so that the windows are then VALID."""
    span = [(k - 1) * d + 1 for k, d in zip(tap.kernel_size, tap.dilation)]
    if tap.padding in ("CIRCULAR", "REFLECT"):  # as in nnx.Conv: pad, then VALID
        pads = [(0, 0)] + [((s - 1) // 2, s // 2) for s in span] + [(0, 0)]
        return jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[tap.padding])
    if isinstance(tap.padding, str):
        pads = lax.padtype_to_pads(x.shape[1:3], span, tap.strides, tap.padding)
    else:
        pads = tap.padding
    # lax.pad also takes negative padding (cropping), like lax.conv_general_dilated.
    config = [(0, 0, 0)] + [(int(lo), int(hi), 0) for lo, hi in pads] + [(0, 0, 0)]
    return lax.pad(x, jnp.zeros((), x.dtype), config)


def _out_size(tap: LayerTap, padded_hw) -> tuple[int, int]:
    out = tuple(
        (n - (k - 1) * d - 1) // s + 1
        for n, k, d, s in zip(padded_hw, tap.kernel_size, tap.dilation, tap.strides)
    )
    if min(out) < 1:
        raise ValueError(f"layer {tap.path!r}: input {padded_hw} (padded) is smaller than the kernel.")
    return out


def _window(xt, tap: LayerTap, i: int, j: int, out_hw):
    """Input values under kernel tap ``(i, j)`` for every output position: ``(C, m, H', W')``."""
    (dh, dw), (sh, sw), (oh, ow) = tap.dilation, tap.strides, out_hw
    start = (0, 0, i * dh, j * dw)
    limit = (xt.shape[0], xt.shape[1], i * dh + sh * (oh - 1) + 1, j * dw + sw * (ow - 1) + 1)
    return lax.slice(xt, start, limit, (1, 1, sh, sw))


def _conv_chunks(tap: LayerTap, x):
    """Row-last conv patches by chunks of images: ``(chunk(k) -> (g, d, m·H'·W'), num, rows)``."""
    x = _pad_input(tap, x.reshape((-1,) + x.shape[-3:]))
    n, out_hw = x.shape[0], _out_size(tap, x.shape[1:3])
    per = max(1, min(n, chunk_rows(tap.groups * tap.dim) // (out_hw[0] * out_hw[1])))
    num = -(-n // per)
    xt = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, num * per - n), (0, 0), (0, 0)))
    kh, kw = tap.kernel_size

    def chunk(k):
        xc = lax.dynamic_slice_in_dim(xt, k * per, per, axis=1)
        cols = [_window(xc, tap, i, j, out_hw) for i in range(kh) for j in range(kw)]
        return jnp.stack(cols, axis=1).reshape(tap.groups, tap.dim, -1)  # channel-major (c, i, j)

    return chunk, num, n * out_hw[0] * out_hw[1]


def _dense_chunks(tap: LayerTap, x):
    rows = x.reshape(-1, 1, tap.in_features)
    xs = _row_chunks(rows, chunk_rows(tap.in_features))
    return (lambda k: xs[k]), xs.shape[0], rows.shape[0]


def layer_chunks(tap: LayerTap, x, y=None, *, dtype) -> tuple[Callable, int, int]:
    """Patches of the layer input ``x`` (and of a second input ``y``, same shape) as chunks.

    Returns ``(chunk, num_chunks, rows)`` for :func:`sigmadecomp.covariance._stats.accumulate_chunks`:
    ``chunk(k)`` gives row-last ``(groups, d, m)`` blocks ``(xt, yt_or_None)`` in ``dtype``.
    """
    if x.shape[-1] != tap.in_features:
        raise ValueError(
            f"layer {tap.path!r} expects {tap.in_features} input features; got input {x.shape}."
        )
    build = _dense_chunks if tap.dense else _conv_chunks
    cx, num, rows = build(tap, x.astype(dtype))
    if y is None:
        return (lambda k: (cx(k), None)), num, rows
    cy, _, _ = build(tap, y.astype(dtype))
    return (lambda k: (cx(k), cy(k))), num, rows


# ----------------------------------------------------------------------------- the tap


_RECORDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("_RECORDING", default=None)


@functools.cache
def _recording_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` records its input when the layer is being tapped."""

    class Recording(cls):
        def __call__(self, inputs, *args, **kwargs):
            calls = _RECORDING.get()
            if calls is not None and id(self) in calls:
                calls[id(self)].append(inputs)
            return super().__call__(inputs, *args, **kwargs)

    Recording.__name__ = Recording.__qualname__ = f"Recording{cls.__name__}"
    return Recording


def _call_model(model, x):
    return model(x)


def _layer_inputs(graphdef, paths: tuple, forward: Callable, state, x) -> dict[str, list]:
    """Run ``forward`` on a copy of the model; return every input each tapped layer received."""
    model = nnx.merge(graphdef, state)
    layers = {path: get_by_path(model, path) for path in paths}
    calls = {id(layer): [] for layer in layers.values()}
    for layer in layers.values():  # the copy only: the user's model objects are never touched
        object.__setattr__(layer, "__class__", _recording_class(type(layer)))
    token = _RECORDING.set(calls)
    try:
        forward(model, x)
    finally:
        _RECORDING.reset(token)
    return {path: calls[id(layer)] for path, layer in layers.items()}


def _layer_update(geometry: LayerTap, state: MomentState, value) -> MomentState:
    """Add the patches of one recorded input of a layer with this geometry to its statistics."""
    chunk, num, rows = layer_chunks(geometry, value, dtype=state.dtype)
    return accumulate_chunks(state, chunk, num, rows)


# One compiled forward pass per model and batch shape, and one compiled statistics update per
# layer geometry and input shape (a ResNet-56 has 7), so compile time does not grow with depth.
_forward_jit = jax.jit(_layer_inputs, static_argnums=(0, 1, 2))
_layer_update_jit = jax.jit(_layer_update, static_argnums=(0,), donate_argnums=(1,))


def _update_all(taps: tuple, stats: dict, inputs: dict, layer_update: Callable) -> dict:
    """Add every recorded input of every tapped layer to that layer's statistics."""
    stats = dict(stats)
    for tap in taps:
        geometry = dataclasses.replace(tap, path="")  # layers of the same shape share a compilation
        for value in inputs[tap.path]:
            stats[tap.path] = layer_update(geometry, stats[tap.path], value)
    return stats


# ----------------------------------------------------------------------------- public entry point


def _select(model: nnx.Module, layers) -> list[tuple[str, nnx.Module]]:
    found = dict(find_layers(model))
    if layers is None:
        return list(found.items())
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [p for p in layers if p not in found]
    if unknown or not layers:
        raise ValueError(
            f"unknown layer path(s) {unknown or layers}; the model's Conv/Linear layers are: "
            f"{', '.join(found) or '(none)'}."
        )
    return [(p, found[p]) for p in dict.fromkeys(layers)]


def _as_input(batch):
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty tuple as a batch; expected an array or (x, y).")
        batch = batch[0]
    return jnp.asarray(batch)


def _called(taps: tuple, inputs: dict, explicit: bool) -> tuple:
    """Drop layers the forward pass never called (an error if they were requested by name)."""
    unused = [t.path for t in taps if not inputs[t.path]]
    if unused and explicit:
        raise ValueError(f"layer(s) {unused} were never called by the forward pass; leave them out.")
    if unused:
        warnings.warn(f"layers never called by the forward pass, left out: {unused}", stacklevel=3)
    return tuple(t for t in taps if inputs[t.path])


def collect_covariances(
    model: nnx.Module,
    batches: Iterable,
    *,
    layers: Sequence[str] | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    forward: Callable | None = None,
    dtype=None,
    jit: bool = True,
    devices=None,
) -> dict[str, LayerCovariance]:
    """Input-patch statistics ``cov = E[x xᵀ]`` of every ``nnx.Conv`` / ``nnx.Linear`` of ``model``.

    Args:
      model: the NNX model, run as it is (call ``model.eval()`` first for BatchNorm / Dropout).
        It is never modified: the tap works on a copy and forward-pass state updates are dropped.
      batches: iterable of input arrays, or of ``(x, y, ...)`` tuples (``x`` is used).
      layers: layer paths (see :func:`sigmadecomp._paths.find_layers`); default all of them.
        Unknown paths raise ``ValueError`` listing the valid ones.
      progress: show a tqdm progress bar.
      max_batches: stop after this many batches.
      forward: ``forward(model, x)`` runs the model (default ``model(x)``), e.g.
        ``lambda m, x: m(x, train=False)``.
      dtype: accumulation dtype; default float64 with x64 enabled, else compensated float32.
      jit: compile the forward pass once per batch shape and each layer's update once per layer
        geometry (default; keep batches one size, a smaller last batch compiles once more, and
        pass the same ``forward`` object across calls to reuse compilations). ``False`` runs
        eagerly, for debugging.
      devices: ``None`` (one device), ``"all"`` (``jax.devices()``, every host after
        ``jax.distributed.initialize``), a count or a list of devices: each batch is split over
        them and the per-device moments merged (:mod:`sigmadecomp.distributed`); equal to the
        one-device result up to rounding. A flax **linen** module is accepted too: pass
        ``collect_covariances((module, variables), batches)`` (see :mod:`sigmadecomp.linen`).

    Returns:
      ``{path: LayerCovariance}`` in the order of :func:`sigmadecomp._paths.find_layers`. Convs
      use their own kernel size, strides, padding, dilation and groups (a grouped conv gives
      ``(groups, d, d)``); dense layers use the rows of their input. A layer called several times
      per forward pass pools all its calls. Layers never called are left out with a warning (an
      error when named in ``layers``).

    >>> model = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)))
    >>> covs = collect_covariances(model, [jnp.ones((2, 8, 8, 3))], progress=False)
    >>> covs["layers.0"].cov.shape
    (27, 27)
    """
    if isinstance(model, tuple):  # (linen module, variables)
        from sigmadecomp.linen import collect_covariances as collect_linen

        if forward is not None:
            raise ValueError("forward= is for NNX models; a linen model runs module.apply(variables, x)")
        return collect_linen(*model, batches, layers=layers, progress=progress, max_batches=max_batches,
                             dtype=dtype, jit=jit, devices=devices)
    if max_batches is not None and int(max_batches) < 1:
        raise ValueError(f"max_batches must be a positive int or None; got {max_batches!r}.")
    explicit = layers is not None
    model = canonical_convs(model)  # list-valued conv settings would make the graphdef unhashable
    taps = tuple(layer_tap(path, layer) for path, layer in _select(model, layers))
    dtype = _check_dtype(_default_dtype() if dtype is None else jnp.dtype(dtype))
    graphdef, state = nnx.split(model)
    forward, paths = forward or _call_model, tuple(t.path for t in taps)
    layer_inputs, layer_update = (_forward_jit, _layer_update_jit) if jit else (_layer_inputs, _layer_update)
    total = _length(batches)
    total = max_batches if total is None else min(total, max_batches or total)
    stats = None
    single = functools.partial(layer_inputs, graphdef, paths, forward, state)
    parallel = _data_parallel(devices, functools.partial(_layer_inputs, graphdef, paths, forward), state,
                              cache_key=(graphdef, paths, forward))
    for batch in tqdm(itertools.islice(batches, max_batches), total=total, disable=not progress,
                      desc="covariance"):
        for inputs, update in batch_pieces(_as_input(batch), parallel, single, layer_update):
            if stats is None:
                taps = _called(taps, inputs, explicit)
                stats = {t.path: init(t.dim, groups=t.groups, dtype=dtype) for t in taps}
            stats = _update_all(taps, stats, inputs, update)
    if stats is None:
        raise ValueError("batches was empty: give at least one batch of inputs.")
    return {path: finalize(s) for path, s in stats.items()}


def _data_parallel(devices, inputs_fn, params, *, cache_key=None):
    """A :class:`sigmadecomp.distributed.DataParallel` for several devices, else ``None``."""
    from sigmadecomp.distributed import DataParallel, resolve_devices

    devices = resolve_devices(devices)
    if devices is None:
        return None
    return DataParallel(devices, inputs_fn, params, _layer_update, cache_key=cache_key)


def _length(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None
