"""Held-out metrics for ``finetune(evaluate=..., keep_best=...)``: the distillation loss on images
the student never trains on, and their accuracy when labels are known."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmadecomp.finetune._config import FinetuneConfig
from sigmadecomp.finetune._loss import kl_divergence

__all__ = ["VALIDATION_METRICS", "held_out_metrics"]

# keep_best criteria of the CIFAR pipeline and the CLI: metric name -> (evaluate key, mode)
VALIDATION_METRICS = {"accuracy": ("validation_accuracy", "max"), "kl": ("validation_kl", "min")}


def held_out_metrics(teacher: nnx.Module, images, labels=None, *,
                     temperature: float = FinetuneConfig.temperature,
                     batch_size: int = 256) -> Callable[[nnx.Module], dict]:
    """``model -> {"validation_kl": ..., "validation_accuracy": ...}`` on held-out ``images``.

    ``validation_kl`` is the distillation term ``T²·KL(teacher ‖ student)`` (the training loss
    without augmentation) on these images, averaged over them; the teacher's logits are computed
    once, here. ``validation_accuracy`` (only with ``labels``) is the student's top-1 accuracy.
    Use it as ``finetune(..., evaluate=held_out_metrics(...), keep_best="validation_kl",
    keep_best_mode="min")``: on images the teacher was trained on, held-out accuracy saturates
    (every state gets 95-99% right) while the loss keeps telling states apart.

    >>> import numpy as np
    >>> from flax import nnx
    >>> from sigmadecomp.models import SmallCNN
    >>> teacher = SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(0))
    >>> x = np.random.default_rng(0).random((6, 8, 8, 1), np.float32)
    >>> metrics = held_out_metrics(teacher, x, np.zeros(6, int))
    >>> metrics(teacher)["validation_kl"]
    0.0
    >>> metrics(SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(1)))["validation_kl"] > 0
    True
    """
    from sigmadecomp.compress import predict_logits

    images = np.asarray(images)
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch (N, ...); got shape {images.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must have shape {images.shape[:1]} (one per image); got {labels.shape}")
    target = jnp.asarray(predict_logits(teacher, images, batch_size=batch_size))

    def evaluate(model: nnx.Module) -> dict:
        logits = predict_logits(model, images, batch_size=batch_size)
        student = jnp.asarray(logits, target.dtype)  # (a float64 teacher beside a float32 student)
        out = {"validation_kl": max(float(kl_divergence(target, student, temperature=temperature)), 0.0)}
        if labels is not None:
            out["validation_accuracy"] = float(np.mean(np.argmax(logits, axis=-1) == labels))
        return out

    return evaluate
