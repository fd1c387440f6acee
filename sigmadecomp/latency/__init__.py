"""Latency: measured timings of models and layers, and latency-aware implementation choices.

* :func:`time_interleaved`, :func:`model_latency`, :func:`machine_load` — medians of jitted
  calls, compared variants interleaved in the same process (the machine may be loaded);
* :func:`choose_implementations` — per planned layer, ``"factorized"`` or ``"dense"`` (the kernel
  rebuilt from the factors) by measured latency, and layers left dense when their factorized form
  is neither faster nor smaller; :func:`set_implementations` applies the choice to a model;
* :func:`layer_latency_table` — per layer, the measured ms of the dense layer and of every
  candidate rank (monotone in the ranks), the costs of ``select_ranks(budget="latency=R")``.

The fast factorized lowerings themselves are in :mod:`sigmadecomp.layers` (``implementation``).
``benchmarks/latency.py`` is the whole-model and per-layer benchmark built on these.
"""

from sigmadecomp.latency._choose import MODES, choose_implementations, set_implementations
from sigmadecomp.latency._table import layer_latency_table, monotone_ms
from sigmadecomp.latency._timing import Timing, forward_fn, machine_load, model_latency, time_interleaved

__all__ = [
    "MODES",
    "Timing",
    "choose_implementations",
    "forward_fn",
    "layer_latency_table",
    "machine_load",
    "model_latency",
    "monotone_ms",
    "set_implementations",
    "time_interleaved",
]
