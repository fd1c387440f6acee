"""Sequential calibration and bias correction, on tiny networks defined here, against dense
float64 oracles built from explicitly gathered patch matrices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sigmadecomp as sd
from sigmadecomp.calibration import (
    compress_sequential, correct_bias, execution_order, forward_stages,
)
from sigmadecomp.calibration._activations import check_stages, run_stages
from sigmadecomp.compress import compress_model
from sigmadecomp.models import CifarResNet
from _compiles import count_compiles

F64 = jnp.float64


def conv(cin, cout, seed, **kw):
    return nnx.Conv(cin, cout, (3, 3), dtype=F64, param_dtype=F64, rngs=nnx.Rngs(seed), **kw)


class Chain(nnx.Module):
    """conv → relu → conv (stride 2, explicit padding, bias) → relu → conv (VALID)."""

    def __init__(self):
        self.conv1 = conv(3, 6, 0, padding="SAME")
        self.conv2 = conv(6, 8, 1, strides=2, padding=((1, 1), (1, 1)))
        self.conv3 = conv(8, 5, 2, padding="VALID")

    def __call__(self, x):
        return self.conv3(nnx.relu(self.conv2(nnx.relu(self.conv1(x)))))


class Reversed(nnx.Module):
    """Attributes in the opposite order of the calls; implements the stage protocol."""

    def __init__(self):
        self.head = conv(6, 4, 3, padding="SAME")
        self.stem = conv(3, 6, 4, padding="SAME")

    def __call__(self, x):
        return self.head(nnx.relu(self.stem(x)))

    def forward_stages(self):
        return (_stem_stage, _head_stage)


def _stem_stage(model, x):
    return nnx.relu(model.stem(x))


def _head_stage(model, h):
    return model.head(h)


def _bn(features, seed):
    bn = nnx.BatchNorm(features, use_running_average=True, dtype=F64, param_dtype=F64, rngs=nnx.Rngs(0))
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    stat = bn.mean[...].dtype  # Flax keeps batch statistics in float32
    bn.mean[...] = 0.3 * jax.random.normal(k1, (features,), stat)
    bn.var[...] = 0.5 + jax.random.uniform(k2, (features,), stat)
    bn.scale[...] = 1.0 + 0.2 * jax.random.normal(k3, (features,), F64)
    return bn


class WithBatchNorm(nnx.Module):
    """conv (bias) → relu → conv (no bias) → BN → relu → conv (no bias) → BN."""

    def __init__(self):
        self.conv1 = conv(3, 6, 5, padding="SAME")
        self.conv2 = conv(6, 8, 6, padding="SAME", use_bias=False)
        self.bn2 = _bn(8, 7)
        self.conv3 = conv(8, 8, 8, padding="SAME", use_bias=False, strides=2)
        self.bn3 = _bn(8, 9)

    def __call__(self, x):
        h = nnx.relu(self.conv1(x))
        return self.bn3(self.conv3(nnx.relu(self.bn2(self.conv2(h)))))

    def corrected_outputs(self, x):
        """The outputs whose mean bias correction restores: conv1, bn2, bn3."""
        y1 = self.conv1(x)
        y2 = self.bn2(self.conv2(nnx.relu(y1)))
        return y1, y2, self.bn3(self.conv3(nnx.relu(y2)))


def images(n=12, size=8, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3), F64)


def patches(layer, x):
    """Explicit im2col of ``x`` for ``layer``: ``(d, rows)`` in the package patch order."""
    strides = (layer.strides,) * 2 if isinstance(layer.strides, int) else layer.strides
    p = sd.extract_patches(x, layer.kernel_size, strides=strides, padding=layer.padding)
    return np.asarray(p.reshape(-1, p.shape[-1]).T)


def dense_matrix(layer):
    kernel = layer.dense_kernel() if hasattr(layer, "dense_kernel") else layer.kernel[...]
    return np.asarray(sd.kernel_to_matrix(kernel))


def svd_oracle(w, x, x_hat, rank, ridge=1e-6):
    """argmin over rank-``rank`` W̃ of ‖W X − W̃ X̂‖² + n·λ‖W̃‖² with the solvers' ridge
    ``λ = ridge·tr(X̂X̂ᵀ/n)/d`` (numpy, float64): as a least-squares problem on the augmented data
    ``[X̂, √(nλ) I]``, whose QR ``Q R`` whitens it; the best rank-r fit of ``[W X, 0] Q`` is mapped
    back by ``R⁻ᵀ``."""
    d, n = x_hat.shape
    lam = ridge * np.sum(x_hat * x_hat) / n / d
    q, r = np.linalg.qr(np.concatenate([x_hat, np.sqrt(n * lam) * np.eye(d)], axis=1).T)
    target = np.concatenate([w @ x, np.zeros((w.shape[0], d))], axis=1)
    u, s, vt = np.linalg.svd(target @ q, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return np.linalg.solve(r, best.T).T


def best_objective(y, x_hat, rank):
    """min over rank-r W̃ of ‖Y − W̃ X̂‖² / ‖Y‖² (no ridge; X̂ may be singular): W̃X̂ ranges over
    the rank-r matrices whose rows lie in X̂'s row space V, so the optimum is ‖Y‖² − ‖Y V‖²
    plus the tail of Y V's singular values beyond r."""
    _, s, vt = np.linalg.svd(x_hat, full_matrices=False)
    b = y @ vt[s > 1e-10 * s[0]].T
    sv = np.linalg.svd(b, compute_uv=False)
    return float((np.sum(y**2) - np.sum(b**2) + np.sum(sv[rank:] ** 2)) / np.sum(y**2))


def assert_same_outputs(w_got, w_want, x_hat, rtol=1e-5):
    want = w_want @ x_hat
    np.testing.assert_allclose(w_got @ x_hat, want, rtol=0, atol=rtol * np.abs(want).max())


def objective(w, w_approx, x, x_hat, shift=None):
    """E‖W x − W̃ x̂ − δ‖² / E‖W x‖² over the columns of the patch matrices."""
    err = w @ x - w_approx @ x_hat
    if shift is not None:
        err = err - np.asarray(shift)[:, None]
    return float(np.sum(err**2) / np.sum((w @ x) ** 2))


# ----------------------------------------------------------------------------- (1) exact cross solve


def test_sequential_svd_matches_dense_oracle():
    net, x = Chain(), images()
    out = compress_sequential(net, x, format="svd", ranks={"conv1": 2, "conv2": 3, "conv3": 2},
                              key=jax.random.key(0), progress=False, batch_size=5)
    comp = out.model
    orig_in = nnx.relu(net.conv2(nnx.relu(net.conv1(x))))
    comp_in = nnx.relu(comp.conv2(nnx.relu(comp.conv1(x))))
    for name, rank, (xin, xhat) in (("conv2", 3, (nnx.relu(net.conv1(x)), nnx.relu(comp.conv1(x)))),
                                    ("conv3", 2, (orig_in, comp_in))):
        layer = getattr(net, name)
        w, px, px_hat = dense_matrix(layer), patches(layer, xin), patches(layer, xhat)
        assert not np.allclose(px, px_hat)  # the earlier compression really changed the input
        oracle, got = svd_oracle(w, px, px_hat, rank), dense_matrix(getattr(comp, name))
        np.testing.assert_allclose(got, oracle, rtol=0, atol=1e-8 * np.abs(oracle).max())
        raw = objective(w, got, px, px_hat)
        report = {r.path: r for r in out.layers}[name]
        np.testing.assert_allclose(report.relative_error, raw, rtol=1e-9)
        # the ridge barely moves the objective even though x̂'s covariance is near-singular
        unridged = best_objective(w @ px, px_hat, rank)
        assert unridged * (1 - 1e-9) <= raw <= unridged * (1 + 1e-3)
        # the solver, fed moments from the raw patches, reports the same objective and solution
        n = px.shape[1]
        sol = sd.decompose(layer.kernel[...], sd.SVD(rank), cov=px_hat @ px_hat.T / n,
                           cross_cov=px @ px_hat.T / n, target_cov=px @ px.T / n)
        # (its objective carries the ridge: + λ‖W̃‖² with λ = 1e-6·tr(X̂X̂ᵀ/n)/d)
        lam = 1e-6 * np.sum(px_hat * px_hat) / n / px.shape[0]
        np.testing.assert_allclose(sol.final_error, raw + n * lam * np.sum(got**2) / np.sum((w @ px) ** 2),
                                   rtol=1e-9)
        assert_same_outputs(np.asarray(sd.kernel_to_matrix(sd.to_dense(sol.value))), got, px_hat, 1e-8)


def test_sequential_tucker2_report_is_raw_objective():
    net, x = Chain(), images()
    out = compress_sequential(net, x, format="tucker2", ranks={"conv2": (4, 3), "conv3": (3, 4)},
                              skip=["conv1"], key=jax.random.key(1), max_steps=5, progress=False)
    comp = out.model
    xin, xhat = nnx.relu(net.conv2(nnx.relu(net.conv1(x)))), nnx.relu(comp.conv2(nnx.relu(comp.conv1(x))))
    px, px_hat = patches(net.conv3, xin), patches(net.conv3, xhat)
    raw = objective(dense_matrix(net.conv3), dense_matrix(comp.conv3), px, px_hat)
    np.testing.assert_allclose(out.layers[1].relative_error, raw, rtol=1e-9)
    assert out.layers[1].path == "conv3" and 0 < raw < 1


# ----------------------------------------------------------------------------- (2) first layer = parallel


def test_first_layer_equals_parallel():
    net, x = Chain(), images()
    ranks = {"conv1": (3, 2), "conv2": (4, 3)}
    common = dict(format="tucker2", ranks=ranks, skip=["conv3"], key=jax.random.key(2), max_steps=4,
                  progress=False)
    seq = compress_sequential(net, x, **common)
    par = compress_model(net, x, norm="sigma", **common)
    np.testing.assert_allclose(dense_matrix(seq.model.conv1), dense_matrix(par.model.conv1),
                               rtol=0, atol=1e-9 * np.abs(dense_matrix(net.conv1)).max())
    np.testing.assert_allclose(seq.layers[0].relative_error, par.layers[0].relative_error, rtol=1e-7)
    # the second layer sees the compressed conv1 and is fitted to it: a different, better answer
    assert not np.allclose(dense_matrix(seq.model.conv2), dense_matrix(par.model.conv2))
    assert np.abs(seq.model(x) - net(x)).mean() < np.abs(par.model(x) - net(x)).mean()


# ----------------------------------------------------------------------------- (3) bias correction


ATOLS = (1e-10, 1e-6, 1e-6)  # conv1 (float64 bias), bn2, bn3 (float32 running means)


def _means(model, x):
    return [np.asarray(y.mean(axis=(0, 1, 2))) for y in model.corrected_outputs(x)]


def test_bias_correction_restores_mean_outputs():
    net, x = WithBatchNorm(), images(seed=3)
    ranks = {"conv1": 2, "conv2": 2, "conv3": 2}
    common = dict(format="svd", ranks=ranks, key=jax.random.key(0), progress=False, batch_size=7)
    plain = compress_sequential(net, x, **common)
    fixed = compress_sequential(net, x, bias_correction=True, **common)
    want = _means(net, x)
    # float64 bias of conv1; the BatchNorm running means are float32 in Flax (rounding ~3e-8)
    for before, after, ref, atol in zip(_means(plain.model, x), _means(fixed.model, x), want, ATOLS):
        assert np.abs(before - ref).max() > 1e-4  # the correction has something to fix
        np.testing.assert_allclose(after, ref, rtol=0, atol=atol)
    # the correction lowers every layer's reported error, and the shift lives in BN / bias
    assert all(f.relative_error < p.relative_error for f, p in zip(fixed.layers, plain.layers))
    assert not np.allclose(fixed.model.bn2.mean[...], net.bn2.mean[...])
    assert type(fixed.model.conv2).__name__ == "LowRankConv" and fixed.model.conv2.use_bias is False


def test_correct_bias_after_parallel_calibration():
    net, x = WithBatchNorm(), images(seed=4)
    par = compress_model(net, x, format="svd", norm="sigma", ranks={"conv1": 2, "conv2": 2, "conv3": 3},
                         key=jax.random.key(0), progress=False)
    before = np.asarray(par.model.bn3.mean[...])
    fixed = correct_bias(net, par.model, x, plan=par.plan, progress=False)
    for got, ref, atol in zip(_means(fixed, x), _means(net, x), ATOLS):
        np.testing.assert_allclose(got, ref, rtol=0, atol=atol)
    np.testing.assert_array_equal(np.asarray(par.model.bn3.mean[...]), before)  # input untouched


def test_bias_correction_without_a_place_raises():
    net, x = Chain(), images()
    net.conv2 = conv(6, 8, 1, strides=2, padding=((1, 1), (1, 1)), use_bias=False)  # → relu, no BN
    with pytest.raises(ValueError, match=r"nowhere to put.*conv2"):
        compress_sequential(net, x, format="svd", ratio=0.5, key=jax.random.key(0),
                            bias_correction=True, progress=False)


# ----------------------------------------------------------------------------- (4) execution order


def test_execution_order_follows_calls_not_attributes():
    net, x = Reversed(), images()
    assert [p for p, _ in sd.surgery._plan.eligible_layers(net).items()] == ["head", "stem"]
    assert execution_order(net, x) == ("stem", "head")
    one_stage = (lambda model, x: model(x),)  # the order of the calls, not of the stages
    assert execution_order(net, jax.ShapeDtypeStruct(x.shape, x.dtype), stages=one_stage) == ("stem", "head")
    out = compress_sequential(net, x, format="svd", ranks={"head": 2, "stem": 2},
                              key=jax.random.key(0), progress=False, cache_activations=False)
    # `head` was fitted to the compressed `stem`'s output: equal to the oracle on those patches
    comp = out.model
    px, px_hat = patches(net.head, nnx.relu(net.stem(x))), patches(net.head, nnx.relu(comp.stem(x)))
    oracle = svd_oracle(dense_matrix(net.head), px, px_hat, 2)
    np.testing.assert_allclose(dense_matrix(comp.head), oracle, rtol=0, atol=1e-8 * np.abs(oracle).max())


def test_resnet_order_and_stages():
    model = CifarResNet(8, dtype=F64, rngs=nnx.Rngs(0))
    x = images(n=2)
    assert execution_order(model, x) == (
        "conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
        "layer3.0.conv1", "layer3.0.conv2", "linear")
    stages = forward_stages(model)
    assert len(stages) == 5 and check_stages(model, stages, x)
    np.testing.assert_allclose(run_stages(model, stages, x), model(x), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- (5) cache = full forward


def test_cached_stages_equal_full_forward():
    net, x = Reversed(), images(n=10)
    net.head = conv(6, 4, 3, padding="SAME", use_bias=True)
    common = dict(format="tucker2", ratio=0.5, key=jax.random.key(3), max_steps=3,
                  bias_correction=True, progress=False, batch_size=4)
    cached = compress_sequential(net, x, **common)
    full = compress_sequential(net, x, cache_activations=False, **common)
    np.testing.assert_allclose(cached.model(x), full.model(x), rtol=1e-10, atol=1e-12)
    assert [r.relative_error for r in cached.layers] == pytest.approx([r.relative_error for r in full.layers],
                                                                      rel=1e-10)


def test_stages_that_do_not_compose_fall_back_with_a_warning():
    class Broken(Reversed):
        def forward_stages(self):
            return (_stem_stage,)  # forgets the last layer

    net, x = Broken(), images(n=4)
    with pytest.warns(UserWarning, match="do not compose"):
        out = compress_sequential(net, x, format="svd", ranks={"head": 2, "stem": 2},
                                  key=jax.random.key(0), progress=False)
    assert [r.path for r in out.layers] == ["head", "stem"]  # plan order


def test_bad_inputs():
    net = Chain()
    with pytest.raises(ValueError, match="calib_images"):
        compress_sequential(net, np.zeros((0, 8, 8, 3)), format="svd", ratio=0.5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="plan must be"):
        correct_bias(net, net, images(), plan={"conv1": 2})


# ----------------------------------------------------------------------------- (6) compile once per shape


def test_identical_blocks_compile_once():
    """Stage and cross-statistics functions are keyed on the block's own structure and the layer's
    path inside it: after compressing blocks 0 and 1 of a stage, compressing blocks 0 and 2 (an
    identical block, reached through the untouched block 1) triggers no XLA compilation at all."""
    model, x = CifarResNet(20, dtype=F64, rngs=nnx.Rngs(0)), images(n=4, size=8)
    common = dict(format="tucker2", key=jax.random.key(0), max_steps=2, progress=False, batch_size=4)

    def run(blocks, **kw):
        ranks = {f"layer1.{b}.conv{c}": (4, 4) for b in blocks for c in (1, 2)}
        return compress_sequential(model, x, ranks=ranks, skip=lambda path: path not in ranks, **common, **kw)

    first, _ = count_compiles(lambda: run((0, 1)))
    other, compiles = count_compiles(lambda: run((0, 2)))
    assert compiles == 0
    assert [r.path for r in other.layers] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.2.conv1", "layer1.2.conv2"]
    # block 2 is really fitted (to other inputs than block 1), and the cached block-wise stages equal
    # the full forward pass
    assert other.layers[2].relative_error != first.layers[2].relative_error
    full = run((0, 2), cache_activations=False)
    np.testing.assert_allclose(other.model(x), full.model(x), rtol=1e-10, atol=1e-12)
