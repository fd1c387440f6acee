"""Covariance statistics: an explicit numpy im2col oracle, streaming/merge algebra, the model tap,
float32 compensation, and one real check on a pretrained ResNet-20."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sigmadecomp import covariance
from sigmadecomp._paths import find_layers
from sigmadecomp._patches import extract_patches
from sigmadecomp.covariance import _collect, _stats

# --------------------------------------------------------------------------- numpy oracle


def _pads(size, k, s, d, padding):
    """(lo, hi) for one spatial axis, written out from the definitions of SAME / VALID."""
    span = (k - 1) * d + 1
    if padding == "VALID":
        return 0, 0
    if padding == "SAME":
        out = -(-size // s)
        total = max((out - 1) * s + span - size, 0)
        return total // 2, total - total // 2
    return padding


def im2col(x, kernel_size, strides=(1, 1), padding="VALID", dilation=(1, 1), groups=1):
    """Patches ``(rows, groups, cin/groups·kh·kw)`` with explicit loops; order (c, i, j) per group."""
    x = np.asarray(x, np.float64)
    n, h, w, cin = x.shape
    kh, kw = kernel_size
    mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}.get(padding) if isinstance(padding, str) else None
    if mode:
        ph = ((kh - 1) * dilation[0] // 2, (kh - 1) * dilation[0] - (kh - 1) * dilation[0] // 2)
        pw = ((kw - 1) * dilation[1] // 2, (kw - 1) * dilation[1] - (kw - 1) * dilation[1] // 2)
        xp = np.pad(x, ((0, 0), ph, pw, (0, 0)), mode=mode)
    else:
        pad = padding if isinstance(padding, str) else padding
        ph = _pads(h, kh, strides[0], dilation[0], pad if isinstance(pad, str) else pad[0])
        pw = _pads(w, kw, strides[1], dilation[1], pad if isinstance(pad, str) else pad[1])
        xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
    oh = (xp.shape[1] - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    ow = (xp.shape[2] - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    cg = cin // groups
    rows = []
    for b in range(n):
        for r in range(oh):
            for c in range(ow):
                row = np.empty((groups, cg * kh * kw))
                for ch in range(cin):
                    for i in range(kh):
                        for j in range(kw):
                            v = xp[b, r * strides[0] + i * dilation[0], c * strides[1] + j * dilation[1], ch]
                            row[ch // cg, (ch % cg) * kh * kw + i * kw + j] = v
                rows.append(row)
    return np.stack(rows)


def moments(p):
    """Reference ``E[x xᵀ]`` per group and ``E[x]`` of patches ``(rows, groups, d)`` in float64."""
    return np.einsum("ngi,ngj->gij", p, p) / len(p), p.mean(0)


# (kernel_size, strides, padding, dilation, groups)
CONV_CASES = [
    ((3, 3), (1, 1), "SAME", (1, 1), 1),
    ((3, 3), (2, 2), "SAME", (1, 1), 1),
    ((3, 3), (1, 1), "VALID", (2, 2), 2),
    ((2, 3), (2, 2), ((1, 2), (0, 1)), (1, 1), 2),
    ((2, 3), (1, 1), "SAME", (2, 2), 1),
    ((3, 3), (1, 2), 1, (2, 1), 1),
    ((1, 1), (1, 1), "VALID", (1, 1), 1),
    ((1, 1), (2, 2), "SAME", (1, 1), 2),
    ((3, 3), (1, 1), "CIRCULAR", (1, 1), 1),
    ((2, 3), (2, 1), "REFLECT", (1, 1), 2),
]


def _conv(case, cin=4, cout=6):
    """A conv with this geometry; its weights do not matter to the input covariance (zeros: no
    random-init compilation)."""
    kernel_size, strides, padding, dilation, groups = case
    return nnx.Conv(cin, cout, kernel_size, strides=strides, padding=padding, kernel_dilation=dilation,
                    feature_group_count=groups, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))


def _oracle_padding(padding):
    return ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_layer_matches_numpy_im2col(case):
    kernel_size, strides, padding, dilation, groups = case
    conv = _conv(case)
    xs = [np.asarray(jax.random.normal(jax.random.key(i), (2, 7, 8, 4), jnp.float32)) for i in range(2)]
    covs = covariance.collect_covariances(nnx.Sequential(conv), xs, progress=False)
    got = covs["layers.0"]
    p = im2col(np.concatenate(xs), kernel_size, strides, _oracle_padding(padding), dilation, groups)
    cov, mean = moments(p)
    squeeze = (lambda a: a[0]) if groups == 1 else (lambda a: a)
    np.testing.assert_allclose(got.cov, squeeze(cov), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.mean, squeeze(mean), rtol=1e-10, atol=1e-12)
    assert float(got.count) == len(p)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[2] not in ("CIRCULAR", "REFLECT")], ids=str)
def test_chunked_patches_are_the_package_patch_order(case):
    """The tap's fast row-last patches equal ``extract_patches`` (THE patch order), transposed."""
    kernel_size, strides, padding, dilation, groups = case
    tap = covariance.layer_tap("conv", _conv(case))
    x = jax.random.normal(jax.random.key(0), (3, 7, 8, 4), jnp.float64)
    chunk, num, rows = _collect.layer_chunks(tap, x, dtype=jnp.float64)
    got = jnp.concatenate([chunk(k)[0] for k in range(num)], axis=2)[:, :, :rows]
    pad = padding if isinstance(padding, str) else _oracle_padding(padding)
    ref = extract_patches(x, kernel_size, strides=strides, padding=pad, dilation=dilation)
    ref = ref.reshape(-1, groups, tap.dim).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_many_chunks_with_zero_padding(monkeypatch):
    """Batches larger than one chunk (scan over chunks, last chunk zero-padded) stay exact."""
    monkeypatch.setattr(_stats, "CHUNK_ELEMENTS", 1)  # → the minimum, 512 rows per chunk
    x = _random_rows(jax.random.key(4), n=1500, groups=1, d=3)
    got = covariance.finalize(covariance.update(covariance.init(3), x))
    cov, mean = moments(np.asarray(x))
    np.testing.assert_allclose(got.cov, cov[0], rtol=1e-12)
    np.testing.assert_allclose(got.mean, mean[0], rtol=1e-12)
    assert float(got.count) == 1500

    case = ((3, 3), (1, 1), "SAME", (1, 1), 2)  # 56 positions per image → 9 images per chunk
    images = np.asarray(jax.random.normal(jax.random.key(5), (20, 7, 8, 4), jnp.float32))
    got = covariance.collect_covariances(nnx.Sequential(_conv(case)), [images], progress=False)["layers.0"]
    cov, mean = moments(im2col(images, (3, 3), padding="SAME", groups=2))
    np.testing.assert_allclose(got.cov, cov, rtol=1e-10, atol=1e-12)
    assert float(got.count) == 20 * 56


def test_dense_layer_uses_rows_of_flattened_leading_dims():
    model = nnx.Sequential(nnx.Linear(5, 3, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0)))
    xs = [np.asarray(jax.random.normal(jax.random.key(i), (2, 3, 5), jnp.float32)) for i in range(3)]
    got = covariance.collect_covariances(model, xs, progress=False)["layers.0"]
    rows = np.concatenate(xs).reshape(-1, 5).astype(np.float64)
    np.testing.assert_allclose(got.cov, rows.T @ rows / len(rows), rtol=1e-10)
    np.testing.assert_allclose(got.mean, rows.mean(0), rtol=1e-10)
    assert float(got.count) == 18


# --------------------------------------------------------------------------- streaming algebra


def _random_rows(key, n=61, groups=2, d=5):
    return jax.random.normal(key, (n, groups, d), jnp.float64) + 0.5


def test_streaming_equals_one_batch_and_merge_order_does_not_matter():
    x = _random_rows(jax.random.key(0))
    cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, 61), 5, replace=False))
    parts = [covariance.update(covariance.init(5, groups=2), p) for p in np.split(np.asarray(x), cuts)]
    whole = covariance.finalize(covariance.update(covariance.init(5, groups=2), x))

    sequential = covariance.init(5, groups=2)
    for p in np.split(np.asarray(x), cuts):
        sequential = covariance.update(sequential, p)
    left = parts[0]
    for s in parts[1:]:
        left = covariance.merge(left, s)
    right = parts[-1]
    for s in parts[-2::-1]:
        right = covariance.merge(s, right)
    tree = covariance.merge(
        covariance.merge(covariance.merge(parts[4], parts[1]), parts[3]),
        covariance.merge(parts[5], covariance.merge(parts[2], parts[0])),
    )
    ref_cov, ref_mean = moments(np.asarray(x))
    for state in (sequential, left, right, tree):
        out = covariance.finalize(state)
        np.testing.assert_allclose(out.cov, whole.cov, rtol=1e-12)
        np.testing.assert_allclose(out.cov, ref_cov, rtol=1e-12)
        np.testing.assert_allclose(out.mean, ref_mean, rtol=1e-12)
        assert float(out.count) == 61
        assert out.cross_cov is None and out.cov_hat is None


def test_cross_moments_for_sequential_calibration():
    x = _random_rows(jax.random.key(1), groups=1)[:, 0]
    y = x + 0.1 * jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
    state = covariance.init(5, cross=True)
    state = covariance.update(covariance.update(state, x[:20], y[:20]), x[20:], y[20:])
    out = covariance.finalize(state)
    xn, yn = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(out.cov, xn.T @ xn / 61, rtol=1e-12)
    np.testing.assert_allclose(out.cross_cov, xn.T @ yn / 61, rtol=1e-12)
    np.testing.assert_allclose(out.cov_hat, yn.T @ yn / 61, rtol=1e-12)
    np.testing.assert_allclose(out.mean_hat, yn.mean(0), rtol=1e-12)


def test_update_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        covariance.update(covariance.init(4), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="cross=True"):
        covariance.update(covariance.init(4), jnp.ones((3, 4)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"\(n, 2, 4\)"):
        covariance.update(covariance.init(4, groups=2), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="different layout"):
        covariance.merge(covariance.init(4), covariance.init(4, cross=True))
    with pytest.raises(ValueError, match="no samples"):
        covariance.finalize(covariance.init(4))


def test_float32_compensated_accumulation_tracks_float64():
    """Many small float32 batches with a large mean: the compensated sums stay at float32 rounding
    of one batch, while a plain float32 running sum drifts (shown, so the test can fail)."""
    d, batches = 6, 2000
    x = 30.0 + jax.random.normal(jax.random.key(3), (batches, 16, d), jnp.float64)
    x32 = x.astype(jnp.float32)
    def stream(state, xs):
        return jax.lax.scan(lambda st, xb: (covariance.update(st, xb), None), state, xs)[0]

    state32 = jax.jit(stream)(covariance.init(d, dtype=jnp.float32), x32)
    state64 = jax.jit(stream)(covariance.init(d, dtype=jnp.float64), x32.astype(jnp.float64))
    naive = np.zeros((d, d), np.float32)
    for xb in np.asarray(x32):  # a plain float32 running sum of exact-ish batch grams
        naive += np.asarray(xb.T.astype(np.float64) @ xb, np.float32)
    assert state32.dtype == jnp.float32 and state32.errs is not None
    ref = np.asarray(covariance.finalize(state64).cov)
    err32 = np.abs(np.asarray(covariance.finalize(state32).cov, np.float64) - ref).max() / np.abs(ref).max()
    err_naive = np.abs(naive.astype(np.float64) / (16 * batches) - ref).max() / np.abs(ref).max()
    assert err32 < 2e-7, err32
    assert err32 < err_naive / 5, (err32, err_naive)


# --------------------------------------------------------------------------- the model tap


def _numpy_init(key, shape, dtype):
    """Normal(0, 0.5) weights drawn by numpy from ``key`` (jax.random init is slow to compile)."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    return jnp.asarray(0.5 * rng.standard_normal(shape), dtype)


class _Net(nnx.Module):
    def __init__(self, rngs):
        init = {"kernel_init": _numpy_init, "bias_init": _numpy_init, "rngs": rngs}
        self.stem = nnx.Conv(3, 8, (3, 3), padding="SAME", **init)
        self.bn = nnx.BatchNorm(8, use_running_average=False, rngs=rngs)  # training mode on purpose
        self.down = nnx.Conv(8, 8, (3, 3), strides=2, padding=((1, 1), (1, 1)), **init)
        self.grouped = nnx.Conv(8, 4, (2, 2), padding="VALID", feature_group_count=2, **init)
        self.head = nnx.Linear(4, 3, **init)

    def features(self, x):
        h1 = nnx.relu(self.bn(self.stem(x)))
        h2 = nnx.relu(self.down(h1))
        return h1, h2, nnx.relu(self.grouped(h2)).mean(axis=(1, 2))

    def __call__(self, x):
        return self.head(self.features(x)[-1])


@pytest.fixture(scope="module")
def net():
    """One model for the tap tests (random init is slow to compile); every test that checks the
    model is unchanged takes its own snapshot first."""
    return _Net(nnx.Rngs(0))


def _batches(n=3):
    return [np.asarray(jax.random.normal(jax.random.key(10 + i), (2, 6, 6, 3), jnp.float32)) for i in range(n)]


def test_tap_equals_running_the_layers_by_hand(net):
    model = net
    xs = _batches()
    covs = covariance.collect_covariances(model, xs, progress=False)
    assert list(covs) == [path for path, _ in find_layers(model)]
    assert set(covs) == {"stem", "down", "grouped", "head"}
    by_hand = {k: [] for k in covs}
    for x in xs:
        h1, h2, pooled = model.features(jnp.asarray(x))
        by_hand["stem"].append(im2col(x, (3, 3), padding="SAME"))
        by_hand["down"].append(im2col(h1, (3, 3), (2, 2), ((1, 1), (1, 1))))
        by_hand["grouped"].append(im2col(h2, (2, 2), groups=2))
        by_hand["head"].append(np.asarray(pooled, np.float64)[:, None, :])
    for path, parts in by_hand.items():
        cov, mean = moments(np.concatenate(parts))
        squeeze = (lambda a: a) if path == "grouped" else (lambda a: a[0])
        np.testing.assert_allclose(covs[path].cov, squeeze(cov), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(covs[path].mean, squeeze(mean), rtol=1e-5, atol=1e-6)


def _snapshot(model):
    return [type(m) for _, m in nnx.iter_graph(model)], jax.tree.map(np.asarray, nnx.state(model))


def _same_snapshot(a, b):
    assert a[0] == b[0]
    jax.tree.map(np.testing.assert_array_equal, a[1], b[1])


def test_model_is_unchanged_also_after_an_exception(net):
    model = net
    x = jnp.asarray(_batches(1)[0])
    out_before = np.asarray(model.features(x)[-1])  # (updates the BatchNorm statistics itself)
    before = _snapshot(model)

    covariance.collect_covariances(model, _batches(), progress=False)
    _same_snapshot(before, _snapshot(model))  # BatchNorm in training mode: its statistics kept

    def failing():
        yield from _batches(2)
        raise RuntimeError("data pipeline broke")

    with pytest.raises(RuntimeError, match="pipeline"):
        covariance.collect_covariances(model, failing(), progress=False)
    def forward_then_fail(m, x):
        m(x)
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        covariance.collect_covariances(model, _batches(), forward=forward_then_fail, progress=False)
    _same_snapshot(before, _snapshot(model))
    np.testing.assert_array_equal(np.asarray(model.features(x)[-1]), out_before)


def test_layer_selection_and_errors(net):
    model = net
    covs = covariance.collect_covariances(model, _batches(1), layers=["head", "down"], progress=False)
    assert set(covs) == {"head", "down"}
    with pytest.raises(ValueError, match="down, grouped, head, stem"):
        covariance.collect_covariances(model, _batches(1), layers=["stem", "nope"], progress=False)
    with pytest.raises(ValueError, match="empty"):
        covariance.collect_covariances(model, [], progress=False)
    features_only = lambda m, x: m.features(x)  # noqa: E731
    with pytest.raises(ValueError, match="never called"):
        covariance.collect_covariances(model, _batches(1), layers=["head"], progress=False,
                                       forward=features_only)
    with pytest.warns(UserWarning, match="head"):
        covs = covariance.collect_covariances(model, _batches(1), progress=False, forward=features_only)
    assert set(covs) == {"stem", "down", "grouped"}
    with pytest.raises(ValueError, match="float32 or float64"):
        covariance.collect_covariances(model, _batches(1), progress=False, dtype=jnp.int32)


def test_eager_equals_jit_and_no_recompilation(net):
    model = net
    xs = _batches(3) + [(b, np.zeros(2)) for b in _batches(2)]  # (x, y) tuples: x is used
    first = covariance.collect_covariances(model, xs, progress=False, max_batches=4)
    sizes = _collect._forward_jit._cache_size(), _collect._layer_update_jit._cache_size()
    again = covariance.collect_covariances(model, _batches(4), progress=False)
    assert (_collect._forward_jit._cache_size(), _collect._layer_update_jit._cache_size()) == sizes
    eager = covariance.collect_covariances(model, xs[:4], progress=False, jit=False)
    for path in first:
        np.testing.assert_allclose(first[path].cov, eager[path].cov, rtol=1e-4, atol=1e-7)
        assert float(first[path].count) == float(again[path].count)


# --------------------------------------------------------------------------- real data


def test_resnet20_on_cifar(data_dir):
    models = pytest.importorskip("sigmadecomp.models")
    from sigmadecomp.data import cifar10_normalize, load_cifar10

    model = models.pretrained_resnet(20, data_dir / "weights" / "resnet20_cifar10.safetensors")
    images, _ = load_cifar10(data_dir / "cifar10", "train", limit=32)
    x = cifar10_normalize(images)
    covs = covariance.collect_covariances(model, [x[:16], x[16:]], progress=False)
    assert len(covs) == 20
    dims = {"conv1": 27, "layer1.0.conv1": 144, "layer2.0.conv1": 144, "layer2.0.conv2": 288,
            "layer3.2.conv2": 576, "linear": 64}
    for path, d in dims.items():
        assert covs[path].cov.shape == (d, d)
    assert float(covs["conv1"].count) == 32 * 32 * 32
    assert float(covs["layer3.0.conv1"].count) == 32 * 8 * 8
    for path, c in covs.items():
        cov = np.asarray(c.cov)
        np.testing.assert_array_equal(cov, cov.T)
        eig = np.linalg.eigvalsh(cov)
        assert eig.min() >= -1e-6 * eig.max(), path
        assert np.all(np.isfinite(cov)) and eig.max() > 0, path
