"""Which factorized layer replaces which layer: one dispatch (through the format registry,
:mod:`sigmadecomp.formats`) used by surgery and loading."""

from __future__ import annotations

from flax import nnx

from sigmadecomp.formats._registry import spec_of
from sigmadecomp.layers._common import FactorizedLayer
from sigmadecomp.layers._cp import CP3Conv, CPConv
from sigmadecomp.layers._lowrank import LowRankConv, LowRankDense
from sigmadecomp.layers._tr import TRConv
from sigmadecomp.layers._tt import TTConv
from sigmadecomp.layers._tucker2 import Tucker2Conv
from sigmadecomp.layers._tucker3 import Tucker3Conv

__all__ = ["FACTORIZED_LAYERS", "factorize_layer"]

# The built-in layer classes (for isinstance checks); registered formats may add more, all of
# which subclass FactorizedLayer.
FACTORIZED_LAYERS = (LowRankConv, LowRankDense, Tucker2Conv, CPConv, CP3Conv, Tucker3Conv, TTConv, TRConv)


def factorize_layer(layer: nnx.Module, factorized, *, implementation: str = "factorized") -> FactorizedLayer:
    """The factorized layer that replaces ``layer`` (``nnx.Conv`` or ``nnx.Linear``), built from
    ``factorized`` (one kernel, or a list with one per feature group) with ``from_layer``;
    ``implementation`` as in :class:`FactorizedLayer` (``"factorized"`` or ``"dense"``).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sigmadecomp import LowRank
    >>> dense = nnx.Linear(6, 3, rngs=nnx.Rngs(0))
    >>> f = LowRank(jnp.ones((1, 1, 6, 2)), jnp.ones((2, 3)), kernel_shape=(6, 3))
    >>> type(factorize_layer(dense, f)).__name__
    'LowRankDense'
    """
    first = factorized[0] if isinstance(factorized, (list, tuple)) and factorized else factorized
    spec = spec_of(first)
    # Only passed when not the default, so layers without the option still build.
    options = {} if implementation == "factorized" else {"implementation": implementation}
    if isinstance(layer, nnx.Linear):
        if spec.dense_layer is None:
            raise ValueError(f"a dense layer (nnx.Linear) can only use the 'svd' format (LowRank); got {spec.name!r}")
        return spec.dense_layer.from_layer(layer, factorized, **options)
    if isinstance(layer, nnx.Conv):
        return spec.layer.from_layer(layer, factorized, **options)
    raise ValueError(f"only nnx.Conv and nnx.Linear layers can be factorized; got {type(layer).__name__}")
