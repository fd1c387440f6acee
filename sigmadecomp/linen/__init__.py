"""Flax **linen** models: covariance taps and compression without editing the module's code.

* :func:`collect_covariances` — ``cov = E[x xᵀ]`` of every 2-D ``nn.Conv`` / ``nn.Dense``, tapped
  with ``flax.linen.intercept_methods`` (identical to the NNX tap for the same weights);
* :func:`describe_layers` — the decomposable layers a forward pass calls, by path;
* :func:`plan`, :func:`compress` — the NNX pipeline's plan and per-layer solves for linen;
* :func:`apply_factorized` — ``module.apply`` with planned layers computed from a factor pytree;
* :class:`LinenCompressed`, :func:`save`, :func:`load` — the result, and its factors on disk;
* :func:`verify` — per-layer and end-to-end errors against the original, counts before/after.

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> from sigmadecomp import linen as sdl
>>> net = nn.Sequential([nn.Conv(8, (3, 3)), nn.relu, nn.Conv(8, (3, 3))])
>>> images = jax.random.normal(jax.random.key(1), (8, 6, 6, 3))
>>> variables = net.init(jax.random.key(0), images)
>>> small = sdl.compress(net, variables, images, format="svd", norm="sigma", ratio=0.5,
...                      key=jax.random.key(0), progress=False)
>>> small(images).shape
(8, 6, 6, 8)
"""

from sigmadecomp.linen._compress import LinenCompressed, apply_factorized, compress, kernels_of, load, plan, save
from sigmadecomp.linen._tap import LinenLayer, collect_covariances, describe_layers
from sigmadecomp.linen._verify import LinenReport, verify

__all__ = [
    "LinenCompressed",
    "LinenLayer",
    "LinenReport",
    "apply_factorized",
    "collect_covariances",
    "compress",
    "describe_layers",
    "kernels_of",
    "load",
    "plan",
    "save",
    "verify",
]
