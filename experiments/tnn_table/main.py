"""The TNN seed's ResNet-32 table on our data: plain and reshaped formats × conv-parameter rates,
Σ-sequential with no training and after distillation (``sigmadecomp.finetune``).

    python experiments/tnn_table/main.py --out experiments/tnn_table/results            # full, resumable
    python experiments/tnn_table/main.py --smoke --out /tmp/tnn_smoke                   # seconds
    python experiments/tnn_table/main.py --distill-steps 0 --only r-tt:0.05 svd:0.05    # no-training column
    python experiments/tnn_table/main.py --shard 2/4 --budget-s 500 --data gpu_data --out out   # worker 2 of 4
    python experiments/tnn_table/report.py --out experiments/tnn_table/results         # merged tables

Each worker (``--shard i/n`` takes every n-th cell, starting at i) writes ONE file,
``results_<i>of<n>.json`` in ``--out``, after every cell; cells already there are skipped, so a
run resumes where it stopped. ``--budget-s`` is the worker's wall-clock budget: no new cell starts
once it is spent, and a distillation is cut (``FinetuneConfig.time_limit``) at the budget; a cell
whose distillation was cut or skipped is recorded as such and redone on the next run. The training
images are the data kit's 5 085 training images; the 512 test images are only evaluated.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]
if (HERE.parents[1] / "gpu_vendor").is_dir():  # pure runtime dependencies unpacked for a bare device
    sys.path.append(str(HERE.parents[1] / "gpu_vendor"))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Several shard workers share one GPU: no worker may preallocate most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # covariances accumulate in float64; models stay float32

import numpy as np  # noqa: E402

from sigmadecomp import calibration as seqcal  # noqa: E402
from sigmadecomp import compress  # noqa: E402
from sigmadecomp import finetune as ft  # noqa: E402
from sigmadecomp.data import cifar10_normalize, load_cifar10, sample  # noqa: E402
from sigmadecomp.models import pretrained_resnet  # noqa: E402

from config import FULL, SMOKE, Config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=pathlib.Path, default=HERE.parents[1] / ".." / "shared" / "data",
                   help="the data kit (cifar10/, weights/)")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="folder of the results files (default: ./results here; with --smoke a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (ResNet-20, one layer, seconds)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of this worker in seconds")
    p.add_argument("--shard", default="0/1", help="i/n: run cells i, i+n, i+2n, … (one results file per shard)")
    p.add_argument("--distill-steps", type=int, default=None, help="distillation steps per cell (0: none)")
    p.add_argument("--lr", type=float, default=None, help="peak distillation learning rate (default: the config's)")
    p.add_argument("--feature-weight", type=float, default=None, help="β of the block-output feature term")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None)
    p.add_argument("--mix", choices=("none", "mixup", "cutmix"), default=None)
    p.add_argument("--batch-size", type=int, default=None, help="distillation batch size")
    p.add_argument("--models", type=pathlib.Path, default=None, help="cache of compressed models: a cell "
                   "whose model is there is not compressed again (saved there otherwise)")
    p.add_argument("--only", nargs="+", default=None, metavar="FORMAT:RATIO", help="run only these cells")
    p.add_argument("--arch", type=int, default=None, help="ResNet depth (default: the config's, 32)")
    p.add_argument("--compile-cache", default="/tmp/sigmadecomp_tnn_jax_cache",
                   help="JAX persistent compilation cache shared by the shard workers ('' = off); outside --out")
    return p.parse_args(argv)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must be i/n with integers, e.g. 0/4; got {text!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"--shard i/n needs 0 <= i < n; got {text!r}")
    return i, n


def cell_key(arch, fmt, ratio, config: Config) -> str:
    return record_key(dict(dataclasses.asdict(config), arch=arch, format=fmt, ratio=ratio))


def record_key(r: dict) -> str:
    """The key of a recorded cell, from its own settings (a results file may hold several recipes)."""
    return (f"resnet{r['arch']}/{r['format']}/{r['ratio']}/sweeps{r['max_steps']}/distill{r['distill_steps']}"
            + recipe_tag(r))


def recipe_tag(r: dict) -> str:
    """The distillation recipe where it differs from the first runs' (lr 0.002, SGD, KL only)."""
    if not r.get("distill_steps", 0):
        return ""
    parts = [f"lr{r['learning_rate']}"] if r.get("learning_rate", 0.002) != 0.002 else []
    parts += [f"feat{r['feature_weight']}"] if r.get("feature_weight", 0.0) else []
    parts += [r["optimizer"]] if r.get("optimizer", "sgd") != "sgd" else []
    parts += [r["mix"]] if r.get("mix", "none") != "none" else []
    return "".join("/" + p for p in parts)


def load_results(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"cells": []}


def save_results(results: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    os.replace(tmp, path)


def device() -> str:
    d = jax.devices()[0]
    return f"{d.platform}: {getattr(d, 'device_kind', '')} ({jax.device_count()} device(s), {os.cpu_count()} CPU cores)"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Data:
    """Model, calibration, training and test images, loaded once per worker."""

    def __init__(self, config: Config, data: pathlib.Path):
        weights = data / "weights" / f"resnet{config.arch}_cifar10.safetensors"
        self.model = pretrained_resnet(config.arch, weights)
        train_x, _ = load_cifar10(data / "cifar10", "train")
        self.train = cifar10_normalize(train_x)
        self.calib = cifar10_normalize(sample(train_x, None, config.calib_images, key=jax.random.key(config.calib_seed)))
        test_x, self.test_y = load_cifar10(data / "cifar10", "test", limit=config.test_images)
        self.test_x = cifar10_normalize(test_x)

    def accuracy(self, model) -> float:
        return float(np.mean(compress.predict_labels(model, self.test_x) == self.test_y))


def conv_rate(model, plan) -> float:
    """Parameters of all convs after / before (uncompressed convs count as kept)."""
    total = sum(int(np.prod(layer.kernel[...].shape)) for layer in _convs(model))
    return (total - plan.params_before + plan.params_after) / total


def _convs(model):
    from flax import nnx

    return [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]


class _Cached:
    """What run_cell reads of a compression result, for a model loaded from the cache."""

    def __init__(self, model, plan, meta):
        self.model, self.plan, self.layers = model, plan, meta["layers"]
        self.mean_relative_error, self.kept_dense = meta["mean_relative_error"], meta["kept_dense"]


def compressed(d: Data, fmt: str, ratio: float, config: Config, skip, models: pathlib.Path | None):
    """Σ-sequential compression of the cell, or its model from the ``models`` cache."""
    from sigmadecomp.surgery import Plan, load, save

    # experiments/finetune's folder name for the same Σ-sequential model (same calibration images,
    # seeds and sweeps), so either experiment reuses the other's; a smoke run compresses only some
    # layers, so its models get their own names. Models finetune made carry no cell.json.
    folder = None if models is None else models / (f"resnet{config.arch}-{fmt}-{ratio}-sigma_seq-sweeps{config.max_steps}"
                                                   + ("-only" if config.only else ""))
    if folder is not None and (folder / "plan.json").is_file():
        meta = (json.loads((folder / "cell.json").read_text()) if (folder / "cell.json").is_file()
                else dict(layers=None, mean_relative_error=None, kept_dense=[]))
        plan = Plan.from_dict(json.loads((folder / "plan.json").read_text())["plan"])
        return _Cached(load(folder, d.model), plan, meta)
    result = seqcal.compress_sequential(d.model, d.calib, format=fmt, ratio=ratio, key=jax.random.key(config.compress_seed),
                                        skip=skip, max_steps=config.max_steps, progress=False)
    if folder is not None:
        save(folder, result.model, result.plan)
        (folder / "cell.json").write_text(json.dumps(dict(
            layers=len(result.layers), kept_dense=list(getattr(result, "kept_dense", [])),
            mean_relative_error=result.mean_relative_error if result.layers else None)))
    return result


def run_cell(d: Data, fmt: str, ratio: float, config: Config, deadline: float | None,
             models: pathlib.Path | None = None) -> dict:
    skip = (lambda p: p not in config.only) if config.only else config.skip
    load = os.getloadavg()
    tic = time.perf_counter()
    result = compressed(d, fmt, ratio, config, skip, models)
    compress_seconds = time.perf_counter() - tic
    record = dict(
        arch=config.arch, format=fmt, ratio=ratio, max_steps=config.max_steps, distill_steps=config.distill_steps,
        batch_size=config.batch_size, learning_rate=config.learning_rate, feature_weight=config.feature_weight,
        optimizer=config.optimizer, mix=config.mix, model_from_cache=isinstance(result, _Cached),
        conv_param_rate=conv_rate(d.model, result.plan) if result.plan.entries else 1.0,
        layers_compressed=len(result.plan.entries), kept_dense=[k["path"] for k in getattr(result, "kept_dense", [])],
        accuracy_dense=d.accuracy(d.model), accuracy_no_training=d.accuracy(result.model),
        mean_relative_error=result.mean_relative_error if result.layers else None,  # per-layer cross error, mean
        compress_seconds=round(compress_seconds, 2), accuracy_distilled=None, distill_seconds=None, distill="not run",
    )
    if config.distill_steps > 0:
        record.update(distill(d, result.model, config, deadline))
    record.update(loadavg=[load, os.getloadavg()], date=now(), device=device(), jax=jax.__version__,
                  train_images=len(d.train), calib_images=len(d.calib), test_images=len(d.test_y))
    return record


def distill(d: Data, student, config: Config, deadline: float | None) -> dict:
    left = None if deadline is None else deadline - time.perf_counter()
    if left is not None and left <= 0:
        return dict(distill="skipped: budget spent")
    cfg = ft.FinetuneConfig(epochs=1, batch_size=config.batch_size, learning_rate=config.learning_rate,
                            temperature=config.temperature, batch_norm=config.batch_norm,
                            feature_weight=config.feature_weight, optimizer=config.optimizer, mix=config.mix,
                            eval_every=config.distill_steps, log_every=max(1, config.distill_steps // 10),
                            time_limit=left)
    images = sample(d.train, None, config.distill_steps * config.batch_size, key=jax.random.key(config.train_seed + 1))
    run = ft.finetune(student, d.model, images, key=jax.random.key(config.train_seed), config=cfg,
                      evaluate=lambda m: {"accuracy": d.accuracy(m)}, progress=False)
    cut = run.stopped == "time_limit"  # "diverged": the guard gave up; the last healthy model is the result
    return dict(accuracy_distilled=None if cut else run.history["eval"][-1]["accuracy"],
                accuracy_at_cut=run.history["eval"][-1]["accuracy"] if cut and run.history["eval"] else None,
                distill_seconds=round(run.seconds, 2), distill_steps_done=run.steps,
                distill=f"cut by the budget after {run.steps} steps" if cut else run.stopped,
                divergence_factor=cfg.divergence_factor, rollbacks=run.rollbacks,
                images_per_second=round(run.steps * config.batch_size / max(run.seconds, 1e-9), 1))


def complete(record: dict) -> bool:
    """Done: no error, and distilled when distillation was asked for (else redone on resume)."""
    return "error" not in record and (record["distill_steps"] == 0 or record["accuracy_distilled"] is not None)


def failed_cell(fmt, ratio, config: Config) -> dict:
    """A cell that raised: recorded with its traceback; the other cells go on (redone on resume)."""
    import traceback

    return dict(arch=config.arch, format=fmt, ratio=ratio, max_steps=config.max_steps, distill_steps=config.distill_steps,
                batch_size=config.batch_size, learning_rate=config.learning_rate, feature_weight=config.feature_weight,
                optimizer=config.optimizer, mix=config.mix, error=traceback.format_exc(), date=now(), device=device(),
                loadavg=[os.getloadavg()] * 2)


def _same(a, b) -> bool:
    return record_key(a) == record_key(b)


def run_all(config: Config, args, out: pathlib.Path) -> dict:
    shard, shards = parse_shard(args.shard)
    path = out / f"results_{shard}of{shards}.json"
    results = load_results(path)
    start, deadline = time.perf_counter(), None if args.budget_s is None else time.perf_counter() + args.budget_s
    cells = list(config.cells) if args.only is None else [(f, float(r)) for f, r in (c.split(":") for c in args.only)]
    mine = cells[shard::shards]
    done = {record_key(r) for r in results["cells"] if complete(r)}
    todo = [c for c in mine if cell_key(config.arch, *c, config) not in done]
    print(f"shard {shard}/{shards}: {len(todo)} cell(s) to do of {len(mine)}; results in {path}", flush=True)
    results["meta"] = dict(config=dataclasses.asdict(config), device=device(), jax=jax.__version__,
                           machine=f"{platform.machine()} {os.cpu_count()} cores")
    d = Data(config, args.data) if todo else None
    for fmt, ratio in todo:
        if deadline is not None and time.perf_counter() >= deadline:
            print(f"budget of {args.budget_s:.0f} s spent; {fmt}:{ratio} and later cells not started", flush=True)
            break
        try:
            record = run_cell(d, fmt, ratio, config, deadline, args.models)
        except Exception:  # noqa: BLE001  (one failing cell must not stop an unattended worker)
            record = failed_cell(fmt, ratio, config)
            print(f"{fmt}:{ratio} FAILED:\n{record['error']}", flush=True)
            results["cells"] = [r for r in results["cells"] if not _same(r, record)] + [record]
            save_results(results, path)
            continue
        key = cell_key(config.arch, fmt, ratio, config)
        results["cells"] = [r for r in results["cells"] if record_key(r) != key] + [record]
        save_results(results, path)
        print(f"{key}: conv params {record['conv_param_rate']:.3f}  no training {record['accuracy_no_training']:.4f}  "
              f"distilled {record['accuracy_distilled']}  ({record['distill']}; compress {record['compress_seconds']:.0f} s)",
              flush=True)
    results.setdefault("sessions", []).append(dict(wall_seconds=round(time.perf_counter() - start, 1), date=now(),
                                                   loadavg=os.getloadavg(), argv=sys.argv[1:]))
    save_results(results, path)
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.compile_cache:  # the workers compile the same solver and layer programs: compile once
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    config = SMOKE if args.smoke else FULL
    overrides = {k: v for k, v in (("distill_steps", args.distill_steps), ("arch", args.arch), ("learning_rate", args.lr),
                                   ("feature_weight", args.feature_weight), ("optimizer", args.optimizer),
                                   ("batch_size", args.batch_size), ("mix", args.mix)) if v is not None}
    config = dataclasses.replace(config, **overrides)
    out = args.out or (pathlib.Path(tempfile.mkdtemp(prefix="tnn_smoke_")) if args.smoke else HERE / "results")
    return run_all(config, args, out)


if __name__ == "__main__":
    main()
