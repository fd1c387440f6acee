"""Factorized kernels: the pytrees every solver returns and every factorized layer consumes.

Each format stores its factors in Flax-friendly layouts plus the static ``kernel_shape`` of the
kernel it approximates (``(kh, kw, cin, cout)`` for a conv, ``(in, out)`` for a dense layer), so
:func:`to_dense` returns an array of exactly that shape. Scales live in ``out_factor``.

=========  ==========================================================================================
format     dense kernel ``K[i, j, c, o]``
=========  ==========================================================================================
LowRank    ``Σ_r in_kernel[i, j, c, r] · out_factor[r, o]``          (SVD; conv kh×kw→r, then 1×1)
Tucker2    ``Σ_ab in_factor[c, a] · core[i, j, a, b] · out_factor[o, b]`` (1×1 → kh×kw core → 1×1)
CP         ``Σ_r kh_factor[i, r] · kw_factor[j, r] · in_factor[c, r] · out_factor[o, r]``
CP3        ``Σ_r spatial_factor[i, j, r] · in_factor[c, r] · out_factor[o, r]`` (spatial modes merged)
Tucker3    ``Σ_abs core[a, b, s] · in_factor[c, b] · spatial_factor[i, j, s] · out_factor[o, a]``
TT         ``Σ_abe in_core[c, a] · kh_core[a, i, b] · kw_core[b, j, e] · out_core[e, o]``
TR         ``Σ_zabe in_core[z, c, a] · kh_core[a, i, b] · kw_core[b, j, e] · out_core[e, o, z]``
=========  ==========================================================================================
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

import jax
import jax.numpy as jnp

__all__ = ["CP", "CP3", "Factorized", "LowRank", "TR", "TT", "Tucker2", "Tucker3", "num_params", "to_dense"]


def _pytree(cls):
    """Frozen dataclass registered as a pytree: arrays are leaves, ``kernel_shape`` is static."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = [f.name for f in dataclasses.fields(cls) if f.name != "kernel_shape"]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=["kernel_shape"])


_HIGHEST = jax.lax.Precision.HIGHEST


def _finish(dense4, kernel_shape):
    return dense4.reshape(kernel_shape)


@_pytree
class LowRank:
    """Rank-``r`` (SVD) kernel: a ``kh×kw`` conv to ``r`` channels followed by a 1×1 conv."""

    in_kernel: jax.Array  # (kh, kw, cin, r)
    out_factor: jax.Array  # (r, cout)
    kernel_shape: tuple

    @property
    def rank(self) -> int:
        return self.out_factor.shape[0]


@_pytree
class Tucker2:
    """Tucker-2 kernel over the channel modes; the spatial modes stay in the core."""

    core: jax.Array  # (kh, kw, r_in, r_out)
    in_factor: jax.Array  # (cin, r_in)
    out_factor: jax.Array  # (cout, r_out)
    kernel_shape: tuple

    @property
    def ranks(self) -> tuple[int, int]:
        """``(r_out, r_in)``, the order of :class:`sigmadecomp.Tucker2ALS`'s ``ranks``."""
        return self.out_factor.shape[1], self.in_factor.shape[1]


@_pytree
class CP:
    """Rank-``R`` CP kernel over the four modes (cout, cin, kh, kw)."""

    out_factor: jax.Array  # (cout, R)
    in_factor: jax.Array  # (cin, R)
    kh_factor: jax.Array  # (kh, R)
    kw_factor: jax.Array  # (kw, R)
    kernel_shape: tuple

    @property
    def rank(self) -> int:
        return self.out_factor.shape[1]


@_pytree
class CP3:
    """Rank-``R`` CP kernel with the spatial modes merged (one depthwise ``kh×kw`` conv)."""

    out_factor: jax.Array  # (cout, R)
    in_factor: jax.Array  # (cin, R)
    spatial_factor: jax.Array  # (kh, kw, R)
    kernel_shape: tuple

    @property
    def rank(self) -> int:
        return self.out_factor.shape[1]


@_pytree
class Tucker3:
    """Tucker-3 kernel over the modes ``cout``, ``cin`` and ``kh·kw`` (spatial modes merged)."""

    core: jax.Array  # (r_out, r_in, r_space)
    in_factor: jax.Array  # (cin, r_in)
    spatial_factor: jax.Array  # (kh, kw, r_space)
    out_factor: jax.Array  # (cout, r_out)
    kernel_shape: tuple

    @property
    def ranks(self) -> tuple[int, int, int]:
        """``(r_out, r_in, r_space)``, the order of :class:`sigmadecomp.Tucker3ALS`'s ``ranks``."""
        return tuple(self.core.shape)

    def dense(self):
        return jnp.einsum("abs,cb,ijs,oa->ijco", self.core, self.in_factor, self.spatial_factor,
                          self.out_factor, precision=_HIGHEST)


@_pytree
class TT:
    """Tensor-train kernel over ``cin → kh → kw → cout`` (cores of ranks ``(r1, r2, r3)``)."""

    in_core: jax.Array  # (cin, r1)
    kh_core: jax.Array  # (r1, kh, r2)
    kw_core: jax.Array  # (r2, kw, r3)
    out_core: jax.Array  # (r3, cout)
    kernel_shape: tuple

    @property
    def ranks(self) -> tuple[int, int, int]:
        return (self.in_core.shape[1], self.kh_core.shape[2], self.kw_core.shape[2])

    def dense(self):
        return jnp.einsum("ca,aib,bje,eo->ijco", self.in_core, self.kh_core, self.kw_core,
                          self.out_core, precision=_HIGHEST)


@_pytree
class TR:
    """Tensor-ring kernel over ``cin → kh → kw → cout`` closing back to ``cin`` (ranks
    ``(r0, r1, r2, r3)``, ``r0`` the closing rank)."""

    in_core: jax.Array  # (r0, cin, r1)
    kh_core: jax.Array  # (r1, kh, r2)
    kw_core: jax.Array  # (r2, kw, r3)
    out_core: jax.Array  # (r3, cout, r0)
    kernel_shape: tuple

    @property
    def ranks(self) -> tuple[int, int, int, int]:
        return (self.in_core.shape[0], self.in_core.shape[2], self.kh_core.shape[2],
                self.kw_core.shape[2])

    def dense(self):
        return jnp.einsum("zca,aib,bje,eoz->ijco", self.in_core, self.kh_core, self.kw_core,
                          self.out_core, precision=_HIGHEST)


Factorized = Union[LowRank, Tucker2, CP, CP3, Tucker3, TT, TR]
_TYPES = (LowRank, Tucker2, CP, CP3, Tucker3, TT, TR)

def to_dense(factorized: Factorized) -> jax.Array:
    """The dense kernel, of shape ``factorized.kernel_shape``, that ``factorized`` represents.

    >>> import jax.numpy as jnp
    >>> lr = LowRank(jnp.ones((3, 3, 4, 2)), jnp.ones((2, 5)), kernel_shape=(3, 3, 4, 5))
    >>> to_dense(lr).shape
    (3, 3, 4, 5)
    """
    f, shape = factorized, factorized.kernel_shape
    if isinstance(f, LowRank):
        dense = jnp.einsum("ijcr,ro->ijco", f.in_kernel, f.out_factor, precision=_HIGHEST)
    elif isinstance(f, Tucker2):
        dense = jnp.einsum(
            "ca,ijab,ob->ijco", f.in_factor, f.core, f.out_factor, precision=_HIGHEST
        )
    elif isinstance(f, CP):
        dense = jnp.einsum(
            "ir,jr,cr,or->ijco", f.kh_factor, f.kw_factor, f.in_factor, f.out_factor,
            precision=_HIGHEST,
        )
    elif isinstance(f, CP3):
        dense = jnp.einsum(
            "ijr,cr,or->ijco", f.spatial_factor, f.in_factor, f.out_factor, precision=_HIGHEST
        )
    elif hasattr(f, "dense"):  # the formats that contract themselves (Tucker3, TT, TR, ...)
        dense = f.dense()
    else:
        raise TypeError(f"expected a factorized kernel such as LowRank or Tucker2; got {type(f).__name__}")
    return _finish(dense, shape)


def num_params(factorized: Factorized) -> int:
    """Number of stored parameters in the factors (biases are the layer's, not counted here).

    >>> import jax.numpy as jnp
    >>> num_params(LowRank(jnp.ones((3, 3, 4, 2)), jnp.ones((2, 5)), kernel_shape=(3, 3, 4, 5)))
    82
    """
    if not isinstance(factorized, _TYPES) and not hasattr(factorized, "dense"):
        raise TypeError(f"expected a factorized kernel such as LowRank or Tucker2; got {type(factorized).__name__}")
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(factorized))
