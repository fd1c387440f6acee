"""The distillation objective (DESIGN.md §8).

    loss = T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))  +  α·CE(labels, z_s)  +  β·Σ_b ‖f_s,b − f_t,b‖² / ‖f_t,b‖²

``z_t``/``z_s`` are teacher/student logits and ``f_·,b`` the outputs of block ``b``. The ``T²``
factor keeps the gradient scale of the soft term independent of ``T`` (Hinton et al. 2015); the
feature term is normalised per block so deep and shallow blocks weigh alike whatever their scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["distillation_loss", "feature_loss", "kl_divergence"]


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Batch mean of ``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``; zero iff the softened outputs agree.

    >>> import jax.numpy as jnp
    >>> z = jnp.array([[1.0, 2.0, 3.0]])
    >>> float(kl_divergence(z, z, temperature=4.0))
    0.0
    """
    if teacher_logits.shape != student_logits.shape or teacher_logits.ndim != 2:
        raise ValueError(f"teacher and student logits must both be (batch, classes); got "
                         f"{teacher_logits.shape} and {student_logits.shape}")
    t = jnp.asarray(temperature, student_logits.dtype)
    log_p_t = jax.nn.log_softmax(teacher_logits / t, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return t * t * jnp.mean(kl)


def feature_loss(student_features: Sequence[jax.Array], teacher_features: Sequence[jax.Array]) -> jax.Array:
    """Sum over blocks of the relative squared error ``‖f_s − f_t‖² / ‖f_t‖²`` (batch totals)."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(f"need the same non-zero number of student and teacher features; got "
                         f"{len(student_features)} and {len(teacher_features)}")
    terms = []
    for s, t in zip(student_features, teacher_features):
        if s.shape != t.shape:
            raise ValueError(f"student feature of shape {s.shape} does not match the teacher's {t.shape}")
        terms.append(jnp.sum((s - t) ** 2) / (jnp.sum(t**2) + jnp.finfo(t.dtype).tiny))
    return sum(terms)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 4.0,
    labels: jax.Array | None = None,
    label_weight: float = 0.0,
    student_features: Sequence[jax.Array] = (),
    teacher_features: Sequence[jax.Array] = (),
    feature_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The total loss and its parts ``{"kl", "ce", "feature"}`` (zero when a term is off).
    ``labels`` are class indices ``(N,)`` or class probabilities ``(N, C)`` (e.g. the labels of
    mixed images, :func:`~sigmadecomp.finetune.mix_labels`).

    >>> import jax.numpy as jnp
    >>> z_t, z_s = jnp.array([[3.0, 0.0]]), jnp.array([[0.0, 3.0]])
    >>> total, parts = distillation_loss(z_s, z_t, temperature=1.0, labels=jnp.array([0]), label_weight=0.5)
    >>> bool(total > 0) and sorted(parts)
    ['ce', 'feature', 'kl']
    """
    kl = kl_divergence(teacher_logits, student_logits, temperature=temperature)
    zero = jnp.zeros((), student_logits.dtype)
    ce = zero
    if label_weight:
        if labels is None:
            raise ValueError("label_weight > 0 needs labels (or set label_weight=0 for pure distillation)")
        log_p = jax.nn.log_softmax(student_logits, axis=-1)
        if labels.ndim == 2:  # class probabilities
            ce = -jnp.mean(jnp.sum(labels.astype(log_p.dtype) * log_p, axis=-1))
        else:
            ce = -jnp.mean(jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1))
    feature = feature_loss(student_features, teacher_features) if feature_weight else zero
    total = kl + jnp.asarray(label_weight, kl.dtype) * ce + jnp.asarray(feature_weight, kl.dtype) * feature
    return total, {"kl": kl, "ce": ce, "feature": feature}
