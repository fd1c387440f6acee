"""Rank selection under a measured-latency budget: the timing table (monotone, one timing per
layer signature, reusable) and the knapsack over its milliseconds."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from sigmadecomp.compress import calibrate
from sigmadecomp.latency import _table, layer_latency_table, monotone_ms
from sigmadecomp.surgery import select_ranks

SHAPE = (1, 8, 8, 3)


@pytest.fixture(scope="module")
def net():
    # two convs of the same shape and configuration: timed once
    model = nnx.Sequential(nnx.Conv(3, 16, (3, 3), rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Conv(16, 16, (3, 3), rngs=nnx.Rngs(1)), nnx.relu,
                           nnx.Conv(16, 16, (3, 3), rngs=nnx.Rngs(2)))
    images = np.asarray(jax.random.normal(jax.random.key(0), (16, 8, 8, 3)), np.float32)
    return model, images, calibrate(model, images, progress=False)


@pytest.fixture(scope="module")
def measured(net):
    """One real timing of the SVD candidates (batch 4, one round), and how often layers were timed."""
    calls = []
    real = _table._time_options

    def counting(*args, **kwargs):
        calls.append(args[1].path)
        return real(*args, **kwargs)

    _table._time_options = counting
    try:
        sel = _select(net, budget="latency=1.0")
    finally:
        _table._time_options = real
    return sel, calls


def _select(net, **kw):
    model, images, cov = net
    kw = dict(format="svd", rule="global", images=images, key=jax.random.key(0), input_shape=SHAPE,
              batch_size=4, latency_repeats=1, progress=False) | kw
    return select_ranks(model, cov, **kw)


def test_monotone_ms_is_a_running_max_over_smaller_ranks():
    options = [None, (1, 1), (1, 2), (2, 1), (2, 2)]
    ms = monotone_ms(options, [9.0, 3.0, 2.0, 1.0, 2.5])
    assert ms.tolist() == [9.0, 3.0, 3.0, 3.0, 3.0]  # dense untouched; (2,2) ≥ every smaller pair


def test_table_is_monotone_recorded_and_timed_once_per_signature(measured):
    sel, calls = measured
    table = sel.latency_table
    assert len(calls) == 2 and len(table["layers"]) == 3  # layers.2 and layers.4 share one timing
    assert table["layers"]["layers.2"]["raw_ms"] == table["layers"]["layers.4"]["raw_ms"]
    for row in table["layers"].values():
        assert row["options"][0] is None and row["dense_ms"] == row["raw_ms"][0] > 0
        ms, raw = np.array(row["ms"][1:]), np.array(row["raw_ms"][1:])
        assert (np.diff(ms) >= 0).all() and (ms >= raw).all()  # SVD: options in increasing rank
    assert table["batch_size"] == 4 and len(table["machine_load"]) == 2 and table["date"]
    json.dumps(sel.to_dict())  # the report, table included, is JSON


def _synthetic(table):
    """The measured table with deterministic ms: factorized rank r costs r / 10 of the dense layer."""
    layers = {}
    for path, row in table["layers"].items():
        ms = [1.0] + [o[0] / 10 for o in row["options"][1:]]
        layers[path] = dict(row, raw_ms=ms, ms=ms, dense_ms=1.0)
    return dict(table, layers=layers)


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_budget_is_met_in_table_ms_and_a_given_table_is_not_timed_again(net, measured, monkeypatch, ratio):
    table = _synthetic(measured[0].latency_table)
    monkeypatch.setattr(_table, "_time_options", lambda *a, **k: pytest.fail("timed despite latency_table="))
    sel = _select(net, budget=f"latency={ratio}", latency_table=table)
    chosen = sum(c.latency for c in sel.layers)
    assert chosen <= ratio * 3 + 1e-9 and sel.achieved("latency") == pytest.approx(chosen / 3)
    assert all(c.latency_before == 1.0 for c in sel.layers)
    for c in sel.layers:  # each layer's reported ms is its chosen option's entry of the table
        assert c.latency == (1.0 if c.ranks is None else c.ranks[0] / 10)
    # the greedy fill leaves less than the cheapest upgrade unspent
    assert sel.achieved("latency") > ratio - 0.35
    report = sel.to_dict()
    assert report["achieved_latency"] == sel.achieved("latency") and report["latency_table"] == table


def test_a_table_from_a_report_file_is_reused(net, measured, tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    # shaped like a `sigmadecomp compress --json` report: its own "layers" beside "rank_selection"
    path.write_text(json.dumps({"layers": [], "rank_selection": measured[0].to_dict()}))
    monkeypatch.setattr(_table, "_time_options", lambda *a, **k: pytest.fail("timed despite latency_table="))
    again = _select(net, budget="latency=1.0", latency_table=str(path))
    assert dict(again) == dict(measured[0])


def test_errors_are_clear(net, measured):
    model, _, cov = net
    with pytest.raises(ValueError, match="rule 'global' only"):
        _select(net, rule="uniform", budget="latency=0.5")
    with pytest.raises(ValueError, match="input_shape"):
        _select(net, budget="latency=0.5", input_shape=None)
    with pytest.raises(ValueError, match="lacks the candidate ranks"):
        _select(net, format="tucker2", budget="latency=0.5", latency_table=measured[0].latency_table)
    with pytest.raises(ValueError, match="fastest measured option"):
        slow = {p: dict(r, ms=[1.0] + [5.0] * (len(r["ms"]) - 1))
                for p, r in measured[0].latency_table["layers"].items()}
        _select(net, budget="latency=0.5", latency_table=dict(measured[0].latency_table, layers=slow))
    with pytest.raises(ValueError, match="latency_table must be"):
        _select(net, budget="latency=0.5", latency_table={"nothing": 1})
    with pytest.raises(ValueError, match="batch_size"):
        layer_latency_table(model, [], {}, batch_size=0)
