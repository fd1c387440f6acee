"""A small CNN for 8×8 grey images (scikit-learn's digits), used by ``sigmadecomp demo``."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

__all__ = ["SmallCNN"]


class SmallCNN(nnx.Module):
    """Three 3×3 convs (the last with stride 2), ReLU, then a dense classifier.

    ``conv1`` (1 → ``widths[0]``), ``conv2`` (→ ``widths[1]``), ``conv3`` (→ ``widths[2]``,
    stride 2), ``linear`` (flattened → ``num_classes``). ``conv2`` and ``conv3`` carry most of the
    conv parameters, so they are the layers worth compressing.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = SmallCNN(rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
    """

    def __init__(
        self,
        *,
        widths: Sequence[int] = (32, 64, 64),
        image_size: int = 8,
        in_channels: int = 1,
        num_classes: int = 10,
        rngs: nnx.Rngs,
    ):
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive ints; got {tuple(widths)!r}.")
        if image_size % 2:
            raise ValueError(f"image_size must be even (conv3 has stride 2); got {image_size}.")
        w1, w2, w3 = (int(w) for w in widths)
        self.conv1 = nnx.Conv(in_channels, w1, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(w1, w2, (3, 3), padding="SAME", rngs=rngs)
        self.conv3 = nnx.Conv(w2, w3, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.linear = nnx.Linear(w3 * (image_size // 2) ** 2, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.relu(self.conv3(x))
        return self.linear(x.reshape(x.shape[0], -1))
