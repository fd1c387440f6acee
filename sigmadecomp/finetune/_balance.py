"""Balance the factors' norms of every factorized layer before training.

A factorized layer computes a kernel multilinear in its factors (every format: the SVD's two
kernels, Tucker-2's three, CP's four, the cores of TT, TR and the reshaped formats), so scaling
factor ``k`` by ``s_k`` with ``∏ s_k = 1`` changes no output. It changes training: the gradient
with respect to one factor scales with the norms of the others, so a factor's *relative* step
``‖ΔA‖ / ‖A‖`` grows as ``∏_{k≠A} ‖F_k‖ / ‖A‖``. The Σ fits return orthonormal factors beside one
core that carries the whole norm (ResNet-32, r-TT at 5%: three cores of norm ``√r ≈ 2.6``, the
last of norm 20), so one learning rate is too large for the orthonormal cores and too small for
the heavy one; weight decay also pulls the unbalanced factors towards balance, against the data.
:func:`balance_factors` gives every factor of a layer the geometric mean of their Frobenius norms
(one scalar per factor: the fits' own per-component scaling is kept).
``FinetuneConfig.balance`` applies it to the student before training.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmadecomp.finetune._implementations import factorized_layers

__all__ = ["balance_factors", "factor_norms"]


def _factors(layer) -> list:
    """The ``nnx.Param`` variables of ``layer``'s factors (every parameter but biases), in a
    fixed order."""
    found = []
    for path, node in nnx.iter_graph(layer):
        if isinstance(node, nnx.Param) and (not path or path[-1] != "bias"):
            found.append((tuple(str(p) for p in path), node))
    return [node for _, node in sorted(found, key=lambda item: item[0])]


def _norms(factors) -> np.ndarray:
    return np.array([float(jnp.linalg.norm(v[...].astype(jnp.float32))) for v in factors], np.float64)


def factor_norms(model: nnx.Module) -> dict:
    """``{path: [Frobenius norm of each factor]}`` of every factorized layer of ``model``."""
    return {path: _norms(_factors(layer)).tolist() for path, layer in factorized_layers(model).items()}


def balance_factors(model: nnx.Module) -> dict:
    """Rescale, in place, the factors of every factorized layer of ``model`` to the geometric mean
    of their Frobenius norms; the layers compute the same function (up to float rounding).

    Returns ``{path: [scale of each factor]}`` (their product is 1). Layers with a zero factor
    are left alone.

    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> import sigmadecomp as sd
    >>> net = nnx.Sequential(nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(0)))
    >>> x = np.random.default_rng(0).normal(size=(4, 6, 6, 8)).astype(np.float32)
    >>> small = sd.compress.compress_model(net, x, format="tucker2", ratio=0.5, norm="frobenius",
    ...                                    key=jax.random.key(0), progress=False).model
    >>> before = small(x)
    >>> scales = balance_factors(small)
    >>> norms = factor_norms(small)["layers.0"]
    >>> bool(np.allclose(norms, norms[0], rtol=1e-4)), bool(np.allclose(small(x), before, atol=1e-4))
    (True, True)
    """
    scales = {}
    for path, layer in factorized_layers(model).items():
        factors = _factors(layer)
        norms = _norms(factors)
        if len(factors) < 2 or not (norms > 0).all() or not np.isfinite(norms).all():
            continue
        target = float(np.exp(np.mean(np.log(norms))))
        scale = target / norms
        for v, s in zip(factors, scale):
            v[...] = v[...] * jnp.asarray(s, v[...].dtype)
        scales[path] = [float(s) for s in scale]
    return scales
