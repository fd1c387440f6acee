"""Reshaped formats r-CP, r-Tucker, r-TT, r-TR (issue 15): regrouping, engine fits, layers, registry."""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sigmadecomp as sd
from sigmadecomp import _reshaped as rs
from sigmadecomp.layers import _ops
from sigmadecomp.layers._config import ConvConfig
from sigmadecomp.layers._reshaped import RCPConv, RTRConv, RTTConv, RTuckerConv, contraction_plan
from sigmadecomp.solvers import _engine as engine

KS = (3, 3, 8, 12)  # modes (2, 2, 2) / (2, 2, 3)
SOLVERS = {"r-cp": sd.RCPALS, "r-tucker": sd.RTuckerALS, "r-tt": sd.RTTALS, "r-tr": sd.RTRALS}
LAYERS = {"r-cp": RCPConv, "r-tucker": RTuckerConv, "r-tt": RTTConv, "r-tr": RTRConv}
RANKS = {"r-cp": (3,), "r-tucker": (3, 2, 3, 4), "r-tt": (3, 4, 4), "r-tr": (2, 2, 3, 2)}


def _random(kind, ranks=None, dtype=jnp.float64, seed=0, kernel_shape=KS):
    f = rs.zeros(kind, kernel_shape, ranks or RANKS[kind], dtype)
    keys = jax.random.split(jax.random.key(seed), len(f.cores))
    cores = tuple(jax.random.normal(k, c.shape, dtype) for k, c in zip(keys, f.cores))
    return rs.CLASSES[kind](cores, f.in_modes, f.out_modes, f.kernel_shape)


def _cov(d, dtype=jnp.float64, seed=1):
    x = np.random.default_rng(seed).standard_normal((3 * d, d)) * np.geomspace(1, 30, d)
    return jnp.asarray(x.T @ x / (3 * d), dtype)


def _history(sol):
    return np.asarray(sol.errors)[: int(sol.num_steps) + 1]


def test_modes_and_regrouping():
    assert rs.balanced_factors(64, 3) == (4, 4, 4) and rs.balanced_factors(12, 2) == (3, 4)
    assert rs.default_modes((3, 3, 16, 32)) == ((2, 2, 4), (2, 4, 4))
    w = jnp.arange(12 * 8 * 9.0).reshape(12, 72)
    x = rs.regroup(w, KS, (2, 2, 2), (2, 2, 3))
    assert x.shape == (9, 4, 4, 6)
    np.testing.assert_array_equal(rs.ungroup(x, KS, (2, 2, 2), (2, 2, 3)), w)
    # one entry by hand: o = (t1, t2, t3) = (1, 0, 2), c = (s1, s2, s3) = (0, 1, 1), p = 5
    o, c, p = 1 * 6 + 0 * 3 + 2, 0 * 4 + 1 * 2 + 1, 5
    assert x[p, 0 * 2 + 1, 1 * 2 + 0, 1 * 3 + 2] == w[o, c * 9 + p]
    with pytest.raises(ValueError, match="multiply to cin"):
        sd.RTTALS((2, 2, 2), in_modes=(2, 2, 3), out_modes=(2, 2, 3)).check(KS)


def _solver(kind):
    """One configuration per format for every float64 test (one compile each)."""
    return SOLVERS[kind](RANKS[kind], max_steps=30)


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_planted_recovery_and_sigma_fit(kind):
    """float64: a kernel built from cores of the format is recovered (cov = I); on a noisy kernel
    the Σ history never increases."""
    solver, eye = _solver(kind), jnp.eye(72, dtype=jnp.float64)
    planted = sd.to_dense(_random(kind))
    sol = sd.decompose(planted, solver, cov=eye, key=jax.random.key(2))
    assert float(sd.relative_error(planted, sol.value)) < 1e-8, (kind, _history(sol)[-3:])
    assert isinstance(sol.value, rs.CLASSES[kind]) and sol.value.ranks == RANKS[kind]
    noisy = planted + 0.3 * jnp.std(planted) * jax.random.normal(jax.random.key(9), KS, jnp.float64)
    sig = sd.decompose(noisy, solver, cov=_cov(72), key=jax.random.key(0))
    h = _history(sig)
    assert np.all(np.diff(h) <= 1e-10 * h[0]) and h[-1] < h[0], h


def test_sigma_fit_improves_on_the_frobenius_fit():
    """Warm-started from the Frobenius fit (the metric-free code path), the Σ fit lowers the
    Σ-error (monotone engine), here by a clear margin on an anisotropic cov."""
    solver, cov = _solver("r-tt"), _cov(72)
    noisy = sd.to_dense(_random("r-tt")) + 2.0 * jax.random.normal(jax.random.key(9), KS, jnp.float64)
    fro = sd.decompose(noisy, solver)
    assert np.all(np.diff(_history(fro)) <= 1e-10)
    sig = sd.decompose(noisy, solver, cov=cov, init=fro.value)
    before = float(sd.relative_error(noisy, fro.value, cov=cov))
    assert float(sd.relative_error(noisy, sig.value, cov=cov)) < 0.9 * before


def test_new_data_does_not_recompile():
    solver = _solver("r-tt")
    sd.decompose(sd.to_dense(_random("r-tt", seed=1)), solver, cov=_cov(72))
    before = engine._engine_solve._cache_size()
    sd.decompose(sd.to_dense(_random("r-tt", seed=2)), dataclasses.replace(solver, rtol=1e-3), cov=_cov(72, seed=3))
    assert engine._engine_solve._cache_size() == before


CONFIGS = ((1, "SAME", 1), (2, "VALID", 1), (2, ((1, 2), (0, 1)), 1), (1, "SAME", 2))


@pytest.mark.parametrize("kind,dtype", [(k, "float64") for k in LAYERS] + [("r-tr", "float32")])
def test_layer_equals_dense_conv(kind, dtype):
    """Both contraction orders equal the dense conv of the same cores: strides 1/2, SAME, VALID,
    explicit padding, dilation (one jit for all of them)."""
    tol = 1e-12 if dtype == "float64" else 1e-5
    f = _random(kind, dtype=dtype)
    bias = jnp.linspace(-1, 1, 12, dtype=dtype)
    x = jax.random.normal(jax.random.key(3), (2, 9, 7, 8), dtype)
    layers = [LAYERS[kind](f, bias=bias, strides=s, padding=p, kernel_dilation=d, order=o)
              for s, p, d in CONFIGS for o in ("channels-first", "spatial-first")]

    @jax.jit
    def both(v):
        dense = sd.to_dense(f)
        refs = [_ops.conv(v, dense, config=ConvConfig(s, p, d, 1), bias=bias) for s, p, d in CONFIGS]
        return refs, [layer(v) for layer in layers]

    refs, outs = both(x)
    for i, y in enumerate(outs):
        ref = refs[i // 2]
        assert y.dtype == jnp.dtype(dtype) and y.shape == ref.shape
        np.testing.assert_allclose(y, ref, atol=tol * float(jnp.max(jnp.abs(ref))), err_msg=f"{CONFIGS[i // 2]} {i % 2}")


def test_counts_follow_the_executed_contractions():
    f = _random("r-tr")
    layer = RTRConv(f)
    counts = layer.counts((9, 7), (9, 7))
    assert counts.params == sd.num_params(f)
    plan = contraction_plan("r-tr", KS, f.in_modes, f.out_modes, f.ranks, 1, (9, 7), (9, 7))
    assert counts.flops == plan["macs"] == plan["conv_macs"] + plan["einsum_macs"]
    assert plan["macs"] < 9 * 8 * 12 * 63  # below the dense conv
    for order in ("channels-first", "spatial-first"):  # auto picked the cheaper; each forced plan counts its own
        forced = contraction_plan("r-tr", KS, f.in_modes, f.out_modes, f.ranks, 1, (9, 7), (9, 7), (order,))
        assert forced["macs"] >= plan["macs"] and forced["order"] == order
        assert RTRConv(f, order=order).plan((1, 9, 7, 8))["path"] == forced["path"]


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def _step(model, opt, x, y):
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int and float
        opt.update(model, nnx.grad(_loss)(model, x, y))


def test_trainable_from_a_fit_and_from_scratch():
    """The cores are ordinary parameters: a few Adam steps lower the loss, from a fit and from a random start."""
    target = jax.random.normal(jax.random.key(4), KS, jnp.float64)
    x = jax.random.normal(jax.random.key(5), (4, 6, 6, 8), jnp.float64)
    y_ref = _ops.conv(x, target, config=ConvConfig())
    fit = sd.decompose(target, _solver("r-tt"), cov=jnp.eye(72, dtype=jnp.float64)).value  # compiled above
    scratch = dataclasses.replace(_solver("r-tt"), init="random")
    start = scratch.random_cores(KS, jax.random.key(6), jnp.float64)
    for f in (fit, scratch.to_factorized(start, KS)):
        model = RTTConv(f)
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        first = float(_loss(model, x, y_ref))
        for _ in range(5):
            _step(model, opt, x, y_ref)
        assert float(_loss(model, x, y_ref)) < first


def test_registry_plan_compress_save_load(tmp_path):
    """Registry entries drive plan → Σ compression → save → load; CLI lists the formats."""
    from sigmadecomp import cli, compress
    from sigmadecomp.surgery import apply, load, plan, save

    class Net(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(8, 12, (3, 3), strides=2, rngs=rngs)
            self.linear = nnx.Linear(12, 4, rngs=rngs)

        def __call__(self, x):
            return self.linear(nnx.relu(self.conv2(nnx.relu(self.conv1(x)))).mean(axis=(1, 2)))

    net, images = Net(), jax.random.normal(jax.random.key(0), (16, 8, 8, 3), jnp.float32)
    result = compress.compress_model(net, images, format="r-tt", norm="sigma", ratio=0.4,
                                     skip=("conv1", "linear"), key=jax.random.key(1), max_steps=2, progress=False)
    assert isinstance(result.model.conv2, RTTConv) and result.plan.entries[0].params_after < 8 * 12 * 9
    assert result.model.conv2.core_1[...].dtype == jnp.float32 and np.isfinite(result.layers[0].relative_error)
    models = {"r-tt": (result.model, result.plan)}
    for kind in ("r-cp", "r-tucker", "r-tr"):  # the other entries: plan → apply (random cores)
        p = plan(net, format=kind, ratio=0.4, skip=("conv1", "linear"), input_shape=(1, 8, 8, 3))
        entry = p.entries[0]
        assert entry.flops_after > 0 and entry.params_after < entry.params_before  # r-CP may cost more MACs
        models[kind] = (apply(net, p, {"conv2": _random(kind, entry.ranks, jnp.float32, kernel_shape=(3, 3, 8, 12))}), p)
    for kind, (model, p) in models.items():
        assert isinstance(model.conv2, LAYERS[kind])
        save(tmp_path / kind, model, p)
        np.testing.assert_allclose(load(tmp_path / kind, Net())(images), model(images), rtol=1e-5, atol=1e-6)
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    fmt = next(a for a in sub.choices["compress"]._actions if "--format" in a.option_strings)
    assert all(fmt.type(f) == f for f in ("r-cp", "r-tucker", "r-tt", "r-tr", "r-cp+tucker2"))


@pytest.mark.parametrize("kind", ["r-cp", "r-tucker", "r-tt", "r-tr"])
def test_rank_rule_with_other_modes_fits_the_budget(kind):
    from sigmadecomp.formats._reshaped import SOLVERS, reshaped_ranks_for_ratio
    from sigmadecomp.layers._reshaped import count_reshaped

    shape, budget = (3, 3, 16, 16), 0.1 * 3 * 3 * 16 * 16
    for modes in ((4, 4), (2, 2, 2, 2)):
        ranks = reshaped_ranks_for_ratio(kind, shape, 0.1, in_modes=modes, out_modes=modes)
        SOLVERS[kind](ranks, in_modes=modes, out_modes=modes).check(shape)  # the solver takes them
        assert count_reshaped(kind, shape, ranks, in_modes=modes, out_modes=modes).params <= budget
    # the default modes given explicitly: the registry's own choice
    assert reshaped_ranks_for_ratio(kind, shape, 0.1) == reshaped_ranks_for_ratio(
        kind, shape, 0.1, in_modes=rs.default_modes(shape)[0], out_modes=rs.default_modes(shape)[1])
    with pytest.raises(ValueError, match="both in_modes and out_modes"):
        reshaped_ranks_for_ratio(kind, shape, 0.1, in_modes=(4, 4))
