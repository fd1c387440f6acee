"""Recover accuracy after compression: distil the compressed student from the dense teacher.

* :func:`finetune` — optax training of any compressed model (every factorized format) on
  ``T²·KL(teacher ‖ student)`` (+ cross-entropy, + feature matching on block outputs), with random
  crop + flip, warm-up + cosine schedule, frozen or updated BatchNorm, resumable checkpoints, a
  history, and (``keep_best``) the best evaluated state on held-out images
  (:func:`sigmadecomp.data.holdout`, :func:`held_out_metrics`: accuracy or distillation loss)
  instead of the last; configured by :class:`FinetuneConfig`,
  returns a :class:`FinetuneResult`;
* :func:`distill_on_cifar10`, :func:`finetune_saved` — what ``sigmadecomp compress --finetune-epochs``
  and ``sigmadecomp finetune`` run;
* :func:`training_implementations` — per factorized layer, train the chain or the dense kernel
  rebuilt from the factors, whichever step is faster here (``FinetuneConfig.implementation="auto"``);
* :func:`factorized_layers` — ``{path: layer}`` of a model's factorized layers;
* :func:`balance_factors` — equal factor norms per layer before training (``FinetuneConfig.balance``);
* :func:`reestimate_batch_norm` — no training: recompute BatchNorm statistics on calibration images;
* the pieces: :func:`distillation_loss`, :func:`kl_divergence`, :func:`feature_loss`,
  :func:`augment`, :func:`mix`, :func:`mix_labels`, :func:`resnet_block_outputs`, :func:`save_checkpoint` / :func:`load_checkpoint`.

    result = finetune(compressed, dense, train_images, key=jax.random.key(0),
                      config=FinetuneConfig(epochs=3, learning_rate=0.01))
    result.model, result.history["train"][-1]["loss"]
"""

from sigmadecomp.finetune._augment import augment, mix, mix_labels
from sigmadecomp.finetune._balance import balance_factors, factor_norms
from sigmadecomp.finetune._batch_norm import batch_norm_layers, reestimate_batch_norm
from sigmadecomp.finetune._checkpoint import load_checkpoint, save_checkpoint
from sigmadecomp.finetune._config import FinetuneConfig
from sigmadecomp.finetune._features import resnet_block_outputs
from sigmadecomp.finetune._implementations import apply_implementations, factorized_layers, training_implementations
from sigmadecomp.finetune._loss import distillation_loss, feature_loss, kl_divergence
from sigmadecomp.finetune._pipeline import distill_on_cifar10, finetune_saved
from sigmadecomp.finetune._train import FinetuneResult, finetune
from sigmadecomp.finetune._validation import VALIDATION_METRICS, held_out_metrics

__all__ = [
    "VALIDATION_METRICS",
    "FinetuneConfig",
    "FinetuneResult",
    "apply_implementations",
    "augment",
    "balance_factors",
    "mix",
    "mix_labels",
    "batch_norm_layers",
    "distill_on_cifar10",
    "distillation_loss",
    "factor_norms",
    "factorized_layers",
    "feature_loss",
    "finetune",
    "finetune_saved",
    "held_out_metrics",
    "kl_divergence",
    "load_checkpoint",
    "reestimate_batch_norm",
    "resnet_block_outputs",
    "save_checkpoint",
    "training_implementations",
]
