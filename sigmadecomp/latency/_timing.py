"""Wall-clock latency of jitted functions and models, measured so that comparisons survive a
shared, loaded machine: the compared variants are compiled first, then run in interleaved rounds
(the order rotated every round), and each reports its median.

A ratio of two medians from the same rounds is what to quote; absolute milliseconds depend on
what else the machine was doing, so :func:`machine_load` (``os.getloadavg()``) goes with them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

__all__ = ["Timing", "forward_fn", "machine_load", "model_latency", "time_interleaved"]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median and every sample (milliseconds) of one variant, from interleaved rounds."""

    median_ms: float
    samples_ms: tuple

    def to_dict(self) -> dict:
        return dict(median_ms=self.median_ms, samples_ms=list(self.samples_ms))


def machine_load() -> list:
    """``os.getloadavg()`` (1, 5, 15 minutes), to be stored next to every timing."""
    return [round(v, 2) for v in os.getloadavg()]


def _run(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return (time.perf_counter() - start) * 1e3


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, repeats: int = 7,
                     warmup: int = 1) -> dict[str, Timing]:
    """Median latency of each zero-argument callable, run in ``repeats`` interleaved rounds.

    Every callable is first run ``warmup`` times (compilation happens there), then each round
    runs every callable once, the order rotated by one per round so that no variant always
    follows the same neighbour. Outputs are waited for (``block_until_ready``).

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.ones((64, 64))
    >>> f, g = jax.jit(lambda x: x @ x), jax.jit(lambda x: x + x)
    >>> t = time_interleaved({"matmul": lambda: f(x), "add": lambda: g(x)}, repeats=3)
    >>> sorted(t), len(t["add"].samples_ms)
    (['add', 'matmul'], 3)
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be ≥ 1 and warmup ≥ 0; got repeats={repeats}, warmup={warmup}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            _run(fns[name])
    samples: dict = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_run(fns[name]))
    return {n: Timing(float(np.median(s)), tuple(round(v, 4) for v in s)) for n, s in samples.items()}


def forward_fn(model: nnx.Module) -> Callable:
    """``x → model(x)`` compiled once (``nnx.split`` outside, so the call costs one dispatch)."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: run(state, x)


def model_latency(models: Mapping[str, nnx.Module], input_shape: Sequence[int], *,
                  batch_sizes: Sequence[int] = (1, 128), repeats: int = 7, dtype=np.float32,
                  seed: int = 0) -> dict[int, dict[str, Timing]]:
    """Batch size → name → :class:`Timing` of each model's jitted forward pass on random inputs of
    shape ``(batch, *input_shape[1:])``; all models interleaved at each batch size. Put models in
    inference mode first (e.g. ``model.eval()`` for BatchNorm).

    >>> from flax import nnx
    >>> a, b = nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(0))
    >>> t = model_latency({"a": a, "b": b}, (1, 8), batch_sizes=(4,), repeats=2)
    >>> sorted(t[4])
    ['a', 'b']
    """
    rng = np.random.default_rng(seed)
    forwards = {name: forward_fn(model) for name, model in models.items()}
    out = {}
    for batch in batch_sizes:
        x = jax.device_put(rng.standard_normal((batch, *tuple(input_shape)[1:])).astype(dtype))
        out[int(batch)] = time_interleaved({n: (lambda f=f: f(x)) for n, f in forwards.items()},
                                           repeats=repeats)
    return out
