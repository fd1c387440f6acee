"""Deterministic batching and sampling: every shuffle comes from an explicit PRNG ``key``."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

__all__ = ["batches", "holdout", "sample"]


def _check_pair(images, labels) -> tuple[np.ndarray, np.ndarray | None]:
    images = np.asarray(images)
    if images.ndim < 1:
        raise ValueError(f"images must have a leading example axis, got shape {images.shape}")
    if labels is None:
        return images, None
    labels = np.asarray(labels)
    if labels.shape[:1] != images.shape[:1]:
        raise ValueError(f"images and labels must have the same length, got {images.shape[0]} images "
                         f"and labels of shape {labels.shape}")
    return images, labels


def _order(n: int, key) -> np.ndarray:
    """``0..n-1``, shuffled by ``jax.random.permutation(key, n)`` when a key is given."""
    return np.arange(n) if key is None else np.asarray(jax.random.permutation(key, n))


def batches(
    images, labels=None, *, batch_size: int, key=None, drop_remainder: bool = False
) -> Iterator:
    """Yield consecutive batches (numpy arrays) of ``images`` (and ``labels``).

    Without ``key`` the order is the data's order; with ``key`` it is
    ``jax.random.permutation(key, N)``, so the same key always gives the same batches. Yields
    ``(images_batch, labels_batch)`` tuples when ``labels`` is given, else image batches alone. The
    last, smaller batch is kept unless ``drop_remainder=True``.

    >>> x, y = np.arange(10).reshape(5, 2), np.arange(5)
    >>> [b[1].tolist() for b in batches(x, y, batch_size=2)]
    [[0, 1], [2, 3], [4]]
    >>> [b.shape for b in batches(x, batch_size=2, key=jax.random.key(0), drop_remainder=True)]
    [(2, 2), (2, 2)]
    """
    images, labels = _check_pair(images, labels)
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = _order(images.shape[0], key)
    stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx] if labels is None else (images[idx], labels[idx])


def sample(images, labels=None, n: int = 0, *, key):
    """``n`` distinct examples chosen by ``key`` (the first ``n`` of ``permutation(key, N)``), e.g.
    a calibration set. Returns ``(images, labels)`` when labels are given, else the images alone.

    >>> x = np.arange(10)
    >>> sample(x, None, 3, key=jax.random.key(0)).shape
    (3,)
    """
    images, labels = _check_pair(images, labels)
    total = images.shape[0]
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= total:
        raise ValueError(f"n must be an int in 1..{total} (the number of examples), got {n!r}")
    idx = _order(total, key)[:n]
    return images[idx] if labels is None else (images[idx], labels[idx])


def holdout(images, labels=None, n: int = 0, *, key, exclude=None):
    """Split off ``n`` examples chosen by ``key`` as a validation set, e.g. to keep the best
    fine-tuning state (:func:`sigmadecomp.finetune.finetune`'s ``keep_best``) without touching the
    test set. Returns ``(rest, held_out)``, each ``(images, labels)`` when labels are given, else
    images alone; ``rest`` keeps the data's order. ``exclude``: indices never held out (e.g. the
    calibration images, so validation does not favour the model fitted on them).

    >>> x, y = np.arange(10) * 10, np.arange(10)
    >>> (x_train, y_train), (x_val, y_val) = holdout(x, y, 3, key=jax.random.key(0))
    >>> len(x_train), len(x_val), sorted(set(y_train) | set(y_val)) == list(range(10))
    (7, 3, True)
    >>> _, x_val = holdout(x, None, 2, key=jax.random.key(0), exclude=np.arange(8))
    >>> sorted(x_val.tolist())
    [80, 90]
    """
    images, labels = _check_pair(images, labels)
    total = images.shape[0]
    banned = np.zeros(total, bool)
    if exclude is not None:
        banned[np.asarray(exclude, dtype=int)] = True
    allowed = total - int(banned.sum())
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= allowed:
        raise ValueError(f"n must be an int in 1..{allowed} (the examples that may be held "
                         f"out), got {n!r}")
    order = _order(total, key)
    held = np.sort(order[~banned[order]][:n])
    keep = np.setdiff1d(np.arange(total), held)
    if labels is None:
        return images[keep], images[held]
    return (images[keep], labels[keep]), (images[held], labels[held])
