"""Accuracy of a classifier on arrays of images, with one compiled forward pass per model shape."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["Accuracy", "evaluate"]


class Accuracy(NamedTuple):
    """``correct`` of ``total`` examples classified right; ``accuracy`` is their ratio."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@partial(jax.jit, static_argnums=0)
def _count_correct(graphdef, state, images, labels, mask):
    logits = nnx.merge(graphdef, state)(images)
    predicted = jnp.argmax(logits, axis=-1)
    hits = (predicted == labels.astype(predicted.dtype)) & mask  # int32 vs int64 under x64
    return jnp.sum(hits.astype(jnp.int32))


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
    """Pad the last batch to the full batch size so the forward pass compiles once."""
    pad = [(0, size - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, pad)


def evaluate(model: nnx.Module, images, labels, *, batch_size: int = 256) -> Accuracy:
    """Top-1 accuracy of ``model`` (a module mapping a batch of ``images`` to logits) on
    ``images`` (already preprocessed, e.g. :func:`sigmadecomp.data.cifar10_normalize`) and integer
    ``labels``. Batches of ``batch_size``; the last one is zero-padded and masked, so the jitted
    forward pass is compiled once per model architecture and batch shape.

    >>> from sigmadecomp.models import CifarResNet
    >>> model = CifarResNet(8, rngs=nnx.Rngs(0))
    >>> evaluate(model, np.zeros((3, 32, 32, 3), np.float32), np.zeros(3, np.int32)).total
    3
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 0 or images.shape[0] == 0:
        raise ValueError(f"images must hold at least one example, got shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({images.shape[0]},) to match images "
                         f"{images.shape}, got dtype {labels.dtype} shape {labels.shape}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    size = min(batch_size, images.shape[0])
    graphdef, state = nnx.split(model)
    correct = 0
    for start in range(0, images.shape[0], size):
        x, y = images[start : start + size], labels[start : start + size]
        mask = np.arange(size) < x.shape[0]
        count = _count_correct(graphdef, state, _pad_to(x, size), _pad_to(y, size), mask)
        correct += int(count)
    return Accuracy(correct, int(images.shape[0]))

