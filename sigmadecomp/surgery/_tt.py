"""Surgery to tensor-train layers: ``nnx.Linear → TTLinear`` and ``nnx.Embed → TTEmbed``, each
kernel fitted by :class:`~sigmadecomp.TTMatrixALS` under its Σ (a dense layer's input ``cov``
from :func:`~sigmadecomp.collect_covariances`; an embedding's token counts from
:func:`~sigmadecomp.covariance.collect_token_counts`) or in the Frobenius norm when none is given."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmadecomp._paths import get_by_path
from sigmadecomp._ttmatrix import TTMatrix, balanced_modes, padded_modes
from sigmadecomp.layers._ttmatrix import TTEmbed, TTLinear
from sigmadecomp.solvers._decompose import decompose
from sigmadecomp.solvers._solution import Solution
from sigmadecomp.solvers._ttmatrix import TTMatrixALS, solve_tt_diagonal
from sigmadecomp.surgery._apply import set_by_path

__all__ = ["fit_tt_embedding", "to_tt"]


def fit_tt_embedding(table, solver: TTMatrixALS, *, token_counts=None, init=None) -> Solution:
    """TT-matrix fit of an embedding table ``(vocab, features)``, its rows padded with zeros to
    ``prod(solver.in_modes)`` (default :func:`padded_modes`). ``token_counts`` (length ``vocab``)
    weights each row by its frequency (Σ = diag of the one-hot second moment); ``None`` is the
    Frobenius fit. Padded rows get weight 0 (they are never looked up)."""
    table = jnp.asarray(table)
    vocab, features = table.shape
    k = len(solver.in_modes or solver.out_modes or ()) or solver.num_cores
    in_modes = solver.in_modes or padded_modes(vocab, k)
    out_modes = solver.out_modes or balanced_modes(features, k)
    rows = math.prod(in_modes)
    if rows < vocab:
        raise ValueError(f"fit_tt_embedding: in_modes {in_modes} hold {rows} rows < vocab {vocab}")
    weights = np.ones(vocab) if token_counts is None else np.asarray(token_counts, np.float64)
    if weights.shape != (vocab,):
        raise ValueError(f"fit_tt_embedding: token_counts must have length vocab={vocab}; got shape {weights.shape}")
    padded = jnp.zeros((rows, features), table.dtype).at[:vocab].set(table)
    weights = jnp.asarray(np.concatenate([weights / weights.sum(), np.zeros(rows - vocab)]), table.dtype)
    fitted = TTMatrixALS(ranks=solver.ranks, eps=solver.eps, in_modes=in_modes, out_modes=out_modes,
                         max_steps=solver.max_steps, rtol=solver.rtol, ridge=solver.ridge)
    return solve_tt_diagonal(padded, weights, fitted, init=init)


def _cast(tt: TTMatrix, dtype) -> TTMatrix:
    return TTMatrix(tuple(c.astype(dtype) for c in tt.cores), tt.in_modes, tt.out_modes)


def to_tt(model: nnx.Module, solvers: Mapping[str, TTMatrixALS], *, covs: Optional[Mapping] = None,
          token_counts: Optional[Mapping] = None, dtype=None) -> tuple[nnx.Module, dict[str, Solution]]:
    """A copy of ``model`` whose layers at the paths of ``solvers`` are TT layers fitted by them.

    ``covs[path]`` (a :class:`~sigmadecomp.LayerCovariance` or a ``(in, in)`` array) makes the fit
    of that ``nnx.Linear`` a Σ fit; ``token_counts[path]`` that of an ``nnx.Embed``. ``dtype``
    (e.g. ``jnp.float64``, with x64 enabled) is the dtype of the fit; the layers keep their own
    parameter dtype. Returns the copy and ``{path: Solution}`` (in the fit's dtype).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> net = nnx.Sequential(nnx.Linear(16, 16, rngs=nnx.Rngs(0)))
    >>> tt_net, sols = to_tt(net, {"layers.0": TTMatrixALS(ranks=(4,), num_cores=2)})
    >>> type(tt_net.layers[0]).__name__, tt_net(jnp.ones((1, 16))).shape
    ('TTLinear', (1, 16))
    """
    copy, solutions = nnx.clone(model), {}
    covs, token_counts = covs or {}, token_counts or {}
    for path, solver in solvers.items():
        layer = get_by_path(copy, path)
        if isinstance(layer, nnx.Linear):
            cov = covs.get(path)
            cov = getattr(cov, "cov", cov)
            kernel = layer.kernel[...]
            sol = decompose(kernel.astype(dtype or kernel.dtype), solver, cov=cov)
            new = TTLinear.from_layer(layer, _cast(sol.value, kernel.dtype))
        elif isinstance(layer, nnx.Embed):
            table = layer.embedding[...]
            sol = fit_tt_embedding(table.astype(dtype or table.dtype), solver, token_counts=token_counts.get(path))
            new = TTEmbed.from_tt(_cast(sol.value, table.dtype), layer.num_embeddings)
        else:
            raise ValueError(f"to_tt: {path!r} is a {type(layer).__name__}; only nnx.Linear and nnx.Embed become TT layers")
        set_by_path(copy, path, new)
        solutions[path] = sol
    return copy, solutions
