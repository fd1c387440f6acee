"""Σ-ALS vs classic (Frobenius) ALS on CIFAR-10 ResNets, no fine-tuning.

    .venv/bin/python experiments/sigma_vs_frobenius/main.py               # full, resumable
    .venv/bin/python experiments/sigma_vs_frobenius/main.py --smoke --out /tmp/smoke
    .venv/bin/python experiments/sigma_vs_frobenius/main.py --table       # table from results.json

Every run is appended to ``results.json`` as soon as it finishes; runs already there are skipped
(``--force`` redoes them), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
# A script's sys.path[0] is its own folder: add the repository root (runs from a checkout without
# `pip install -e .`) and this folder (for config.py).
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE)]

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # covariances accumulate in float64; models stay float32

import numpy as np  # noqa: E402

from sigmadecomp import calibration as seqcal  # noqa: E402
from sigmadecomp import compress  # noqa: E402
from sigmadecomp.data import cifar10_normalize, load_cifar10, sample  # noqa: E402
from sigmadecomp.models import pretrained_resnet  # noqa: E402
from sigmadecomp.surgery import FORMAT_NAMES, plan  # noqa: E402

import _results  # noqa: E402
from config import ENGINE, FULL, SMOKE, Config  # noqa: E402

INPUT_SHAPE = (1, 32, 32, 3)
ARCHS = (20, 32, 56)  # the pretrained weights of the data kit
CALIBRATIONS = ("parallel", "sequential", "sequential+bias")
KEY_FIELDS = ("arch", "calibration", "format", "norm", "ratio")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=pathlib.Path, default=HERE.parents[1] / ".." / "shared" / "data",
                   help="data kit with cifar10/ and weights/ (default ../shared/data)")
    p.add_argument("--out", type=pathlib.Path, help="where results.json and figure.png go (default: this "
                   "folder; with --smoke a folder in the system's temporary directory)")
    p.add_argument("--smoke", action="store_true", help="tiny configuration for CI (seconds)")
    p.add_argument("--engine", action="store_true", help="the engine formats' configuration (issue 14: "
                   "tucker3, tt, tr × both norms × parallel/sequential × ratios 0.5/0.33/0.25)")
    p.add_argument("--force", action="store_true", help="redo runs already in results.json")
    p.add_argument("--table", action="store_true", help="print the table (and figure) from results.json only")
    p.add_argument("--archs", type=int, nargs="+", help="subset of depths, e.g. 20 32")
    p.add_argument("--formats", nargs="+", help="subset of formats, e.g. tucker2 cp")
    p.add_argument("--norms", nargs="+", help="subset of norms: frobenius sigma")
    p.add_argument("--ratios", type=float, nargs="+", help="subset of parameter ratios")
    p.add_argument("--calibrations", nargs="+", help="subset of calibration modes")
    return p.parse_args(argv)


def select(config: Config, args) -> Config:
    """The configuration with the command-line filters applied (unknown values are errors)."""
    allowed = dict(archs=ARCHS, formats=FORMAT_NAMES, norms=compress.NORMS, calibrations=CALIBRATIONS)
    changes = {}
    for name in ("archs", "formats", "norms", "ratios", "calibrations"):
        wanted = getattr(args, name)
        if wanted is None:
            continue
        bad = [v for v in wanted if not 0 < v <= 1] if name == "ratios" else [
            v for v in wanted if v not in allowed[name]]
        if bad:
            raise SystemExit(f"--{name}: {bad} not allowed; choose from "
                             f"{'(0, 1]' if name == 'ratios' else allowed[name]}")
        changes[name] = tuple(wanted)
    return dataclasses.replace(config, **changes)


# ---------------------------------------------------------------- results file


def run_key(record: dict) -> tuple:
    return tuple(record[f] for f in KEY_FIELDS)


def load_results(path: pathlib.Path) -> dict:
    results = _results.load_results(path)
    results.setdefault("calibration_seconds", {})
    results.setdefault("meta", {})
    return results


save_results = _results.save_results


# Settings that change every number but are not axes of the run key: a results file holds runs of
# one value of each, and resuming with other values is refused (the key would not tell them apart).
SETTINGS = ("calib_images", "test_images", "calib_seed", "compress_seed", "max_steps", "skip", "batch_size")


def settings_of(config: dict) -> dict:
    return {name: json.loads(json.dumps(config[name])) for name in SETTINGS}


def check_resumable(results: dict, base: Config, path: pathlib.Path) -> None:
    """Exit with a one-line error when ``path`` holds runs made with other settings."""
    old = results.get("meta", {}).get("config")
    if not results["runs"] or old is None:
        return
    new = settings_of(dataclasses.asdict(base))
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if changed:
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise SystemExit(f"{path} holds {len(results['runs'])} run(s) made with other settings ({what}); "
                         f"refusing to mix them: use another --out, or delete the file to start over")


def add_run(results: dict, record: dict) -> None:
    _results.add_run(results, record, run_key)


machine = _results.machine


# ---------------------------------------------------------------- the measurements


@dataclasses.dataclass
class Arch:
    """One pretrained model with its calibration statistics and whole-model counts."""

    depth: int
    model: object
    covariances: dict | None
    calib: object  # the calibration images (sequential runs gather their own statistics)
    params: int
    macs: int  # conv + dense multiply-accumulates per image of the uncompressed model


def load_data(data: pathlib.Path, config: Config):
    train_x, _ = load_cifar10(data / "cifar10", "train")
    calib = cifar10_normalize(sample(train_x, None, config.calib_images, key=jax.random.key(config.calib_seed)))
    test_x, test_y = load_cifar10(data / "cifar10", "test", limit=config.test_images)
    return calib, cifar10_normalize(test_x), test_y


def whole_model_macs(model) -> int:
    """Conv + dense MACs per image of the dense model (a ratio-1 plan of every layer is only read)."""
    full = plan(model, format="svd", ratio=1.0, input_shape=INPUT_SHAPE)
    return int(full.flops_before)


def prepare_arch(depth: int, data: pathlib.Path, calib, config: Config, results: dict) -> Arch:
    model = pretrained_resnet(depth, data / "weights" / f"resnet{depth}_cifar10.safetensors")
    paths = plan(model, format="svd", ratio=0.5, skip=config.skip).paths
    start = time.perf_counter()
    covariances = compress.calibrate(model, calib, layers=paths, batch_size=config.batch_size, progress=False)
    jax.block_until_ready([c.cov for c in covariances.values()])
    results["calibration_seconds"][f"resnet{depth}"] = round(time.perf_counter() - start, 2)
    return Arch(depth, model, covariances, calib, compress.count_params(model), whole_model_macs(model))


def measure(arch: Arch, key: tuple, test, config: Config) -> dict:
    depth, calibration, format, norm, ratio = key
    start = time.perf_counter()
    result = compress_one(arch, key, config)
    scores = compress.evaluate_agreement(arch.model, result.model, *test, batch_size=config.batch_size)
    p = result.plan
    macs = arch.macs - p.flops_before + p.flops_after
    return dict(
        arch=depth, calibration=calibration, format=format, norm=norm, ratio=ratio, **scores,
        params=compress.count_params(result.model), baseline_params=arch.params,
        params_ratio=compress.count_params(result.model) / arch.params,
        layer_params_ratio=p.params_after / p.params_before,
        macs=macs, baseline_macs=arch.macs, macs_ratio=macs / arch.macs,
        mean_relative_error=result.mean_relative_error,
        layer_errors=[round(layer.relative_error, 6) for layer in result.layers],
        statuses=dict(collections.Counter(layer.status for layer in result.layers)),
        max_steps=config.sweeps(format), mean_steps=float(np.mean([layer.num_steps for layer in result.layers])),
        max_history_increase=max(layer.max_increase for layer in result.layers),
        loadavg=[round(x, 2) for x in os.getloadavg()],
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        compress_seconds=round(result.seconds, 2), seconds=round(time.perf_counter() - start, 2),
        calib_images=config.calib_images, test_images=len(test[1]),
    )


def compress_one(arch: Arch, key: tuple, config: Config):
    """Parallel: every layer from the original network's cov (measured once per architecture).
    Sequential: layers in execution order, each fitted to the inputs it sees in the partially
    compressed network (Σ only), optionally with bias correction."""
    depth, calibration, format, norm, ratio = key
    common = dict(format=format, ratio=ratio, key=jax.random.key(config.compress_seed), skip=config.skip,
                  max_steps=config.sweeps(format), batch_size=config.batch_size, progress=False)
    if calibration == "parallel":
        return compress.compress_model(arch.model, norm=norm, covariances=arch.covariances,
                                       input_shape=INPUT_SHAPE, **common)
    if norm != "sigma":
        raise ValueError(f"{calibration} calibration fits the Σ norm only; got norm {norm!r}")
    return seqcal.compress_sequential(arch.model, arch.calib,
                                      bias_correction=calibration == "sequential+bias", **common)


def run_all(config: Config, args, results: dict, out: pathlib.Path) -> None:
    done = {run_key(r) for r in results["runs"]}
    todo = [k for k in config.runs() if args.force or k not in done]
    print(f"{len(todo)} run(s) to do, {len(done)} already in {out}", flush=True)
    if not todo:
        return
    calib, test_x, test_y = load_data(args.data, config)
    for depth in dict.fromkeys(k[0] for k in todo):
        arch = prepare_arch(depth, args.data, calib, config, results)
        print(f"resnet{depth}: calibrated in {results['calibration_seconds'][f'resnet{depth}']} s", flush=True)
        for key in (k for k in todo if k[0] == depth):
            record = measure(arch, key, (test_x, test_y), config)
            add_run(results, record)
            save_results(results, out)
            print(f"resnet{depth} {key[2]:8s} {key[3]:9s} ratio {key[4]:.2f}: acc {record['accuracy']:.4f} "
                  f"(base {record['baseline_accuracy']:.4f}) Σ-err {record['mean_relative_error']:.4f} "
                  f"{record['seconds']:.1f} s {record['statuses']}", flush=True)


# ---------------------------------------------------------------- table and figure


_FORMAT_ORDER = {name: i for i, name in enumerate(FORMAT_NAMES)}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def accuracy_table(runs: list[dict]) -> str:
    """Accuracy (%) per architecture × format × norm (rows) and parameter ratio (columns)."""
    ratios = sorted({r["ratio"] for r in runs}, reverse=True)
    cells = {(r["arch"], r["calibration"], r["format"], r["norm"], r["ratio"]): r for r in runs}
    rows = sorted({k[:4] for k in cells}, key=lambda k: (k[0], k[1], _FORMAT_ORDER[k[2]], k[3]))
    head = "| model | calibration | format | norm | baseline | " + " | ".join(f"ratio {x:g}" for x in ratios) + " |"
    lines = [head, "|" + "---|" * (5 + len(ratios))]
    for row in rows:
        base = next(cells[row + (x,)]["baseline_accuracy"] for x in ratios if row + (x,) in cells)
        accs = [_pct(cells[row + (x,)]["accuracy"]) if row + (x,) in cells else "—" for x in ratios]
        lines.append(f"| ResNet-{row[0]} | {row[1]} | {row[2]} | {row[3]} | {_pct(base)} | " + " | ".join(accs) + " |")
    return "\n".join(lines)


def detail_table(runs: list[dict]) -> str:
    """One line per run with every recorded quantity."""
    head = ("| model | calibration | format | norm | ratio | acc % | agree % | params/base | MACs/base "
            "| mean rel err | steps (mean/max) | statuses | s |")
    lines = [head, "|" + "---|" * 13]
    for r in sorted(runs, key=lambda r: (r["arch"], r["calibration"], _FORMAT_ORDER[r["format"]], -r["ratio"],
                                         r["norm"])):
        steps = "—" if r["max_steps"] is None else f"{r['mean_steps']:.1f}/{r['max_steps']}"
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items()))
        lines.append(f"| ResNet-{r['arch']} | {r['calibration']} | {r['format']} | {r['norm']} | {r['ratio']:g} | {_pct(r['accuracy'])} "
                     f"| {_pct(r['agreement'])} | {r['params_ratio']:.3f} | {r['macs_ratio']:.3f} "
                     f"| {r['mean_relative_error']:.4f} | {steps} | {statuses} | {r['seconds']:.0f} |")
    return "\n".join(lines)


# (marker, line style) per (calibration, norm): Frobenius dotted, Σ solid, sequential dashed.
_STYLES = {("parallel", "frobenius"): ("x", ":"), ("parallel", "sigma"): ("o", "-"),
           ("sequential", "sigma"): ("s", "--"), ("sequential+bias", "sigma"): ("^", "-.")}


def figure(runs: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r["arch"] for r in runs})
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 4), squeeze=False, sharey=True)
    colors = {"svd": "tab:blue", "tucker2": "tab:orange", "cp": "tab:green", "cp3": "tab:red",
              "tucker3": "tab:purple", "tt": "tab:brown", "tr": "tab:pink"}
    for ax, arch in zip(axes[0], archs):
        mine = [r for r in runs if r["arch"] == arch]
        for (calibration, format, norm) in sorted({(r["calibration"], r["format"], r["norm"]) for r in mine}):
            line = sorted((r["ratio"], r["accuracy"]) for r in mine
                          if (r["calibration"], r["format"], r["norm"]) == (calibration, format, norm))
            label = f"{format} {'Σ' if norm == 'sigma' else 'Frobenius'}" + (
                "" if calibration == "parallel" else f" ({calibration})")
            marker, style = _STYLES[(calibration, norm)]
            ax.plot(*zip(*line), marker=marker, color=colors.get(format), linestyle=style, label=label)
        ax.axhline(mine[0]["baseline_accuracy"], color="gray", linestyle="--", label="baseline (dense)")
        ax.set(title=f"ResNet-{arch}", xlabel="parameter ratio per layer (target)", xlim=(0.2, 0.75))
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (512 test images)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="center left",
               bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Σ-ALS vs Frobenius ALS, no fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def statistics(runs: list[dict]) -> str:
    """The statistics quoted in the README prose, computed from the runs (paste them from here)."""
    by = {run_key(r): r for r in runs}
    lines = []
    gains, losses = [], []
    for (arch, calibration, fmt, norm, ratio), r in sorted(by.items()):
        par = by.get((arch, "parallel", fmt, "sigma", ratio))
        if calibration == "sequential" and par is not None:
            gains.append(100 * (r["accuracy"] - par["accuracy"]))
            if r["accuracy"] < par["accuracy"]:
                losses.append(f"ResNet-{arch} {fmt} {ratio:g} ({_pct(par['accuracy'])} → {_pct(r['accuracy'])})")
    if gains:
        g = np.asarray(gains)
        lines.append(f"sequential vs parallel Σ: better in {int(np.sum(g > 0))} of {len(g)} pairs, tied in "
                     f"{int(np.sum(g == 0))}, worse in {int(np.sum(g < 0))}; by {g.min():+.1f} to {g.max():+.1f} "
                     f"points (median {np.median(g):+.1f}); losses: {', '.join(losses) or 'none'}")
    factors, wins, ties, fits, exceptions = [], 0, 0, 0, []
    for (arch, calibration, fmt, norm, ratio), r in sorted(by.items()):
        frob = by.get((arch, calibration, fmt, "frobenius", ratio))
        if calibration != "parallel" or norm != "sigma" or frob is None:
            continue
        factors.append(frob["mean_relative_error"] / r["mean_relative_error"])
        for i, (s, f) in enumerate(zip(r["layer_errors"], frob["layer_errors"])):
            fits, wins, ties = fits + 1, wins + (s < f), ties + (s == f)
            if s >= f:
                exceptions.append(f"ResNet-{arch} {fmt} {ratio:g} layer {i}")
    if factors:
        lines.append(f"mean Σ-error, Frobenius / Σ fit: {min(factors):.2f}–{max(factors):.2f} (median "
                     f"{np.median(factors):.2f}) over {len(factors)} pairs, Σ lower in "
                     f"{sum(f > 1 for f in factors)}")
        lines.append(f"layer fits where the Σ fit has the strictly lower Σ-error (6 decimals as recorded): "
                     f"{wins} of {fits}; ties {ties}; exceptions: {', '.join(exceptions) or 'none'}")
    return "\n".join(lines)


ENGINE_FORMATS = ("tucker3", "tt", "tr")


def engine_targets(runs: list[dict]) -> str:
    """Issue 14's targets, from the recorded runs: per layer, is the Σ fit's Σ-error <= the
    Frobenius fit's (parallel calibration, same ranks)? Did any error history rise? How far is
    sequential Σ at ratio 0.5 from the dense accuracy?"""
    cells = {(r["arch"], r["calibration"], r["format"], r["norm"], r["ratio"]): r for r in runs}
    lines = ["| model | format | ratio | layers Σ-err(Σ fit) <= Σ-err(F fit) | worst Σ/F layer ratio "
             "| max history rise (Σ, F) |", "|---|---|---|---|---|---|"]
    for (arch, cal, fmt, norm, ratio), r in sorted(cells.items()):
        if fmt not in ENGINE_FORMATS or cal != "parallel" or norm != "sigma":
            continue
        f = cells.get((arch, cal, fmt, "frobenius", ratio))
        if f is None:
            continue
        pairs = list(zip(r["layer_errors"], f["layer_errors"]))
        wins = sum(s <= fr for s, fr in pairs)
        worst = max(s / fr for s, fr in pairs if fr > 0)
        rises = (r.get("max_history_increase"), f.get("max_history_increase"))
        lines.append(f"| ResNet-{arch} | {fmt} | {ratio:g} | {wins}/{len(pairs)} | {worst:.3f} | "
                     f"{rises[0]:.2g}, {rises[1]:.2g} |")
    lines += ["", "| model | format | calibration | ratio | accuracy % | dense % | gap (points) |",
              "|---|---|---|---|---|---|---|"]
    for (arch, cal, fmt, norm, ratio), r in sorted(cells.items()):
        if fmt in ENGINE_FORMATS and cal == "sequential":
            gap = 100 * (r["baseline_accuracy"] - r["accuracy"])
            lines.append(f"| ResNet-{arch} | {fmt} | {cal} | {ratio:g} | {_pct(r['accuracy'])} | "
                         f"{_pct(r['baseline_accuracy'])} | {gap:.1f} |")
    return "\n".join(lines)


def report(results: dict, out_dir: pathlib.Path) -> None:
    runs = results["runs"]
    if not runs:
        print("no runs in results.json yet")
        return
    print(accuracy_table(runs), "\n", detail_table(runs), "\n", statistics(runs), sep="\n")
    if any(r["format"] in ENGINE_FORMATS for r in runs):
        print("\n" + engine_targets(runs))
    figure(runs, out_dir / "figure.png")


def main(argv=None) -> None:
    args = parse_args(argv)
    base = SMOKE if args.smoke else ENGINE if args.engine else FULL
    config = select(base, args)
    if args.out is None:
        args.out = pathlib.Path(tempfile.gettempdir()) / "sigma_vs_frobenius_smoke" if args.smoke else HERE
    out = args.out / "results.json"
    results = load_results(out)
    if not args.table:
        check_resumable(results, base, out)
        start = time.perf_counter()
        meta = dict(config=dataclasses.asdict(base), machine=machine(), jax=jax.__version__, smoke=args.smoke)
        results["meta_engine" if args.engine else "meta"] = meta
        session = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), argv=sys.argv[1:])
        run_all(config, args, results, out)
        session["wall_seconds"] = round(time.perf_counter() - start, 1)
        results.setdefault("sessions", []).append(session)
        save_results(results, out)
    report(results, args.out)


if __name__ == "__main__":
    main()
