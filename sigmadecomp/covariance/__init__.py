"""Streaming input-patch statistics of a model's layers, the data side of the Σ-solvers.

* ``covariance.init``, ``.update``, ``.merge``, ``.finalize`` and :class:`MomentState` —
  pure-JAX streaming moments ``E[x xᵀ]``, ``E[x]`` and, for sequential calibration, the cross
  moments ``E[x x̂ᵀ]``, ``E[x̂ x̂ᵀ]`` of two inputs seen together (float64 with x64, otherwise
  Neumaier-compensated float32);
* :class:`LayerCovariance` — the finalised statistics of one layer;
* :func:`collect_covariances` — taps every ``nnx.Conv`` / ``nnx.Linear`` of a Flax NNX model
  (without touching the model) and returns ``{layer path: LayerCovariance}``;
* :class:`LayerTap`, :func:`layer_tap` — a layer's patch geometry (kernel size, strides,
  padding, dilation, groups), as used by the tap.
"""

from sigmadecomp.covariance._collect import LayerTap, collect_covariances, layer_tap
from sigmadecomp.covariance._tokens import collect_token_counts
from sigmadecomp.covariance._stats import LayerCovariance, MomentState, finalize, init, merge, update

# The streaming functions keep their short names and are used qualified
# (``covariance.update(state, x)``); the top-level package star-imports ``__all__``, where bare
# ``init`` / ``update`` / ``merge`` / ``finalize`` would be ambiguous, so they are not listed.
__all__ = [
    "LayerCovariance",
    "LayerTap",
    "MomentState",
    "collect_covariances",
    "collect_token_counts",
    "layer_tap",
]
