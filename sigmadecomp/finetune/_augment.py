"""CIFAR augmentation inside jit: random crop after zero padding, and horizontal flip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["augment"]


def augment(key: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
    """Per image: pad ``pad`` pixels of zeros on each side, crop back to the original size at a
    random offset, and flip left-right with probability ½. ``images`` are NHWC and already
    normalised, so the padding is the mean colour (zero after normalisation). Same ``key``, same
    result; shapes are static, so this compiles once per batch shape.

    >>> import jax, jax.numpy as jnp
    >>> augment(jax.random.key(0), jnp.ones((2, 8, 8, 3))).shape
    (2, 8, 8, 3)
    """
    if images.ndim != 4:
        raise ValueError(f"augment expects NHWC images (N, H, W, C); got shape {images.shape}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    n, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if pad:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
        crop = lambda image, o: lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))  # noqa: E731
        images = jax.vmap(crop)(padded, offsets)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
        images = jnp.where(flips, images[:, :, ::-1, :], images)
    return images
