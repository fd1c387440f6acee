"""Tiny NNX models and random factorized kernels shared by test_surgery.py and test_io.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmadecomp import CP, CP3, TR, TT, LowRank, Tucker2, Tucker3
from sigmadecomp.layers import factor_shapes

CLASSES = {"svd": LowRank, "tucker2": Tucker2, "cp": CP, "cp3": CP3, "tucker3": Tucker3, "tt": TT, "tr": TR}


def numpy_init(seed: int):
    """Initializer drawing from numpy: Flax's default (truncated normal) compiles for seconds per
    shape on a busy CPU, which would dominate these tests."""
    rng = np.random.default_rng(seed)

    def init(key, shape, dtype):
        del key
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1])), dtype)

    return init


class TinyNet(nnx.Module):
    """conv (SAME) → BN → relu → [strided VALID conv, grouped 3×1 conv with explicit padding] → mean → linear."""

    def __init__(self, *, width: int = 8, dtype=jnp.float32, seed: int = 0):
        rngs = nnx.Rngs(seed)
        kw = dict(param_dtype=dtype, rngs=rngs)
        kw_init = dict(kw, kernel_init=numpy_init(seed), bias_init=numpy_init(seed + 1))
        self.conv1 = nnx.Conv(3, width, (3, 3), **kw_init)
        self.bn = nnx.BatchNorm(width, use_running_average=True, **kw)
        self.blocks = nnx.List([
            nnx.Conv(width, width, (3, 3), strides=2, padding="VALID", **kw_init),
            nnx.Conv(width, 12, (3, 1), padding=((1, 1), (0, 0)), kernel_dilation=(2, 1),
                     feature_group_count=2, use_bias=False, **kw_init),
        ])
        self.linear = nnx.Linear(12, 5, **kw_init)
        # non-trivial batch statistics, so that saving them matters
        # (Flax keeps batch statistics in float32 whatever param_dtype is: store them in ``dtype``)
        self.bn.mean = nnx.BatchStat(jnp.asarray(np.linspace(-0.5, 0.5, width), dtype))
        self.bn.var = nnx.BatchStat(jnp.asarray(np.linspace(0.5, 2.0, width), dtype))

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv1(x)))
        for block in self.blocks:
            x = nnx.relu(block(x))
        return self.linear(x.mean(axis=(1, 2)))


def random_factorized(fmt, kernel_shape, ranks, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = factor_shapes(fmt, kernel_shape, ranks)
    arrays = {k: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), dtype) for k, s in shapes.items()}
    return CLASSES[fmt](**arrays, kernel_shape=tuple(kernel_shape))


def random_factors(plan, seed=0, dtype=jnp.float32) -> dict:
    """Random factorized kernels with the plan's shapes (a list per grouped conv)."""
    out = {}
    for i, e in enumerate(plan.entries):
        parts = [random_factorized(e.format, e.group_kernel_shape, e.ranks, 100 * seed + 10 * i + g, dtype)
                 for g in range(e.groups)]
        out[e.path] = parts if e.groups > 1 else parts[0]
    return out


def inputs(n=4, size=9, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, size, size, 3)), dtype)


def run(model, x):
    """``model(x)`` under jit: much cheaper than eager convs, which compile op by op."""
    return jax.jit(lambda x: model(x))(x)


def state_arrays(model) -> dict:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))
    return {path: np.asarray(var[...]) for path, var in flat}


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
