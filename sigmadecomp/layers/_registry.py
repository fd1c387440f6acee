"""Which factorized layer replaces which layer: one dispatch used by surgery and loading."""

from __future__ import annotations

from flax import nnx

from sigmadecomp.layers._common import FactorizedLayer
from sigmadecomp.layers._cp import CP3Conv, CPConv
from sigmadecomp.layers._lowrank import LowRankConv, LowRankDense
from sigmadecomp.layers._shapes import format_of
from sigmadecomp.layers._tucker2 import Tucker2Conv

__all__ = ["CONV_LAYERS", "FACTORIZED_LAYERS", "factorize_layer"]

CONV_LAYERS = {"svd": LowRankConv, "tucker2": Tucker2Conv, "cp": CPConv, "cp3": CP3Conv}
FACTORIZED_LAYERS = (LowRankConv, LowRankDense, Tucker2Conv, CPConv, CP3Conv)


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
    fmt = format_of(first)
    # Only passed when not the default, so layers without the option still build.
    options = {} if implementation == "factorized" else {"implementation": implementation}
    if isinstance(layer, nnx.Linear):
        if fmt != "svd":
            raise ValueError(f"a dense layer (nnx.Linear) can only use the 'svd' format (LowRank); got {fmt!r}")
        return LowRankDense.from_layer(layer, factorized, **options)
    if isinstance(layer, nnx.Conv):
        return CONV_LAYERS[fmt].from_layer(layer, factorized, **options)
    raise ValueError(f"only nnx.Conv and nnx.Linear layers can be factorized; got {type(layer).__name__}")
