"""The fine-tuning configuration: one frozen, validated, JSON-ready dataclass."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["FinetuneConfig"]

OPTIMIZERS = ("sgd", "adamw")
BATCH_NORM_MODES = ("frozen", "update")
MIX_MODES = ("none", "mixup", "cutmix")
TRAINING_IMPLEMENTATIONS = ("auto", "as-is", "factorized", "dense")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """How to distil a compressed student from its dense teacher (DESIGN.md §8).

    Attributes:
        epochs: passes over the training images (``N // batch_size`` steps each).
        batch_size: images per step (the last incomplete batch of an epoch is dropped: one shape,
            one compilation).
        learning_rate: peak learning rate of the warm-up + cosine schedule. The default, 0.002, is
            the safe one measured (experiments/finetune/README.md, "Recipe"): 0.01 distilled a
            Σ-sequential CP ResNet-32 better at 10% and 20% of the conv parameters, but diverged
            during the warm-up at 5% (accuracy 38% → 12%), where 0.002 reached 58%.
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: decoupled weight decay on kernels (arrays of rank ≥ 2), not on BN/biases.
        clip_norm: gradients are clipped to this global norm (``None``: no clipping); a badly
            initialised student (e.g. heavy Frobenius compression) otherwise starts with huge
            logits and gradients that wreck it in one step.
        warmup_fraction: fraction of the steps with a linear warm-up from 0.
        end_lr_fraction: the cosine decays to ``end_lr_fraction · learning_rate``.
        temperature: ``T`` of the ``T²·KL`` term.
        label_weight: ``α`` of the cross-entropy term (needs labels; 0: labels unused).
        feature_weight: ``β`` of the feature term on block outputs (0: off).
        batch_norm: ``"frozen"`` (running statistics fixed, inference-mode BN; its scale and
            offset still train) or ``"update"`` (training-mode BN: batch statistics, running
            statistics re-estimated by the moving average).
        augment: random crop (after ``pad`` pixels of padding) and horizontal flip.
        mix: ``"none"``, ``"mixup"`` or ``"cutmix"`` of each (augmented) image with a partner from
            its batch (:func:`~sigmadecomp.finetune.mix`); the teacher labels the mixed image, and the
            cross-entropy term, if any, weighs both images' labels by their share.
        mix_alpha: ``alpha`` of the ``Beta(alpha, alpha)`` mixing proportion.
        divergence_factor: the divergence guard (``None``: off). The loss is followed by a moving
            average over about ten steps; when a step's loss is not finite, or the average rises above
            ``divergence_factor`` times its lowest value so far, the run goes back to the last healthy
            state (parameters, BN statistics, optimizer state; saved every ``log_every`` steps while
            the average is within 25% of its lowest) and continues with half the learning rate. The
            step count, schedule and budget go on: the rolled-back steps are spent, not repeated.
            The default, 2, sits above the healthy runs of experiments/finetune (their smoothed
            6-step loss means rose at most 1.6× over their low, at lr 0.03) and far below the
            divergence of CP 5% at lr 0.01 (37×).
        implementation: how the factorized layers run while training (the returned model keeps
            the student's own setting): ``"auto"`` times one training step of each layer both ways
            and takes the faster (:func:`~sigmadecomp.finetune.training_implementations`; r-CP
            trains ~20× faster with its dense kernel rebuilt each step, plain CP faster as a
            chain), ``"as-is"`` keeps the student's, ``"factorized"`` / ``"dense"`` force one.
            Same function either way, to float rounding.
        balance: rescale every factorized layer's factors to equal Frobenius norms before training
            (:func:`~sigmadecomp.finetune.balance_factors`: same function, better-conditioned
            steps; the Σ fits leave orthonormal factors beside one core holding the whole norm).
        max_rollbacks: after this many rollbacks a further divergence ends the run
            (``stopped="diverged"``) with the last healthy state.
        time_limit: stop after this many seconds of training (evaluation and checkpoints not
            counted); ``None``: run every step. The schedule is step-based either way.
        log_every: steps between history entries (loss averaged over them, throughput).
        eval_every: steps between evaluations (``None``: at the end of every epoch).
        checkpoint_every: steps between checkpoints (``None``: at the end of every epoch).

    >>> FinetuneConfig(epochs=2, learning_rate=0.01).optimizer
    'sgd'
    """

    epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 0.002
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_norm: float | None = 5.0
    warmup_fraction: float = 0.05
    end_lr_fraction: float = 0.0
    temperature: float = 4.0
    label_weight: float = 0.0
    feature_weight: float = 0.0
    batch_norm: str = "frozen"
    augment: bool = True
    pad: int = 4
    mix: str = "none"
    mix_alpha: float = 1.0
    divergence_factor: float | None = 2.0
    max_rollbacks: int = 4
    implementation: str = "auto"
    balance: bool = False
    time_limit: float | None = None
    log_every: int = 10
    eval_every: int | None = None
    checkpoint_every: int | None = None

    def __post_init__(self):
        positive = dict(epochs=self.epochs, batch_size=self.batch_size, log_every=self.log_every)
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("learning_rate", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "label_weight", "feature_weight", "momentum", "pad"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("warmup_fraction", "end_lr_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {MIX_MODES}, got {self.mix!r}")
        if not self.mix_alpha > 0:
            raise ValueError(f"mix_alpha must be > 0, got {self.mix_alpha!r}")
        if self.implementation not in TRAINING_IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {TRAINING_IMPLEMENTATIONS}, got {self.implementation!r}")
        if not isinstance(self.balance, bool):
            raise ValueError(f"balance must be True or False, got {self.balance!r}")
        if self.batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"batch_norm must be one of {BATCH_NORM_MODES}, got {self.batch_norm!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm!r}")
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1 or None, got {self.divergence_factor!r}")
        if not isinstance(self.max_rollbacks, int) or isinstance(self.max_rollbacks, bool) or self.max_rollbacks < 0:
            raise ValueError(f"max_rollbacks must be an int >= 0, got {self.max_rollbacks!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds or None, got {self.time_limit!r}")

    def schedule(self, total_steps: int) -> optax.Schedule:
        """Linear warm-up from 0 to ``learning_rate``, then cosine decay to
        ``end_lr_fraction · learning_rate`` at ``total_steps`` (float32 throughout, so it also runs
        under strict dtype promotion, unlike optax's own cosine schedule).

        >>> lr = FinetuneConfig(learning_rate=0.1, warmup_fraction=0.1).schedule(100)
        >>> [round(float(lr(s)), 4) for s in (0, 5, 10, 55, 100)]
        [0.0, 0.05, 0.1, 0.05, 0.0]
        """
        warmup = int(round(self.warmup_fraction * total_steps))
        peak = np.float32(self.learning_rate)
        end = np.float32(self.end_lr_fraction * self.learning_rate)

        def lr(count):
            step = jnp.asarray(count, jnp.float32)
            rising = peak * step / np.float32(max(warmup, 1))
            progress = jnp.clip((step - np.float32(warmup)) / np.float32(max(total_steps - warmup, 1)), 0, 1)
            cosine = end + (peak - end) * np.float32(0.5) * (1 + jnp.cos(np.float32(np.pi) * progress))
            return jnp.where(step < np.float32(warmup), rising, cosine)

        return lr

    def optimizer_for(self, total_steps: int | None) -> optax.GradientTransformation:
        """The optax optimizer: SGD-Nesterov or AdamW, decoupled weight decay on kernels only.
        ``total_steps=None``: the same optimizer at learning rate 1 (the training step multiplies
        its updates by the scheduled rate itself, times the divergence guard's scale)."""
        lr = 1.0 if total_steps is None else self.schedule(total_steps)
        clip = [] if self.clip_norm is None else [optax.clip_by_global_norm(self.clip_norm)]
        if self.optimizer == "adamw":
            return optax.chain(*clip, optax.adamw(lr, weight_decay=self.weight_decay, mask=_kernel_mask))
        return optax.chain(*clip, optax.masked(optax.add_decayed_weights(self.weight_decay), _kernel_mask),
                           optax.sgd(lr, momentum=self.momentum, nesterov=True))


def _kernel_mask(params):
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
