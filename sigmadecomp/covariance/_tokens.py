"""The covariance tap for embeddings: an ``nnx.Embed`` looks up one-hot inputs, whose second
moment ``E[x xᵀ]`` is ``diag(token frequencies)`` — so its Σ is a vector of counts."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from flax import nnx

from sigmadecomp._paths import find_layers
from sigmadecomp.covariance._collect import _as_input, _call_model, _forward_jit

__all__ = ["collect_token_counts"]


def collect_token_counts(model: nnx.Module, batches: Iterable, *, layers: Sequence[str] | None = None,
                         forward: Callable | None = None, max_batches: int | None = None) -> dict[str, np.ndarray]:
    """How often each id reaches each ``nnx.Embed`` of ``model`` on ``batches``: ``{path: counts}``
    with ``counts`` of length ``num_embeddings`` (float64). ``counts / counts.sum()`` is the
    diagonal of ``E[x xᵀ]`` of the one-hot inputs, the Σ of a TT embedding fit. Padding ids count
    like any other id; pass a ``forward`` that masks them if they should not.

    >>> import jax.numpy as jnp
    >>> model = nnx.Sequential(nnx.Embed(5, 2, rngs=nnx.Rngs(0)))
    >>> collect_token_counts(model, [jnp.array([[1, 1, 4]])])["layers.0"].tolist()
    [0.0, 2.0, 0.0, 0.0, 1.0]
    """
    found = dict(find_layers(model, (nnx.Embed,)))
    paths = tuple(found if layers is None else layers)
    unknown = [p for p in paths if p not in found]
    if unknown or not paths:
        raise ValueError(f"unknown embedding path(s) {unknown or paths}; the model's nnx.Embed layers are: {', '.join(found) or '(none)'}")
    graphdef, state = nnx.split(model)
    counts = {p: np.zeros(found[p].num_embeddings, np.float64) for p in paths}
    for batch in itertools.islice(batches, max_batches):
        inputs = _forward_jit(graphdef, paths, forward or _call_model, state, _as_input(batch))
        for path in paths:
            for ids in inputs[path]:
                counts[path] += np.bincount(np.asarray(ids).ravel(), minlength=counts[path].size)[: counts[path].size]
    return counts
