"""Verify a compressed linen model against its original, as :func:`sigmadecomp.verify` does for NNX.

One interceptor runs the compressed model and, at every replaced layer, also applies the ORIGINAL
dense layer to the same input (the input the compressed layer sees, earlier layers compressed), so
``rel_error = Σ‖y_c − y_o‖² / Σ‖y_o − b‖²`` is the layer's relative Σ-error on these inputs; the
original model runs beside it for the end-to-end ``output_rel_error`` and top-1 agreement. MACs per
example are those of the plan (kernel size × output positions), summed over all conv/dense layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sigmadecomp.linen._compress import LinenCompressed, _factorized_layer
from sigmadecomp.linen._tap import describe_layers, is_tapped, layer_path

__all__ = ["LinenReport", "verify"]


@dataclasses.dataclass(frozen=True)
class LinenReport:
    """Per replaced layer relative error, whole-model parameter / MAC counts before and after, and
    the end-to-end output error and top-1 agreement over the batches."""

    layer_errors: dict
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    output_rel_error: float
    top1_agreement: float | None
    num_examples: int


def _comparing_interceptor(factors, sums: dict):
    def interceptor(next_fun, args, kwargs, context):
        if not is_tapped(context) or layer_path(context.module) not in factors:
            return next_fun(*args, **kwargs)
        path = layer_path(context.module)
        y_c = _factorized_layer(context.module, factors[path])(args[0])
        y_o = next_fun(*args, **kwargs)  # the dense layer: its kernel is still in these variables
        bias = context.module.variables["params"].get("bias") if context.module.use_bias else None
        centred = y_o if bias is None else y_o - jnp.broadcast_to(bias, y_o.shape).astype(y_o.dtype)
        sums[path] = (jnp.sum((y_c - y_o) ** 2), jnp.sum(centred ** 2))
        return y_c

    return interceptor


def _step(compressed: LinenCompressed, original_variables):
    kwargs = dict(compressed.apply_kwargs)

    @jax.jit
    def step(variables, factors, x):
        sums: dict = {}
        out_o = compressed.module.apply(variables, x, **kwargs)
        with nn.intercept_methods(_comparing_interceptor(factors, sums)):
            out_c = compressed.module.apply(variables, x, **kwargs)
        return out_o, out_c, sums

    return lambda x: step(original_variables, compressed.factors, x)


def _macs(module, variables, x, kwargs) -> dict:
    layers = describe_layers(module, variables, jax.ShapeDtypeStruct((1, *np.shape(x)[1:]), x.dtype), **kwargs)
    return {p: int(np.prod(layer.kernel_shape) * np.prod(layer.out_shape[1:-1])) for p, layer in layers.items()}


def verify(compressed: LinenCompressed, original_variables, batches: Iterable) -> LinenReport:
    """Compare ``compressed`` with the original model (the same module with ``original_variables``)
    on ``batches`` of inputs."""
    step, totals, out = _step(compressed, original_variables), {}, [0.0, 0.0, 0, 0]
    x = None
    for x in batches:
        out_o, out_c, sums = jax.device_get(step(jnp.asarray(x)))
        for path, (num, den) in sums.items():
            a, b = totals.get(path, (0.0, 0.0))
            totals[path] = (a + float(num), b + float(den))
        out[0] += float(np.sum((out_c - out_o) ** 2))
        out[1] += float(np.sum(out_o ** 2))
        out[2] += int(out_o.shape[0])
        if out_o.ndim == 2:
            out[3] += int(np.sum(np.argmax(out_o, -1) == np.argmax(out_c, -1)))
    if x is None:
        raise ValueError("batches is empty: verify needs at least one batch of inputs")
    macs = _macs(compressed.module, original_variables, x, dict(compressed.apply_kwargs))
    plan = compressed.plan
    flops_after = sum(macs.values()) - sum(macs[p] for p in plan.paths) + sum(
        e.flops_after for e in plan.entries)
    params_before = sum(int(np.prod(np.shape(v))) for v in jax.tree_util.tree_leaves(original_variables["params"]))
    return LinenReport(
        layer_errors={p: totals[p][0] / totals[p][1] if totals[p][1] > 0 else float("nan") for p in totals},
        params_before=params_before, params_after=compressed.num_params(),
        flops_before=sum(macs.values()), flops_after=int(flops_after),
        output_rel_error=out[0] / out[1] if out[1] > 0 else float("nan"),
        top1_agreement=out[3] / out[2] if out[2] else None, num_examples=out[2])
