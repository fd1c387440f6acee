"""Factorized layers equal the dense layer built from the same factors; counts match the layers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sigmadecomp import CP, CP3, TR, TT, LowRank, Tucker2, Tucker3, to_dense
from sigmadecomp.layers import (
    CP3Conv, CPConv, LowRankConv, LowRankDense, TRConv, TTConv, Tucker2Conv, Tucker3Conv, count_format, factor_shapes, factorize_layer,
)
from sigmadecomp.layers._ops import LOWERINGS, use_lowering

FORMATS = {"svd": (LowRank, LowRankConv, (3,)), "tucker2": (Tucker2, Tucker2Conv, (3, 2)),
           "cp": (CP, CPConv, (4,)), "cp3": (CP3, CP3Conv, (4,)),
           "tucker3": (Tucker3, Tucker3Conv, (3, 2, 2)), "tt": (TT, TTConv, (2, 3, 2)),
           "tr": (TR, TRConv, (2, 2, 3, 2))}

def INIT(key, shape, dtype):
    """Deterministic numpy init: Flax's default initializer compiles for seconds per shape."""
    return jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)


# (kernel_size, strides, padding, kernel_dilation, groups)
CONFIGS = [
    ((3, 3), 1, "SAME", 1, 1),
    ((3, 3), 2, "VALID", 1, 1),
    ((3, 3), (2, 1), ((1, 2), (0, 1)), (2, 1), 1),
    ((3, 3), 1, "SAME", 2, 1),
    ((3, 3), 2, 1, 1, 1),
    ((1, 1), 2, "SAME", 1, 1),
    ((3, 1), (1, 2), "VALID", (2, 1), 1),
    ((3, 3), 2, "CIRCULAR", 1, 1),
    ((3, 3), 1, "SAME", 1, 2),
    ((3, 1), 2, ((1, 1), (0, 0)), 1, 2),
]


def random_factorized(fmt, kernel_shape, ranks, seed, dtype):
    """Random factors (numpy: no compilation per shape, which keeps the many small cases fast)."""
    rng = np.random.default_rng(seed)
    shapes = factor_shapes(fmt, kernel_shape, ranks)
    arrays = {name: jnp.asarray(rng.standard_normal(s), dtype) for name, s in shapes.items()}
    return FORMATS[fmt][0](**arrays, kernel_shape=tuple(kernel_shape))


def numpy_dense(f):
    """Independent oracle for ``to_dense``: the format's defining sum, in numpy float64."""
    a = {k: np.asarray(v, np.float64) for k, v in vars(f).items() if k != "kernel_shape"}
    if isinstance(f, LowRank):
        dense = np.einsum("ijcr,ro->ijco", a["in_kernel"], a["out_factor"])
    elif isinstance(f, Tucker2):
        dense = np.einsum("ca,ijab,ob->ijco", a["in_factor"], a["core"], a["out_factor"])
    elif isinstance(f, Tucker3):
        dense = np.einsum("abs,cb,ijs,oa->ijco", a["core"], a["in_factor"], a["spatial_factor"], a["out_factor"])
    elif isinstance(f, TT):
        dense = np.einsum("ca,aib,bje,eo->ijco", a["in_core"], a["kh_core"], a["kw_core"], a["out_core"])
    elif isinstance(f, TR):
        dense = np.einsum("zca,aib,bje,eoz->ijco", a["in_core"], a["kh_core"], a["kw_core"], a["out_core"])
    elif isinstance(f, CP):
        dense = np.einsum("ir,jr,cr,or->ijco", a["kh_factor"], a["kw_factor"], a["in_factor"], a["out_factor"])
    else:
        dense = np.einsum("ijr,cr,or->ijco", a["spatial_factor"], a["in_factor"], a["out_factor"])
    return dense.reshape(f.kernel_shape)


def reference_conv(kernel_size, strides, padding, dilation, groups, cin, cout, parts, seed, dtype):
    """A plain nnx.Conv whose kernel is the dense kernel of ``parts`` (one per group)."""
    kernel = np.concatenate([numpy_dense(p) for p in parts], axis=-1)
    bias = np.random.default_rng(seed).standard_normal(cout)
    return nnx.Conv(cin, cout, kernel_size, strides, padding=padding, kernel_dilation=dilation,
                    feature_group_count=groups, param_dtype=dtype, rngs=nnx.Rngs(0),
                    kernel_init=lambda *_: jnp.asarray(kernel, dtype), bias_init=lambda *_: jnp.asarray(bias, dtype))


def both(layer, reference, x):
    """Both outputs from one jit: far cheaper than eager convs, which compile op by op."""
    return jax.jit(lambda x: (layer(x), reference(x)))(x)


def every_implementation(layer, x):
    """name → output of every way the layer can run: the nnx.Conv chain, the factorized chain with
    each lowering, the dense kernel rebuilt from the factors; one jit for all."""

    def run(x):
        outs = dict(reference=layer.reference(x), dense=layer.dense_call(x))
        for lowering in LOWERINGS:
            with use_lowering(lowering):
                outs[f"factorized/{lowering}"] = layer.factorized_call(x)
        return outs

    return jax.jit(run)(x)


def assert_close(got, want, tol):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_layers_equal_dense_conv(fmt, dtype, tol):
    """Every config: strides 1/2, SAME/VALID/explicit/CIRCULAR padding, dilation 1/2, 3×3/1×1/3×1, groups."""
    cin, cout = 4, 6
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 8, cin)), dtype)
    for i, (ks, strides, padding, dilation, groups) in enumerate(CONFIGS):
        shape = ks + (cin // groups, cout // groups)
        parts = [random_factorized(fmt, shape, FORMATS[fmt][2], 10 * i + g, dtype) for g in range(groups)]
        conv = reference_conv(ks, strides, padding, dilation, groups, cin, cout, parts, i, dtype)
        layer = FORMATS[fmt][1].from_layer(conv, parts if groups > 1 else parts[0])
        assert layer.in_conv.kernel[...].dtype == jnp.dtype(dtype)
        got, want = both(layer, conv, x)
        assert_close(got, want, tol)
        for name, out in every_implementation(layer, x).items():
            assert out.dtype == want.dtype, name
            assert_close(out, want, tol)


def test_lowrank_dense_equals_linear(dtype, tol):
    f = random_factorized("svd", (7, 5), (2,), 0, dtype)
    linear = nnx.Linear(7, 5, param_dtype=dtype, rngs=nnx.Rngs(0),
                        kernel_init=lambda *_: jnp.asarray(numpy_dense(f), dtype))
    layer = LowRankDense.from_layer(linear, f)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 7)), dtype)
    assert_close(*both(layer, linear, x), tol)
    assert layer.out_dense.bias is not None and layer.in_dense.bias is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_to_factorized_round_trip_and_grouped_dense_kernel(fmt):
    parts = [random_factorized(fmt, (3, 3, 2, 3), FORMATS[fmt][2], i, jnp.float64)
             for i in range(2)]
    layer = FORMATS[fmt][1](parts, bias=jnp.zeros(6, jnp.float64))
    for got, want in zip(layer.to_factorized(), parts):
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    want = jnp.concatenate([to_dense(p) for p in parts], axis=-1)
    np.testing.assert_allclose(np.asarray(layer.dense_kernel()), np.asarray(want), rtol=1e-12)


def test_layer_without_bias_and_factorize_layer_dispatch():
    conv = nnx.Conv(4, 6, (3, 3), use_bias=False, rngs=nnx.Rngs(0), kernel_init=INIT)
    f = random_factorized("tucker2", (3, 3, 4, 6), (2, 2), 0, jnp.float32)
    layer = factorize_layer(conv, f)
    assert isinstance(layer, Tucker2Conv) and layer.out_conv.bias is None and not layer.use_bias
    assert layer.counts().params == 4 * 2 + 9 * 2 * 2 + 2 * 6


def test_factors_are_cast_to_the_layer_dtype():
    conv = nnx.Conv(4, 6, (3, 3), param_dtype=jnp.float32, rngs=nnx.Rngs(0), kernel_init=INIT)
    f = random_factorized("cp", (3, 3, 4, 6), (3,), 0, jnp.float64)
    layer = CPConv.from_layer(conv, f)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}


def test_layer_is_jittable():
    f = random_factorized("cp", (3, 3, 4, 6), (3,), 0, jnp.float32)
    layer = CPConv(f, strides=2)
    x = jnp.ones((1, 8, 8, 4), jnp.float32)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), layer(x), rtol=1e-6)


# ----------------------------------------------------------------------------------- bad input


def test_from_layer_rejects_mismatches():
    conv = nnx.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0), kernel_init=INIT)
    wrong = random_factorized("tucker2", (3, 3, 4, 5), (2, 2), 0, jnp.float32)
    with pytest.raises(ValueError, match=r"kernel_shape \(3, 3, 4, 6\)"):
        Tucker2Conv.from_layer(conv, wrong)
    with pytest.raises(ValueError, match="expected a Tucker2"):
        Tucker2Conv.from_layer(conv, random_factorized("cp", (3, 3, 4, 6), (2,), 0, jnp.float32))
    grouped = nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0), kernel_init=INIT)
    one = random_factorized("svd", (3, 3, 2, 3), (2,), 0, jnp.float32)
    with pytest.raises(ValueError, match="2 feature group"):
        LowRankConv.from_layer(grouped, one)
    linear = nnx.Linear(4, 6, rngs=nnx.Rngs(0), kernel_init=INIT)
    with pytest.raises(ValueError, match="only use the 'svd' format"):
        factorize_layer(linear, random_factorized("cp", (3, 3, 4, 6), (2,), 0, jnp.float32))
    with pytest.raises(ValueError, match="needs an nnx.Conv"):
        Tucker2Conv.from_layer(linear, wrong)


def test_bad_factor_shapes_and_unequal_group_ranks():
    bad = Tucker2(jnp.ones((3, 3, 2, 2)), jnp.ones((5, 2)), jnp.ones((6, 2)), kernel_shape=(3, 3, 4, 6))
    with pytest.raises(ValueError, match="needs factors"):
        Tucker2Conv(bad)
    a = random_factorized("svd", (3, 3, 2, 3), (2,), 0, jnp.float32)
    b = random_factorized("svd", (3, 3, 2, 3), (1,), 1, jnp.float32)
    with pytest.raises(ValueError, match="one rank for every group"):
        LowRankConv([a, b])
    dense = random_factorized("svd", (4, 6), (2,), 0, jnp.float32)
    with pytest.raises(ValueError, match="LowRankDense"):
        LowRankConv(dense)
    with pytest.raises(ValueError, match="bias must have shape"):
        LowRankConv(a, bias=jnp.zeros(4))
    with pytest.raises(ValueError, match="padding"):
        LowRankConv(a, padding="CAUSAL")


def test_unsupported_conv_configs_are_rejected():
    f = random_factorized("svd", (3, 3, 4, 6), (2,), 0, jnp.float32)
    transposed = nnx.Conv(4, 6, (3, 3), input_dilation=2, rngs=nnx.Rngs(0), kernel_init=INIT)
    with pytest.raises(ValueError, match="input_dilation"):
        LowRankConv.from_layer(transposed, f)
    masked = nnx.Conv(4, 6, (3, 3), mask=jnp.ones((3, 3, 4, 6)), rngs=nnx.Rngs(0), kernel_init=INIT)
    with pytest.raises(ValueError, match="masked"):
        LowRankConv.from_layer(masked, f)


# -------------------------------------------------------------------------------------- counts


def measured(layer, x, monkeypatch):
    """Params from the layer's own state; MACs by counting every sub-conv/dense call."""
    macs = []
    for cls in (nnx.Conv, nnx.Linear):
        original = cls.__call__

        def counting(self, inputs, *a, _original=original, **k):
            y = _original(self, inputs, *a, **k)
            # × the batch over the layer's input batch: sub-convs shared over a folded index
            # (Tucker-3's channels, TR's closing rank) run once per folded batch entry.
            macs.append(math.prod(self.kernel.shape) * math.prod(y.shape[1:-1]) * y.shape[0] // x.shape[0])
            return y

        monkeypatch.setattr(cls, "__call__", counting)
    y = jax.eval_shape(getattr(layer, "reference", layer), x)  # counted at trace time: no compute
    monkeypatch.undo()
    params = sum(v.size for v in jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param)))
    return params, sum(macs), y


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[2], CONFIGS[6], CONFIGS[8]])
def test_counts_match_the_layer(fmt, config, monkeypatch):
    ks, strides, padding, dilation, groups = config
    cin, cout, ranks = 4, 6, FORMATS[fmt][2]
    parts = [random_factorized(fmt, ks + (cin // groups, cout // groups), ranks, i, jnp.float32)
             for i in range(groups)]
    conv = reference_conv(ks, strides, padding, dilation, groups, cin, cout, parts, 9, jnp.float32)
    layer = FORMATS[fmt][1].from_layer(conv, parts if groups > 1 else parts[0])
    x = jnp.ones((1, 11, 10, cin), jnp.float32)
    params, macs, y = measured(layer, x, monkeypatch)
    counts = layer.counts(in_spatial=(11, 10), out_spatial=y.shape[1:3])
    assert (counts.params, counts.flops) == (params, macs)
    params0, macs0, _ = measured(conv, x, monkeypatch)
    dense = count_format("dense", conv.kernel.shape, groups=groups, bias=True,
                         in_spatial=(11, 10), out_spatial=y.shape[1:3])
    assert (dense.params, dense.flops) == (params0, macs0)


def test_dense_counts_match(monkeypatch):
    f = random_factorized("svd", (7, 5), (2,), 0, jnp.float32)
    layer = LowRankDense(f, bias=jnp.zeros(5, jnp.float32))
    params, macs, _ = measured(layer, jnp.ones((2, 3, 7), jnp.float32), monkeypatch)
    counts = layer.counts(out_spatial=(3,))
    assert (counts.params, counts.flops) == (params, macs) == (7 * 2 + 2 * 5 + 5, 3 * (7 * 2 + 2 * 5))
    assert count_format("dense", (7, 5), bias=False).flops == 35
    assert count_format("tucker2", (3, 3, 4, 6), (2, 2)).flops is None
