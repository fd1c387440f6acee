"""Latency-aware plans: run each planned layer the fastest way measured on this machine, and leave
a layer uncompressed when its factorized form is neither faster nor smaller than the dense one.

For every entry of a :class:`~sigmadecomp.surgery.Plan` (with spatial sizes, i.e. planned with
``input_shape``) three versions of the layer are timed alone, interleaved, on random inputs of
the layer's real input shape at ``batch_size``: the original dense layer, the factorized layer
(``implementation="factorized"``, fast lowerings of :mod:`sigmadecomp.layers._ops`) and the
factorized layer run as one conv with the rebuilt kernel (``implementation="dense"``). Factor
values do not change the time, so random factors of the planned ranks are used. Layers with the
same shapes and configuration are timed once.

Rule (the reason is written into the entry, with the measured milliseconds):

* the faster of the two implementations is chosen;
* if even that is not faster than the dense layer AND the factors are not fewer parameters than
  the dense kernel, the layer stays dense: it moves to ``Plan.left_dense`` with the reason.

``mode="factorized"`` or ``"dense"`` forces one implementation everywhere, without measuring.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import numpy as np
from flax import nnx

from sigmadecomp._paths import get_by_path
from sigmadecomp.formats import get as get_format
from sigmadecomp.layers._common import IMPLEMENTATIONS
from sigmadecomp.layers._registry import factorize_layer
from sigmadecomp.layers._shapes import placeholder
from sigmadecomp.latency._timing import forward_fn, time_interleaved
from sigmadecomp.surgery._plan import Plan, PlanEntry

__all__ = ["MODES", "choose_implementations", "set_implementations"]

MODES = ("auto", *IMPLEMENTATIONS)


def choose_implementations(model: nnx.Module, plan: Plan, *, mode: str = "auto", batch_size: int = 128,
                           repeats: int = 5, seed: int = 0) -> Plan:
    """The plan with each entry's ``implementation`` and ``reason`` filled in (see the module
    docstring); ``model`` is the uncompressed model the plan was made for (in inference mode).

    >>> from flax import nnx
    >>> from sigmadecomp.surgery import plan
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.conv = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.conv(x)
    >>> net = Net(nnx.Rngs(0))
    >>> p = plan(net, format="cp", ratio=0.5, input_shape=(1, 8, 8, 8))
    >>> chosen = choose_implementations(net, p, batch_size=2, repeats=1)
    >>> chosen.entries[0].implementation in ("factorized", "dense")
    True
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if mode != "auto":
        entries = tuple(dataclasses.replace(e, implementation=mode, reason=f"{mode} forced by the user")
                        if supports_implementations(e) else _single(e) for e in plan.entries)
        return dataclasses.replace(plan, entries=entries)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    missing = [e.path for e in plan.entries if e.in_spatial is None]
    if missing:
        raise ValueError(f"plan entries {missing} have no spatial sizes: make the plan with input_shape=... "
                         "so that each layer can be timed on its real input shape")
    cache: dict = {}
    entries, left = [], list(plan.left_dense)
    for entry in plan.entries:
        if not supports_implementations(entry):
            entries.append(_single(entry))
            continue
        key = _timing_key(entry)
        if key not in cache:
            cache[key] = _time_entry(get_by_path(model, entry.path), entry, batch_size, repeats, seed)
        decided = _decide(entry, cache[key], batch_size)
        if decided is None:
            left.append((entry.path, _left_reason(entry, cache[key], batch_size)))
        else:
            entries.append(decided)
    return dataclasses.replace(plan, entries=tuple(entries), left_dense=tuple(left))


def supports_implementations(entry: PlanEntry) -> bool:
    """Whether the entry's layer class takes ``implementation=`` (a format registered without it,
    e.g. one that overrides ``__call__``, has only its own implementation)."""
    spec = get_format(entry.format)
    cls = spec.dense_layer if entry.kind == "dense" else spec.layer
    return cls is not None and "implementation" in inspect.signature(cls.__init__).parameters


def _single(entry: PlanEntry) -> PlanEntry:
    return dataclasses.replace(entry, implementation="factorized",
                               reason="factorized: the only implementation of this layer class")


def set_implementations(model: nnx.Module, plan: Plan) -> nnx.Module:
    """A copy of the compressed ``model`` whose factorized layers use the plan's implementations."""
    model = nnx.clone(model)
    for entry in plan.entries:
        if supports_implementations(entry):
            get_by_path(model, entry.path).implementation = entry.implementation
    return model


def _timing_key(entry: PlanEntry) -> tuple:
    fields = ("kind", "kernel_shape", "format", "ranks", "use_bias", "strides", "padding",
              "kernel_dilation", "groups", "in_spatial")
    return tuple(str(getattr(entry, f)) for f in fields)


def _random_factors(entry: PlanEntry, dtype, seed: int):
    rng = np.random.default_rng(seed)
    parts = [jax.tree_util.tree_map(lambda z: rng.standard_normal(z.shape).astype(z.dtype),
                                    placeholder(entry.format, entry.group_kernel_shape, entry.ranks, dtype))
             for _ in range(entry.groups)]
    return parts if entry.groups > 1 else parts[0]


def _time_entry(layer, entry: PlanEntry, batch_size: int, repeats: int, seed: int) -> dict:
    """Median ms of the dense layer and of both implementations of its factorized replacement."""
    dtype = layer.kernel[...].dtype
    factorized = factorize_layer(layer, _random_factors(entry, dtype, seed))
    rebuilt = nnx.clone(factorized)
    rebuilt.implementation = "dense"
    cin = entry.kernel_shape[-2] * entry.groups
    x = np.random.default_rng(seed).standard_normal((batch_size, *entry.in_spatial, cin)).astype(dtype)
    x = jax.device_put(x)
    fns = {name: forward_fn(m) for name, m in
           (("dense", layer), ("factorized", factorized), ("rebuilt", rebuilt))}
    timings = time_interleaved({n: (lambda f=f: f(x)) for n, f in fns.items()}, repeats=repeats)
    return {n: t.median_ms for n, t in timings.items()}


def _decide(entry: PlanEntry, ms: dict, batch_size: int):
    best = "factorized" if ms["factorized"] <= ms["rebuilt"] else "dense"
    best_ms = min(ms["factorized"], ms["rebuilt"])
    faster = best_ms < ms["dense"]
    if not faster and entry.params_after >= entry.params_before:
        return None
    times = (f"at batch {batch_size}: dense layer {ms['dense']:.3g} ms, factorized {ms['factorized']:.3g} ms, "
             f"rebuilt dense kernel {ms['rebuilt']:.3g} ms")
    why = "fastest" if faster else "fastest of the two, slower than the dense layer but fewer parameters"
    return dataclasses.replace(entry, implementation=best, reason=f"{best}: {why} ({times})")


def _left_reason(entry: PlanEntry, ms: dict, batch_size: int) -> str:
    return (f"factorized form neither faster (best {min(ms['factorized'], ms['rebuilt']):.3g} ms vs dense "
            f"{ms['dense']:.3g} ms at batch {batch_size}) nor smaller ({entry.params_after} vs "
            f"{entry.params_before} parameters)")
