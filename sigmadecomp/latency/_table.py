"""Per-layer latency tables for rank selection under a measured-latency budget.

For each planned layer and each candidate ranks ``ρ`` (and the dense layer itself), the forward
time of that layer alone, on random inputs of its real input shape at ``batch_size``, on this
machine. What is timed is the **factorized** implementation (``implementation="factorized"``, the
layers' default): timing the rebuilt-kernel implementation too would double the compilations, and
that one runs a dense conv, i.e. about the dense layer's time, which the dense option already
offers. Factor values do not change the time, so random factors of the candidate ranks are used.

Timing follows :func:`time_interleaved`: one layer's dense version and all its candidates are
compiled, then run in interleaved rounds; each reports its median (``raw_ms``). Medians on a loaded
machine are noisy, and a knapsack over noisy costs is not reproducible, so the table used for
selection (``ms``) is made monotone in the ranks: ``ms(ρ) = max raw_ms(ρ')`` over the candidates
``ρ' ≤ ρ`` (componentwise, e.g. both Tucker-2 ranks), never less than a smaller candidate. Layers
with the same shapes and configuration (and candidate ranks) are timed once.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from sigmadecomp._paths import get_by_path
from sigmadecomp.latency._choose import _random_factors, _timing_key
from sigmadecomp.latency._timing import forward_fn, machine_load, time_interleaved
from sigmadecomp.layers._registry import factorize_layer

__all__ = ["layer_latency_table", "monotone_ms"]


def monotone_ms(options: Sequence, raw_ms: Sequence[float]) -> np.ndarray:
    """``ms[j] = max raw_ms[k]`` over the options ``k`` whose ranks are ``≤`` option ``j``'s in
    every component (``None``, the dense layer, is left as measured: another implementation).

    >>> monotone_ms([None, (1,), (2,), (3,)], [5.0, 2.0, 1.5, 3.0]).tolist()
    [5.0, 2.0, 2.0, 3.0]
    """
    raw = np.asarray(raw_ms, np.float64)
    out = raw.copy()
    ranked = [(j, np.asarray(o)) for j, o in enumerate(options) if o is not None]
    for j, r in ranked:
        below = [k for k, s in ranked if s.shape == r.shape and np.all(s <= r)]
        out[j] = raw[below].max()
    return out


def layer_latency_table(model, entries: Sequence, options: Mapping[str, Sequence], *, batch_size: int = 128,
                        repeats: int = 5, seed: int = 0, progress: bool = True) -> dict:
    """The latency table of ``entries`` (plan entries of ``model``, planned with ``input_shape``)
    at the candidate ranks ``options[path]`` (``None`` = the dense layer; it is always timed).

    Returns ``{"batch_size", "repeats", "implementation": "factorized", "machine_load": [before,
    after], "date", "layers": {path: {"options", "raw_ms", "ms", "dense_ms"}}}`` with ``options``
    as lists (``None`` for dense), ``raw_ms`` the medians and ``ms`` the monotone table (see the
    module docstring). JSON-serialisable; :func:`sigmadecomp.surgery.select_ranks` takes it back as
    ``latency_table=``.

    >>> from flax import nnx
    >>> from sigmadecomp.surgery import plan
    >>> net = nnx.Sequential(nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(0)))
    >>> p = plan(net, format="svd", ratio=1.0, input_shape=(1, 8, 8, 8))
    >>> t = layer_latency_table(net, p.entries, {"layers.0": [None, (2,), (4,)]}, batch_size=2, repeats=1,
    ...                         progress=False)
    >>> t["layers"]["layers.0"]["options"], len(t["layers"]["layers.0"]["ms"])
    ([None, [2], [4]], 3)
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    missing = [e.path for e in entries if e.in_spatial is None]
    if missing:
        raise ValueError(f"layers {missing} have no input shape: plan with input_shape=... (e.g. (1, 32, 32, 3)) "
                         "so that each layer can be timed at its real input shape")
    load_before = machine_load()
    cache: dict = {}
    layers = {}
    for entry in tqdm(list(entries), desc="latency table", disable=not progress, leave=False):
        opts = [None if o is None else tuple(int(v) for v in o) for o in options[entry.path]]
        if None not in opts:
            opts = [None, *opts]
        signature = (_timing_key(dataclasses.replace(entry, ranks=())), tuple(opts))
        if signature not in cache:
            cache[signature] = _time_options(get_by_path(model, entry.path), entry, opts, batch_size, repeats, seed)
        raw = cache[signature]
        layers[entry.path] = dict(options=[None if o is None else list(o) for o in opts], raw_ms=raw,
                                  ms=monotone_ms(opts, raw).tolist(), dense_ms=raw[opts.index(None)])
    return dict(batch_size=batch_size, repeats=repeats, implementation="factorized",
                machine_load=[load_before, machine_load()],
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), layers=layers)


def _time_options(layer, entry, opts, batch_size: int, repeats: int, seed: int) -> list:
    """Median ms of the dense layer and of the factorized layer at every ranks of ``opts``."""
    dtype = layer.kernel[...].dtype
    cin = entry.kernel_shape[-2] * entry.groups
    x = jax.device_put(np.random.default_rng(seed).standard_normal(
        (batch_size, *entry.in_spatial, cin)).astype(dtype))
    fns = {}
    for j, ranks in enumerate(opts):
        module = layer if ranks is None else factorize_layer(
            layer, _random_factors(dataclasses.replace(entry, ranks=ranks), dtype, seed))
        fns[j] = (lambda f=forward_fn(module): f(x))
    timings = time_interleaved(fns, repeats=repeats)
    return [round(timings[j].median_ms, 5) for j in range(len(opts))]
