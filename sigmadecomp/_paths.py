"""How layers of a Flax NNX model are named everywhere (covariance keys, surgery plans, saving).

A layer's path is its attribute path in the module graph joined with dots, list indices included:
``"conv1"``, ``"layer1.0.conv2"``, ``"linear"``. One function makes the names, one finds the layers.
"""

from __future__ import annotations

from collections.abc import Iterator

from flax import nnx

__all__ = ["find_layers", "get_by_path", "path_to_str"]

DECOMPOSABLE = (nnx.Conv, nnx.Linear)


def path_to_str(path: tuple) -> str:
    """``('layer1', 0, 'conv2')`` → ``'layer1.0.conv2'``."""
    return ".".join(str(p) for p in path)


def find_layers(model: nnx.Module, types: tuple = DECOMPOSABLE) -> Iterator[tuple[str, nnx.Module]]:
    """Yield ``(path, layer)`` for every sub-module of ``model`` that is an instance of ``types``,
    in the module graph's (deterministic) traversal order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, types) and path:
            yield path_to_str(path), node


def get_by_path(model: nnx.Module, path: str) -> nnx.Module:
    """The sub-module at dotted ``path``; ``KeyError`` listing the valid layer paths if absent."""
    node = model
    try:
        for part in path.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
    except (AttributeError, IndexError, KeyError, TypeError):
        valid = ", ".join(p for p, _ in find_layers(model))
        raise KeyError(f"no layer at path {path!r}; decomposable layers are: {valid}") from None
    return node
