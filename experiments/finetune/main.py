"""Distillation fine-tuning of compressed ResNets: Σ-sequential vs Frobenius vs random initialisation.

    .venv/bin/python experiments/finetune/main.py                 # full, resumable
    .venv/bin/python experiments/finetune/main.py --smoke --out /tmp/smoke
    .venv/bin/python experiments/finetune/main.py --table         # table and figure from results.json

Each run appends to ``results.json`` as soon as it finishes; runs already there are skipped, so an
interrupted experiment resumes where it stopped. The training images are the data kit's training
batches (5 085); the test batch is only ever evaluated.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE)]

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # covariances accumulate in float64; models stay float32

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sigmadecomp import calibration as seqcal  # noqa: E402
from sigmadecomp import compress  # noqa: E402
from sigmadecomp import finetune as ft  # noqa: E402
from sigmadecomp._paths import get_by_path  # noqa: E402
from sigmadecomp.data import cifar10_normalize, holdout, load_cifar10, sample  # noqa: E402
from sigmadecomp.models import pretrained_resnet  # noqa: E402

from _results import add_run, load_results, machine, save_results  # noqa: E402
from config import ALL_INITS, FULL, GLOBAL_GRID, GLOBAL_PROXY_SWEEPS, SMOKE, Config  # noqa: E402

# The TNN seed's ResNet-32 table (full retraining on 50 000 images; dense 93.2%), in %.
# Plain rows from issue 13, reshaped rows from issue 15 (the columns the seed reports; 2% left out).
TNN = {"svd": {0.05: 83.09, 0.1: 87.27, 0.2: 89.58}, "cp": {0.05: 84.02, 0.1: 86.93, 0.2: 88.75},
       "tucker2": {0.05: 83.57, 0.1: 86.00, 0.2: 88.03}, "tt": {0.05: 77.44, 0.1: 82.92, 0.2: 84.13},
       "r-cp": {0.05: 89.86, 0.1: 91.28}, "r-tucker": {0.05: 71.34, 0.1: 81.59, 0.2: 87.11},
       "r-tt": {0.05: 84.26, 0.1: 87.89}, "r-tr": {0.05: 80.80, 0.2: 90.60}}
TARGET = {0.05: 86.0, 0.1: 89.0, 0.2: 91.0}  # issue 13, best format per rate, ≤ 10 min distillation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=pathlib.Path, default=HERE.parents[1] / ".." / "shared" / "data")
    p.add_argument("--out", type=pathlib.Path, help="folder of results.json and figure.png (default: "
                   "this folder; with --smoke a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny configuration for CI (seconds)")
    p.add_argument("--table", action="store_true", help="print the table and draw the figure only")
    p.add_argument("--limit", type=int, default=None, help="run at most this many new runs")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's)")
    p.add_argument("--feature-weight", type=float, default=None,
                   help="β of the feature-matching term on the residual blocks' outputs (default: the config's, 0)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="default: the config's (sgd)")
    p.add_argument("--mix", choices=("none", "mixup", "cutmix"), default=None,
                   help="mix each training image with a partner; the teacher labels the mix (default: none)")
    p.add_argument("--ce", type=float, default=None, help="α of the cross-entropy term on the labels")
    p.add_argument("--batch-norm", choices=("frozen", "update"), default=None, help="default: the config's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--guard", type=float, default=None, help="divergence guard factor (FinetuneConfig."
                   "divergence_factor; default: the config's, 2.0)")
    p.add_argument("--no-guard", action="store_true", help="train without the divergence guard")
    p.add_argument("--balance", action="store_true", help="equal factor norms per layer before training "
                   "(FinetuneConfig.balance)")
    p.add_argument("--validation", type=int, default=None, metavar="N",
                   help="hold N labelled training images out (never calibration images) and keep the "
                        "distillation state with the best --validation-metric on them, the start included")
    p.add_argument("--validation-metric", choices=tuple(ft.VALIDATION_METRICS), default=None,
                   help="with --validation: keep the state with the highest held-out accuracy (default) or "
                        "the lowest held-out distillation loss")
    p.add_argument("--images", type=int, default=None, help="distillation budget in training images "
                   "(steps = images // batch size; default: the config's steps)")
    p.add_argument("--cpu-budget", action="store_true", help="issue 13's budget: train 600 s × the 2-core CPU "
                   "throughput measured for this (format, rate) on the device machine (cpu_throughput.json; a "
                   "reshaped format uses its plain format's, a missing rate the nearest one's), like gpu_grid.py")
    p.add_argument("--models", type=pathlib.Path, default=None, help="folder of compressed models made "
                   "beforehand (e.g. by experiments/gpu_grid.py --precompress), used when it has the cell")
    p.add_argument("--only", nargs="+", default=None, metavar="FORMAT:RATIO:INIT",
                   help="run only these cells, e.g. tucker2:0.1:sigma_seq")
    p.add_argument("--results", default="results.json", help="results file name inside --out (parallel "
                   "processes write separate files; --merge folds them into results.json)")
    p.add_argument("--dense-bn", action="store_true", help="measure BN re-estimation on the dense model "
                   "(a sanity check of the procedure) and store it in the results file")
    p.add_argument("--merge", nargs="+", default=None, help="results files whose runs are added to results.json")
    return p.parse_args(argv)


def run_key(r) -> str:
    """Every setting that changes a run's numbers: the cell, BN mode, lr, images trained, CE weight."""
    lr = r.get("learning_rate", 0.02)
    key = f"resnet{r['arch']}/{r['format']}/{r['ratio']}/{r['init']}/bn-{r.get('batch_norm', 'update')}/lr{lr}"
    key += f"/img{r.get('steps', 48) * r.get('batch_size', 64)}"
    key += f"/ce{r['label_weight']}" if r.get("label_weight") else ""
    key += f"/feat{r['feature_weight']}" if r.get("feature_weight") else ""
    key += f"/{r['optimizer']}" if r.get("optimizer", "sgd") != "sgd" else ""
    key += f"/{r['mix']}" if r.get("mix", "none") != "none" else ""
    key += "/balanced" if r.get("balance") else ""
    key += f"/val{r['validation']}" if r.get("validation") else ""
    key += f"-{r['validation_metric']}" if r.get("validation") and r.get("validation_metric", "accuracy") != "accuracy" else ""
    return key + (f"/guard{r['divergence_factor']}" if r.get("divergence_factor") else "")  # none before session 5


def training_stream(train, n: int, seed: int):
    """``n`` training (images, labels): a fixed sample when ``n`` ≤ the training set, else whole
    shuffled passes (one permutation per pass, key ``seed``) cut at ``n``, so any image budget is
    met exactly with every image seen about equally often."""
    x, y = train
    if n <= len(x):
        return sample(x, y, n, key=jax.random.key(seed))
    passes = -(-n // len(x))
    order = np.concatenate([np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(seed), k), len(x)))
                            for k in range(passes)])[:n]
    return x[order], y[order]


# ---------------------------------------------------------------- one run


def randomize(model, paths, key):
    """Redraw every kernel inside the factorized layers at ``paths`` (any format): normal with
    variance 1/fan_in (LeCun), biases kept. The rest of the network stays pretrained."""
    for i, path in enumerate(paths):
        layer = get_by_path(model, path)
        subs = [m for _, m in nnx.iter_graph(layer) if isinstance(m, (nnx.Conv, nnx.Linear))]
        for j, sub in enumerate(subs):
            kernel = sub.kernel[...]
            fan_in = int(np.prod(kernel.shape[:-1]))
            draw = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), j), kernel.shape, kernel.dtype)
            sub.kernel[...] = draw / np.sqrt(fan_in).astype(kernel.dtype)
    return model


def compress_for(model, calib, format, ratio, init, config: Config):
    if "+" in format and init != "sigma_seq_global":
        raise SystemExit(f"{format}: several formats are chosen per layer by the global rule: init sigma_seq_global")
    common = dict(format=format.split("+")[0], ratio=ratio, key=jax.random.key(config.compress_seed),
                  skip=config.skip, max_steps=config.max_steps, progress=False)
    if init == "sigma_seq":
        return seqcal.compress_sequential(model, calib, **common)
    if init == "sigma_seq_global":
        sel = global_ranks(model, calib, format, ratio, config)
        common = {k: v for k, v in common.items() if k not in ("ratio", "skip")}
        return seqcal.compress_sequential(model, calib, **common, ranks=sel, skip=sel.is_dense)
    return compress.compress_model(model, calib, norm="sigma" if init == "sigma_par" else "frobenius", **common)


def global_ranks(model, calib, format, ratio, config: Config):
    """Every layer's ranks under one budget, ``params=ratio`` of the compressed layers' dense count:
    ``select_ranks``'s global rule on the dense model's statistics (its damage curves and
    sensitivities from the calibration images), candidates at ``GLOBAL_GRID`` × ``ratio``. A format
    ``"a+b"`` offers every layer the candidates of both; the rule picks each layer's format."""
    from sigmadecomp.surgery import plan, select_ranks

    formats = tuple(format.split("+"))
    paths = plan(model, format=formats[0], ratio=1.0, skip=config.skip).paths
    covariances = compress.calibrate(model, calib, layers=paths, progress=False)
    grid = tuple(sorted({min(round(g * ratio, 4), 0.9) for g in GLOBAL_GRID}))
    return select_ranks(model, covariances, format=formats, rule="global", budget=f"params={ratio}", norm="sigma",
                        images=calib, key=jax.random.key(config.compress_seed + 1), skip=config.skip,
                        input_shape=(1, 32, 32, 3), grid=grid, sweeps=GLOBAL_PROXY_SWEEPS, progress=True)


def compressed_model(model, calib, format, ratio, init, config: Config, cache: pathlib.Path,
                     given: pathlib.Path | None = None):
    """The compressed model and its plan, from ``cache`` when an earlier run saved it there (the
    distillation settings can change without recompressing), else from ``given`` (models made
    beforehand, same folder names); ``None`` seconds when cached."""
    from sigmadecomp.surgery import Plan, load, save

    if init == "random":  # the Frobenius model's architecture, every factor redrawn
        frobenius, plan, seconds = compressed_model(model, calib, format, ratio, "frobenius", config, cache, given)
        return randomize(nnx.clone(frobenius), plan.paths, jax.random.key(config.compress_seed)), plan, seconds
    name = f"resnet{config.arch}-{format}-{ratio}-{init}-sweeps{config.max_steps}"
    folder = cache / name
    if not (folder / "plan.json").is_file() and given is not None and (given / name / "plan.json").is_file():
        folder = given / name
    if (folder / "plan.json").is_file():
        plan = Plan.from_dict(json.loads((folder / "plan.json").read_text())["plan"])
        return load(folder, model), plan, None
    tic = time.perf_counter()
    result = compress_for(model, calib, format, ratio, init, config)
    seconds = time.perf_counter() - tic
    save(folder, result.model, result.plan)
    return result.model, result.plan, seconds


def calib_kl(teacher, student, calib, config: Config) -> float:
    """Distillation loss T²·KL(teacher ‖ student) on the calibration images (training data)."""
    return float(ft.kl_divergence(_logits(teacher, calib), _logits(student, calib), temperature=config.temperature))


def _logits(model, images):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jax.numpy.asarray(images))


def conv_rate(model, plan) -> float:
    """Parameters of all convs after / before (the first conv, skipped, counts as kept)."""
    conv1 = int(np.prod(model.conv1.kernel[...].shape))
    return (conv1 + plan.params_after) / (conv1 + plan.params_before)


_BASELINE = {}


def baseline_accuracy(model, test) -> float:
    if "acc" not in _BASELINE:
        _BASELINE["acc"] = float(np.mean(compress.predict_labels(model, test[0]) == test[1]))
    return _BASELINE["acc"]


def measure(model, train, calib, test, key: tuple, config: Config, cache: pathlib.Path,
            given: pathlib.Path | None = None) -> dict:
    format, ratio, init = key
    accuracy = lambda m: {"accuracy": float(np.mean(compress.predict_labels(m, test[0]) == test[1]))}  # noqa: E731
    compressed, plan, compress_seconds = compressed_model(model, calib, format, ratio, init, config, cache, given)
    before = accuracy(compressed)["accuracy"]
    tic = time.perf_counter()
    bn = ft.reestimate_batch_norm(compressed, calib)
    bn_seconds = time.perf_counter() - tic
    after_bn = accuracy(bn)["accuracy"]
    # The distillation starts from whichever of the two has the lower distillation loss on the
    # calibration images (training data only; the test set chooses nothing).
    kl = {"compressed": calib_kl(model, compressed, calib, config), "bn_reestimated": calib_kl(model, bn, calib, config)}
    start_from = min(kl, key=kl.get)
    epochs_equiv = config.steps * config.batch_size / len(train[0])
    ft_config = ft.FinetuneConfig(
        epochs=1, batch_size=config.batch_size, learning_rate=config.learning_rate,
        temperature=config.temperature, batch_norm=config.batch_norm, eval_every=config.eval_every,
        log_every=min(config.eval_every, 6), label_weight=config.label_weight,
        feature_weight=config.feature_weight, optimizer=config.optimizer, mix=config.mix,
        divergence_factor=config.divergence_factor, balance=config.balance)
    evaluate, keep_best, keep_best_mode = accuracy, None, "max"
    if config.validation:  # held out of the training images, never a calibration image
        # the calibration images' indices: run_all's sample() drawn on the indices themselves
        calib_index = sample(np.arange(len(train[0])), None, config.calib_images, key=jax.random.key(config.calib_seed))
        train, (held_x, held_y) = holdout(*train, config.validation, key=jax.random.key(config.train_seed + 2),
                                          exclude=calib_index)

        held_out = ft.held_out_metrics(model, held_x, held_y, temperature=config.temperature)

        def with_validation(m):
            return dict(accuracy(m), **held_out(m))

        evaluate = with_validation
        keep_best, keep_best_mode = ft.VALIDATION_METRICS[config.validation_metric]
    # One "epoch" of exactly `steps` batches of the training images (key train_seed + 1).
    images, labels = training_stream(train, config.steps * config.batch_size, config.train_seed + 1)
    load_before = os.getloadavg()
    run = ft.finetune(compressed if start_from == "compressed" else bn, model, images,
                      labels if config.label_weight else None, key=jax.random.key(config.train_seed),
                      config=ft_config, evaluate=evaluate, keep_best=keep_best, keep_best_mode=keep_best_mode,
                      progress=False)
    # The returned model's test accuracy: the last evaluation's, or with keep_best the chosen one's
    # (chosen by the held-out training images; the test set chooses nothing).
    chosen = next(e for e in run.history["eval"] if e["step"] == run.best_step) if keep_best else run.history["eval"][-1]
    return dict(
        arch=config.arch, format=format, ratio=ratio, init=init,
        batch_norm=config.batch_norm, learning_rate=config.learning_rate, start_from=start_from, calib_kl=kl,
        conv_param_rate=conv_rate(model, plan), params=compress.count_params(compressed),
        baseline_params=compress.count_params(model),
        accuracy_compressed=before, accuracy_bn=after_bn, accuracy_finetuned=chosen["accuracy"],
        accuracy_last=run.history["eval"][-1]["accuracy"], validation=config.validation,
        **({"validation_metric": config.validation_metric} if config.validation else {}), best=run.history.get("best"),
        baseline_accuracy=baseline_accuracy(model, test), finetune_seconds=round(run.seconds, 2),
        compress_seconds=None if compress_seconds is None else round(compress_seconds, 2), bn_seconds=round(bn_seconds, 2),
        steps=run.steps, batch_size=config.batch_size, epochs_equivalent=round(epochs_equiv, 3),
        compilations=run.compilations, history=run.history, max_steps=config.max_steps,
        finetune_config=dataclasses.asdict(ft_config), loadavg=[load_before, os.getloadavg()],
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        train_images=len(train[0]), test_images=len(test[1]), calib_images=len(calib),
        label_weight=config.label_weight, feature_weight=config.feature_weight, optimizer=config.optimizer,
        mix=config.mix, divergence_factor=config.divergence_factor, balance=config.balance,
        rollbacks=run.rollbacks, stopped=run.stopped,
        device=str(jax.devices()[0].device_kind),
        steady_images_per_second=steady_throughput(run.history, config.batch_size),
    )


def steady_throughput(history, batch_size: int) -> float | None:
    """Training images/s after the first logged interval (which holds the compilation)."""
    train = history["train"]
    if len(train) < 2 or train[-1]["seconds"] <= train[0]["seconds"]:
        return None
    return (train[-1]["step"] - train[0]["step"]) * batch_size / (train[-1]["seconds"] - train[0]["seconds"])


def dense_bn(config: Config, args) -> dict:
    """Accuracy of the uncompressed model before/after BN re-estimation on the calibration images."""
    model = pretrained_resnet(config.arch, args.data / "weights" / f"resnet{config.arch}_cifar10.safetensors")
    train_x, _ = load_cifar10(args.data / "cifar10", "train")
    calib = cifar10_normalize(sample(train_x, None, config.calib_images, key=jax.random.key(config.calib_seed)))
    test_x, test_y = load_cifar10(args.data / "cifar10", "test", limit=config.test_images)
    test_x = cifar10_normalize(test_x)
    acc = lambda m: float(np.mean(compress.predict_labels(m, test_x) == test_y))  # noqa: E731
    return dict(arch=config.arch, accuracy=acc(model), accuracy_bn=acc(ft.reestimate_batch_norm(model, calib)),
                calib_images=config.calib_images, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def run_all(config: Config, args, results, out):
    done = {run_key(r) for r in results["runs"]}
    runs = config.runs if args.only is None else [
        (f, float(r), i) for f, r, i in (item.split(":") for item in args.only)]
    unknown = sorted({k[2] for k in runs} - set(ALL_INITS))
    if unknown:
        raise SystemExit(f"unknown init(s) {unknown}; choose from {list(ALL_INITS)}")

    def key_of(k):
        c, _ = cell_config(config, k, args)
        return run_key(dict(arch=c.arch, format=k[0], ratio=k[1], init=k[2], batch_norm=c.batch_norm,
                            learning_rate=c.learning_rate, steps=c.steps, batch_size=c.batch_size,
                            label_weight=c.label_weight, feature_weight=c.feature_weight, optimizer=c.optimizer,
                            mix=c.mix, divergence_factor=c.divergence_factor, balance=c.balance,
                            validation=c.validation, validation_metric=c.validation_metric))

    todo = [k for k in runs if key_of(k) not in done]
    todo = todo[: args.limit] if args.limit is not None else todo
    print(f"{len(todo)} run(s) to do, {len(done)} already in {out}", flush=True)
    if not todo:
        return
    model = pretrained_resnet(config.arch, args.data / "weights" / f"resnet{config.arch}_cifar10.safetensors")
    train_x, train_y = load_cifar10(args.data / "cifar10", "train")
    train = (cifar10_normalize(train_x), train_y)
    calib = cifar10_normalize(sample(train_x, None, config.calib_images, key=jax.random.key(config.calib_seed)))
    test_x, test_y = load_cifar10(args.data / "cifar10", "test", limit=config.test_images)
    test = (cifar10_normalize(test_x), test_y)
    results["meta"] = dict(machine=machine(), config=dataclasses.asdict(config))
    for key in todo:
        cell, budget = cell_config(config, key, args)
        record = measure(model, train, calib, test, key, cell, out / "models", args.models)
        if budget is not None:
            record["cpu_budget"] = budget
        add_run(results, record, run_key)
        save_results(results, out / args.results)
        print(f"{run_key(record)}: compressed {record['accuracy_compressed']:.3f}  BN {record['accuracy_bn']:.3f}  "
              f"distilled {record['accuracy_finetuned']:.3f} in {record['finetune_seconds']:.0f} s "
              f"(load {record['loadavg'][0][0]:.1f})", flush=True)


# ---------------------------------------------------------------- table and figure


# Σ-sequential with uniform or global ranks: one initialisation, compared with the others together
SIGMA_SEQ = ("sigma_seq", "sigma_seq_global")
INIT_STYLES = {"sigma_seq": "-", "sigma_seq_global": "-", "sigma_par": "-.", "frobenius": ":", "random": "--"}


def _label(r) -> str:
    return (f"{r['init']} ({r['max_steps']} sweeps, BN {r.get('batch_norm', 'update')} in training, "
            f"lr {r.get('learning_rate', 0.02)})")


def table(results) -> str:
    """Accuracy (%) per format and conv-parameter rate: the TNN seed's row, then ours per init and
    stage. ``distilled`` is after the fixed budget (steps × batch size images, same for all)."""
    runs = results["runs"]
    ratios = sorted({r["ratio"] for r in runs})
    lines = ["| format | initialisation | stage | " + " | ".join(f"{r:.0%}" for r in ratios) + " |",
             "|" + "---|" * (3 + len(ratios))]
    order = {init: i for i, init in enumerate(ALL_INITS)}
    for f in [f for f in ("svd", "cp", "tucker2", "cp+tucker2") if any(r["format"] == f for r in runs)]:
        if f in TNN:  # a mixed plan (cp+tucker2) has no seed row
            tnn = [f"{TNN[f][r]:.2f}" if r in TNN[f] else "–" for r in ratios]
            lines.append(f"| {f} | TNN seed | full retraining, 50 000 images | " + " | ".join(tnn) + " |")
        groups = sorted({_label(r): order[r["init"]] for r in runs if r["format"] == f}.items(), key=lambda kv: kv[1])
        for label, _ in groups:
            cell = {r["ratio"]: r for r in runs if r["format"] == f and _label(r) == label}
            for stage, field in (("no training", "accuracy_compressed"), ("BN re-estimated, no training", "accuracy_bn"),
                                 ("distilled", "accuracy_finetuned")):
                cells = [f"{100 * cell[r][field]:.2f}" if r in cell else "–" for r in ratios]
                lines.append(f"| {f} | {label} | {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(results) -> str:
    """One line per run: rates, where distillation started, its time and throughput, the load."""
    lines = ["| run | conv params | start | distil s | img/s | compress s | load (1 min) | date |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        rate = r["steps"] * r["batch_size"] / r["finetune_seconds"]
        lines.append(f"| {run_key(r)} ({r['max_steps']} sweeps) | {r['conv_param_rate']:.3f} | {r.get('start_from', 'compressed')} | "
                     f"{r['finetune_seconds']:.0f} | {rate:.1f} | {r['compress_seconds'] if r['compress_seconds'] is not None else 'cached'} | "
                     f"{r['loadavg'][0][0]:.1f} | {r['date']} |")
    return "\n".join(lines)


def targets(results) -> str:
    out = []
    for ratio, goal in TARGET.items():
        got = [r for r in results["runs"] if r["ratio"] == ratio]
        if not got:
            out.append(f"- {ratio:.0%}: target ≥ {goal}%: not measured")
            continue
        best = max(got, key=lambda r: r["accuracy_finetuned"])
        verdict = "met" if 100 * best["accuracy_finetuned"] >= goal else f"missed by {goal - 100 * best['accuracy_finetuned']:.2f} points"
        out.append(f"- {ratio:.0%}: target ≥ {goal}%: best {100 * best['accuracy_finetuned']:.2f}% "
                   f"({best['format']}, {best['init']}, {best['finetune_seconds']:.0f} s of distillation): {verdict}")
    # The same cell and recipe, any init, and image budgets within 15% (budgets measured at different
    # times differ a little; the 48-step runs of session 2 are not compared with budgeted ones).
    recipe = lambda r: re.sub(r"/img\d+", "", run_key(r).replace(f"/{r['init']}/", "/*/"))  # noqa: E731
    images = lambda r: r["steps"] * r["batch_size"]  # noqa: E731
    for sigma in sorted((r for r in results["runs"] if r["init"] == "sigma_seq"), key=run_key):
        others = {r["init"]: r["accuracy_finetuned"] for r in results["runs"] if r["init"] not in SIGMA_SEQ
                  and recipe(r) == recipe(sigma) and abs(images(r) - images(sigma)) <= 0.15 * images(sigma)}
        if others:
            wins = all(sigma["accuracy_finetuned"] > v for v in others.values())
            out.append(f"- {recipe(sigma)} ({images(sigma)} images): Σ-sequential {100 * sigma['accuracy_finetuned']:.2f} vs "
                       + ", ".join(f"{k} {100 * v:.2f}" for k, v in others.items())
                       + f": Σ-sequential {'beats every other init' if wins else 'does NOT beat every other init'}")
    return "\n".join(out)


def figure(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["format"], r["ratio"]) for r in results["runs"]})
    fig, axes = plt.subplots(1, len(combos), figsize=(4 * len(combos), 3.4), squeeze=False)
    for ax, (f, ratio) in zip(axes[0], combos):
        for r in results["runs"]:
            if (r["format"], r["ratio"]) != (f, ratio):
                continue
            ev = r["history"]["eval"]
            ax.plot([e["seconds"] for e in ev], [100 * e["accuracy"] for e in ev], INIT_STYLES[r["init"]],
                    marker="o" if r.get("batch_norm") == "frozen" else "x", ms=3,
                    label=f"{r['init']}, BN {r.get('batch_norm', 'update')}, lr {r.get('learning_rate', 0.02)}")
        ax.set_title(f"ResNet-32 {f} {ratio:.0%}")
        ax.set_xlabel("distillation time (s, loaded 2-core CPU)")
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CPU_BUDGET_S = 600.0  # issue 13: "at most 10 minutes of distillation on the 2-core CPU"


# The plain format whose device-measured 2-core rate a reshaped format's budget starts from.
PLAIN = {"r-cp": "cp", "r-tucker": "tucker2", "r-tt": "cp", "r-tr": "cp"}
TRAINING_BENCHMARK = HERE.parents[1] / "benchmarks" / "training_implementations.json"


def relative_speed(format: str, reference: str) -> float | None:
    """``format``'s distillation throughput over ``reference``'s on the development CPU
    (benchmarks/training_implementations.py, ResNet-32 at 10% of the conv parameters), each the
    best of its three variants (factorized, dense, auto): the speed of its faster implementation,
    which is what ``"auto"`` trains with. The best rather than the "auto" row itself because the
    machine was shared: the same configuration measured 2× apart in one benchmark run. ``None``
    if either is missing."""
    rows = load_results(TRAINING_BENCHMARK).get("rows", {})
    rate = {k.split("/")[1]: max(r[v]["images_per_second"] for v in ("factorized", "dense", "auto"))
            for k, r in rows.items() if k.startswith("resnet32/") and "/0.1/" in k}
    return rate[format] / rate[reference] if format in rate and reference in rate else None


def cpu_budget(format: str, ratio: float, batch_size: int) -> dict:
    """Issue 13's budget as an image count, from the 2-core throughput that gpu_grid.py measured on
    the device machine (a quiet, pinned 2-core CPU), so that runs on a loaded development CPU or on
    a GPU train exactly as much as the 2-core CPU would in 10 minutes. A format the device did not
    measure (the reshaped ones) takes its plain format's rate (``PLAIN``) times its speed relative
    to that format, measured on the development CPU (:func:`relative_speed`). A mixed plan
    (``"cp+tucker2"``) takes the slower of its formats' rates: fewer images, never more."""
    if "+" in format:
        slowest = min((cpu_budget(f, ratio, batch_size) for f in format.split("+")),
                      key=lambda b: b["cpu_images_per_second"])
        return dict(slowest, source=slowest["source"] + f"; the slowest of {format}")
    measured = {k: v["images_per_second"] for k, v in
                load_results(HERE / "cpu_throughput.json").get("device", {}).get("formats", {}).items()
                if v.get("images_per_second")}
    base = PLAIN.get(format, format)
    rates = {float(k.split("@")[1]): v for k, v in measured.items() if k.split("@")[0] == base}
    if not rates:
        raise SystemExit(f"--cpu-budget: no 2-core throughput of {base} in cpu_throughput.json")
    near = min(rates, key=lambda r: abs(r - ratio))
    rate = rates[near]
    source = f"device 2-core CPU, {base}@{near}" + ("" if (base, near) == (format, ratio) else
                                                     f" (used for {format}@{ratio}: its own was not measured)")
    if base != format:
        speed = relative_speed(format, base)
        if speed is None:
            source += f"; no {format}/{base} speed ratio measured in {TRAINING_BENCHMARK.name}: taken as 1"
        else:
            rate *= speed
            source += f" × {speed:.3f} ({format}/{base} distillation speed, dev CPU, {TRAINING_BENCHMARK.name})"
    images = int(CPU_BUDGET_S * rate) // batch_size * batch_size
    return dict(cpu_seconds=CPU_BUDGET_S, cpu_images_per_second=rate, source=source, images=images, waited_seconds=0.0)


def cell_config(config: Config, key: tuple, args) -> tuple[Config, dict | None]:
    """The configuration of one cell: with ``--cpu-budget``, its steps come from its image budget."""
    if not args.cpu_budget:
        return config, None
    budget = cpu_budget(key[0], key[1], config.batch_size)
    return with_images(config, budget["images"]), budget


def with_images(config: Config, images: int) -> Config:
    """``config`` training on ``images`` images: whole batches, evaluated 8 times along the way."""
    steps = images // config.batch_size
    return dataclasses.replace(config, steps=steps, eval_every=max(1, steps // 8))


def with_overrides(config: Config, args) -> Config:
    """The configuration with the command line's recipe overrides applied."""
    names = dict(lr="learning_rate", feature_weight="feature_weight", optimizer="optimizer", ce="label_weight",
                 batch_norm="batch_norm", batch_size="batch_size", mix="mix", guard="divergence_factor",
                 validation="validation", validation_metric="validation_metric")
    config = dataclasses.replace(config, **{field: getattr(args, arg) for arg, field in names.items()
                                            if getattr(args, arg) is not None})
    if args.no_guard:
        config = dataclasses.replace(config, divergence_factor=None)
    if args.balance:
        config = dataclasses.replace(config, balance=True)
    if args.images is not None:
        if args.images < config.batch_size:
            raise SystemExit(f"--images {args.images} is less than one batch of {config.batch_size}")
        config = with_images(config, args.images)
    return config


def main(argv=None):
    args = parse_args(argv)
    config = SMOKE if args.smoke else FULL
    config = with_overrides(config, args)
    out = args.out or (pathlib.Path(tempfile.mkdtemp(prefix="finetune_smoke_")) if args.smoke else HERE)
    results = load_results(out / args.results)
    if args.merge:
        for name in args.merge:
            other = load_results(out / name)
            results.update({k: v for k, v in other.items() if k not in ("runs", "sessions")})
            results.setdefault("sessions", []).extend(other.get("sessions", []))
            for record in other["runs"]:
                add_run(results, record, run_key)
        save_results(results, out / args.results)
    elif args.dense_bn:
        results["dense_bn"] = dense_bn(config, args)
        save_results(results, out / args.results)
    elif not args.table:
        start = time.perf_counter()
        run_all(config, args, results, out)
        results.setdefault("sessions", []).append(dict(
            wall_seconds=round(time.perf_counter() - start, 1), loadavg=os.getloadavg(),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), argv=sys.argv[1:]))
        save_results(results, out / args.results)
    if results["runs"]:
        print(table(results))
        print()
        print(details(results))
        print()
        print(targets(results))
        if "dense_bn" in results:
            d = results["dense_bn"]
            print(f"- dense ResNet-{d['arch']}: {100 * d['accuracy']:.2f}% -> {100 * d['accuracy_bn']:.2f}% after BN "
                  f"re-estimation on {d['calib_images']} calibration images")
        figure(results, out / "figure.png")


if __name__ == "__main__":
    main()
