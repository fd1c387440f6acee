"""Fine-tuning as the command line runs it: distil on the training batches of a CIFAR-10 folder
(never its test batch), after ``sigmadecomp compress`` or on a model saved by it."""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from sigmadecomp.data import cifar10_normalize, holdout, load_cifar10
from sigmadecomp.finetune._config import FinetuneConfig
from sigmadecomp.finetune._train import FinetuneResult, finetune
from sigmadecomp.finetune._validation import VALIDATION_METRICS, held_out_metrics

__all__ = ["distill_on_cifar10", "finetune_saved"]


def distill_on_cifar10(student: nnx.Module, teacher: nnx.Module, data_dir, *, epochs: int,
                       learning_rate: float = FinetuneConfig.learning_rate, key: jax.Array,
                       validation: int = 0, validation_metric: str = "accuracy", checkpoint_dir=None,
                       progress: bool = True) -> FinetuneResult:
    """:func:`finetune` on every image of ``data_dir``'s training batches (``data_batch_*``),
    labels unused (pure distillation), the other settings at :class:`FinetuneConfig`'s defaults.

    ``validation > 0`` holds that many labelled training images out (chosen by ``key``), evaluates
    them at the start and after every epoch (:func:`held_out_metrics`: accuracy and distillation
    loss), and returns the state with the best ``validation_metric`` (``"accuracy"``, highest, or
    ``"kl"``, lowest; ``keep_best``, ``history["best"]``), so the run never ends below its start
    by that measure on held-out data."""
    if validation_metric not in VALIDATION_METRICS:
        raise ValueError(f"validation_metric must be one of {sorted(VALIDATION_METRICS)}; got {validation_metric!r}")
    images, labels = load_cifar10(data_dir, "train")
    images = cifar10_normalize(images)
    config = FinetuneConfig(epochs=epochs, learning_rate=learning_rate)
    if not validation:
        return finetune(student, teacher, images, key=key, config=config, checkpoint_dir=checkpoint_dir,
                        progress=progress)
    (images, _), (held, held_labels) = holdout(images, labels, validation, key=jax.random.fold_in(key, 1))
    metric, mode = VALIDATION_METRICS[validation_metric]
    return finetune(student, teacher, images, key=key, config=config, checkpoint_dir=checkpoint_dir,
                    evaluate=held_out_metrics(teacher, held, held_labels, temperature=config.temperature),
                    keep_best=metric, keep_best_mode=mode, progress=progress)


def _accuracy(model, images, labels) -> float:
    from sigmadecomp.compress import predict_labels

    return float(np.mean(predict_labels(model, images) == labels))


def finetune_saved(*, model_dir, teacher_arch: str, teacher_weights, data_dir, eval_dir=None,
                   epochs: int, learning_rate: float = FinetuneConfig.learning_rate, key: int = 0,
                   validation: int = 0, validation_metric: str = "accuracy", save_dir=None, checkpoint_dir=None,
                   progress: bool = True) -> dict:
    """Distil a model saved by ``sigmadecomp compress --save`` from its dense teacher: what
    ``sigmadecomp finetune`` runs. Returns a JSON-ready dict with ``accuracy_before_finetune``,
    ``accuracy``, ``baseline_accuracy`` (the teacher), ``finetune_seconds``, ``finetune_epochs``,
    ``finetune_steps``, ``finetune_stopped``, ``finetune_rollbacks`` (divergence guard),
    ``finetune_best`` (with ``validation`` images held out: the kept state's step and its
    ``validation_metric`` value, see :func:`distill_on_cifar10`) and the configuration; ``save_dir`` receives the
    fine-tuned model."""
    from sigmadecomp.compress import ARCHS
    from sigmadecomp.models import pretrained_resnet
    from sigmadecomp.surgery import Plan, load, save

    if teacher_arch not in ARCHS:
        raise ValueError(f"teacher_arch must be one of {tuple(ARCHS)}; got {teacher_arch!r}")
    teacher = pretrained_resnet(ARCHS[teacher_arch], teacher_weights)
    student = load(model_dir, teacher)
    test_images, test_labels = load_cifar10(eval_dir or data_dir, "test")
    test_images = cifar10_normalize(test_images)
    before = _accuracy(student, test_images, test_labels)
    start = time.perf_counter()
    result = distill_on_cifar10(student, teacher, data_dir, epochs=epochs, learning_rate=learning_rate,
                                key=jax.random.key(key), validation=validation,
                                validation_metric=validation_metric, checkpoint_dir=checkpoint_dir, progress=progress)
    wall = time.perf_counter() - start
    if save_dir is not None:
        plan = Plan.from_dict(json.loads((pathlib.Path(model_dir) / "plan.json").read_text())["plan"])
        save(save_dir, result.model, plan)
    return dict(
        accuracy_before_finetune=before, accuracy=_accuracy(result.model, test_images, test_labels),
        baseline_accuracy=_accuracy(teacher, test_images, test_labels), num_eval_images=int(len(test_labels)),
        finetune_seconds=result.seconds, finetune_wall_seconds=wall, finetune_epochs=epochs,
        finetune_steps=result.steps, finetune_stopped=result.stopped, finetune_rollbacks=result.rollbacks,
        finetune_best=result.history.get("best"), history=result.history,
        config=dict(model=str(model_dir), teacher_arch=teacher_arch, teacher_weights=str(teacher_weights),
                    data=str(data_dir), eval_data=str(eval_dir or data_dir), learning_rate=learning_rate,
                    key=key, validation=validation, validation_metric=validation_metric, save=None if save_dir is None else str(save_dir)))
