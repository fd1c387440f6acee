"""save / load of compressed models: bit-identical round trip and clear errors for bad files."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from _surgery_models import TinyNet, inputs, random_factors, run, state_arrays
from flax import nnx

from sigmadecomp import Tucker2, extract_patches, kernel_to_matrix, to_dense
from sigmadecomp._paths import get_by_path
from sigmadecomp.data import cifar10_normalize, load_cifar10
from sigmadecomp.layers import CPConv, LowRankDense
from sigmadecomp.models import CifarResNet, pretrained_resnet
from sigmadecomp.surgery import apply, load, plan, save, verify


def compressed_tiny(dtype="float32", fmt="cp"):
    model = TinyNet(dtype=dtype)
    p = plan(model, format=fmt, ratio=0.4, formats={"linear": "svd"}, input_shape=(1, 9, 9, 3))
    return model, p, apply(model, p, random_factors(p, seed=3, dtype=dtype))


@pytest.mark.parametrize("fmt", ["cp", "cp3", "svd", "tucker2", "tucker3", "tt", "tr"])
def test_round_trip_is_bit_identical(tmp_path, dtype, fmt):
    model, p, compressed = compressed_tiny(dtype, fmt)
    save(tmp_path / "model", compressed, p)
    assert sorted(f.name for f in (tmp_path / "model").iterdir()) == ["params.safetensors", "plan.json"]
    template = TinyNet(dtype=dtype, seed=7)  # other weights: everything must come from the file
    before = state_arrays(template)
    loaded = load(tmp_path / "model", template)
    x = inputs(dtype=dtype)
    np.testing.assert_array_equal(np.asarray(run(loaded, x)), np.asarray(run(compressed, x)))
    saved, got = state_arrays(compressed), state_arrays(loaded)
    assert saved.keys() == got.keys() and all(np.array_equal(saved[k], got[k]) for k in saved)
    after = state_arrays(template)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # template untouched
    assert type(loaded.blocks[1]) is type(compressed.blocks[1]) and loaded.blocks[1].groups == 2


def test_load_accepts_a_factory_and_the_plan_is_in_the_file(tmp_path):
    model, p, compressed = compressed_tiny()
    save(tmp_path, compressed, p)
    loaded = load(tmp_path, lambda: TinyNet(seed=5))
    assert isinstance(loaded.conv1, CPConv) and isinstance(loaded.linear, LowRankDense)
    header = json.loads((tmp_path / "plan.json").read_text())
    assert header["version"] == 1 and [e["path"] for e in header["plan"]["entries"]] == list(p.paths)
    assert ["conv1", "conv", [3, 3, 3, 8]] in header["architecture"]


def test_load_rejects_another_architecture(tmp_path):
    _, p, compressed = compressed_tiny()
    save(tmp_path, compressed, p)
    with pytest.raises(ValueError, match="architecture does not match"):
        load(tmp_path, TinyNet(width=4))


def test_load_rejects_bad_tensors(tmp_path):
    _, p, compressed = compressed_tiny()
    save(tmp_path, compressed, p)
    file = tmp_path / "params.safetensors"
    tensors = safetensors.numpy.load_file(str(file))
    good = dict(tensors)
    del tensors["bn.mean"]
    tensors["stray"] = np.zeros(3, np.float32)
    tensors["conv1.in_conv.kernel"] = np.zeros((1, 1, 3, 99), np.float32)
    safetensors.numpy.save_file(tensors, str(file))
    with pytest.raises(ValueError, match=r"missing \['bn.mean'\], unexpected \['stray'\], mismatched .*conv1.in_conv"):
        load(tmp_path, TinyNet())
    good["bn.var"] = good["bn.var"].astype(np.float64)
    safetensors.numpy.save_file(good, str(file))
    with pytest.raises(ValueError, match="bn.var"):
        load(tmp_path, TinyNet())
    file.unlink()
    with pytest.raises(ValueError, match="params.safetensors not found"):
        load(tmp_path, TinyNet())


def test_load_rejects_wrong_version_and_missing_directory(tmp_path):
    _, p, compressed = compressed_tiny()
    save(tmp_path, compressed, p)
    header = json.loads((tmp_path / "plan.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps(dict(header, version=99)))
    with pytest.raises(ValueError, match="version 99 is not readable"):
        load(tmp_path, TinyNet())
    with pytest.raises(ValueError, match="not a model saved by"):
        load(tmp_path / "nowhere", TinyNet())


def test_save_rejects_a_model_that_does_not_follow_the_plan(tmp_path):
    model, p, _ = compressed_tiny()
    with pytest.raises(ValueError, match="should be a cp layer"):
        save(tmp_path, model, p)


# ------------------------------------------------------------------------- end to end (data kit)


def hosvd_tucker2(kernel, ranks):
    """Truncated HOSVD (numpy): an independent, deterministic Tucker-2 of a real kernel."""
    k = np.asarray(kernel, np.float64)
    kh, kw, cin, cout = k.shape
    r_out, r_in = ranks
    u_out = np.linalg.svd(k.reshape(-1, cout).T, full_matrices=False)[0][:, :r_out]
    u_in = np.linalg.svd(np.moveaxis(k, 2, 0).reshape(cin, -1), full_matrices=False)[0][:, :r_in]
    core = np.einsum("ijco,ca,ob->ijab", k, u_in, u_out)
    return Tucker2(jnp.asarray(core, jnp.float32), jnp.asarray(u_in, jnp.float32),
                   jnp.asarray(u_out, jnp.float32), kernel_shape=k.shape)


@pytest.mark.data
@pytest.mark.slow
def test_resnet20_tucker2_verify_and_round_trip(data_dir, tmp_path):
    """Real ResNet-20 on 64 CIFAR-10 test images: plan → apply → verify → save → load."""
    model = pretrained_resnet(20, data_dir / "weights" / "resnet20_cifar10.safetensors")
    images = jnp.asarray(cifar10_normalize(load_cifar10(data_dir / "cifar10", "test", limit=64)[0]))
    p = plan(model, format="tucker2", ratio=0.5, skip=["conv1", "linear"], input_shape=(1, 32, 32, 3))
    assert len(p) == 18
    factors = {e.path: hosvd_tucker2(get_by_path(model, e.path).kernel[...], e.ranks) for e in p.entries}
    compressed = apply(model, p, factors)
    report = verify(model, compressed, [images[:32], images[32:]], plan=p)
    # the first replaced layer sees the same input in both models: its error is the Σ-error of
    # DESIGN §1 with cov from that input's patches (explicit im2col in float64)
    entry = p["layer1.0.conv1"]
    x = jax.jit(lambda x: nnx.relu(model.bn1(model.conv1(x))))(images)
    patches = np.asarray(extract_patches(x, (3, 3), strides=entry.strides, padding=entry.padding), np.float64)
    cov = np.einsum("nhwd,nhwe->de", patches, patches)
    w = np.asarray(kernel_to_matrix(get_by_path(model, entry.path).kernel[...]), np.float64)
    dw = w - np.asarray(kernel_to_matrix(to_dense(factors[entry.path])), np.float64)
    sigma_error = np.trace(dw @ cov @ dw.T) / np.trace(w @ cov @ w.T)
    row = next(r for r in report.layers if r.path == entry.path)
    np.testing.assert_allclose(row.rel_error, sigma_error, rtol=1e-3)
    assert all(0 < r.rel_error < 1 for r in report.layers)
    assert report.flops_before - report.flops_after == p.flops_before - p.flops_after
    assert report.params_before - report.params_after == p.params_before - p.params_after
    assert 0 <= report.top1_agreement <= 1 and report.num_examples == 64
    save(tmp_path, compressed, p)
    abstract = lambda: nnx.eval_shape(lambda: CifarResNet(20, rngs=nnx.Rngs(0)))  # noqa: E731
    loaded = load(tmp_path, abstract)
    got, want = jax.jit(lambda x: (loaded(x), compressed(x)))(images)  # one compile for both
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
