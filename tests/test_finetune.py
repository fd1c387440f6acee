"""sigmadecomp.finetune: the loss against closed forms, augmentation, BatchNorm re-estimation
against directly computed statistics, and training of every factorized format (one compilation,
key-determinism, exact resume from a checkpoint)."""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sigmadecomp import compress, formats
from sigmadecomp import finetune as ft
from sigmadecomp.models import CifarResNet, SmallCNN


def _params(model):
    return jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))


def _images(n, size=8, channels=1, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, channels)).astype(np.float32)


# ---------------------------------------------------------------- loss


def test_kl_matches_the_closed_form_and_scales_with_t_squared():
    rng = np.random.default_rng(0)
    z_t, z_s = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    for t in (1.0, 3.0):
        p, q = np.exp(z_t / t), np.exp(z_s / t)
        p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
        expected = t * t * np.mean(np.sum(p * np.log(p / q), axis=1))
        got = float(ft.kl_divergence(jnp.asarray(z_t), jnp.asarray(z_s), temperature=t))
        assert got == pytest.approx(expected, rel=1e-9)
    assert float(ft.kl_divergence(jnp.asarray(z_t), jnp.asarray(z_t))) == pytest.approx(0.0, abs=1e-12)


def test_distillation_loss_adds_cross_entropy_and_features():
    rng = np.random.default_rng(1)
    z_t, z_s = jnp.asarray(rng.normal(size=(6, 3))), jnp.asarray(rng.normal(size=(6, 3)))
    labels = jnp.asarray([0, 1, 2, 0, 1, 2])
    f_t, f_s = [jnp.ones((6, 2))], [jnp.full((6, 2), 1.5)]
    total, parts = ft.distillation_loss(z_s, z_t, temperature=2.0, labels=labels, label_weight=0.3,
                                        student_features=f_s, teacher_features=f_t, feature_weight=2.0)
    ce = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z_s, labels)))
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-9)
    assert float(parts["feature"]) == pytest.approx(0.25, rel=1e-9)  # ‖0.5‖² / ‖1‖² per element
    assert float(total) == pytest.approx(float(parts["kl"]) + 0.3 * ce + 2.0 * 0.25, rel=1e-9)
    with pytest.raises(ValueError, match="needs labels"):
        ft.distillation_loss(z_s, z_t, label_weight=1.0)
    with pytest.raises(ValueError, match="batch, classes"):
        ft.kl_divergence(z_t, z_s[:, :2])


def test_cross_entropy_takes_class_probabilities():
    z = jnp.array([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
    y = jnp.array([0, 2])
    ce = lambda labels: float(ft.distillation_loss(z, z, labels=labels, label_weight=1.0)[1]["ce"])  # noqa: E731
    np.testing.assert_allclose(ce(jax.nn.one_hot(y, 3, dtype=z.dtype)), ce(y), rtol=1e-6)
    mixed = ft.mix_labels(y, jnp.array([0.25, 1.0], z.dtype), jnp.array([1, 0]), 3)
    log_p = np.asarray(jax.nn.log_softmax(z))
    np.testing.assert_allclose(ce(mixed), -np.mean([0.25 * log_p[0, 0] + 0.75 * log_p[0, 2], log_p[1, 2]]), rtol=1e-6)


# ---------------------------------------------------------------- augmentation


def test_augment_crops_padded_windows_and_flips_deterministically():
    x = jnp.asarray(_images(16, size=6, channels=2))
    a, b = ft.augment(jax.random.key(3), x, pad=2), ft.augment(jax.random.key(3), x, pad=2)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(ft.augment(jax.random.key(4), x, pad=2)))
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
    flipped = 0
    for img, src in zip(np.asarray(a), padded):
        windows = [src[i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        plain = any(np.array_equal(img, w) for w in windows)
        mirrored = any(np.array_equal(img[:, ::-1], w) for w in windows)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 0 < flipped < 16
    assert np.array_equal(np.asarray(ft.augment(jax.random.key(0), x, pad=0, flip=False)), np.asarray(x))
    with pytest.raises(ValueError, match="NHWC"):
        ft.augment(jax.random.key(0), x[0])


def test_mixup_and_cutmix_mix_each_image_with_its_partner():
    x = jnp.asarray(_images(8, size=8, channels=2))
    mixed, lam, partner = ft.mix(jax.random.key(1), x, mode="mixup", alpha=0.4)
    assert sorted(np.asarray(partner).tolist()) == list(range(8)) and np.all((lam >= 0) & (lam <= 1))
    w = np.asarray(lam)[:, None, None, None]
    np.testing.assert_allclose(np.asarray(mixed), w * np.asarray(x) + (1 - w) * np.asarray(x)[np.asarray(partner)],
                               rtol=1e-6, atol=1e-6)
    cut, kept, partner = ft.mix(jax.random.key(2), x, mode="cutmix")
    cut, kept, partner, x = (np.asarray(a) for a in (cut, kept, partner, x))
    from_self = np.all(cut == x, axis=-1)  # pixel by pixel: the image's own or its partner's
    from_partner = np.all(cut == x[partner], axis=-1)
    assert np.all(from_self | from_partner)
    own = np.where(partner == np.arange(8), 1.0, np.mean(from_self & ~from_partner, axis=(1, 2)))
    np.testing.assert_allclose(kept[partner != np.arange(8)], own[partner != np.arange(8)], atol=1e-6)
    same = [np.asarray(ft.mix(jax.random.key(2), jnp.asarray(x), mode="cutmix")[0]) for _ in range(2)]
    assert np.array_equal(same[0], same[1]) and np.array_equal(same[0], cut)
    with pytest.raises(ValueError, match="mode"):
        ft.mix(jax.random.key(0), jnp.asarray(x), mode="mosaic")


def test_mixed_distillation_with_labels_trains_and_is_deterministic(teacher_and_data):
    teacher, images = teacher_and_data
    student = _compressed(teacher, images, "svd")
    labels = np.arange(len(images)) % 10
    config = ft.FinetuneConfig(epochs=2, batch_size=16, learning_rate=0.05, log_every=1, mix="cutmix",
                               label_weight=0.5, implementation="as-is")  # no timing: runs must match
    runs = [ft.finetune(student, teacher, images, labels, key=jax.random.key(0), config=config, progress=False)
            for _ in range(2)]
    assert runs[0].compilations == 1
    assert all(e["ce"] > 0 and np.isfinite(e["loss"]) for e in runs[0].history["train"])
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(_params(runs[0].model), _params(runs[1].model)))
    plain = ft.finetune(student, teacher, images, labels, key=jax.random.key(0), progress=False,
                        config=ft.FinetuneConfig(**{**config.__dict__, "mix": "none"}))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(_params(runs[0].model), _params(plain.model)))


# ---------------------------------------------------------------- BatchNorm re-estimation


def test_batch_norm_reestimation_gives_the_population_statistics():
    model = CifarResNet(8, rngs=nnx.Rngs(0))
    images = _images(20, size=32, channels=3)
    new = ft.reestimate_batch_norm(model, images, batch_size=8)  # batches of 8, 8, 4
    out = np.asarray(model.conv1(jnp.asarray(images)), np.float64)  # bn1's input
    np.testing.assert_allclose(np.asarray(new.bn1.mean[...]), out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new.bn1.var[...]), out.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-5)
    assert float(jnp.max(jnp.abs(model.bn1.mean[...]))) == 0.0  # the input model is untouched
    assert new.bn1.use_running_average and new.bn1.momentum == model.bn1.momentum
    with pytest.raises(ValueError, match="no nnx.BatchNorm"):
        ft.reestimate_batch_norm(SmallCNN(widths=(2, 2, 2), rngs=nnx.Rngs(0)), _images(4))


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def teacher_and_data():
    teacher = SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(0))
    return teacher, _images(32)


def _target(format) -> str:
    """The SmallCNN layer a format compresses here: ``linear`` for dense-only formats, else conv2."""
    spec = formats.get(format)
    return "linear" if spec.layer is spec.dense_layer else "conv2"


_COMPRESSED: dict = {}  # the teacher and images are kept alive with the entry, so their ids stay theirs
_TEACHER_12 = SmallCNN(widths=(4, 8, 8), num_classes=12, rngs=nnx.Rngs(0))


def _compressed(teacher, images, format):
    """A fresh copy of ``teacher`` compressed to ``format`` (made once per teacher, data and format)."""
    tag = (id(teacher), id(images), format)
    if tag not in _COMPRESSED:
        skip = ("conv1", "conv2", "conv3") if _target(format) == "linear" else ("conv1", "linear")
        _COMPRESSED[tag] = (teacher, images, compress.compress_model(
            teacher, images, format=format, norm="sigma", ratio=0.5, skip=skip, key=jax.random.key(0),
            progress=False, max_steps=2).model)
    return nnx.clone(_COMPRESSED[tag][2])


# "as-is": the layers train as built, no per-layer timing (test_training_implementations_... covers "auto").
CONFIG = ft.FinetuneConfig(epochs=2, batch_size=16, learning_rate=0.05, log_every=1, implementation="as-is")


# Every registered conv format, as others add them (TT-matrix layers are dense-only and come from
# surgery.to_tt; test_tt trains them). One student holds all of them, one layer each, so the check
# that every format trains costs one compilation of one train step, not one per format.
CONV_FORMATS = [f for f in formats.format_names() if formats.get(f).layer is not formats.get(f).dense_layer]


class _EveryFormat(nnx.Module):
    """A 1 → 8 stem, then one 8 → 8 conv per conv format (``f0``, ``f1``, ...), then a classifier."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, 8, (3, 3), padding="SAME", rngs=rngs)
        for i in range(len(CONV_FORMATS)):
            setattr(self, f"f{i}", nnx.Conv(8, 8, (3, 3), padding="SAME", rngs=rngs))
        self.linear = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem(x))
        for i in range(len(CONV_FORMATS)):
            x = x + 0.5 * nnx.relu(getattr(self, f"f{i}")(x))
        return self.linear(x.mean(axis=(1, 2)))


def test_a_student_with_every_format_trains_with_one_compilation():
    teacher, images = _EveryFormat(nnx.Rngs(0)), _images(32)
    student = teacher
    for i, format in enumerate(CONV_FORMATS):  # compress layer f{i} to format i, the rest as they are
        student = compress.compress_model(student, images, format=format, norm="sigma", ratio=0.5,
                                          skip=lambda path, i=i: path != f"f{i}", key=jax.random.key(i),
                                          progress=False, max_steps=2).model
    assert [type(getattr(student, f"f{i}")) for i in range(len(CONV_FORMATS))] == [
        formats.get(f).layer for f in CONV_FORMATS]
    before = {f"f{i}": [np.asarray(p) for p in _params(getattr(student, f"f{i}"))] for i in range(len(CONV_FORMATS))}
    config = dataclasses.replace(CONFIG, learning_rate=0.01)  # 0.05 trips the divergence guard on 11 layers
    result = ft.finetune(student, teacher, images, key=jax.random.key(0), config=config, progress=False)
    assert result.steps == 4 and result.compilations == 1 and result.stopped == "completed"
    assert not result.history["guard"]
    for path, params in before.items():
        layer = getattr(result.model, path)
        assert type(layer) is type(getattr(student, path))
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(params, _params(getattr(student, path))))
        assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(params, _params(layer))), path
    train = result.history["train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4] and all(np.isfinite(e["loss"]) for e in train)
    assert all(e["images_per_second"] > 0 for e in train)


@pytest.mark.parametrize("format", [f for f in formats.format_names() if f != "tt-matrix"])
def test_balancing_equalises_factor_norms_and_keeps_the_function(teacher_and_data, format):
    teacher, images = teacher_and_data
    if _target(format) == "linear":
        teacher = _TEACHER_12
    student = _compressed(teacher, images, format)
    layer = getattr(student, _target(format))
    layer.implementation = "factorized"
    factor = next(v for path, v in nnx.iter_graph(layer)  # unbalance: one factor ×50
                  if isinstance(v, nnx.Param) and path[-1] != "bias")
    factor[...] = factor[...] * 50.0
    student.eval()
    before = np.asarray(student(images))
    scales = ft.balance_factors(student)
    norms = ft.factor_norms(student)[_target(format)]
    assert len(norms) >= 2 and np.allclose(norms, norms[0], rtol=1e-4)
    assert np.prod(scales[_target(format)]) == pytest.approx(1.0, rel=1e-9)
    np.testing.assert_allclose(np.asarray(student(images)), before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


def test_balanced_distillation_starts_from_the_same_function(teacher_and_data):
    teacher, images = teacher_and_data
    student = _compressed(teacher, images, "tucker2")
    runs = [ft.finetune(student, teacher, images, key=jax.random.key(0), progress=False,
                        config=dataclasses.replace(CONFIG, balance=b)) for b in (False, True)]
    first = [r.history["train"][0]["loss"] for r in runs]  # the loss of step 1 is taken before its update
    assert first[1] == pytest.approx(first[0], rel=1e-4)
    assert all(r.stopped == "completed" and np.isfinite(r.history["train"][-1]["loss"]) for r in runs)
    assert ft.factor_norms(student)["conv2"] != ft.factor_norms(runs[1].model)["conv2"]  # input intact, output moved


def test_distillation_reduces_the_loss_on_fixed_data(teacher_and_data):
    teacher, images = teacher_and_data
    student = SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(1))  # far from the teacher: a large KL to remove
    config = ft.FinetuneConfig(epochs=30, batch_size=32, learning_rate=0.05, augment=False, log_every=1,
                               warmup_fraction=0.0)
    result = ft.finetune(student, teacher, images, key=jax.random.key(0), config=config, progress=False)
    losses = [e["loss"] for e in result.history["train"]]
    assert losses[-1] < 0.5 * losses[0]


def test_same_key_same_model_and_evaluation_history(teacher_and_data):
    teacher, images = teacher_and_data
    student = _compressed(teacher, images, "tucker2")
    evaluate = lambda m: {"mean_logit": float(jnp.mean(m(jnp.asarray(images))))}  # noqa: E731
    runs = [ft.finetune(student, teacher, images, key=jax.random.key(k), config=CONFIG, evaluate=evaluate,
                        progress=False) for k in (0, 0, 1)]
    same = [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(_params(runs[0].model), _params(runs[1].model))]
    assert all(same)
    assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(_params(runs[0].model), _params(runs[2].model)))
    assert [e["step"] for e in runs[0].history["eval"]] == [0, 2, 4]


def test_interrupted_run_resumes_to_the_same_model(teacher_and_data, tmp_path):
    teacher, images = teacher_and_data
    student = _compressed(teacher, images, "cp")
    full = ft.finetune(student, teacher, images, key=jax.random.key(0), config=CONFIG, progress=False)
    first = ft.finetune(student, teacher, images, key=jax.random.key(0), progress=False, checkpoint_dir=tmp_path,
                        config=ft.FinetuneConfig(**{**CONFIG.__dict__, "time_limit": 1e-9}))
    assert first.stopped == "time_limit" and first.steps == 1
    resumed = ft.finetune(student, teacher, images, key=jax.random.key(0), config=CONFIG, progress=False,
                          checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 1 and resumed.steps == 4
    for a, b in zip(_params(full.model), _params(resumed.model)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert [e["step"] for e in resumed.history["train"]] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="another config, key"):
        ft.finetune(student, teacher, images, key=jax.random.key(1), config=CONFIG, progress=False,
                    checkpoint_dir=tmp_path)


def _scripted(values, seen):
    """An ``evaluate`` returning ``values`` in turn and recording each model's parameters."""
    calls = iter(values)

    def evaluate(model):
        seen.append([np.asarray(p) for p in _params(model)])
        return {"val": next(calls), "other": 0.0}
    return evaluate


def test_keep_best_returns_the_best_evaluated_state(teacher_and_data):
    teacher, images = teacher_and_data
    student = _compressed(teacher, images, "cp")
    config = ft.FinetuneConfig(**{**CONFIG.__dict__, "eval_every": 1})  # 4 steps, evaluated at 0..4
    seen = []
    result = ft.finetune(student, teacher, images, key=jax.random.key(0), config=config, progress=False,
                         evaluate=_scripted([0.3, 0.8, float("nan"), 0.8, 0.1], seen), keep_best="val")
    assert result.best_step == 1 and result.history["best"] == dict(metric="val", mode="max", step=1, value=0.8)
    assert [e["val"] for e in result.history["eval"]][:2] == [0.3, 0.8]  # the history is the whole run's
    for a, b in zip(seen[1], _params(result.model)):
        assert np.array_equal(a, np.asarray(b))
    assert not all(np.array_equal(a, b) for a, b in zip(seen[1], seen[4]))  # training did move on
    # The starting student is a candidate: a run that only gets worse hands it back unchanged.
    start = ft.finetune(student, teacher, images, key=jax.random.key(0), config=config, progress=False,
                        evaluate=_scripted([0.9, 0.5, 0.4, 0.3, 0.2], []), keep_best="val")
    assert start.best_step == 0
    for a, b in zip(_params(student), _params(start.model)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # A loss is minimised: the lowest finite value wins (NaN never does).
    seen = []
    low = ft.finetune(student, teacher, images, key=jax.random.key(0), config=config, progress=False,
                      evaluate=_scripted([float("nan"), 0.5, 0.2, 0.2, 0.4], seen), keep_best="val",
                      keep_best_mode="min")
    assert low.best_step == 2 and low.history["best"] == dict(metric="val", mode="min", step=2, value=0.2)
    for a, b in zip(seen[2], _params(low.model)):
        assert np.array_equal(a, np.asarray(b))
    plain = ft.finetune(student, teacher, images, key=jax.random.key(0), config=config, progress=False,
                        evaluate=_scripted([0.9, 0.5, 0.4, 0.3, 0.2], []))
    assert plain.best_step is None and "best" not in plain.history
    with pytest.raises(ValueError, match="keep_best_mode must be 'max' or 'min'"):
        ft.finetune(student, teacher, images, key=jax.random.key(0), config=config, keep_best="val",
                    evaluate=_scripted([0.1], []), keep_best_mode="lowest")
    with pytest.raises(ValueError, match="keep_best needs evaluate"):
        ft.finetune(student, teacher, images, key=jax.random.key(0), config=config, keep_best="val")
    with pytest.raises(KeyError, match=r"'nope' is not a key.*\['other', 'val'\]"):
        ft.finetune(student, teacher, images, key=jax.random.key(0), config=config, progress=False,
                    evaluate=_scripted([0.1], []), keep_best="nope")


def test_keep_best_survives_an_interrupted_run(teacher_and_data, tmp_path):
    teacher, images = teacher_and_data
    student = _compressed(teacher, images, "cp")
    from sigmadecomp.data import holdout

    train, held = holdout(images, None, 8, key=jax.random.key(2))
    target = np.asarray(teacher(held))
    closeness = lambda m: {"val": -float(np.mean((np.asarray(m(held)) - target) ** 2))}  # noqa: E731
    config = ft.FinetuneConfig(**{**CONFIG.__dict__, "batch_size": 8, "eval_every": 1, "learning_rate": 0.5})
    full = ft.finetune(student, teacher, train, key=jax.random.key(0), config=config, progress=False,
                       evaluate=closeness, keep_best="val")
    ft.finetune(student, teacher, train, key=jax.random.key(0), progress=False, checkpoint_dir=tmp_path,
                config=ft.FinetuneConfig(**{**config.__dict__, "time_limit": 1e-9}), evaluate=closeness,
                keep_best="val")
    resumed = ft.finetune(student, teacher, train, key=jax.random.key(0), config=config, progress=False,
                          checkpoint_dir=tmp_path, evaluate=closeness, keep_best="val")
    assert resumed.resumed_from == 1 and resumed.best_step == full.best_step
    assert resumed.history["best"]["value"] == pytest.approx(full.history["best"]["value"], rel=1e-5)
    for a, b in zip(_params(full.model), _params(resumed.model)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="keep_best='val', keep_best_mode='max', not None"):
        ft.finetune(student, teacher, train, key=jax.random.key(0), config=config, progress=False,
                    checkpoint_dir=tmp_path, evaluate=closeness)
    with pytest.raises(ValueError, match="not 'val', 'min'"):
        ft.finetune(student, teacher, train, key=jax.random.key(0), config=config, progress=False,
                    checkpoint_dir=tmp_path, evaluate=closeness, keep_best="val", keep_best_mode="min")


def test_distill_on_cifar10_holds_validation_images_out_and_keeps_the_best(tmp_path):
    import pickle

    rng = np.random.default_rng(0)
    for i in range(1, 6):  # 5 × 16 synthetic training images in the official format
        batch = {b"labels": rng.integers(0, 10, 16).tolist(), b"data": rng.integers(0, 256, (16, 3072), dtype=np.uint8)}
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    teacher = SmallCNN(widths=(4, 8, 8), in_channels=3, image_size=32, rngs=nnx.Rngs(0))
    student = SmallCNN(widths=(4, 8, 8), in_channels=3, image_size=32, rngs=nnx.Rngs(1))
    run = ft.distill_on_cifar10(student, teacher, tmp_path, epochs=2, key=jax.random.key(0), validation=16,
                                progress=False)
    values = [e["validation_accuracy"] for e in run.history["eval"]]
    assert run.steps == 2 and [e["step"] for e in run.history["eval"]] == [0, 1, 2]  # 64 images: 1 step/epoch
    assert run.history["best"] == dict(metric="validation_accuracy", mode="max", step=run.best_step, value=max(values))
    assert run.best_step == values.index(max(values)) and all(v in np.arange(17) / 16 for v in values)
    # the held-out distillation loss, lowest kept; the same held-out images (same key) evaluated
    by_kl = ft.distill_on_cifar10(student, teacher, tmp_path, epochs=2, key=jax.random.key(0), validation=16,
                                  validation_metric="kl", progress=False)
    losses = [e["validation_kl"] for e in by_kl.history["eval"]]
    assert [e["validation_accuracy"] for e in by_kl.history["eval"]] == values
    assert by_kl.history["best"] == dict(metric="validation_kl", mode="min", step=by_kl.best_step, value=min(losses))
    with pytest.raises(ValueError, match="validation_metric must be one of"):
        ft.distill_on_cifar10(student, teacher, tmp_path, epochs=1, key=jax.random.key(0), validation=16,
                              validation_metric="loss", progress=False)
    plain = ft.distill_on_cifar10(student, teacher, tmp_path, epochs=1, key=jax.random.key(0), progress=False)
    assert plain.best_step is None and plain.history["eval"] == []


def test_held_out_metrics_match_the_distillation_term_and_check_their_input(teacher_and_data):
    teacher, images = teacher_and_data
    student = SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(1))
    labels = np.arange(len(images)) % 10
    metrics = ft.held_out_metrics(teacher, images, labels, temperature=2.0, batch_size=5)  # batches of 5
    got = metrics(student)
    want = ft.kl_divergence(teacher(images), student(images), temperature=2.0)
    assert got["validation_kl"] == pytest.approx(float(want), rel=1e-5)
    assert got["validation_accuracy"] == np.mean(np.argmax(student(images), -1) == labels)
    assert "validation_accuracy" not in ft.held_out_metrics(teacher, images)(student)
    with pytest.raises(ValueError, match="labels must have shape"):
        ft.held_out_metrics(teacher, images, labels[:3])
    with pytest.raises(ValueError, match="non-empty batch"):
        ft.held_out_metrics(teacher, images[:0])


# lr 30 without clipping blows SmallCNN's student up at the second step (loss 0.08 -> 22 -> 11 000).
EXPLODING = ft.FinetuneConfig(epochs=5, batch_size=16, learning_rate=30.0, log_every=1, clip_norm=None,
                              warmup_fraction=0.0, augment=False)


def test_divergence_guard_rolls_back_and_halves_the_learning_rate(teacher_and_data):
    teacher, images = teacher_and_data
    student = SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(1))
    unguarded = ft.finetune(student, teacher, images, key=jax.random.key(0), progress=False,
                            config=ft.FinetuneConfig(**{**EXPLODING.__dict__, "divergence_factor": None}))
    guarded = ft.finetune(student, teacher, images, key=jax.random.key(0), config=EXPLODING, progress=False)
    first = unguarded.history["train"][0]["loss"]
    assert unguarded.history["train"][-1]["loss"] > 100 * first
    assert guarded.stopped == "completed" and guarded.steps == 10 and guarded.compilations == 1
    events = guarded.history["guard"]
    assert guarded.rollbacks == len(events) >= 1
    assert [e["learning_rate_scale"] for e in events] == [0.5 ** (i + 1) for i in range(len(events))]
    assert all(e["restored_step"] < e["step"] and not e["stopped"] for e in events)
    assert guarded.history["train"][-1]["loss"] < 2 * first  # recovered: no logged loss is the blow-up
    assert all(np.isfinite(np.asarray(p)).all() for p in _params(guarded.model))


def test_divergence_guard_gives_up_with_the_last_healthy_state(teacher_and_data):
    teacher, images = teacher_and_data
    student = SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(1))
    result = ft.finetune(student, teacher, images, key=jax.random.key(0), progress=False,
                         config=ft.FinetuneConfig(**{**EXPLODING.__dict__, "max_rollbacks": 0}))
    assert result.stopped == "diverged" and result.rollbacks == 0 and result.history["guard"][0]["stopped"]
    restored = result.history["guard"][0]["restored_step"]
    assert restored == 0  # the only validated state: the student itself
    for a, b in zip(_params(student), _params(result.model)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_guard_changes_nothing_in_a_healthy_run_and_resumes_exactly(teacher_and_data, tmp_path):
    teacher, images = teacher_and_data
    student = _compressed(teacher, images, "cp")
    off = ft.finetune(student, teacher, images, key=jax.random.key(0), progress=False,
                      config=ft.FinetuneConfig(**{**CONFIG.__dict__, "divergence_factor": None}))
    on = ft.finetune(student, teacher, images, key=jax.random.key(0), config=CONFIG, progress=False)
    assert on.rollbacks == 0
    for a, b in zip(_params(off.model), _params(on.model)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # A rollback after the checkpoint goes back to the snapshot saved in it.
    student = SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(1))
    full = ft.finetune(student, teacher, images, key=jax.random.key(0), config=EXPLODING, progress=False)
    ft.finetune(student, teacher, images, key=jax.random.key(0), progress=False, checkpoint_dir=tmp_path,
                config=ft.FinetuneConfig(**{**EXPLODING.__dict__, "time_limit": 1e-9}))
    resumed = ft.finetune(student, teacher, images, key=jax.random.key(0), config=EXPLODING, progress=False,
                          checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 1 and resumed.history["guard"] == full.history["guard"]
    for a, b in zip(_params(full.model), _params(resumed.model)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_training_implementations_follow_the_timing_rule_and_keep_the_function(teacher_and_data, tmp_path,
                                                                               monkeypatch):
    from sigmadecomp.finetune import _implementations as impl

    teacher, images = teacher_and_data
    student = _compressed(teacher, images, "r-cp")
    chosen = ft.training_implementations(student, (16, 8, 8, 1), repeats=1)
    assert set(chosen) == {"conv2", "conv3"}
    ms = chosen["conv2"]["ms"]
    assert all(v > 0 for v in ms.values())
    switched = chosen["conv2"]["implementation"] != "factorized"
    assert switched == (ms["factorized"] > impl.MARGIN * ms["dense"] and
                        ms["factorized"] - ms["dense"] >= impl.MIN_SAVING_MS)
    runs = {mode: ft.finetune(student, teacher, images, key=jax.random.key(0), progress=False,
                              config=ft.FinetuneConfig(**{**CONFIG.__dict__, "implementation": mode}))
            for mode in ("factorized", "dense")}
    assert runs["dense"].history["implementations"] == {"conv2": "dense", "conv3": "dense"}
    for a, b in zip(_params(runs["factorized"].model), _params(runs["dense"].model)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)  # same function
    assert runs["dense"].model.conv2.implementation == "factorized"  # the student's own, returned
    # A resumed run trains with the implementations it started with, without timing again.
    config = ft.FinetuneConfig(**{**CONFIG.__dict__, "implementation": "auto"})
    ft.finetune(student, teacher, images, key=jax.random.key(0), progress=False, checkpoint_dir=tmp_path,
                config=ft.FinetuneConfig(**{**config.__dict__, "time_limit": 1e-9}))
    monkeypatch.setattr("sigmadecomp.finetune._train.training_implementations",
                        lambda *a, **k: pytest.fail("timed again on resume"))
    resumed = ft.finetune(student, teacher, images, key=jax.random.key(0), config=config, progress=False,
                          checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 1 and set(resumed.history["implementations"]) == {"conv2", "conv3"}


def test_batch_norm_modes_and_feature_term():
    teacher = CifarResNet(8, rngs=nnx.Rngs(0))
    student = CifarResNet(8, rngs=nnx.Rngs(1))
    images = _images(16, size=32, channels=3)
    common = dict(epochs=1, batch_size=8, learning_rate=0.01, log_every=1)
    frozen = ft.finetune(student, teacher, images, key=jax.random.key(0), progress=False,
                         config=ft.FinetuneConfig(**common, batch_norm="frozen", feature_weight=1.0))
    assert np.array_equal(np.asarray(frozen.model.bn1.mean[...]), np.asarray(student.bn1.mean[...]))
    assert all(e["feature"] > 0 for e in frozen.history["train"])
    update = ft.finetune(student, teacher, images, key=jax.random.key(0), progress=False,
                         config=ft.FinetuneConfig(**common, batch_norm="update"))
    assert not np.array_equal(np.asarray(update.model.bn1.mean[...]), np.asarray(student.bn1.mean[...]))
    assert update.model.bn1.use_running_average  # returned in inference mode


@pytest.mark.parametrize("options, needle", [
    (dict(epochs=0), "epochs"), (dict(learning_rate=0.0), "learning_rate"), (dict(optimizer="lion"), "optimizer"),
    (dict(batch_norm="x"), "batch_norm"), (dict(warmup_fraction=2.0), "warmup_fraction"),
    (dict(time_limit=-1.0), "time_limit"), (dict(clip_norm=0.0), "clip_norm"), (dict(mix="mosaic"), "mix"),
    (dict(mix_alpha=0.0), "mix_alpha"), (dict(divergence_factor=1.0), "divergence_factor"),
    (dict(max_rollbacks=-1), "max_rollbacks"), (dict(implementation="fast"), "implementation"),
    (dict(balance=1), "balance"),
])
def test_bad_config_is_a_clear_error(options, needle):
    with pytest.raises(ValueError, match=needle):
        ft.FinetuneConfig(**options)


def test_bad_data_is_a_clear_error(teacher_and_data):
    teacher, images = teacher_and_data
    with pytest.raises(ValueError, match="fewer than one batch"):
        ft.finetune(teacher, teacher, images[:4], key=jax.random.key(0), config=CONFIG, progress=False)
    with pytest.raises(ValueError, match="needs labels"):
        ft.finetune(teacher, teacher, images, key=jax.random.key(0), progress=False,
                    config=ft.FinetuneConfig(label_weight=1.0, batch_size=16))
    with pytest.raises(ValueError, match="features="):
        ft.finetune(teacher, teacher, images, key=jax.random.key(0), progress=False,
                    config=ft.FinetuneConfig(feature_weight=1.0, batch_size=16))
