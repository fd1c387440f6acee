"""Distillation fine-tuning of a compressed student from its dense teacher (DESIGN.md §8).

The training state is three pytrees — trainable parameters (every ``nnx.Param``), the rest of the
student (BatchNorm statistics, ...) and the optax state — advanced by one jit-compiled step. Every
random choice derives from the caller's ``key`` and the step number (shuffle of epoch ``e``:
``fold_in(shuffle_key, e)``; augmentation of step ``s``: ``fold_in(augment_key, s)``), so a run
resumed from a checkpoint retraces the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sigmadecomp.finetune._augment import augment, mix, mix_labels
from sigmadecomp.finetune._balance import balance_factors
from sigmadecomp.finetune._checkpoint import checkpoint_meta, load_checkpoint, save_checkpoint
from sigmadecomp.finetune._config import FinetuneConfig
from sigmadecomp.finetune._features import default_features
from sigmadecomp.finetune._implementations import (apply_implementations, factorized_layers,
                                                   training_implementations)
from sigmadecomp.finetune._loss import distillation_loss

__all__ = ["FinetuneResult", "finetune"]

Features = Callable[[nnx.Module, jax.Array], tuple[jax.Array, list]]


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned student (inference mode) and what happened.

    ``history`` is JSON-ready: ``{"train": [...], "eval": [...], "guard": [...]}`` (plus ``"best"`` when
    ``keep_best`` chose the returned state: ``metric``, ``mode``, ``step``, ``value``). Train entries (every
    ``log_every`` steps): ``step``, ``epoch``, ``loss``, ``kl``, ``ce``, ``feature`` (means over the
    interval), ``learning_rate``, ``seconds`` (training time so far, evaluation and checkpoints
    excluded), ``images_per_second`` (over the interval). Eval entries: ``step``, ``seconds`` and
    whatever ``evaluate`` returned (one before the first step, then every ``eval_every`` steps).
    Guard entries (one per divergence): ``step``, ``loss``, ``average``, ``lowest``,
    ``restored_step``, ``learning_rate_scale`` (after the rollback), ``stopped``.
    """

    model: nnx.Module
    history: dict
    steps: int  # steps taken in total (including those of a resumed run)
    seconds: float  # training seconds in total
    compilations: int  # compiled versions of the train step (1: no recompilation)
    stopped: str  # "completed", "time_limit" or "diverged" (the divergence guard gave up)
    resumed_from: int  # step the run resumed from (0: fresh start)
    rollbacks: int = 0  # divergence-guard rollbacks (each halved the learning rate)
    best_step: int | None = None  # with keep_best: the step of the returned state (0: the start)


def _split(student: nnx.Module, config: FinetuneConfig, implementations: dict):
    student = nnx.clone(student)
    if config.balance:
        balance_factors(student)
    apply_implementations(student, implementations)
    student.train() if config.batch_norm == "update" else student.eval()
    return nnx.split(student, nnx.Param, ...)


def _implementations(student, config: FinetuneConfig, batch_shape: tuple) -> dict:
    """``{path: implementation}`` the student trains with (see ``FinetuneConfig.implementation``)."""
    if config.implementation == "auto":
        return {p: c["implementation"] for p, c in training_implementations(student, batch_shape).items()}
    if config.implementation == "as-is":
        return {}
    return {p: config.implementation for p in factorized_layers(student)}


@functools.lru_cache(maxsize=16)
def _make_step(graphdef, teacher_graphdef, config: FinetuneConfig, total: int, features: Features | None):
    """The jitted train step, cached: a second run with the same models, configuration and number of
    steps reuses the compiled step instead of compiling it again."""
    tx = config.optimizer_for(None)  # learning rate 1: the step scales the updates itself
    lr = config.schedule(total)
    use_features = config.feature_weight > 0

    def forward(model, x):
        return features(model, x) if use_features else (model(x), [])

    def step(params, rest, opt_state, teacher_state, images, labels, key, count, lr_scale):
        mixed = config.mix != "none"
        augment_key, mix_key = jax.random.split(key) if mixed else (key, None)  # mix "none": as before
        x = augment(augment_key, images, pad=config.pad) if config.augment else images
        if mixed:
            x, lam, partner = mix(mix_key, x, mode=config.mix, alpha=config.mix_alpha)
        t_logits, t_features = jax.lax.stop_gradient(forward(nnx.merge(teacher_graphdef, teacher_state), x))
        if mixed and config.label_weight:  # each image's label weighed by its share of the mix
            labels = mix_labels(labels, lam, partner, t_logits.shape[-1])

        def loss_fn(params):
            # copy=True: fresh Variables at this trace level, so training-mode BatchNorm may update them.
            model = nnx.merge(graphdef, params, rest, copy=True)
            logits, s_features = forward(model, x)
            loss, parts = distillation_loss(
                logits, t_logits, temperature=config.temperature, labels=labels,
                label_weight=config.label_weight, student_features=s_features,
                teacher_features=t_features, feature_weight=config.feature_weight)
            return loss, (parts, nnx.split(model, nnx.Param, ...)[2])

        (loss, (parts, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        rate = lr(count) * lr_scale  # the schedule at this step; lr_scale < 1 after a rollback
        params = jax.tree_util.tree_map(lambda p, u: p + (u * rate).astype(p.dtype), params, updates)
        return params, new_rest, opt_state, dict(parts, loss=loss)

    return jax.jit(step)


def _check_data(images, labels, config: FinetuneConfig):
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be preprocessed NHWC inputs (N, H, W, C); got shape {images.shape}")
    if images.shape[0] < config.batch_size:
        raise ValueError(f"{images.shape[0]} images are fewer than one batch (batch_size="
                         f"{config.batch_size}); lower batch_size")
    if labels is None:
        if config.label_weight:
            raise ValueError("label_weight > 0 needs labels; pass labels= or set label_weight=0")
        return images, np.zeros(images.shape[0], np.int32)
    labels = np.asarray(labels)
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    return images, labels.astype(np.int32)


# Settings that do not change the trajectory: a run may be resumed with other values.
_CADENCE = ("time_limit", "log_every", "eval_every", "checkpoint_every")


def _fingerprint(config: FinetuneConfig, key, num_images: int) -> dict:
    trajectory = {k: v for k, v in dataclasses.asdict(config).items() if k not in _CADENCE}
    return dict(config=trajectory, key=np.asarray(jax.random.key_data(key)).tolist(), num_images=num_images)


def _eval_entry(evaluate, graphdef, params, rest, step: int, seconds: float) -> dict:
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return dict(step=step, seconds=round(seconds, 3), **evaluate(model))


def finetune(
    student: nnx.Module,
    teacher: nnx.Module,
    images,
    labels=None,
    *,
    key: jax.Array,
    config: FinetuneConfig = FinetuneConfig(),
    evaluate: Callable[[nnx.Module], dict] | None = None,
    checkpoint_dir=None,
    features: Features | None = None,
    keep_best: str | None = None,
    keep_best_mode: str = "max",
    progress: bool = True,
) -> FinetuneResult:
    """Distil ``student`` (e.g. a compressed model, any factorized format) from ``teacher``.

    Minimises ``T²·KL(teacher ‖ student)`` (+ ``α·CE`` on ``labels``, + ``β``·feature term) on
    augmented ``images`` with the optax optimizer and warm-up + cosine schedule of ``config``.
    Neither input model is modified. The train step is compiled once.

    Args:
        student, teacher: NNX models mapping ``images`` to logits of the same shape.
        images: preprocessed training inputs, NHWC (never the test set).
        labels: integer labels, only needed when ``config.label_weight > 0``.
        key: PRNG key of the shuffles and augmentations.
        config: a :class:`FinetuneConfig`.
        evaluate: ``model -> dict`` of numbers (e.g. test accuracy), called on an inference-mode
            copy before the first step and every ``eval_every`` steps; its time is not counted.
        checkpoint_dir: if given, the training state is saved there every ``checkpoint_every``
            steps and at the end, and a run started with a checkpoint there resumes from it (same
            student, teacher, data, key and config; anything else is an error).
        features: ``(model, x) -> (logits, [block outputs])`` for the feature term; default: the
            residual blocks' outputs of a :class:`sigmadecomp.models.CifarResNet`.
        keep_best: a key of ``evaluate``'s dict to maximise, e.g. the accuracy on labelled images
            held out of ``images`` (:func:`sigmadecomp.data.holdout`; never the test set): the
            returned model is the evaluated state with the highest value, the starting student
            included, so the run never hands back a model worse than the one it was given by that
            measure (ties keep the earlier state). Needs ``evaluate``; checkpoints keep the best
            state too.
        keep_best_mode: ``"max"`` (an accuracy) or ``"min"`` (a loss, e.g. ``validation_kl`` of
            :func:`held_out_metrics`, which keeps resolving where held-out accuracy saturates).
        progress: show a tqdm bar with the loss and the throughput.

    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from sigmadecomp.models import SmallCNN
    >>> teacher = SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(0))
    >>> student = SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(1))
    >>> images = np.random.default_rng(0).random((32, 8, 8, 1), np.float32)
    >>> result = finetune(student, teacher, images, key=jax.random.key(0), progress=False,
    ...                   config=FinetuneConfig(epochs=2, batch_size=16, learning_rate=0.05))
    >>> result.steps, result.compilations
    (4, 1)

    Keep the best state by accuracy on held-out labelled images:

    >>> from sigmadecomp.data import holdout
    >>> labels = np.arange(32) % 10
    >>> (x, y), (x_val, y_val) = holdout(images, labels, 8, key=jax.random.key(1))
    >>> accuracy = lambda m: {"val": float(np.mean(np.argmax(m(x_val), -1) == y_val))}
    >>> result = finetune(student, teacher, x, key=jax.random.key(0), progress=False, evaluate=accuracy,
    ...                   keep_best="val", config=FinetuneConfig(epochs=2, batch_size=8))
    >>> result.best_step in (0, 3, 6)
    True
    """
    if keep_best_mode not in ("max", "min"):
        raise ValueError(f"keep_best_mode must be 'max' or 'min'; got {keep_best_mode!r}")
    if keep_best is not None and evaluate is None:
        raise ValueError("keep_best needs evaluate (a model -> dict function whose dict holds "
                         f"{keep_best!r})")
    images, labels = _check_data(images, labels, config)
    features = features or default_features(student, teacher, config.feature_weight)
    steps_per_epoch = images.shape[0] // config.batch_size
    total = config.epochs * steps_per_epoch
    tx = config.optimizer_for(None)
    implementations = None
    if checkpoint_dir is not None:  # a resumed run trains with the implementations it started with
        implementations = checkpoint_meta(checkpoint_dir).get("history", {}).get("implementations")
    if implementations is None:
        implementations = _implementations(student, config, (config.batch_size, *images.shape[1:]))
    graphdef, params, rest = _split(student, config, implementations)
    teacher = nnx.clone(teacher)
    teacher.eval()
    teacher_graphdef, teacher_state = nnx.split(teacher)
    opt_state = tx.init(params)
    shuffle_key, augment_key = jax.random.split(key)
    fingerprint = _fingerprint(config, key, images.shape[0])
    history = {"train": [], "eval": [], "guard": [], "implementations": implementations}
    start, seconds = 0, 0.0
    state = [params, rest, opt_state]
    guard = _Guard(config.divergence_factor, config.max_rollbacks, list(state), events=history["guard"])
    best = _Best(keep_best, state[:2], keep_best_mode)
    resumed = _resume(checkpoint_dir, state, guard, best, fingerprint)
    if resumed is not None:
        state, history, start, seconds = resumed
        params, rest = state[0], state[1]
    loop = _Loop(config, images, labels, steps_per_epoch, shuffle_key, augment_key, evaluate, graphdef, best)
    step_fn = _make_step(graphdef, teacher_graphdef, config, total, features)
    if evaluate is not None and start == 0:
        loop.evaluate_at(state, 0, 0.0, history)
    bar = tqdm(total=total, initial=start, desc="distillation", disable=not progress, unit="step")
    save = functools.partial(_save, checkpoint_dir, state, guard, best, history, fingerprint)
    step, seconds, stopped = loop.run(step_fn, state, guard, teacher_state, start, total, seconds, history,
                                      bar, save)
    bar.close()
    save(step, seconds)
    final = state
    if keep_best is not None and best.step is not None:
        final = best.state
        history["best"] = dict(metric=keep_best, mode=keep_best_mode, step=best.step, value=best.value)
    model = nnx.merge(graphdef, final[0], final[1])
    model.eval()
    apply_implementations(model, {p: layer.implementation for p, layer in factorized_layers(student).items()})
    return FinetuneResult(model, history, step, seconds, step_fn._cache_size(), stopped, start,
                          guard.rollbacks, best.step if keep_best is not None else None)


def _resume(folder, state: list, guard: _Guard, best: _Best, fingerprint: dict):
    """``(state, history, step, seconds)`` of the checkpoint in ``folder`` (the guard restored with
    its snapshot, the best state with its step), or ``None`` when there is none."""
    if folder is None:
        return None
    meta = checkpoint_meta(folder)
    if meta and meta.get("fingerprint") != fingerprint:
        raise ValueError(f"the checkpoint in {folder} was made with another config, key or "
                         "data size; use the same ones to resume, or another folder")
    made = meta.get("best", {}) if meta else {}
    if meta and (made.get("metric"), made.get("mode", "max")) != (best.metric, best.mode):
        raise ValueError(f"the checkpoint in {folder} was made with keep_best={made.get('metric')!r}, "
                         f"keep_best_mode={made.get('mode', 'max')!r}, not {best.metric!r}, {best.mode!r}; "
                         "use the same to resume")
    like = dict(state=_named(state), snapshot=_named(state))
    if best.metric is not None:
        like["best"] = _named_model(state)
    loaded = load_checkpoint(folder, like)
    if loaded is None:
        return None
    trees, meta = loaded
    guard.restore(meta["guard"], _unnamed(trees["snapshot"]), meta["history"]["guard"])
    if best.metric is not None:
        best.restore(meta["best"], [trees["best"]["params"], trees["best"]["rest"]])
    return _unnamed(trees["state"]), meta["history"], meta["step"], meta["seconds"]


def _named(state: list) -> dict:
    return dict(params=state[0], rest=state[1], opt_state=state[2])


def _named_model(state: list) -> dict:
    """The model part of a state (no optimizer state): what keep_best returns."""
    return dict(params=state[0], rest=state[1])


def _unnamed(trees: dict) -> list:
    return [trees["params"], trees["rest"], trees["opt_state"]]


def _save(folder, state, guard, best, history, fingerprint, step, seconds):
    if folder is None:
        return
    trees = dict(state=_named(state), snapshot=_named(guard.snapshot))
    if best.metric is not None:
        trees["best"] = _named_model(best.state)
    save_checkpoint(folder, trees, dict(step=step, seconds=seconds, history=history, fingerprint=fingerprint,
                                        guard=guard.meta(), best=best.meta()))


@dataclasses.dataclass
class _Best:
    """``keep_best``: the evaluated state with the best (highest, or lowest for ``mode="min"``)
    ``metric`` so far."""

    metric: str | None
    state: list  # [params, rest]: the model only, never resumed from (immutable arrays: no copy)
    mode: str = "max"
    step: int | None = None
    value: float | None = None

    def consider(self, entry: dict, state: list):
        if self.metric is None:
            return
        if self.metric not in entry:
            raise KeyError(f"keep_best={self.metric!r} is not a key of evaluate's dict "
                           f"{sorted(k for k in entry if k not in ('step', 'seconds'))}")
        value = float(entry[self.metric])
        better = self.step is None or (value > self.value if self.mode == "max" else value < self.value)
        if np.isfinite(value) and better:
            self.state, self.step, self.value = state[:2], entry["step"], value

    def meta(self) -> dict:
        return dict(metric=self.metric, mode=self.mode, step=self.step, value=self.value)

    def restore(self, meta: dict, state: list):
        self.state, self.step, self.value = state, meta["step"], meta["value"]


@dataclasses.dataclass
class _Guard:
    """The divergence guard (``FinetuneConfig.divergence_factor``): a moving average of the loss,
    its lowest value, the last healthy training state and the learning-rate scale."""

    factor: float | None
    max_rollbacks: int
    snapshot: list  # [params, rest, opt_state] at snapshot_step (arrays are immutable: no copy)
    snapshot_step: int = 0
    snapshot_average: float | None = None
    scale: float = 1.0
    average: float | None = None
    lowest: float = float("inf")
    rollbacks: int = 0
    events: list = dataclasses.field(default_factory=list)

    DECAY = 0.9  # moving average over about ten steps
    HEALTHY = 1.25  # snapshots only while the average is within 25% of its lowest

    def observe(self, loss: float) -> bool:
        """Follow one step's loss; ``True`` when the run diverges."""
        if self.factor is None:
            return False
        if not np.isfinite(loss):
            return True
        self.average = loss if self.average is None else self.DECAY * self.average + (1 - self.DECAY) * loss
        self.lowest = min(self.lowest, self.average)
        return self.average > self.factor * self.lowest

    def remember(self, state: list, step: int):
        if self.factor is not None and self.average is not None and self.average <= self.HEALTHY * self.lowest:
            self.snapshot, self.snapshot_step, self.snapshot_average = list(state), step, self.average

    def roll_back(self, state: list, step: int, loss: float) -> bool:
        """Restore the snapshot into ``state``; ``False`` (state restored, run to stop) when the
        rollbacks are used up."""
        state[:] = self.snapshot
        give_up = self.rollbacks >= self.max_rollbacks
        if not give_up:
            self.rollbacks += 1
            self.scale *= 0.5
        self.events.append(dict(step=step, loss=loss, average=self.average, lowest=self.lowest,
                                restored_step=self.snapshot_step, learning_rate_scale=self.scale,
                                stopped=give_up))
        self.average = self.snapshot_average
        return not give_up

    def meta(self) -> dict:
        return dict(snapshot_step=self.snapshot_step, snapshot_average=self.snapshot_average, scale=self.scale, average=self.average,
                    lowest=self.lowest if np.isfinite(self.lowest) else None, rollbacks=self.rollbacks)

    def restore(self, meta: dict, snapshot: list, events: list):
        self.snapshot, self.snapshot_step = snapshot, meta["snapshot_step"]
        self.snapshot_average = meta["snapshot_average"]
        self.scale, self.average, self.rollbacks = meta["scale"], meta["average"], meta["rollbacks"]
        self.lowest = float("inf") if meta["lowest"] is None else meta["lowest"]
        self.events = events


@dataclasses.dataclass
class _Loop:
    """The host loop: batches, logging, evaluation and checkpoint cadence, the time limit."""

    config: FinetuneConfig
    images: np.ndarray
    labels: np.ndarray
    steps_per_epoch: int
    shuffle_key: jax.Array
    augment_key: jax.Array
    evaluate: Callable | None
    graphdef: object
    best: _Best

    def evaluate_at(self, state: list, step: int, seconds: float, history: dict):
        entry = _eval_entry(self.evaluate, self.graphdef, state[0], state[1], step, seconds)
        history["eval"].append(entry)
        self.best.consider(entry, state)

    def batch(self, step: int):
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.asarray(jax.random.permutation(jax.random.fold_in(self.shuffle_key, epoch), len(self.images)))
        idx = order[i * self.config.batch_size : (i + 1) * self.config.batch_size]
        return jnp.asarray(self.images[idx]), jnp.asarray(self.labels[idx])

    def run(self, step_fn, state, guard, teacher_state, start, total, seconds, history, bar, save):
        c, spe = self.config, self.steps_per_epoch
        eval_every, ckpt_every = c.eval_every or spe, c.checkpoint_every or spe
        lr = c.schedule(total)
        sums, count, tic = {}, 0, time.perf_counter()
        interval_start = seconds
        step, stopped = start, "completed"
        while step < total:
            images, labels = self.batch(step)
            previous = list(state)  # the state this step's loss is measured on
            *new_state, parts = step_fn(*state, teacher_state, images, labels,
                                       jax.random.fold_in(self.augment_key, step), np.int32(step),
                                       np.float32(guard.scale))
            parts = {k: float(v) for k, v in parts.items()}  # waits for the step: honest timing
            step += 1
            if guard.observe(parts["loss"]):
                if not guard.roll_back(state, step, parts["loss"]):
                    stopped = "diverged"
                    break
                parts = {}  # the diverged step is not logged as a loss
            else:
                state[:] = new_state
            now = time.perf_counter()
            seconds, tic = seconds + (now - tic), now
            if parts:
                sums = {k: sums.get(k, 0.0) + v for k, v in parts.items()}
                count += 1
            if (step % c.log_every == 0 or step == total) and count:
                rate = count * c.batch_size / max(seconds - interval_start, 1e-9)
                history["train"].append(dict(
                    step=step, epoch=round(step / spe, 4), **{k: v / count for k, v in sums.items()},
                    learning_rate=float(lr(step)) * guard.scale, seconds=round(seconds, 3),
                    images_per_second=round(rate, 2)))
                bar.set_postfix(loss=f"{sums['loss'] / count:.4f}", img_s=f"{rate:.0f}")
                sums, count, interval_start = {}, 0, seconds
                guard.remember(previous, step - 1)  # validated by this step's loss, unlike the new state
            bar.update(1)
            limit_hit = c.time_limit is not None and seconds >= c.time_limit
            if self.evaluate is not None and (step % eval_every == 0 or step == total or limit_hit):
                self.evaluate_at(state, step, seconds, history)
            if step % ckpt_every == 0 and step < total:
                save(step, seconds)
            tic = time.perf_counter()
            if limit_hit and step < total:
                stopped = "time_limit"
                break
        return step, seconds, stopped
