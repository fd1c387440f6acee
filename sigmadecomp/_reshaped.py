"""Reshaped (tensorised) conv kernels, DESIGN.md §6 (TNN seed; Garipov et al.'s TT-conv).

With ``cin = s₁⋯s_m`` and ``cout = t₁⋯t_m`` (row-major: ``s₁`` is the slowest digit), a kernel
``K[i, j, c, o]`` is regrouped (:func:`regroup`) as the tensor of order ``m+1``

    X[p, (s₁t₁), …, (s_m t_m)],   p = i·kw + j,

and decomposed in one of four formats; every core holds one mode of ``X`` (the spatial core
``p``, channel core ``k`` the pair ``(s_k, t_k)`` as two axes) plus rank axes:

===========  =============================================================================  ===========
format       cores (``P = kh·kw``)                                                           ranks
===========  =============================================================================  ===========
``r-cp``     ``(P, R)``, ``(s_k, t_k, R)``                                                   ``(R,)``
``r-tucker`` ``(P, r₀)``, ``(s_k, t_k, r_k)``, core ``(r₀, r₁, …, r_m)``                     ``(r₀, …, r_m)``
``r-tt``     ``(P, r₁)``, ``(r_k, s_k, t_k, r_{k+1})``, last ``(r_m, s_m, t_m)``             ``(r₁, …, r_m)``
``r-tr``     ``(r₀, P, r₁)``, ``(r_k, s_k, t_k, r_{k+1})``, last ``(r_m, s_m, t_m, r₀)``     ``(r₀, …, r_m)``
===========  =============================================================================  ===========

(``r-tt`` with the spatial core first is Garipov's TT-conv; the layer never forms ``K``.)
The modes default to :func:`default_modes` (``m = 3``, balanced, ascending) and may be given.
Each format is described once by its einsum *labels* (one string per core), from which the core
shapes, the ranks, the bonds, the dense kernel and the layer's contraction are all derived.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from sigmadecomp._ttmatrix import core_attribute

__all__ = ["FORMATS", "NUM_MODES", "RCP", "RTR", "RTT", "RTucker", "Reshaped", "balanced_factors",
           "default_modes", "regroup", "reshaped_labels", "ungroup"]

NUM_MODES = 3  # channel modes m by default (ResNet channels 16/32/64 → (2,2,4)/(2,4,4)/(4,4,4))
MAX_MODES = 8
SPATIAL = "p"
S_LETTERS, T_LETTERS, R_LETTERS = "abcdefgh", "ijklmnoq", "rstuvwxyz"
_HIGHEST = jax.lax.Precision.HIGHEST


def balanced_factors(n: int, m: int) -> tuple[int, ...]:
    """``n`` as ``m`` ascending factors, as equal as possible (largest primes first, each to the
    currently smallest factor); factors of 1 where ``n`` has too few primes.

    >>> balanced_factors(16, 3), balanced_factors(64, 3), balanced_factors(3, 3)
    ((2, 2, 4), (4, 4, 4), (1, 1, 3))
    """
    if n < 1 or not 1 <= m <= MAX_MODES:
        raise ValueError(f"balanced_factors needs n >= 1 and 1 <= m <= {MAX_MODES}; got n={n}, m={m}")
    primes, p, rest = [], 2, n
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    primes += [rest] if rest > 1 else []
    factors = [1] * m
    for prime in sorted(primes, reverse=True):
        factors[factors.index(min(factors))] *= prime
    return tuple(sorted(factors))


def kernel_dims(kernel_shape) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in kernel_shape)
    if len(shape) != 4:
        raise ValueError(f"reshaped formats are for conv kernels (kh, kw, cin, cout); got kernel shape {shape}")
    return shape


def default_modes(kernel_shape, num_modes: int = NUM_MODES) -> tuple[tuple, tuple]:
    """``(in_modes, out_modes)``: :func:`balanced_factors` of ``cin`` and ``cout``.

    >>> default_modes((3, 3, 16, 32))
    ((2, 2, 4), (2, 4, 4))
    """
    _, _, cin, cout = kernel_dims(kernel_shape)
    return balanced_factors(cin, num_modes), balanced_factors(cout, num_modes)


def check_modes(kernel_shape, in_modes, out_modes) -> tuple[tuple, tuple]:
    """The modes as int tuples; ``ValueError`` unless they factor ``cin`` and ``cout``."""
    _, _, cin, cout = kernel_dims(kernel_shape)
    in_modes, out_modes = tuple(int(s) for s in in_modes), tuple(int(t) for t in out_modes)
    if len(in_modes) != len(out_modes) or not 1 <= len(in_modes) <= MAX_MODES:
        raise ValueError(f"in_modes {in_modes} and out_modes {out_modes} need the same length m, 1 <= m <= {MAX_MODES}")
    if math.prod(in_modes) != cin or math.prod(out_modes) != cout or min(in_modes + out_modes) < 1:
        raise ValueError(f"in_modes {in_modes} must multiply to cin = {cin} and out_modes {out_modes} to cout = "
                         f"{cout} (kernel shape {tuple(kernel_shape)}); e.g. {default_modes(kernel_shape, len(in_modes))}")
    return in_modes, out_modes


def regroup(matrix, kernel_shape, in_modes, out_modes):
    """``W (cout, d)`` (package patch order ``d = (cin, kh, kw)``) → the order-``(m+1)`` tensor
    ``X[p, (s₁t₁), …, (s_m t_m)]`` that every reshaped format decomposes.

    >>> import jax.numpy as jnp
    >>> regroup(jnp.zeros((32, 16 * 9)), (3, 3, 16, 32), (2, 2, 4), (2, 4, 4)).shape
    (9, 4, 8, 16)
    """
    kh, kw, _, _ = kernel_dims(kernel_shape)
    m = len(in_modes)
    x = jnp.reshape(matrix, (*out_modes, *in_modes, kh * kw))  # (t…, s…, p)
    perm = [2 * m] + [a for k in range(m) for a in (m + k, k)]  # (p, s₁, t₁, …)
    return jnp.transpose(x, perm).reshape(kh * kw, *(s * t for s, t in zip(in_modes, out_modes)))


def ungroup(tensor, kernel_shape, in_modes, out_modes):
    """Inverse of :func:`regroup`: ``X`` → ``W (cout, d)``."""
    kh, kw, cin, cout = kernel_dims(kernel_shape)
    m = len(in_modes)
    x = jnp.reshape(tensor, (kh * kw, *(a for pair in zip(in_modes, out_modes) for a in pair)))
    perm = [2 + 2 * k for k in range(m)] + [1 + 2 * k for k in range(m)] + [0]  # (t…, s…, p)
    return jnp.transpose(x, perm).reshape(cout, cin * kh * kw)


# ---------------------------------------------------------------------------------------------
# The four formats, each declared by its einsum labels


def _tucker(m):
    r = R_LETTERS
    return (SPATIAL + r[0],) + tuple(S_LETTERS[k] + T_LETTERS[k] + r[k + 1] for k in range(m)) + (r[: m + 1],)


def _tt(m):
    r = R_LETTERS
    channel = tuple(r[k] + S_LETTERS[k] + T_LETTERS[k] + (r[k + 1] if k < m - 1 else "") for k in range(m))
    return (SPATIAL + r[0],) + channel


def _tr(m):
    r = R_LETTERS
    channel = tuple(r[k + 1] + S_LETTERS[k] + T_LETTERS[k] + (r[k + 2] if k < m - 1 else r[0]) for k in range(m))
    return (r[0] + SPATIAL + r[1],) + channel


FORMATS = {  # kind → (labels(m), number of ranks(m))
    "r-cp": (lambda m: (SPATIAL + "r",) + tuple(S_LETTERS[k] + T_LETTERS[k] + "r" for k in range(m)), lambda m: 1),
    "r-tucker": (_tucker, lambda m: m + 1),
    "r-tt": (_tt, lambda m: m),
    "r-tr": (_tr, lambda m: m + 1),
}


@functools.lru_cache(maxsize=None)
def reshaped_labels(kind: str, m: int) -> tuple:
    """The einsum labels of the cores of ``kind`` with ``m`` channel modes (``p`` spatial, ``s_k``
    from ``abc…``, ``t_k`` from ``ijk…``, ranks from ``rst…`` in rank order).

    >>> reshaped_labels("r-tt", 3)
    ('pr', 'rais', 'sbjt', 'tck')
    """
    if kind not in FORMATS:
        raise ValueError(f"unknown reshaped format {kind!r}; expected one of {tuple(FORMATS)}")
    if not 1 <= m <= MAX_MODES:
        raise ValueError(f"{kind}: the number of channel modes must be 1..{MAX_MODES}; got {m}")
    return FORMATS[kind][0](m)


def sizes(kind: str, kernel_shape, in_modes, out_modes, ranks) -> dict:
    """Label → size for one kernel (``ranks`` in rank order)."""
    kh, kw, _, _ = kernel_dims(kernel_shape)
    m = len(in_modes)
    want = FORMATS[kind][1](m)
    if len(ranks) != want:
        raise ValueError(f"{kind} with m = {m} channel modes takes {want} rank(s); got {tuple(ranks)}")
    out = {SPATIAL: kh * kw, **{R_LETTERS[j]: int(r) for j, r in enumerate(ranks)}}
    out.update({S_LETTERS[k]: s for k, s in enumerate(in_modes)})
    out.update({T_LETTERS[k]: t for k, t in enumerate(out_modes)})
    return out


def core_shapes(kind: str, kernel_shape, in_modes, out_modes, ranks) -> tuple:
    """The core shapes of ``kind`` (in the order of :func:`reshaped_labels`).

    >>> core_shapes("r-tr", (3, 3, 16, 32), (2, 2, 4), (2, 4, 4), (2, 3, 4, 5))
    ((2, 9, 3), (3, 2, 2, 4), (4, 2, 4, 5), (5, 4, 4, 2))
    """
    size = sizes(kind, kernel_shape, in_modes, out_modes, ranks)
    return tuple(tuple(size[c] for c in label) for label in reshaped_labels(kind, len(in_modes)))


def dense_spec(kind: str, m: int) -> str:
    """Einsum from the cores to ``K`` as ``(p, s₁…s_m, t₁…t_m)``."""
    return ",".join(reshaped_labels(kind, m)) + "->" + SPATIAL + S_LETTERS[:m] + T_LETTERS[:m]


@dataclasses.dataclass(frozen=True)
class Reshaped:
    """A reshaped conv kernel (base of :class:`RCP`, :class:`RTucker`, :class:`RTT`, :class:`RTR`):
    ``cores`` in the order of :func:`reshaped_labels`, the channel modes, the kernel shape."""

    cores: tuple
    in_modes: tuple
    out_modes: tuple
    kernel_shape: tuple
    kind = ""

    @property
    def ranks(self) -> tuple:
        found = {}
        for label, core in zip(reshaped_labels(self.kind, len(self.in_modes)), self.cores):
            found.update({c: int(n) for c, n in zip(label, core.shape) if c in R_LETTERS})
        return tuple(found[c] for c in sorted(found, key=R_LETTERS.index))

    @property
    def dtype(self):
        return self.cores[0].dtype

    def dense(self):
        """The dense kernel ``(kh, kw, cin, cout)`` (tests and error evaluation; layers never form it)."""
        w = jnp.einsum(dense_spec(self.kind, len(self.in_modes)), *self.cores, precision=_HIGHEST)
        return w.reshape(self.kernel_shape)

    def __getattr__(self, name: str):
        return core_attribute(self, name)


def _register(cls):
    return jax.tree_util.register_dataclass(
        dataclasses.dataclass(frozen=True)(cls), data_fields=["cores"],
        meta_fields=["in_modes", "out_modes", "kernel_shape"])


@_register
class RCP(Reshaped):
    """Reshaped CP (``r-cp``): ``X = Σ_R a_p ∘ b₁ ∘ ⋯ ∘ b_m`` over the regrouped modes.

    >>> import jax.numpy as jnp
    >>> f = RCP((jnp.ones((9, 2)), jnp.ones((2, 2, 2)), jnp.ones((2, 2, 2))), (2, 2), (2, 2), (3, 3, 4, 4))
    >>> f.ranks, f.dense().shape
    ((2,), (3, 3, 4, 4))
    """

    kind = "r-cp"


@_register
class RTucker(Reshaped):
    """Reshaped Tucker (``r-tucker``): factors for ``p`` and each ``(s_k t_k)``, core last."""

    kind = "r-tucker"


@_register
class RTT(Reshaped):
    """Reshaped tensor train (``r-tt``), spatial core first: Garipov et al.'s TT-conv."""

    kind = "r-tt"


@_register
class RTR(Reshaped):
    """Reshaped tensor ring (``r-tr``): the TT chain closed by the rank ``r₀``."""

    kind = "r-tr"


CLASSES = {cls.kind: cls for cls in (RCP, RTucker, RTT, RTR)}


def zeros(kind: str, kernel_shape, ranks, dtype=jnp.float32, *, in_modes: Optional[tuple] = None,
          out_modes: Optional[tuple] = None) -> Reshaped:
    """A kernel of ``kind`` with zero cores (placeholders when loading)."""
    if in_modes is None or out_modes is None:
        m = NUM_MODES if kind == "r-cp" else len(ranks) - (kind != "r-tt")
        in_modes, out_modes = default_modes(kernel_shape, m)
    shapes = core_shapes(kind, kernel_shape, in_modes, out_modes, tuple(ranks))
    return CLASSES[kind](tuple(jnp.zeros(s, dtype) for s in shapes), tuple(in_modes), tuple(out_modes),
                         tuple(kernel_shape))
