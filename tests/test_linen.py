"""Linen models: covariance taps and factor-pytree compression equal the NNX path for the same weights."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sigmadecomp as sd
from sigmadecomp import linen as sdl
from sigmadecomp.compress import compress_model, count_params


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding=1, name="conv2")(x))
        x = nn.relu(nn.Conv(8, (3, 3), padding="VALID", kernel_dilation=1, name="conv3")(x))
        return nn.Dense(5, name="linear")(x.reshape(x.shape[0], -1))


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 6, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(6, 8, (3, 3), strides=2, padding=1, rngs=rngs)
        self.conv3 = nnx.Conv(8, 8, (3, 3), padding="VALID", rngs=rngs)
        self.linear = nnx.Linear(8 * 4, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.relu(self.conv3(x))
        return self.linear(x.reshape(x.shape[0], -1))


NAMES = ("conv1", "conv2", "conv3", "linear")


@pytest.fixture(scope="module")
def twins():
    """A linen CNN, its variables, and an NNX CNN holding exactly the same weights."""
    x = jax.random.normal(jax.random.key(0), (12, 8, 8, 3), jnp.float32)
    module = LinenCNN()
    variables = jax.jit(module.init)(jax.random.key(1), x)
    model = NnxCNN(nnx.Rngs(0))
    for name in NAMES:
        getattr(model, name).kernel[...] = variables["params"][name]["kernel"]
        getattr(model, name).bias[...] = variables["params"][name]["bias"]
    assert np.array_equal(module.apply(variables, x), model(x))
    return module, variables, model, x


def test_describe_layers_in_execution_order(twins):
    module, variables, _, x = twins
    layers = sdl.describe_layers(module, variables, x[:1])
    assert list(layers) == list(NAMES)
    assert layers["conv2"].kernel_shape == (3, 3, 6, 8) and layers["conv2"].tap.strides == (2, 2)
    assert layers["linear"].kind == "dense" and layers["linear"].kernel_shape == (32, 5)


def test_covariances_identical_to_nnx(twins):
    module, variables, model, x = twins
    batches = [x[:5], x[5:]]
    linen = sdl.collect_covariances(module, variables, batches, progress=False)
    nnx_covs = sd.collect_covariances(model, batches, progress=False)
    via_tuple = sd.collect_covariances((module, variables), batches, progress=False, layers=["conv2"])
    assert list(linen) == list(nnx_covs)
    for path in NAMES:
        assert np.array_equal(linen[path].cov, nnx_covs[path].cov), path
        assert np.array_equal(linen[path].mean, nnx_covs[path].mean), path
    assert np.array_equal(via_tuple["conv2"].cov, nnx_covs["conv2"].cov)


@pytest.mark.parametrize("fmt", ["tucker2"])  # svd: in the verify and save tests below
def test_compress_identical_to_nnx(twins, fmt):
    module, variables, model, x = twins
    options = dict(format=fmt, norm="sigma", ratio=0.5, skip=("conv1", "linear"), key=jax.random.key(3),
                   progress=False, max_steps=3)
    small = sdl.compress(module, variables, x, **options)
    reference = compress_model(model, x, **options)
    for report, ref in zip(small.layers, reference.layers):
        assert report == ref
    for path in small.plan.paths:
        ours, theirs = small.factors[path], reference.model.conv2.to_factorized() if path == "conv2" else \
            reference.model.conv3.to_factorized()
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
            assert np.array_equal(a, b), path
    np.testing.assert_allclose(small(x), reference.model(x), rtol=1e-10, atol=1e-12)
    assert small.num_params() == count_params(reference.model)
    assert "kernel" not in small.variables["params"]["conv2"]  # the dense kernel is not kept
    assert small.plan.to_dict() == reference.plan.to_dict()


def test_verify_reports_in_model_errors(twins):
    module, variables, model, x = twins
    small = sdl.compress(module, variables, x, format="svd", norm="sigma", ratio=0.5,
                         skip=("conv1",), key=jax.random.key(0), progress=False)
    reference = compress_model(model, x, format="svd", norm="sigma", ratio=0.5, skip=("conv1",),
                               key=jax.random.key(0), progress=False)
    ours = sdl.verify(small, variables, [x[:6], x[6:]])
    theirs = sd.verify(model, reference.model, [x[:6], x[6:]], plan=reference.plan)
    assert (ours.params_before, ours.params_after) == (theirs.params_before, theirs.params_after)
    assert (ours.flops_before, ours.flops_after) == (theirs.flops_before, theirs.flops_after)
    for layer in theirs.layers:
        np.testing.assert_allclose(ours.layer_errors[layer.path], layer.rel_error, rtol=1e-9)
    np.testing.assert_allclose(ours.output_rel_error, theirs.output_rel_error, rtol=1e-5)  # float32 outputs


@pytest.mark.parametrize("save_format", ["safetensors", "orbax"])
def test_save_load_round_trip(twins, tmp_path, save_format):
    module, variables, _, x = twins
    small = sdl.compress(module, variables, x, format="svd", norm="frobenius", ratio=0.5,
                         skip=("conv1",), key=jax.random.key(0), progress=False)
    sdl.save(tmp_path, small, format=save_format)
    loaded = sdl.load(tmp_path, module, variables)
    assert loaded.plan == small.plan
    assert np.array_equal(loaded(x), small(x))
    other = LinenCNN().init(jax.random.key(0), jnp.zeros((1, 10, 10, 3), jnp.float32))  # other linear shape
    with pytest.raises(ValueError, match="kernel at 'linear'"):
        sdl.load(tmp_path, module, other)


def test_errors(twins):
    module, variables, _, x = twins
    with pytest.raises(ValueError, match="unknown linen layer path"):
        sdl.collect_covariances(module, variables, [x], layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="skip names unknown"):
        sdl.plan(module, variables, x, format="svd", ratio=0.5, skip=["nope"])
    with pytest.raises(ValueError, match="not a linen model saved"):
        sdl.load("/nonexistent", module, variables)
