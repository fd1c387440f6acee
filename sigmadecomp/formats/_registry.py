"""The format registry: one :class:`FormatSpec` per format, read by ``plan``, the counts, the
layers' dispatch, save/load, the compression pipeline and the CLI.

Adding a format = its pytree (``sigmadecomp/_factorized.py``), its solver (an engine declaration,
``sigmadecomp/solvers/_<name>.py``), its layer and counts (``sigmadecomp/layers/_<name>.py``), a
rank-for-ratio rule, and ONE :func:`register` call. Nothing else lists formats.

The built-in formats are registered by ``sigmadecomp/formats/_builtin.py``, imported lazily on the
first lookup (so that the layers, solvers and surgery modules can import this registry at module
level without import cycles).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Optional

__all__ = ["FormatSpec", "format_names", "get", "register", "spec_of"]


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """Everything the package needs to know about one format.

    Attributes:
        name: the format's name in plans, files and on the command line (e.g. ``"tt"``).
        factorized: the pytree class (e.g. :class:`sigmadecomp.TT`); its fields are the factors.
        layer: the NNX conv layer class built from it (``layer.from_layer(conv, factorized)``).
        rank_names: names of the ranks in order, e.g. ``("r1", "r2", "r3")``.
        factor_shapes: ``(kernel_shape, ranks) -> {field: shape}`` for one group.
        count: ``(kernel_shape, ranks, *, groups, bias, in_spatial, out_spatial) -> Counts``.
        rank_for_ratio: ``(kernel_shape, ratio, *, groups, kernel=None) -> tuple``; rounds down.
        solver: ``(ranks, **options) -> AbstractSolver`` (``options``: e.g. ``max_steps``).
        check_ranks: ``(kernel_shape, ranks) -> None``; raises ``ValueError`` saying which rank
            exceeds which mode.
        dense_layer: the layer for ``nnx.Linear`` (``None``: convs only).
        expand_rank: turns one int into the full rank tuple (``None``: one int only for
            single-rank formats).
        description: one line for ``--help``.
    """

    name: str
    factorized: type
    layer: type
    rank_names: tuple
    factor_shapes: Callable
    count: Callable
    rank_for_ratio: Callable
    solver: Callable
    check_ranks: Callable
    dense_layer: Optional[type] = None
    expand_rank: Optional[Callable] = None
    description: str = ""

    def ranks_of(self, factorized) -> tuple:
        """The ranks of a factorized kernel of this format (read from its factor shapes)."""
        ranks = getattr(factorized, "ranks", None)
        if ranks is None:
            ranks = (factorized.rank,)
        return tuple(int(r) for r in ranks)

    def normalize_ranks(self, value) -> tuple:
        """An int or a sequence → the rank tuple; ``ValueError`` if it has the wrong length."""
        ranks = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if len(ranks) == 1 and self.expand_rank is not None and isinstance(value, int):
            ranks = tuple(self.expand_rank(value))
        if len(ranks) != len(self.rank_names) or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
            form = f"ranks ({', '.join(self.rank_names)}) of positive ints"
            if self.expand_rank is not None:
                form += " or one int for all"
            elif len(self.rank_names) == 1:
                form = "a rank that must be one positive int"
            raise ValueError(f"format {self.name!r} takes {form}; got {value!r}")
        return ranks

    def placeholder(self, kernel_shape, ranks, dtype):
        """A factorized kernel of zeros with the right shapes (overwritten by loaded weights)."""
        import jax.numpy as jnp

        shapes = self.factor_shapes(tuple(kernel_shape), tuple(ranks))
        arrays = {k: jnp.zeros(s, dtype) for k, s in shapes.items()}
        return self.factorized(**arrays, kernel_shape=tuple(kernel_shape))


_REGISTRY: dict[str, FormatSpec] = {}
_LOADED = False


def _ensure_builtin() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from sigmadecomp.formats import _builtin  # noqa: F401  (registers on import)


def register(spec: FormatSpec, *, replace: bool = False) -> FormatSpec:
    """Add ``spec`` to the registry (``replace=True`` to overwrite an existing name).

    >>> from sigmadecomp.formats import get, register
    >>> spec = get("tt")
    >>> register(spec, replace=True).name
    'tt'
    """
    if not isinstance(spec, FormatSpec):
        raise ValueError(f"register takes a FormatSpec; got {type(spec).__name__}")
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"format {spec.name!r} is already registered; pass replace=True to overwrite it")
    _REGISTRY[spec.name] = spec
    return spec


def format_names() -> tuple:
    """Registered format names in registration order.

    >>> format_names()[:4]
    ('svd', 'tucker2', 'cp', 'cp3')
    """
    _ensure_builtin()
    return tuple(_REGISTRY)


def get(name: str) -> FormatSpec:
    """The :class:`FormatSpec` of ``name``; ``ValueError`` listing the known names otherwise."""
    _ensure_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown format {name!r}; expected one of {format_names()}")
    return _REGISTRY[name]


def spec_of(factorized) -> FormatSpec:
    """The :class:`FormatSpec` whose pytree class ``factorized`` is an instance of."""
    _ensure_builtin()
    for spec in _REGISTRY.values():
        if type(factorized) is spec.factorized:
            return spec
    raise ValueError(f"expected a factorized kernel of a registered format "
                     f"({', '.join(s.factorized.__name__ for s in _REGISTRY.values())}); "
                     f"got {type(factorized).__name__}")


def largest_scale(count: Callable[[float], int], budget: float, *, upper: float = 1.0) -> float:
    """The largest ``α ∈ (0, upper]`` with ``count(α) <= budget`` for a count non-decreasing in
    ``α`` (bisection; the rank rules of the multi-rank formats share it)."""
    lo, hi = 0.0, upper
    if count(hi) <= budget:
        return hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if count(mid) <= budget else (lo, mid)
    return lo


def floor_rank(x: float, size: int) -> int:
    """``⌊x⌋`` clipped to ``[1, size]`` (a tiny epsilon keeps exact targets from losing a rank)."""
    return max(1, min(math.floor(x + 1e-9), size))
