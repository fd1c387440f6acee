"""plan / apply / verify on a tiny NNX model with random factorized kernels."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from _surgery_models import TinyNet, inputs, numpy_init, random_factors, run, state_arrays
from flax import nnx

from sigmadecomp import to_dense
from sigmadecomp._paths import get_by_path
from sigmadecomp.layers import CPConv, LowRankDense, Tucker2Conv
from sigmadecomp.surgery import Plan, apply, plan, rank_for_ratio, verify
from sigmadecomp.surgery._apply import set_by_path

PATHS = ["blocks.0", "blocks.1", "conv1", "linear"]  # the module graph's (sorted) order


def tucker_plan(model, **kw):
    kw.setdefault("ratio", 0.5)
    return plan(model, format="tucker2", formats={"linear": "svd"}, **kw)


def dense_twin(model, factors):
    """The model with each planned kernel replaced by the dense kernel of its factors."""
    twin = nnx.clone(model)
    for path, f in factors.items():
        parts = f if isinstance(f, list) else [f]
        layer = get_by_path(twin, path)
        layer.kernel[...] = jnp.concatenate([to_dense(p) for p in parts], axis=-1).astype(layer.kernel.dtype)
    return twin


# ------------------------------------------------------------------------------------------ plan


def test_plan_with_ratio_covers_every_layer_and_counts():
    model = TinyNet()
    p = tucker_plan(model, input_shape=(1, 9, 9, 3))
    assert p.paths == tuple(PATHS)
    b0, b1, conv1, linear = p.entries
    assert conv1.kind == "conv" and conv1.padding == "SAME" and conv1.strides == (1, 1)
    assert b0.strides == (2, 2) and b0.padding == "VALID"
    assert b1.groups == 2 and b1.padding == ((1, 1), (0, 0)) and b1.kernel_dilation == (2, 1) and not b1.use_bias
    assert linear.kind == "dense" and linear.format == "svd" and linear.strides is None
    for e in p.entries:
        assert e.ranks == rank_for_ratio(e.format, e.kernel_shape, 0.5, groups=e.groups)
        bias = e.kernel_shape[-1] if e.use_bias else 0
        assert e.params_after - bias <= 0.5 * (e.params_before - bias)
    assert (b0.in_spatial, b0.out_spatial) == ((9, 9), (4, 4))
    assert (b1.in_spatial, b1.out_spatial) == ((4, 4), (2, 4))
    assert b0.flops_before == 16 * 3 * 3 * 8 * 8 and linear.flops_before == 12 * 5
    assert p.flops_after < p.flops_before and p.params_after < p.params_before


def test_plan_without_input_shape_has_no_flops_and_round_trips_json():
    p = tucker_plan(TinyNet())
    assert all(e.flops_before is None and e.flops_after is None for e in p.entries)
    assert p.flops_before is None and "n/a" in p.table()
    for q in (p, tucker_plan(TinyNet(), input_shape=(2, 9, 9, 3))):
        assert Plan.from_dict(json.loads(json.dumps(q.to_dict()))) == q


def test_plan_skip_ranks_and_formats():
    model = TinyNet()
    p = plan(model, format="cp", ratio=0.3, skip=["conv1", "linear"])
    assert p.paths == ("blocks.0", "blocks.1")
    q = plan(model, format="svd", ratio=0.3, skip=lambda path: path.startswith("blocks"))
    assert q.paths == ("conv1", "linear")
    r = plan(model, format="tucker2", ranks={"conv1": (3, 2), "blocks.0": 4, "linear": 2},
             formats={"linear": "svd"}, skip=["blocks.1"])
    assert [e.ranks for e in r.entries] == [(4, 4), (3, 2), (2,)]
    assert r["blocks.0"].format == "tucker2"


@pytest.mark.parametrize("kwargs, match", [
    (dict(format="tucker2", ratio=0.5), r"'linear' is dense .* use 'svd'"),
    (dict(format="svd", ratio=0.5, ranks={"conv1": 1}), "exactly one of ratio"),
    (dict(format="svd"), "exactly one of ratio"),
    (dict(format="svd", ratio=0.0), r"ratio must be in \(0, 1\]"),
    (dict(format="svd", ratio=1.5), r"ratio must be in \(0, 1\]"),
    (dict(format="tt4", ratio=0.5), "format must be one of"),
    (dict(format="tt", ranks={"conv1": (2, 3)}, skip=lambda p: p != "conv1"), r"takes ranks \(r1, r2, r3\)"),
    (dict(format="tt", ranks={"conv1": (2, 9, 2)}, skip=lambda p: p != "conv1"), r"r2.*exceeds the r1·kh mode"),
    (dict(format="svd", ratio=0.5, skip=["conv9"]), r"unknown layer path\(s\) \['conv9'\].*blocks.0, blocks.1, conv1, linear"),
    (dict(format="svd", ratio=0.5, skip="conv1"), "skip=\\['conv1'\\]"),
    (dict(format="svd", ranks={"conv1": 2, "blocks.0": 2, "blocks.1": 2, "linar": 2}), "unknown layer path"),
    (dict(format="svd", ranks={"conv1": 2}), r"no entry for layer\(s\) \['blocks.0', 'blocks.1', 'linear'\]"),
    (dict(format="svd", ranks={"conv1": 28, "blocks.0": 2, "blocks.1": 2, "linear": 2}), "exceeds the full rank"),
    (dict(format="tucker2", ranks={"conv1": (2, 4)}, skip=lambda p: p != "conv1"), r"exceed the mode sizes"),
    (dict(format="cp", ranks={"conv1": 0}, skip=lambda p: p != "conv1"), "must be one positive int"),
    (dict(format="svd", ratio=0.5, formats={"conv1": "cp4"}), "unknown format 'cp4'"),
    (dict(format="svd", ratio=0.5, skip=["conv1"], ranks=None, formats={"conv1": "svd", "x": "svd"}), "formats"),
])
def test_plan_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(TinyNet(), **kwargs)


def test_plan_rejects_unsupported_layers_unless_skipped():
    model = TinyNet()
    model.blocks[0] = nnx.Conv(8, 8, (3, 3), input_dilation=2, kernel_init=numpy_init(0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'blocks.0' cannot be factorized: input_dilation"):
        plan(model, format="svd", ratio=0.5)
    assert "blocks.0" not in plan(model, format="svd", ratio=0.5, skip=["blocks.0"]).paths


# ----------------------------------------------------------------------------------------- apply


def test_apply_replaces_layers_on_a_copy_and_matches_dense_twin(dtype, tol):
    model = TinyNet(dtype=dtype)
    before = state_arrays(model)
    p = tucker_plan(model)
    factors = random_factors(p, dtype=dtype)
    compressed = apply(model, p, factors)
    assert isinstance(compressed.conv1, Tucker2Conv) and isinstance(compressed.linear, LowRankDense)
    assert isinstance(compressed.blocks[1], Tucker2Conv) and compressed.blocks[1].groups == 2
    after = state_arrays(model)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert isinstance(model.conv1, nnx.Conv) and isinstance(model.linear, nnx.Linear)
    x = inputs(dtype=dtype)
    want = run(dense_twin(model, factors), x)
    np.testing.assert_allclose(run(compressed, x), want, rtol=tol, atol=tol * float(jnp.max(jnp.abs(want))))


def test_apply_rejects_mismatched_factors():
    model = TinyNet()
    p = tucker_plan(model)
    factors = random_factors(p)
    with pytest.raises(ValueError, match=r"missing \['linear'\]"):
        apply(model, p, {k: v for k, v in factors.items() if k != "linear"})
    with pytest.raises(ValueError, match=r"not in the plan \['extra'\]"):
        apply(model, p, {**factors, "extra": factors["linear"]})
    other = random_factors(plan(model, format="cp", ratio=0.5, formats={"linear": "svd"}))
    with pytest.raises(ValueError, match="format 'cp' instead of 'tucker2'"):
        apply(model, p, {**factors, "conv1": other["conv1"]})
    with pytest.raises(ValueError, match="2 feature group"):
        apply(model, p, {**factors, "blocks.1": factors["blocks.1"][0]})
    small = random_factors(tucker_plan(model, ratio=0.2))
    with pytest.raises(ValueError, match="ranks .* instead of"):
        apply(model, p, {**factors, "conv1": small["conv1"]})
    with pytest.raises(ValueError, match="does not match the plan"):
        apply(TinyNet(width=4), p, factors)


def test_set_by_path_handles_lists():
    model = TinyNet()
    p = plan(model, format="cp", ranks={"blocks.0": 3}, skip=lambda q: q != "blocks.0")
    compressed = apply(model, p, random_factors(p))
    assert isinstance(compressed.blocks[0], CPConv)
    set_by_path(compressed, "blocks.0", nnx.Linear(2, 2, kernel_init=numpy_init(0), rngs=nnx.Rngs(0)))
    assert isinstance(compressed.blocks[0], nnx.Linear)


# ---------------------------------------------------------------------------------------- verify


def test_verify_measures_errors_and_counts():
    model = TinyNet()
    p = tucker_plan(model, input_shape=(1, 9, 9, 3))
    factors = random_factors(p)
    compressed = apply(model, p, factors)
    batches = [inputs(seed=1), (inputs(seed=2), np.zeros(4))]
    report = verify(model, compressed, batches, plan=p)
    assert report.num_examples == 8 and [r.path for r in report.layers] == PATHS
    # the first layer sees the raw input in both models: its error is computable by hand
    conv, fact = model.conv1, compressed.conv1
    outs = [run(lambda x: (fact(x), conv(x)), x) for x in (inputs(seed=1), inputs(seed=2))]
    num = sum(float(jnp.sum((y - y_ref) ** 2)) for y, y_ref in outs)
    den = sum(float(jnp.sum((y_ref - conv.bias[...][None, None, None]) ** 2)) for _, y_ref in outs)
    np.testing.assert_allclose(report.layers[2].rel_error, num / den, rtol=1e-4)
    # measured MACs and params agree with the plan's predicted counts
    for row, entry in zip(report.layers, p.entries):
        assert (row.params_before, row.params_after) == (entry.params_before, entry.params_after)
        assert (row.flops_before, row.flops_after) == (entry.flops_before, entry.flops_after)
    assert report.flops_before - report.flops_after == p.flops_before - p.flops_after
    assert report.params_before - report.params_after == p.params_before - p.params_after
    assert 0 <= report.top1_agreement <= 1 and report.output_rel_error > 0
    text = str(report)
    assert all(path in text for path in PATHS) and "top-1 agreement" in text
    # New factors of the same structure: the same compiled step, the same counts.
    from sigmadecomp.surgery._verify import _make_step

    step = _make_step(model, compressed, p.paths)[0]
    again = verify(model, apply(model, p, random_factors(p, seed=5)), batches, plan=p)
    assert _make_step(model, compressed, p.paths)[0] is step and step._cache_size() == 1
    assert again.flops_after == report.flops_after and again.layers[2].rel_error != report.layers[2].rel_error


def test_verify_is_exact_against_the_dense_twin_and_finds_layers_without_plan():
    model = TinyNet(dtype=jnp.float64)
    p = tucker_plan(model)
    factors = random_factors(p, dtype=jnp.float64)
    compressed = apply(model, p, factors)
    twin = dense_twin(model, factors)
    before = state_arrays(compressed)
    report = verify(twin, compressed, [inputs(dtype=jnp.float64)])
    assert [r.path for r in report.layers] == PATHS
    assert max(r.rel_error for r in report.layers) < 1e-20 and report.output_rel_error < 1e-20
    assert report.top1_agreement == 1.0
    after = state_arrays(compressed)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_verify_rejects_empty_batches_and_other_architectures():
    model = TinyNet()
    p = tucker_plan(model)
    compressed = apply(model, p, random_factors(p))
    with pytest.raises(ValueError, match="batches is empty"):
        verify(model, compressed, [])
    with pytest.raises(ValueError, match="array or a tuple"):
        verify(model, compressed, [{"image": 1}])
    other = TinyNet()
    other.blocks[0] = nnx.BatchNorm(8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="same architecture"):
        verify(other, compressed, [inputs()])


def test_plan_on_a_compressed_model_sees_only_the_remaining_layers():
    model = TinyNet()
    p = plan(model, format="svd", ratio=0.5, skip=["linear"])
    compressed = apply(model, p, random_factors(p))
    q = plan(compressed, format="svd", ratio=0.5)
    assert q.paths == ("linear",)
