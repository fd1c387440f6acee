"""Fast lowerings equal the conv op, implementations are interchangeable, timings interleave, and
the latency-aware plan decides (and records why) by the rule of sigmadecomp.latency."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _surgery_models import TinyNet, inputs, random_factors, random_factorized, run

from sigmadecomp.latency import _choose, choose_implementations, set_implementations, time_interleaved
from sigmadecomp.layers import CP3Conv, CPConv, LowRankDense
from sigmadecomp.layers._config import ConvConfig
from sigmadecomp.layers._ops import LOWERINGS, conv, depthwise, pointwise, use_lowering
from sigmadecomp.surgery import Plan, apply, load, plan, save

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (strides, padding, kernel_dilation) for a 3×2 depthwise kernel
DEPTHWISE_CONFIGS = [(1, "SAME", 1), (2, "VALID", 1), ((2, 1), ((2, 0), (1, 1)), (1, 2)),
                     (1, "CIRCULAR", 1), (2, "REFLECT", (2, 1)), (1, ((-1, 2), (0, 0)), 1)]


def _arr(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def test_depthwise_lowerings_equal_the_grouped_conv(dtype, tol):
    """Shift-and-add against a grouped lax conv, every padding kind, strides, dilation, a bias,
    two leading batch dimensions and an unbatched input."""
    x, k, b = _arr((2, 3, 9, 8, 5), 0, dtype), _arr((3, 2, 5), 1, dtype), _arr((5,), 2, dtype)

    def all_configs(x):
        outs = []
        for strides, padding, dilation in DEPTHWISE_CONFIGS:
            config = ConvConfig(strides, padding, dilation)
            grouped = ConvConfig(strides, padding, dilation, 5)
            want = conv(x, k[:, :, None, :], config=grouped, bias=b)
            got = [depthwise(x, k, config=config, bias=b, lowering=low) for low in LOWERINGS]
            got.append(depthwise(x[0, 0], k, config=config, bias=b, lowering="cpu"))
            outs.append((want, got))
        return outs

    for want, (cpu, conv_lowering, unbatched) in jax.jit(all_configs)(x):
        for got in (cpu, conv_lowering):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.max(jnp.abs(want))))
        np.testing.assert_allclose(unbatched, want[0, 0], rtol=tol, atol=tol * float(jnp.max(jnp.abs(want))))


def test_pointwise_is_the_grouped_1x1_conv(dtype, tol):
    x, k, b = _arr((3, 4, 5, 6), 0, dtype), _arr((3, 4), 1, dtype), _arr((4,), 2, dtype)

    def both(x):
        want = conv(x, k[None, None], config=ConvConfig(1, "VALID", 1, 2), bias=b)
        return want, [pointwise(x, k, groups=2, bias=b, lowering=low) for low in LOWERINGS]

    want, got = jax.jit(both)(x)
    for g in got:
        np.testing.assert_allclose(g, want, rtol=tol, atol=tol * float(jnp.max(jnp.abs(want))))


def test_bad_lowering_and_depthwise_channels():
    with pytest.raises(ValueError, match="lowering must be one of"):
        with use_lowering("gpu"):
            pass
    with pytest.raises(ValueError, match="channels"):
        depthwise(jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 4)), config=ConvConfig(), lowering="cpu")


def test_implementation_dense_equals_factorized_and_can_be_switched():
    f = random_factorized("cp", (3, 3, 4, 6), (5,), 0)
    x = _arr((2, 7, 7, 4), 1)
    factorized = CPConv(f, bias=jnp.ones(6), strides=2)
    dense = CPConv(f, bias=jnp.ones(6), strides=2, implementation="dense")
    want = run(factorized, x)
    np.testing.assert_allclose(run(dense, x), want, rtol=2e-5, atol=2e-5)
    switched = CP3Conv(random_factorized("cp3", (3, 3, 4, 6), (5,), 1))
    before = run(switched, x)
    switched.implementation = "dense"
    np.testing.assert_allclose(run(switched, x), before, rtol=2e-5, atol=2e-5)
    lin = LowRankDense(random_factorized("svd", (7, 5), (2,), 0), bias=jnp.ones(5), implementation="dense")
    v = _arr((3, 7), 2)
    np.testing.assert_allclose(lin(v), lin.reference(v), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="implementation must be one of"):
        CPConv(f, implementation="fast")


def test_time_interleaved_rotates_the_order_and_counts_rounds():
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or jnp.zeros(())) for name in "abc"}
    timings = time_interleaved(fns, repeats=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t.samples_ms) == 3 and t.median_ms >= 0 for t in timings.values())
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved(fns, repeats=0)


def _tiny_plan(ratio=0.4):
    model = TinyNet()
    return model, plan(model, format="cp", ratio=ratio, formats={"linear": "svd"}, input_shape=(1, 9, 9, 3))


def test_auto_rule_and_reasons(monkeypatch):
    """Faster → factorized; slower but smaller → the faster implementation; neither faster nor
    smaller → left dense, with the measured times in the reason."""
    model, p = _tiny_plan()
    times = iter([dict(dense=2.0, factorized=1.0, rebuilt=2.1), dict(dense=2.0, factorized=3.0, rebuilt=2.2),
                  dict(dense=1.0, factorized=3.0, rebuilt=1.5), dict(dense=1.0, factorized=0.5, rebuilt=1.1)])
    monkeypatch.setattr(_choose, "_time_entry", lambda *a: next(times))
    entries = list(p.entries)
    entries[2] = dataclasses.replace(entries[2], params_after=entries[2].params_before)  # not smaller
    chosen = choose_implementations(model, dataclasses.replace(p, entries=tuple(entries)), batch_size=4)
    got = {e.path: e.implementation for e in chosen.entries}
    # entries in plan order: blocks.0, blocks.1, conv1, linear
    assert got == {"blocks.0": "factorized", "blocks.1": "dense", "linear": "factorized"}
    assert [path for path, _ in chosen.left_dense] == ["conv1"]
    assert "neither faster" in chosen.left_dense[0][1] and "1.5 ms" in chosen.left_dense[0][1]
    assert "slower than the dense layer but fewer parameters" in chosen["blocks.1"].reason
    assert "left dense: conv1" in chosen.table()
    again = Plan.from_dict(json.loads(json.dumps(chosen.to_dict())))
    assert again == chosen


def test_forced_modes_and_bad_arguments():
    model, p = _tiny_plan()
    forced = choose_implementations(model, p, mode="dense")
    assert {e.implementation for e in forced.entries} == {"dense"}
    assert all("forced" in e.reason for e in forced.entries)
    with pytest.raises(ValueError, match="mode must be one of"):
        choose_implementations(model, p, mode="fastest")
    no_shapes = plan(model, format="cp", ratio=0.4, formats={"linear": "svd"})
    with pytest.raises(ValueError, match="input_shape"):
        choose_implementations(model, no_shapes)


def test_chosen_implementations_survive_apply_save_and_load(tmp_path):
    model, p = _tiny_plan()
    p = choose_implementations(model, p, mode="dense")
    compressed = apply(model, p, random_factors(p, seed=1))
    assert {compressed.blocks[0].implementation, compressed.linear.implementation} == {"dense"}
    back = set_implementations(compressed, dataclasses.replace(
        p, entries=tuple(dataclasses.replace(e, implementation="factorized") for e in p.entries)))
    x = inputs()
    np.testing.assert_allclose(run(back, x), run(compressed, x), rtol=2e-5, atol=2e-5)
    save(tmp_path / "m", compressed, p)
    loaded = load(tmp_path / "m", TinyNet())
    assert loaded.blocks[1].implementation == "dense"
    np.testing.assert_array_equal(run(loaded, x), run(compressed, x))


def test_auto_measures_a_tiny_model():
    model, p = _tiny_plan()
    chosen = choose_implementations(model, p, batch_size=2, repeats=1)
    assert len(chosen.entries) + len(chosen.left_dense) == len(p.entries)
    assert all("ms" in e.reason for e in chosen.entries)


@pytest.mark.experiment
@pytest.mark.data
@pytest.mark.slow
def test_benchmark_smoke_records_every_field(data_dir, tmp_path):
    out = tmp_path / "latency.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--smoke",
                           "--data", str(data_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())["runs"]
    assert (result["arch"], result["format"], result["ratio"]) == ("resnet20", "cp", 0.5)
    assert {(r["batch"], r["variant"]) for r in result["rows"]} == {
        (b, v) for b in (1, 2) for v in ("dense", "factorized_conv", "factorized", "auto")}
    assert len(result["load"]) == 3 and 0.4 < result["mac_ratio"] < 0.6
    assert {tuple(r["ms"]) for r in result["layers"]} == {("dense", "factorized_conv", "factorized", "rebuilt")}
    assert sum(r["count"] for r in result["layers"] if r["batch"] == 1) == 18
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--table", "--out", str(out)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "| resnet20 | cp | 0.5 |" in table.stdout
