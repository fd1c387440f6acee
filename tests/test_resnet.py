"""CIFAR ResNet: reference accuracies of the pretrained weights, layout conversion against an
independent numpy (NCHW / OIHW, PyTorch semantics) forward pass, import errors, evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from sigmadecomp._paths import find_layers
from sigmadecomp.data import cifar10_normalize, load_cifar10
from sigmadecomp.models import (
    CifarResNet,
    evaluate,
    load_pytorch_checkpoint,
    load_safetensors,
    load_state_dict,
    pretrained_resnet,
)
from sigmadecomp.models._evaluate import _count_correct

REFERENCE_CORRECT = {20: 467, 32: 478, 56: 482}  # of 512, from ../shared/data/README.md


# ---------- an independent reference: PyTorch semantics in numpy, NCHW / OIHW, float64 ----------

def _conv_nchw(x, w, stride):
    """PyTorch Conv2d(k=3, padding=1, stride, bias=False) written out as shifted slices."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out_h, out_w = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], out_h, out_w))
    for a in range(3):
        for b in range(3):
            patch = xp[:, :, a : a + stride * out_h : stride, b : b + stride * out_w : stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, a, b])
    return out


def _bn_nchw(x, sd, name):
    scale = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + 1e-5)
    shift = sd[f"{name}.bias"] - sd[f"{name}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _resnet_nchw(x, sd, n):
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    out = relu(_bn_nchw(_conv_nchw(x, sd["conv1.weight"], 1), sd, "bn1"))
    for stage, planes in ((1, 16), (2, 32), (3, 64)):
        for i in range(n):
            p, stride = f"layer{stage}.{i}", 2 if stage > 1 and i == 0 else 1
            y = relu(_bn_nchw(_conv_nchw(out, sd[f"{p}.conv1.weight"], stride), sd, f"{p}.bn1"))
            y = _bn_nchw(_conv_nchw(y, sd[f"{p}.conv2.weight"], 1), sd, f"{p}.bn2")
            if out.shape[1] != planes:
                pad = planes // 4
                out = np.pad(out[:, :, ::2, ::2], ((0, 0), (pad, pad), (0, 0), (0, 0)))
            out = relu(y + out)
    return out.mean(axis=(2, 3)) @ sd["linear.weight"].T + sd["linear.bias"]


def _random_state_dict(depth, seed=0):
    """Random PyTorch-layout tensors with the names and shapes of a CIFAR ResNet-``depth``."""
    rng, n = np.random.default_rng(seed), (depth - 2) // 6
    sd = {"conv1.weight": rng.normal(0, 0.3, (16, 3, 3, 3))}
    bns = ["bn1"]
    for stage, (cin, planes) in enumerate(((16, 16), (16, 32), (32, 64)), start=1):
        for i in range(n):
            p, c = f"layer{stage}.{i}", cin if i == 0 else planes
            sd[f"{p}.conv1.weight"] = rng.normal(0, (9 * c) ** -0.5, (planes, c, 3, 3))
            sd[f"{p}.conv2.weight"] = rng.normal(0, (9 * planes) ** -0.5, (planes, planes, 3, 3))
            bns += [f"{p}.bn1", f"{p}.bn2"]
    for name in bns:
        size = sd[name.replace("bn", "conv") + ".weight"].shape[0]
        sd |= {f"{name}.weight": rng.uniform(0.5, 1.5, size), f"{name}.bias": rng.normal(0, 0.1, size),
               f"{name}.running_mean": rng.normal(0, 0.1, size),
               f"{name}.running_var": rng.uniform(0.5, 1.5, size)}
    sd |= {"linear.weight": rng.normal(0, 0.125, (10, 64)), "linear.bias": rng.normal(0, 0.1, 10)}
    return {k: v.astype(np.float32) for k, v in sd.items()}


def _abstract(depth, **kwargs):
    """A shape-only model: skips random init, whose compilation dominates test time on CPU."""
    return nnx.eval_shape(lambda: CifarResNet(depth, rngs=nnx.Rngs(0), **kwargs))


@pytest.fixture(scope="module")
def tiny():
    """ResNet-8 with random weights imported from a PyTorch-layout state_dict."""
    sd = _random_state_dict(8)
    return load_state_dict(_abstract(8), sd), sd


# ------------------------------------------ tests ------------------------------------------------

@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("depth", [20, 32, 56])
def test_pretrained_reference_accuracy(data_dir, depth):
    images, labels = load_cifar10(data_dir / "cifar10", "test")
    model = pretrained_resnet(depth, data_dir / "weights" / f"resnet{depth}_cifar10.safetensors")
    assert model.conv1.kernel.get_value().dtype == jnp.float32  # x64 is on in tests
    result = evaluate(model, cifar10_normalize(images), labels, batch_size=512)
    assert result.total == 512
    assert abs(result.correct - REFERENCE_CORRECT[depth]) <= 2, result


def test_import_matches_pytorch_semantics(tiny):
    """The whole imported network (OIHW→HWIO, (out,in)→(in,out), stride-2 padding, option-A
    shortcuts, eval-mode BN) equals a numpy NCHW forward pass on the same PyTorch tensors."""
    model, sd = tiny
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32))
    expected = _resnet_nchw(x, {k: v.astype(np.float64) for k, v in sd.items()}, n=1)
    got = model(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_strided_conv_matches_pytorch_padding(tiny):
    """A stride-2 conv pads (1, 1) like PyTorch; 'SAME' would pad (0, 1) and fail this."""
    model, sd = tiny
    x = np.random.default_rng(2).normal(size=(2, 16, 32, 32))
    expected = _conv_nchw(x, sd["layer2.0.conv1.weight"].astype(np.float64), 2)
    got = model.layer2[0].conv1(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-4)


def test_layer_paths_mirror_pytorch_names():
    paths = [path for path, _ in find_layers(_abstract(20))]
    assert len(paths) == 20 and paths[0] == "conv1" and paths[-1] == "linear"
    assert "layer2.0.conv1" in paths and "layer3.2.conv2" in paths


@pytest.mark.parametrize("depth", [7, 19, 21, 2, 20.0])
def test_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match=r"6n \+ 2"):
        CifarResNet(depth, rngs=nnx.Rngs(0))


def test_float32_under_x64_and_float64_on_request():
    assert jax.config.jax_enable_x64
    model32 = _abstract(8)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model32)))
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float64)
    assert nnx.eval_shape(lambda m, x: m(x), model32, x).dtype == jnp.float32
    model64 = load_state_dict(_abstract(8, dtype=jnp.float64), _random_state_dict(8))
    assert model64.linear.kernel[...].dtype == jnp.float64
    assert nnx.eval_shape(lambda m, x: m(x), model64, x).dtype == jnp.float64


def test_mismatched_state_dict_lists_every_problem_and_changes_nothing(tiny):
    _, sd = tiny
    model = load_state_dict(_abstract(8), sd)
    before = np.asarray(model.conv1.kernel[...]).copy()
    bad = dict(sd)
    del bad["layer1.0.bn2.running_var"]
    bad["layer1.0.conv3.weight"] = np.zeros((16, 16, 3, 3), np.float32)
    bad["linear.weight"] = bad["linear.weight"].T
    bad["conv1.weight"] = np.zeros((16, 3, 3, 3), np.float32)  # right shape: would be loaded
    with pytest.raises(ValueError) as info:
        load_state_dict(model, bad)
    message = str(info.value)
    assert "3 problems" in message
    assert "missing: layer1.0.bn2.running_var (expected PyTorch shape (16,))" in message
    assert "unexpected: layer1.0.conv3.weight" in message
    assert "wrong shape: linear.weight expected (10, 64) (PyTorch layout), got (64, 10)" in message
    np.testing.assert_array_equal(np.asarray(model.conv1.kernel[...]), before)


def test_non_finite_tensor_is_rejected(tiny):
    bad = dict(tiny[1])
    bad["layer1.0.bn1.running_var"] = np.full(16, np.nan, np.float32)
    with pytest.raises(ValueError, match="non-finite values: layer1.0.bn1.running_var"):
        load_state_dict(_abstract(8), bad)


def test_dataparallel_prefix_and_batch_counters_are_accepted(tiny):
    model, sd = tiny
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    wrapped["module.bn1.num_batches_tracked"] = np.array(100)
    other = load_state_dict(_abstract(8), wrapped)
    x = jnp.ones((1, 32, 32, 3), jnp.float32)
    np.testing.assert_array_equal(np.asarray(other(x)), np.asarray(model(x)))


def test_safetensors_roundtrip_and_file_errors(tiny, tmp_path):
    model, sd = tiny
    save_file(sd, str(tmp_path / "w.safetensors"))
    loaded = pretrained_resnet(8, tmp_path / "w.safetensors")
    x = jnp.ones((1, 32, 32, 3), jnp.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_safetensors(model, tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="junk.safetensors is not a valid safetensors"):
        load_safetensors(model, tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match=r"\.safetensors, \.pt or \.pth"):
        pretrained_resnet(8, tmp_path / "w.npz")


def test_pytorch_checkpoint_without_torch_says_how_to_fix(tmp_path):
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install torch.*load_safetensors"):
            load_pytorch_checkpoint(_abstract(8), tmp_path / "w.pt")
    else:
        pytest.skip("torch is installed; see test_pytorch_checkpoint_roundtrip")


def test_pytorch_checkpoint_roundtrip(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    model, sd = tiny
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "w.pth")
    loaded = pretrained_resnet(8, tmp_path / "w.pth")
    x = jnp.ones((1, 32, 32, 3), jnp.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


def test_evaluate_masks_the_last_batch_and_compiles_once(tiny):
    model, _ = tiny
    x = np.random.default_rng(3).normal(size=(7, 32, 32, 3)).astype(np.float32)
    predicted = np.asarray(jnp.argmax(model(jnp.asarray(x)), axis=-1))
    labels = predicted.astype(np.int32)
    labels[:2] = (labels[:2] + 1) % 10  # exactly two wrong
    assert evaluate(model, x, labels, batch_size=7) == (5, 7)
    assert evaluate(model, x, labels, batch_size=3) == (5, 7)  # last batch of 1, padded to 3
    size = _count_correct._cache_size()
    assert evaluate(model, x[::-1].copy(), labels[::-1].copy(), batch_size=3) == (5, 7)
    assert _count_correct._cache_size() == size
    with pytest.raises(ValueError, match="labels must be integers"):
        evaluate(model, x, labels[:3])
