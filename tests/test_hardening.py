"""Issue 9: no NaN or wrong answer reaches a model, bad input gets a clear error.

Solver statuses and statistics, the PSD check, the Cholesky jitter cap, the key rule, the
pipelines' ``kept_dense``, the conv-configuration normaliser, and the CLI's early errors.
"""

from __future__ import annotations

import dataclasses
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sigmadecomp as sd
import sigmadecomp.distributed._layers
from sigmadecomp.solvers._numerics import MAX_JITTER, logged_jitter, record_jitter, safe_cholesky

DTYPES = ["float32", "float64"]
SOLVERS = [sd.SVD(3), sd.Tucker2ALS((4, 3), max_steps=5), sd.CPALS(3, max_steps=5)]


def _problem(seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(3, 3, 4, 8))
    x = rng.normal(size=(300, 36))
    return jnp.asarray(kernel, dtype), jnp.asarray(x.T @ x / 300, dtype)


def _indefinite(cov):
    """``cov`` with its smallest eigenvalue moved to −0.5·tr(cov)/d: symmetric, positive
    diagonal, not PSD."""
    c = np.asarray(cov, np.float64)
    w, v = np.linalg.eigh(c)
    w[0] = -0.5 * w.mean()
    bad = (v * w) @ v.T
    assert np.all(np.diag(bad) > 0)
    return 0.5 * (bad + bad.T)


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_every_solver_reports_ridge_jitter_tikhonov(solver, dtype):
    kernel, cov = _problem(dtype=dtype)
    sol = sd.decompose(kernel, solver, cov=cov)
    assert {"ridge", "jitter", "tikhonov"} <= set(sol.stats)
    expected_ridge = 1e-6 * float(jnp.trace(cov)) / cov.shape[0]
    assert float(sol.stats["ridge"]) == pytest.approx(expected_ridge, rel=1e-5)
    assert 0.0 <= float(sol.stats["jitter"]) <= MAX_JITTER and float(sol.stats["tikhonov"]) == 0.0
    assert all(sol.stats[k].dtype == kernel.dtype for k in ("ridge", "jitter", "tikhonov"))
    frob = sd.decompose(kernel, solver)
    assert float(frob.stats["ridge"]) == 0.0


def test_cp_reports_its_tikhonov_weight():
    kernel, cov = _problem()
    sol = sd.decompose(kernel, sd.CPALS(3, max_steps=3, tikhonov=1e-3), cov=cov)
    w = np.asarray(sd.kernel_to_matrix(kernel))
    energy = float(np.sum((w @ np.asarray(cov)) * w))  # tr(W M Wᵀ) up to the 1e-6 ridge
    tau = 1e-3 * energy / float(np.sum(w * w)) ** (1 / 4)
    assert float(sol.stats["tikhonov"]) == pytest.approx(tau, rel=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_safe_cholesky_jitter_is_capped_alike_in_both_dtypes(dtype):
    v = np.array([1.0, 2.0, 3.0])
    singular = jnp.asarray(np.outer(v, v), dtype)  # PSD, rank 1: plain Cholesky fails
    with record_jitter() as log:
        chol = safe_cholesky(singular)
        jitter = float(logged_jitter(log, singular.dtype))
    assert _finite(chol) and 0 < jitter <= MAX_JITTER
    with record_jitter() as log:  # indefinite: no jitter up to the cap helps -> NaN, never a big shift
        chol = safe_cholesky(jnp.asarray(np.diag([2.0, -1.0]), dtype))
        jitter = float(logged_jitter(log, singular.dtype))
    assert not _finite(chol) and jitter == pytest.approx(MAX_JITTER, rel=1e-6)


# ----------------------------------------------------------------------------- statuses


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_nan_kernel_and_non_psd_cov(solver, dtype):
    """Outside jit a non-PSD cov is a ValueError; under jit it is status NOT_PSD with a finite
    value, and a NaN kernel is NONFINITE: never CONVERGED."""
    kernel, cov = _problem(dtype=dtype)
    bad = jnp.asarray(_indefinite(cov), dtype)
    with pytest.raises(sd.NotPSDError, match="not positive semi-definite.*smallest eigenvalue"):
        sd.decompose(kernel, solver, cov=bad)
    with pytest.raises(ValueError, match="target_cov is not positive semi-definite"):
        sd.decompose(kernel, solver, cov=cov, cross_cov=cov, target_cov=bad)
    run = jax.jit(lambda k, c: sd.decompose(k, solver, cov=c))
    good = run(kernel, cov)
    assert sd.Status(int(good.status)) not in (sd.Status.NONFINITE, sd.Status.NOT_PSD) and _finite(good.value)
    sol = run(kernel.at[0, 0, 0, 0].set(jnp.nan), cov)
    assert sd.Status(int(sol.status)) == sd.Status.NONFINITE
    sol = run(kernel, bad)
    assert sd.Status(int(sol.status)) == sd.Status.NOT_PSD and _finite(sol.value)
    assert "not positive semi-definite" in sol.message


@pytest.mark.parametrize("dtype", DTYPES)
def test_singular_cov_rounded_to_the_dtype_is_accepted(dtype):
    """The PSD tolerance (10·d·eps·tr/d) lets a rank-deficient second moment through."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 36)) * np.geomspace(1, 1e3, 36)  # rank 5 of 36, badly scaled
    cov = jnp.asarray(x.T @ x / 5, dtype)
    kernel, _ = _problem(dtype=dtype)
    for solver in SOLVERS:
        sol = sd.decompose(kernel, solver, cov=cov)
        assert sd.Status(int(sol.status)) not in (sd.Status.NOT_PSD, sd.Status.NONFINITE)


def test_tucker2_rejects_r_in_above_r_out_times_kernel_area():
    kernel = jnp.ones((1, 1, 8, 4)) + jnp.arange(32.0).reshape(1, 1, 8, 4)
    with pytest.raises(ValueError, match=r"r_in\) = 4 exceeds the r_out·kh·kw"):
        sd.decompose(kernel, sd.Tucker2ALS((2, 4)))
    model = nnx.Sequential(nnx.Conv(8, 3, (1, 1), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="neither may exceed the other"):
        sd.plan(model, format="tucker2", ranks={"layers.0": (2, 4)})
    r_out, r_in = sd.surgery.tucker2_ranks_for_ratio((1, 1, 64, 4), 0.9)
    assert r_in <= r_out and r_out <= r_in


def test_key_is_required_exactly_when_the_start_is_random():
    kernel, cov = _problem()
    with pytest.raises(ValueError, match="pass key="):
        sd.decompose(kernel, sd.Tucker2ALS((4, 3), init="random"), cov=cov)
    with pytest.raises(ValueError, match="pass key="):
        sd.decompose(kernel, sd.CPALS(12, max_steps=2), cov=cov)  # rank 12 > kh = 3: random padding
    for solver in SOLVERS:  # deterministic starts: no key needed, and the key changes nothing
        a = sd.decompose(kernel, solver, cov=cov)
        b = sd.decompose(kernel, solver, cov=cov, key=jax.random.key(5))
        assert np.array_equal(np.asarray(a.errors), np.asarray(b.errors), equal_nan=True)
    sd.decompose(kernel, sd.Tucker2ALS((4, 3), init="random"), cov=cov, key=jax.random.key(1))


# ----------------------------------------------------------------------------- pipelines


def _small_net():
    class Net(nnx.Module):
        def __init__(self, rngs):
            # Flax forms that used to crash the jitted passes: padding lists, strides/dilation lists.
            self.conv1 = nnx.Conv(3, 8, (3, 3), padding=[(1, 1), (1, 1)], strides=[1, 1], rngs=rngs)
            self.conv2 = nnx.Conv(8, 8, (3, 3), padding=1, kernel_dilation=[2, 2], rngs=rngs)
            self.conv3 = nnx.Conv(8, 6, (3, 3), padding="CIRCULAR", strides=2, rngs=rngs)

        def __call__(self, x):
            return self.conv3(nnx.relu(self.conv2(nnx.relu(self.conv1(x)))))

    return Net(nnx.Rngs(0))


def _images(n=8):
    return jax.random.normal(jax.random.key(0), (n, 8, 8, 3), jnp.float32)


def test_conv_forms_work_in_every_pass():
    from sigmadecomp.calibration import compress_sequential
    from sigmadecomp.compress import compress_model, predict_labels

    net, x = _small_net(), _images()
    covs = sd.collect_covariances(net, [x], progress=False)
    patches = sd.extract_patches(nnx.relu(net.conv1(x)), (3, 3), padding=((1, 1), (1, 1)),
                                 dilation=(2, 2))
    want = np.einsum("nhwd,nhwe->de", patches, patches) / (patches.shape[0] * patches.shape[1] * patches.shape[2])
    np.testing.assert_allclose(covs["conv2"].cov, want, rtol=1e-5, atol=1e-6)
    assert predict_labels(net, x).shape == (8, 3, 3)
    full = compress_model(net, x, format="svd", norm="sigma", ranks={"conv1": 8, "conv2": 8, "conv3": 6},
                          key=jax.random.key(0), progress=False)  # full rank: the same network
    np.testing.assert_allclose(full.model(x), net(x), rtol=1e-3, atol=1e-4)
    seq = compress_sequential(net, x, format="svd", ratio=0.5, key=jax.random.key(0), progress=False,
                              bias_correction=True)
    assert len(sd.verify(net, seq.model, [x], plan=seq.plan).layers) == 3


def _corrupt(monkeypatch, bad_path_kernel_shape):
    """Make ``sd.decompose`` return a NaN, NONFINITE solution for kernels of one shape."""
    real = sd.decompose

    def fake(kernel, solver, **kwargs):
        sol = real(kernel, solver, **kwargs)
        if tuple(kernel.shape) == bad_path_kernel_shape:
            value = jax.tree_util.tree_map(lambda a: a * jnp.nan, sol.value)
            sol = type(sol)(value, jnp.int32(sd.Status.NONFINITE), sol.errors, sol.num_steps, sol.stats)
        return sol

    monkeypatch.setattr(sd, "decompose", fake)
    monkeypatch.setattr(sigmadecomp.distributed._layers, "decompose", fake)  # the layer-parallel path


@pytest.mark.parametrize("pipeline", ["parallel", "sequential", "devices"])
def test_unusable_layers_stay_dense_with_one_warning(monkeypatch, pipeline):
    from sigmadecomp.calibration import compress_sequential
    from sigmadecomp.compress import compress_model

    net, x = _small_net(), _images()
    _corrupt(monkeypatch, (3, 3, 8, 8))  # conv2
    common = dict(format="svd", ratio=0.5, key=jax.random.key(0), progress=False)
    with pytest.warns(RuntimeWarning, match="layer 'conv2' kept dense: status NONFINITE") as caught:
        if pipeline != "sequential":  # "devices": the layer-parallel path (sigmadecomp.distributed)
            out = compress_model(net, x, norm="sigma", devices=[jax.local_devices()[0]] if pipeline == "devices"
                                 else None, **common)
        else:
            out = compress_sequential(net, x, **common)
    assert sum("kept dense" in str(w.message) for w in caught) == 1
    assert [k["path"] for k in out.kept_dense] == ["conv2"] and out.kept_dense[0]["status"] == "NONFINITE"
    assert isinstance(out.model.conv2, nnx.Conv) and out.model.conv2.kernel[...].shape == (3, 3, 8, 8)
    assert [layer.path for layer in out.layers] == ["conv1", "conv3"] and out.plan.paths == ("conv1", "conv3")
    assert _finite(nnx.state(out.model)) and _finite(out.model(x))


@pytest.mark.parametrize("devices", [None, "one"])
def test_non_psd_statistics_keep_the_layer_dense(devices):
    from sigmadecomp.compress import compress_model

    net, x = _small_net(), _images()
    covs = dict(sd.collect_covariances(net, [x], progress=False))
    bad = covs["conv3"]
    covs["conv3"] = dataclasses.replace(bad, cov=jnp.asarray(_indefinite(bad.cov), bad.cov.dtype))
    with pytest.warns(RuntimeWarning, match="'conv3' kept dense: cov is not positive semi-definite"):
        out = compress_model(net, format="svd", norm="sigma", ratio=0.5, key=jax.random.key(0),
                             covariances=covs, input_shape=(1, 8, 8, 3), progress=False,
                             devices=None if devices is None else [jax.local_devices()[0]])
    assert out.plan.paths == ("conv1", "conv2") and isinstance(out.model.conv3, nnx.Conv)
    assert out.kept_dense == ({"path": "conv3", "status": "NOT_PSD", "reason": out.kept_dense[0]["reason"]},)


# ----------------------------------------------------------------------------- CLI


def _random_torch_state_dict(model, seed=0) -> dict:
    """Random PyTorch-layout tensors for every variable the importer fills (He-scaled weights,
    unit BatchNorm variances), from the shapes of an abstract model: no eager initialisation."""
    from sigmadecomp.models._pytorch_import import _model_slots, _torch_shape

    rng, out = np.random.default_rng(seed), {}
    for name, (variable, convert) in _model_slots(model).items():
        shape = _torch_shape(variable, convert)
        if name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
            value = rng.uniform(0.5, 1.5, shape)  # BatchNorm variance / scale
        elif len(shape) >= 2:
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        else:
            value = 0.1 * rng.normal(size=shape)
        out[name] = value.astype(np.float32)
    return out


def _write_cifar(folder, n_train=40, n_test=24):
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]
    for name, n in names:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batch = {b"batch_label": b"synthetic", b"labels": rng.integers(0, 10, n).tolist(), b"data": data}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


@pytest.fixture(scope="module")
def resnet44(tmp_path_factory):
    """A ResNet-44 with random weights in the PyTorch state_dict safetensors layout + tiny CIFAR."""
    from safetensors.numpy import save_file

    from sigmadecomp.models import CifarResNet

    root = tmp_path_factory.mktemp("resnet44")
    model = nnx.eval_shape(lambda: CifarResNet(44, rngs=nnx.Rngs(0)))
    save_file(_random_torch_state_dict(model), str(root / "resnet44.safetensors"))
    return root / "resnet44.safetensors", _write_cifar(root / "cifar")


def _argv(weights, data, *extra):
    return ["compress", "--arch", "resnet44", "--weights", str(weights), "--data", str(data),
            "--format", "svd", "--calibration", "parallel", "--calib", "16", "--batch-size", "16",
            "--no-progress", *extra]


@pytest.mark.experiment
@pytest.mark.slow
def test_resnet44_compress_works_and_is_deterministic(resnet44, tmp_path):
    """`sigmadecomp compress --arch resnet44 ...` on a ResNet-44 checkpoint; the same command run
    again gives bit-identical JSON numbers (same process: compiled functions are reused, which
    must not change a bit)."""
    from sigmadecomp.cli import main

    weights, data = resnet44
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert main(_argv(weights, data, "--json", str(first), "--save", str(tmp_path / "model"))) == 0
    report = json.loads(first.read_text())
    assert report["config"]["arch"] == "resnet44" and len(report["layers"]) == 42  # 43 convs − conv1
    assert report["kept_dense"] == [] and report["params"] < report["baseline_params"]
    assert (tmp_path / "model" / "plan.json").is_file()
    assert main(_argv(weights, data, "--json", str(second))) == 0
    again = json.loads(second.read_text())
    for field in ("accuracy", "agreement", "baseline_accuracy", "mean_relative_error"):
        assert again[field] == report[field], field
    assert [la["relative_error"] for la in again["layers"]] == [la["relative_error"] for la in report["layers"]]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_depth_mismatch_is_one_short_line(resnet44, capsys):
    from sigmadecomp.cli import main

    weights, data = resnet44
    argv = _argv(weights, data)
    argv[argv.index("resnet44")] = "resnet20"
    assert main(argv) == 1
    line = _one_error_line(capsys)
    assert "ResNet-44" in line and "ResNet-20" in line and len(line) < 300, line


def test_too_many_calibration_images_is_one_line(resnet44, capsys):
    from sigmadecomp.cli import main

    weights, data = resnet44
    argv = _argv(weights, data)
    argv[argv.index("--calib") + 1] = "41"
    assert main(argv) == 1
    assert "41 is more than the 40 training images" in _one_error_line(capsys)


@pytest.mark.parametrize("flag", ["--json", "--save"])
def test_unwritable_outputs_fail_before_any_work(resnet44, tmp_path, capsys, monkeypatch, flag):
    import sigmadecomp.compress
    from sigmadecomp.cli import main

    monkeypatch.setattr(sigmadecomp.compress, "compress_pretrained",
                        lambda **_: pytest.fail("the long work started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(_argv(*resnet44, flag, str(blocker / "out"))) == 1
    line = _one_error_line(capsys)
    assert flag in line and "is a file, not a folder" in line


def test_internal_errors_keep_their_traceback(resnet44, monkeypatch):
    import sigmadecomp.compress
    from sigmadecomp.cli import main

    def broken(**_):
        return np.reshape(np.zeros(3), (2,))  # a ValueError raised inside NumPy, not by a check

    monkeypatch.setattr(sigmadecomp.compress, "compress_pretrained", broken)
    with pytest.raises(ValueError, match="cannot reshape"):
        main(_argv(*resnet44))


@pytest.mark.parametrize("arch, ok", [("resnet8", True), ("resnet44", True), ("resnet110", True),
                                      ("resnet18", False), ("resnet2", False), ("vgg16", False)])
def test_any_cifar_resnet_depth(arch, ok):
    from sigmadecomp.compress import resnet_depth

    if ok:
        assert resnet_depth(arch) == int(arch[6:])
    else:
        with pytest.raises(ValueError, match="6n\\+2"):
            resnet_depth(arch)
