"""The configuration of a 2-D conv that a factorized layer must reproduce, normalised once.

:class:`ConvConfig` reads ``strides``, ``padding``, ``kernel_dilation`` and ``feature_group_count``
from an :class:`flax.nnx.Conv` (or from keyword arguments) and turns them into plain tuples, so the
factorized layers, the counts and the surgery plan all see the same, JSON-friendly values.
"""

from __future__ import annotations

import dataclasses
from typing import Union

from flax import nnx

__all__ = ["ConvConfig", "canonical_convs"]

Padding = Union[str, tuple[tuple[int, int], tuple[int, int]]]
_STRING_PADDINGS = ("SAME", "VALID", "CIRCULAR", "REFLECT")


def _pair(value, name: str) -> tuple[int, int]:
    """``None``/int/sequence → a pair of positive ints (Flax's broadcasting rule)."""
    if value is None:
        value = 1
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v >= 1 for v in value):
        raise ValueError(f"{name} must be a positive int or a pair of them for a 2-D conv; got {value!r}")
    return value


def normalize_padding(padding) -> Padding:
    """``'same'``/``'VALID'``/int/pairs → ``'SAME'``-like string or ``((top, bottom), (left, right))``."""
    if isinstance(padding, str):
        if padding.upper() in _STRING_PADDINGS:
            return padding.upper()
        raise ValueError(
            f"padding {padding!r} is not supported by factorized 2-D convs; use one of "
            f"{_STRING_PADDINGS} or explicit ((top, bottom), (left, right)) pairs"
        )
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pads) != 2 or not all(len(p) == 2 and all(isinstance(v, int) for v in p) for p in pads):
        raise ValueError(f"explicit padding must be two (low, high) int pairs for a 2-D conv; got {padding!r}")
    return pads


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    """Strides, padding, kernel dilation and feature groups of a 2-D conv, normalised."""

    strides: tuple[int, int] = (1, 1)
    padding: Padding = "SAME"
    kernel_dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self):
        object.__setattr__(self, "strides", _pair(self.strides, "strides"))
        object.__setattr__(self, "kernel_dilation", _pair(self.kernel_dilation, "kernel_dilation"))
        object.__setattr__(self, "padding", normalize_padding(self.padding))
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups (feature_group_count) must be a positive int; got {self.groups!r}")

    @classmethod
    def from_conv(cls, layer: nnx.Conv) -> ConvConfig:
        """Read the configuration of ``layer``; ``ValueError`` for what cannot be factorized."""
        if len(layer.kernel_size) != 2:
            raise ValueError(f"only 2-D convs can be factorized; got kernel_size {layer.kernel_size}")
        if _pair(layer.input_dilation, "input_dilation") != (1, 1):
            raise ValueError(
                f"input_dilation {layer.input_dilation} (a transposed conv) is not supported; "
                "leave this layer out of the plan (skip=...)"
            )
        if layer.mask is not None:
            raise ValueError("masked convs are not supported; leave this layer out of the plan (skip=...)")
        return cls(layer.strides, layer.padding, layer.kernel_dilation, layer.feature_group_count)

    def rows(self) -> dict:
        """Keyword arguments of the ``kh×1`` half of a separable conv (row stride/padding/dilation)."""
        return dict(strides=(self.strides[0], 1), padding=self._half(0),
                    kernel_dilation=(self.kernel_dilation[0], 1))

    def cols(self) -> dict:
        """Keyword arguments of the ``1×kw`` half of a separable conv."""
        return dict(strides=(1, self.strides[1]), padding=self._half(1),
                    kernel_dilation=(1, self.kernel_dilation[1]))

    def spatial(self) -> dict:
        """Keyword arguments of the full ``kh×kw`` conv (without groups)."""
        return dict(strides=self.strides, padding=self.padding, kernel_dilation=self.kernel_dilation)

    def _half(self, axis: int) -> Padding:
        # String paddings are computed per spatial axis by lax / Flax, and a size-1 kernel axis with
        # stride 1 gets no padding under each of them, so the string splits unchanged.
        if isinstance(self.padding, str):
            return self.padding
        return tuple(p if a == axis else (0, 0) for a, p in enumerate(self.padding))

    def to_dict(self) -> dict:
        padding = self.padding if isinstance(self.padding, str) else [list(p) for p in self.padding]
        return dict(strides=list(self.strides), padding=padding,
                    kernel_dilation=list(self.kernel_dilation), groups=self.groups)

    @classmethod
    def from_dict(cls, data: dict) -> ConvConfig:
        return cls(tuple(data["strides"]), data["padding"], tuple(data["kernel_dilation"]), data["groups"])



_CONV_ATTRS = ("kernel_size", "strides", "padding", "kernel_dilation", "input_dilation")


def _freeze(value):
    """Lists (at any depth) → tuples: the same configuration, but hashable."""
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _conv_issues(model: nnx.Module):
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Conv):
            for name in _CONV_ATTRS:
                value = getattr(node, name, None)
                if _freeze(value) != value or type(_freeze(value)) is not type(value):
                    yield node
                    break


def canonical_convs(model: nnx.Module) -> nnx.Module:
    """``model`` itself when every ``nnx.Conv`` configuration is hashable, else a copy whose convs
    hold their ``kernel_size``/``strides``/``padding``/``kernel_dilation``/``input_dilation`` as
    tuples (same layer, same outputs).

    Why: Flax accepts lists there (``padding=[(1, 1), (1, 1)]`` is a documented form), but a list
    inside a module makes its ``nnx.graphdef`` unhashable, and every jitted pass of the package
    (covariance taps, sequential stages, evaluation) takes the graphdef as a static argument. This
    is the one place that normalises it; :class:`ConvConfig` then reads the values.

    >>> from flax import nnx
    >>> conv = nnx.Conv(3, 4, (3, 3), padding=[(1, 1), (1, 1)], strides=[1, 1], rngs=nnx.Rngs(0))
    >>> canonical_convs(conv).padding
    ((1, 1), (1, 1))
    """
    if next(_conv_issues(model), None) is None:
        return model
    copy = nnx.clone(model)
    for node in list(_conv_issues(copy)):
        for name in _CONV_ATTRS:
            if hasattr(node, name):
                setattr(node, name, _freeze(getattr(node, name)))
    return copy
