"""CIFAR augmentation inside jit: random crop after zero padding, horizontal flip, and mixup / cutmix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["augment", "mix", "mix_labels"]


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


def mix(key: jax.Array, images: jax.Array, *, mode: str, alpha: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mix every image with a partner from the same batch: ``(mixed, lam, partner)``.

    ``mode="mixup"``: ``lam·x + (1 − lam)·x[partner]`` with ``lam ~ Beta(alpha, alpha)`` per image.
    ``mode="cutmix"``: a box of area ``≈ (1 − lam)`` of ``x`` replaced by the same box of its partner;
    ``lam`` is returned as the fraction of ``x`` actually kept. ``partner`` is a random permutation of
    the batch, so a soft-label loss can weigh ``labels`` by ``lam`` and ``labels[partner]`` by
    ``1 − lam``. With distillation the teacher simply labels the mixed image: the inputs cover the
    space between the few training images, which is what a small training set lacks. Same key,
    same result; static shapes (compiles once per batch shape).

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    >>> mixed, lam, partner = mix(jax.random.key(0), x, mode="mixup")
    >>> mixed.shape, lam.shape, sorted(partner.tolist())
    ((2, 4, 4, 1), (2,), [0, 1])
    >>> bool(jnp.allclose(mixed, lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[partner]))
    True
    """
    if images.ndim != 4:
        raise ValueError(f"mix expects NHWC images (N, H, W, C); got shape {images.shape}")
    if mode not in ("mixup", "cutmix"):
        raise ValueError(f"mode must be 'mixup' or 'cutmix', got {mode!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    n, h, w, _ = images.shape
    perm_key, lam_key, box_key = jax.random.split(key, 3)
    partner = jax.random.permutation(perm_key, n)
    lam = jax.random.beta(lam_key, alpha, alpha, (n,), dtype=images.dtype)
    other = images[partner]
    if mode == "mixup":
        weight = lam[:, None, None, None]
        return weight * images + (1 - weight) * other, lam, partner
    # cutmix: a box of side sqrt(1 - lam) of the image's sides, centred uniformly, clipped at the edges
    side = jnp.sqrt(1 - lam)
    bh, bw = jnp.round(side * h), jnp.round(side * w)
    centre = jax.random.uniform(box_key, (n, 2), dtype=images.dtype) * jnp.array([[h, w]], images.dtype)
    top, left = jnp.clip(centre[:, 0] - bh / 2, 0, h), jnp.clip(centre[:, 1] - bw / 2, 0, w)
    bottom, right = jnp.clip(centre[:, 0] + bh / 2, 0, h), jnp.clip(centre[:, 1] + bw / 2, 0, w)
    rows, cols = jnp.arange(h, dtype=images.dtype), jnp.arange(w, dtype=images.dtype)
    inside_r = (rows[None, :] >= top[:, None]) & (rows[None, :] < bottom[:, None])
    inside_c = (cols[None, :] >= left[:, None]) & (cols[None, :] < right[:, None])
    box = (inside_r[:, :, None] & inside_c[:, None, :])[..., None]
    kept = 1 - jnp.mean(box.astype(images.dtype), axis=(1, 2, 3))
    return jnp.where(box, other, images), kept, partner


def mix_labels(labels: jax.Array, lam: jax.Array, partner: jax.Array, num_classes: int) -> jax.Array:
    """Class probabilities of images mixed by :func:`mix`: ``lam·onehot(y) + (1 − lam)·onehot(y[partner])``.

    >>> import jax.numpy as jnp
    >>> mix_labels(jnp.array([0, 1]), jnp.array([0.75, 1.0]), jnp.array([1, 0]), 3).tolist()
    [[0.75, 0.25, 0.0], [0.0, 1.0, 0.0]]
    """
    onehot = jax.nn.one_hot(labels, num_classes, dtype=lam.dtype)
    share = lam[:, None]
    return share * onehot + (1 - share) * onehot[partner]
