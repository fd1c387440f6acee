"""scikit-learn's 8×8 handwritten digits: a dataset that ships inside scikit-learn (no download).

1797 grey images of the digits 0–9 with 17 intensity levels (0–16). Used by ``sigmadecomp demo``,
which must run anywhere with nothing to fetch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

__all__ = ["Digits", "load_digits"]


class Digits(NamedTuple):
    """A deterministic train/test split of the digits; images NHWC float32 in [0, 1]."""

    train_images: np.ndarray  # (n_train, 8, 8, 1) float32
    train_labels: np.ndarray  # (n_train,) int32
    test_images: np.ndarray  # (n_test, 8, 8, 1) float32
    test_labels: np.ndarray  # (n_test,) int32


def load_digits(*, key: jax.Array, test_fraction: float = 0.25) -> Digits:
    """scikit-learn's digits, shuffled with ``key`` and split into train and test.

    Pixels are divided by 16 (the maximum intensity), so they lie in [0, 1].

    >>> import jax
    >>> d = load_digits(key=jax.random.key(0))
    >>> d.train_images.shape, d.test_images.shape, d.train_images.dtype
    ((1348, 8, 8, 1), (449, 8, 8, 1), dtype('float32'))
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must lie strictly between 0 and 1; got {test_fraction!r}. "
            "Pass e.g. test_fraction=0.25."
        )
    from sklearn.datasets import load_digits as _sk_load_digits  # heavy import, only when used

    bunch = _sk_load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., None]
    labels = bunch.target.astype(np.int32)
    order = np.asarray(jax.random.permutation(key, len(labels)))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return Digits(images[train], labels[train], images[test], labels[test])
