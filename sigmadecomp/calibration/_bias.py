"""Bias correction: shift a compressed layer's output so that its mean on the calibration data
equals the original layer's.

A layer is linear in its input patches, so its mean output is ``W·E[x]`` (plus the bias) and the
shift that restores it is exact, per output channel:

    δ = W·E[x] − W̃·E[x̂]

with ``E[x]``, ``E[x̂]`` the patch means of the original and compressed networks' inputs. Patch
means count the zero padding exactly as the conv does (patches are taken from the padded input),
so ``W·E[x]`` is the mean of the conv's output over images *and* output positions.

**Where δ goes** (:func:`bias_sites`), chosen so that the compressed model keeps the structure its
plan describes (``save`` / ``load`` keep working):

* a layer with a bias: added to the bias of the factorized layer (on its last sub-layer);
* a bias-free layer whose output goes straight into a ``BatchNorm`` (conv → BN, as in ResNets):
  subtracted from that BatchNorm's running mean — ``BN(ŷ + δ)`` with mean ``μ`` equals ``BN(ŷ)``
  with mean ``μ − δ``, exactly, in inference mode (in training mode BN removes any mean anyway);
* anything else: ``ValueError`` (give the layer a bias, or turn bias correction off).

"Straight into" is decided by tracing: the BatchNorm's input must be the very array the layer
returned; a layer whose output is also used elsewhere must not be conv → BN fused this way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from sigmadecomp._paths import get_by_path, path_to_str
from sigmadecomp._patches import kernel_to_matrix
from sigmadecomp.covariance._stats import LayerCovariance
from sigmadecomp.surgery._tap import intercept

__all__ = ["BiasSite", "apply_shift", "bias_sites", "output_shift"]


@dataclasses.dataclass(frozen=True)
class BiasSite:
    """Where the shift of layer ``layer`` goes: its own bias (``kind="bias"``, ``path`` = the
    layer) or the running mean of the BatchNorm at ``path`` (``kind="batchnorm"``)."""

    layer: str
    kind: str
    path: str


def _consumers(model: nnx.Module, stage, spec, paths: Sequence[str]) -> dict:
    """``{layer path: [BatchNorm paths whose input is that layer's output]}`` for one stage."""
    graphdef, state = nnx.split(model)
    found: dict = {}

    def run(state, h):
        copy = nnx.merge(graphdef, state)
        outputs, bn_inputs = {}, []
        taps = [(get_by_path(copy, p), functools.partial(_keep_output, outputs, p)) for p in paths]
        taps += [(bn, functools.partial(_keep_input, bn_inputs, path_to_str(bp)))
                 for bp, bn in nnx.iter_graph(copy) if isinstance(bn, nnx.BatchNorm)]
        with intercept(taps):
            out = stage(copy, h)
        for p in paths:  # identity of traced arrays: the BN was fed exactly this layer's output
            found[p] = [bp for bp, x in bn_inputs if p in outputs and x is outputs[p]]
        return out

    return found, jax.eval_shape(run, state, spec)


def _keep_output(outputs: dict, path: str, layer, x, y) -> None:
    del layer, x
    outputs[path] = y


def _keep_input(inputs: list, path: str, layer, x, y) -> None:
    del layer, y
    inputs.append((path, x))


def bias_sites(model: nnx.Module, stages, per_stage: Sequence[tuple], spec, paths) -> dict:
    """``{path: BiasSite}`` for the layers ``paths`` of the uncompressed ``model``.

    ``stages`` / ``per_stage`` as from :func:`sigmadecomp.calibration.forward_stages` and
    ``stage_layers``; ``spec`` is the model input. Raises ``ValueError`` naming every layer that
    has neither a bias nor a BatchNorm fed by it.
    """
    spec = jax.ShapeDtypeStruct(tuple(spec.shape), spec.dtype)
    sites, homeless = {}, []
    for stage, called in zip(stages, per_stage):
        wanted = [p for p in called if p in paths]
        bias_free = [p for p in wanted if get_by_path(model, p).bias is None]
        consumers, spec = _consumers(model, stage, spec, bias_free)
        for p in wanted:
            if p not in consumers:
                sites[p] = BiasSite(p, "bias", p)
            elif len(consumers[p]) == 1:
                sites[p] = BiasSite(p, "batchnorm", consumers[p][0])
            else:
                homeless.append(p)
    if homeless:
        raise ValueError(
            f"bias correction has nowhere to put the mean shift of layer(s) {homeless}: they have no "
            "bias and their output does not go straight into one BatchNorm. Build them with "
            "use_bias=True, skip them, or set bias_correction=False."
        )
    return sites


@jax.jit
def _shift(w, w_approx, mean, mean_hat):
    hi = lax.Precision.HIGHEST
    return jnp.dot(w, mean, precision=hi) - jnp.dot(w_approx, mean_hat, precision=hi)


def output_shift(kernel, approx_kernel, stats: LayerCovariance) -> jax.Array:
    """``δ = W·E[x] − W̃·E[x̂]`` (one value per output channel) in the statistics' dtype.

    ``kernel`` / ``approx_kernel`` are dense kernels of the same shape; ``stats`` has the cross
    means (``mean_hat``), or only ``mean`` when both networks see the same input.

    >>> import jax.numpy as jnp
    >>> from sigmadecomp.covariance import LayerCovariance
    >>> stats = LayerCovariance(cov=jnp.eye(2), mean=jnp.ones(2), count=jnp.ones(()))
    >>> output_shift(jnp.ones((2, 3)), jnp.zeros((2, 3)), stats).tolist()
    [2.0, 2.0, 2.0]
    """
    dtype = stats.mean.dtype
    mean_hat = stats.mean if stats.mean_hat is None else stats.mean_hat
    w = kernel_to_matrix(jnp.asarray(kernel)).astype(dtype)
    w_approx = kernel_to_matrix(jnp.asarray(approx_kernel)).astype(dtype)
    return _shift(w, w_approx, stats.mean, mean_hat)


def _bias_variable(layer: nnx.Module) -> nnx.Variable:
    """The one bias of a (possibly factorized) layer: its own, or its last sub-layer's."""
    biases = [node.bias for _, node in nnx.iter_graph(layer)
              if isinstance(node, (nnx.Conv, nnx.Linear)) and node.bias is not None]
    if len(biases) != 1:
        raise ValueError(f"expected exactly one bias in {type(layer).__name__}; found {len(biases)}")
    return biases[0]


def apply_shift(model: nnx.Module, site: BiasSite, shift) -> None:
    """Add ``shift`` to the output of ``site.layer`` in ``model`` (in place; see the module doc)."""
    if site.kind == "bias":
        var = _bias_variable(get_by_path(model, site.layer))
        var[...] = var[...] + jnp.asarray(shift).astype(var[...].dtype)
    else:
        mean = get_by_path(model, site.path).mean
        mean[...] = mean[...] - jnp.asarray(shift).astype(mean[...].dtype)
