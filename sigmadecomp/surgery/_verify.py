"""Verify a compressed model against its original on real data.

Two measurements per batch, both models running on the same inputs:

* **per layer** — each replaced layer's output is compared with the ORIGINAL layer applied to the
  SAME input, i.e. the input the compressed layer sees inside the compressed model (earlier
  layers are already compressed). ``rel_error = Σ‖y_c − y_o‖² / Σ‖y_o − b‖²`` summed over all
  batches, with ``b`` the layer's bias. The bias cancels in the numerator, so this is exactly the
  relative Σ-error ``tr((W − W̃) cov (W − W̃)ᵀ) / tr(W cov Wᵀ)`` that the solvers minimise, with
  ``cov`` the covariance of these inputs' patches.
* **end to end** — ``output_rel_error = Σ‖out_c − out_o‖² / Σ‖out_o‖²`` of the models' outputs
  (e.g. logits) and, for ``(batch, classes)`` outputs, the fraction of examples whose arg-max
  agrees (``top1_agreement``).

MACs are measured, not predicted: every ``nnx.Conv`` / ``nnx.Linear`` call is counted as kernel
size × output positions. Both models run on ``nnx.split`` copies inside ``jax.jit``, so neither is
modified; put them in inference mode (``model.eval()``) first if they have batch norm or dropout.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmadecomp._paths import get_by_path, path_to_str
from sigmadecomp.layers._common import FactorizedLayer
from sigmadecomp.layers._config import canonical_convs
from sigmadecomp.surgery._plan import Plan, _arrow, format_table
from sigmadecomp.surgery._tap import count_macs, intercept, num_params

__all__ = ["LayerReport", "Report", "verify"]


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One replaced layer: its format and ranks, counts before/after and measured relative error
    (``None`` if the layer was never called)."""

    path: str
    format: str
    ranks: tuple
    params_before: int
    params_after: int
    flops_before: Optional[int]
    flops_after: Optional[int]
    rel_error: Optional[float]


@dataclasses.dataclass(frozen=True)
class Report:
    """Result of :func:`verify`; ``str(report)`` is a readable table. FLOPs are MACs per example
    of all conv/dense layers of the whole model; params count every ``nnx.Param``."""

    layers: tuple
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    output_rel_error: float
    top1_agreement: Optional[float]
    num_examples: int

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else float("nan")

    def table(self) -> str:
        rows = [(r.path, r.format, "x".join(map(str, r.ranks)), _arrow(r.params_before, r.params_after),
                 _arrow(r.flops_before, r.flops_after), _fmt(r.rel_error)) for r in self.layers]
        rows.append(("model", "", "", _arrow(self.params_before, self.params_after),
                     _arrow(self.flops_before, self.flops_after), ""))
        table = format_table(("layer", "format", "ranks", "params", "MACs", "rel. error"), rows)
        agree = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.4f}"
        return (f"{table}\noutput rel. error {_fmt(self.output_rel_error)}{agree} "
                f"({self.num_examples} examples)")

    def __str__(self) -> str:
        return self.table()


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3e}"


def replaced_paths(original: nnx.Module, compressed: nnx.Module) -> tuple:
    """Paths of the factorized layers of ``compressed`` (checked against ``original``)."""
    paths = tuple(path_to_str(p) for p, node in nnx.iter_graph(compressed)
                  if p and isinstance(node, FactorizedLayer))
    for path in paths:
        layer = get_by_path(original, path)
        if not isinstance(layer, (nnx.Conv, nnx.Linear)):
            raise ValueError(f"{path!r} is factorized in the compressed model but the original has a "
                             f"{type(layer).__name__} there: are these the same architecture?")
    return paths


def verify(original: nnx.Module, compressed: nnx.Module, batches: Iterable, *,
           plan: Optional[Plan] = None) -> Report:
    """Compare ``compressed`` with ``original`` on ``batches`` (see the module docstring).

    Args:
      original, compressed: the two models (not modified).
      batches: an iterable of inputs, or of ``(inputs, ...)`` tuples such as ``(images, labels)``.
      plan: the plan that made ``compressed``; its layers are the ones checked. Without it, every
        factorized layer of ``compressed`` is checked.

    Returns:
      A :class:`Report`.

    Example (a compressed model that is an exact copy has zero error)::

        report = verify(model, apply(model, p, factors), [images[:128], images[128:256]], plan=p)
        print(report)
    """
    original, compressed = canonical_convs(original), canonical_convs(compressed)
    paths = plan.paths if plan is not None else replaced_paths(original, compressed)
    for path in paths:
        get_by_path(compressed, path), get_by_path(original, path)  # KeyError listing valid paths
    step, macs_o, macs_c = _make_step(original, compressed, paths)
    states = (nnx.state(original), nnx.state(compressed))
    totals = _Totals(paths)
    for batch in batches:
        totals.add(*jax.device_get(step(*states, _inputs(batch))))
    if totals.examples == 0:
        raise ValueError("batches is empty: verify needs at least one batch of inputs")
    return _report(original, compressed, paths, totals, macs_o, macs_c)


def _inputs(batch):
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty tuple as a batch; expected inputs or (inputs, labels)")
        batch = batch[0]
    if not hasattr(batch, "shape"):
        raise ValueError(f"each batch must be an array or a tuple (inputs, ...); got {type(batch).__name__}")
    return jnp.asarray(batch)


def _make_step(original, compressed, paths):
    return _cached_step(nnx.graphdef(original), nnx.graphdef(compressed), tuple(paths))


@functools.lru_cache(maxsize=8)
def _cached_step(graph_o, graph_c, paths: tuple):
    """The jitted comparison step of one (original, compressed, paths) structure, cached so that a
    second ``verify`` of models of the same structure (new weights, new data of the same shape)
    reuses its compilation; the MAC counts filled in at trace time are cached with it."""
    macs_o: dict = {}
    macs_c: dict = {}

    @jax.jit
    def step(state_o, state_c, x):
        model_o, model_c = nnx.merge(graph_o, state_o), nnx.merge(graph_c, state_c)
        with intercept(count_macs(model_o, macs_o)):
            out_o = model_o(x)
        sums: dict = {}
        taps = [(get_by_path(model_c, p), _comparer(get_by_path(model_o, p), p, sums)) for p in paths]
        with intercept(count_macs(model_c, macs_c) + taps):
            out_c = model_c(x)
        return _output_stats(out_o, out_c), sums

    return step, macs_o, macs_c


def _comparer(original_layer, path: str, sums: dict):
    """Tap: run the original layer on the compressed layer's input and accumulate the errors."""

    def compare(layer, x, y):
        y_ref = original_layer(x)
        signal = y_ref
        if original_layer.bias is not None:  # the bias cancels in y − y_ref; leave it out of the scale too
            bias = original_layer.bias[...].astype(y_ref.dtype)
            signal = y_ref - bias.reshape((1,) * (y_ref.ndim - 1) + bias.shape)
        err, ref = jnp.sum(jnp.square(y - y_ref)), jnp.sum(jnp.square(signal))
        old = sums.get(path, (0.0, 0.0))
        sums[path] = (old[0] + err, old[1] + ref)

    return compare


def _output_stats(out_o, out_c):
    leaves_o, leaves_c = jax.tree_util.tree_leaves(out_o), jax.tree_util.tree_leaves(out_c)
    err = sum(jnp.sum(jnp.square(c - o)) for o, c in zip(leaves_o, leaves_c))
    ref = sum(jnp.sum(jnp.square(o)) for o in leaves_o)
    first = leaves_o[0]
    agree = -1
    if len(leaves_o) == 1 and first.ndim == 2:
        agree = jnp.sum(jnp.argmax(first, axis=-1) == jnp.argmax(leaves_c[0], axis=-1))
    return err, ref, agree, first.shape[0]


class _Totals:
    """Host-side float64 accumulators over batches."""

    def __init__(self, paths):
        self.layer = {p: np.zeros(2) for p in paths}
        self.output = np.zeros(2)
        self.agree, self.examples = 0, 0

    def add(self, output_stats, sums):
        err, ref, agree, n = output_stats
        self.output += (float(err), float(ref))
        self.agree = None if (agree < 0 or self.agree is None) else self.agree + int(agree)
        self.examples += int(n)
        for path, (e, r) in sums.items():
            self.layer[path] += (float(e), float(r))


def _report(original, compressed, paths, totals: _Totals, macs_o: dict, macs_c: dict) -> Report:
    layers = []
    for path in paths:
        new = get_by_path(compressed, path)
        err, ref = totals.layer[path]
        after = [v for k, v in macs_c.items() if k == path or k.startswith(path + ".")]
        layers.append(LayerReport(
            path, getattr(new, "format", type(new).__name__), tuple(getattr(new, "ranks", ())),
            num_params(get_by_path(original, path)), num_params(new),
            macs_o.get(path), sum(after) if after else None,
            None if ref == 0 and err == 0 else float(err / ref) if ref else float("inf"),
        ))
    err, ref = totals.output
    return Report(
        tuple(layers), num_params(original), num_params(compressed), sum(macs_o.values()),
        sum(macs_c.values()), float(err / ref) if ref else float(err),
        None if totals.agree is None else totals.agree / totals.examples, totals.examples,
    )
