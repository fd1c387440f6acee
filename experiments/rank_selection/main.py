"""Rank selection (uniform / energy / vbmf / global) on CIFAR-10 ResNets, no fine-tuning.

    .venv/bin/python experiments/rank_selection/main.py              # full, resumable
    .venv/bin/python experiments/rank_selection/main.py --smoke --out /tmp/smoke
    .venv/bin/python experiments/rank_selection/main.py --table      # tables + figure from results.json

Each run: choose ranks with :func:`sigmadecomp.surgery.select_ranks` on the original network's
statistics, then compress (sequential Σ, or parallel for the Frobenius rows) and evaluate on the
dev test set. Every run is appended to ``results.json`` as soon as it finishes; runs already
there are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import os
import pathlib
import resource
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE)]

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # covariances accumulate in float64; models stay float32

from sigmadecomp import calibration as seqcal  # noqa: E402
from sigmadecomp import compress  # noqa: E402
from sigmadecomp.data import cifar10_normalize, load_cifar10, sample  # noqa: E402
from sigmadecomp.latency import machine_load, model_latency  # noqa: E402
from sigmadecomp.models import pretrained_resnet  # noqa: E402
from sigmadecomp.surgery import plan, select_ranks  # noqa: E402

from _results import add_run, load_results, merge, save_results  # noqa: E402
from config import FULL, SMOKE  # noqa: E402

INPUT_SHAPE = (1, 32, 32, 3)
RUN_FIELDS = ("arch", "format", "norm", "calibration", "rule", "budget")  # a run of Config.runs
# A result's key: the run and its calibration-set size (``--calib-images`` ablation; Config's default otherwise).
KEY_FIELDS = RUN_FIELDS + ("calib_images",)
# Published ResNet-20 / CIFAR-10 points: whole network, with training (ALDS: its "compress only"
# row). Their baselines differ from ours; the accuracy *drop* is what is comparable.
PUBLISHED = [
    dict(method="ALDS (Liebenwein et al. 2021), no fine-tune", params_ratio=0.5, drop=25.2),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=pathlib.Path, default=HERE.parents[1] / ".." / "shared" / "data")
    p.add_argument("--out", type=pathlib.Path, help="folder of results.json / figure.png (default: here; "
                   "with --smoke a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny configuration for CI (seconds)")
    p.add_argument("--table", action="store_true", help="print tables and draw the figure from results.json")
    p.add_argument("--limit", type=int, default=None, help="do at most this many runs")
    p.add_argument("--formats", nargs="+", help="only runs of these formats (e.g. a second process for cp)")
    p.add_argument("--rules", nargs="+", help="only runs of these rules (e.g. global_sweeps)")
    p.add_argument("--budgets", nargs="+", help="only runs of these budgets (e.g. flops=0.5 flops=0.33)")
    p.add_argument("--calib-images", type=int, default=None,
                   help="calibration images per run (default: the config's); runs are keyed by it, so an "
                   "ablation sits beside the default runs in the same results.json")
    p.add_argument("--merge", type=pathlib.Path, nargs="+", default=[],
                   help="add the runs of these results.json files (from other --out folders), print the "
                   "tables and stop (no new runs)")
    return p.parse_args(argv)


def run_key(record) -> tuple:
    return tuple(record[f] for f in KEY_FIELDS)


def sibling(key: tuple, **fields) -> tuple:
    """``key`` with some fields replaced, e.g. ``sibling(key, rule="uniform")``: the run to compare with."""
    unknown = set(fields) - set(KEY_FIELDS)
    if unknown:
        raise ValueError(f"not key fields: {sorted(unknown)}")
    return tuple(fields.get(f, v) for f, v in zip(KEY_FIELDS, key))


class Arch:
    """A pretrained model, its calibration images and statistics, and a selection cache per norm."""

    def __init__(self, depth, data, calib, config):
        self.depth = depth
        self.model = pretrained_resnet(depth, data / "weights" / f"resnet{depth}_cifar10.safetensors")
        self.calib = calib
        paths = plan(self.model, format="svd", ratio=1.0, skip=config.skip).paths
        self.covariances = compress.calibrate(self.model, calib, layers=paths, batch_size=config.batch_size,
                                              progress=False)
        self.params = compress.count_params(self.model)
        self.macs = int(plan(self.model, format="svd", ratio=1.0, input_shape=INPUT_SHAPE).flops_before)
        self.cache = {}
        self.model.eval()  # inference mode (BatchNorm) for the latency measurements


def measure(arch: Arch, key, test, config) -> dict:
    depth, fmt, norm, calibration, rule, budget = key
    start = time.perf_counter()
    damage = "linear" if rule == "global_linear" else "curve"  # the ablation of the damage model
    # global_sweeps: Tucker-2's ε from a few ALS sweeps at grid ratios (CP's default) instead of
    # the HOSVD spectrum proxy.
    proxy = "sweeps" if rule.startswith("global_sweeps") or fmt not in ("svd", "tucker2") else None
    frozen = latency_table_file(depth, fmt, norm, config) if budget.startswith("latency") else None
    # "cp+tucker2": the global rule offers every layer both formats' swept candidates and picks one
    sel = select_ranks(arch.model, arch.covariances, format=tuple(fmt.split("+")), rule=rule.split("_")[0],
                       damage=damage,
                       budget=None if budget == "none" else budget, norm=norm, images=arch.calib,
                       key=jax.random.key(config.calib_seed + 1), skip=config.skip, input_shape=INPUT_SHAPE,
                       proxy=proxy if rule.startswith("global") else None,
                       grid=config.sweep_grid if proxy == "sweeps" else config.grid, sweeps=config.proxy_sweeps,
                       cache=arch.cache.setdefault(norm, {}), batch_size=config.latency_batch,
                       latency_repeats=config.latency_repeats, max_error=config.max_error, progress=False,
                       latency_table=frozen if frozen is not None and frozen.is_file() else None)
    if frozen is not None and not frozen.is_file():  # every later latency run of this format reads it
        frozen.parent.mkdir(parents=True, exist_ok=True)
        frozen.write_text(json.dumps(sel.latency_table, indent=1))
    select_seconds = time.perf_counter() - start
    common = dict(format=fmt.split("+")[0], ranks=sel, skip=sel.is_dense, key=jax.random.key(config.compress_seed),
                  max_steps=config.max_steps, batch_size=config.batch_size, progress=False)
    if rule.endswith("_replan"):  # the pass re-solves the selection layer by layer: no ranks/skip up front
        if calibration != "sequential":
            raise ValueError(f"{key}: {rule} re-plans during sequential calibration only")
        common = {k: v for k, v in common.items() if k not in ("ranks", "skip")}
        result = seqcal.compress_sequential(arch.model, arch.calib, **common, replan=sel.replanner(
            window=config.replan_window, sweeps=config.proxy_sweeps))
    elif calibration in ("sequential", "sequential+bias"):  # +bias: each layer's mean output restored
        result = seqcal.compress_sequential(arch.model, arch.calib, **common,
                                            bias_correction=calibration == "sequential+bias")
    else:
        result = compress.compress_model(arch.model, norm=norm, covariances=arch.covariances,
                                         input_shape=INPUT_SHAPE, **common)
    scores = compress.evaluate_agreement(arch.model, result.model, *test, batch_size=config.batch_size)
    p = result.plan
    measured = {layer.path: layer.relative_error for layer in result.layers}
    params = compress.count_params(result.model)
    replan = result.replan or {}
    used = {r["path"]: r.get("used") for r in replan.get("layers", [])}
    return dict(
        zip(RUN_FIELDS, key), **scores,
        achieved_params=replan.get("achieved_params", sel.achieved("params")),
        achieved_flops=replan.get("achieved_flops", sel.achieved("flops")),
        params=params, baseline_params=arch.params, params_ratio=params / arch.params,
        macs_ratio=(arch.macs - p.flops_before + p.flops_after) / arch.macs,
        predicted_damage=sel.predicted_damage,
        layers=[dict(path=c.path, format=c.format,
                     ranks=used[c.path] if replan else None if c.ranks is None else list(c.ranks),
                     predicted_error=c.predicted_error, sensitivity=c.sensitivity,
                     measured_error=measured.get(c.path),
                     **({"upfront_ranks": None if c.ranks is None else list(c.ranks)} if replan else {}))
                for c in sel.layers],
        **({"replan": replan} if replan else {}),
        **({k: sel.options[k] for k in ("max_error", "error_cap")} if rule.startswith("global") else {}),
        **(latency_record(arch, key, sel, result, config) if budget.startswith("latency") else {}),
        select_seconds=round(select_seconds, 2), seconds=round(time.perf_counter() - start, 2),
        calib_images=config.calib_images, test_images=len(test[1]), max_steps=config.max_steps,
        loadavg=list(os.getloadavg()), date=datetime.datetime.now().isoformat(timespec="seconds"),
    )


def latency_table_file(depth, fmt, norm, config) -> pathlib.Path | None:
    """Where a latency budget's layer table is kept (``Config.latency_tables``), or ``None``.

    Timing the layers again for every run made the same budget feasible under one machine load and
    infeasible under another (SVD latency=0.5, session 6), so the first table measured per model,
    format and batch is written here and every later run selects from it; the whole models are
    still timed per run (``latency_record``).
    """
    if config.latency_tables is None:
        return None
    folder = pathlib.Path(config.latency_tables)
    folder = folder if folder.is_absolute() else HERE / folder
    return folder / f"resnet{depth}-{fmt}-{norm}-b{config.latency_batch}.json"


def latency_record(arch: Arch, key, sel, result, config) -> dict:
    """A latency-budget run: the selection's table ms next to the MEASURED whole-model latency.

    Also the ``flops=0.5`` global selection of the same format (same cache, so the same ranks as
    its own run in results.json): its ranks' ms in the same latency table (predicted) and its
    whole-model latency, measured interleaved with the dense and the latency-selected model. Its
    factors come from one parallel sweep (values do not change the time; its accuracy is that of
    its own run). Both compressed models run the factorized implementation, what the table timed.
    """
    depth, fmt, norm, calibration, rule, budget = key
    table = sel.latency_table
    other = select_ranks(arch.model, arch.covariances, format=fmt, rule="global", budget="flops=0.5", norm=norm,
                         images=arch.calib, key=jax.random.key(config.calib_seed + 1), skip=config.skip,
                         input_shape=INPUT_SHAPE, proxy=None if fmt in ("svd", "tucker2") else "sweeps",
                         grid=config.grid if fmt in ("svd", "tucker2") else config.sweep_grid,
                         sweeps=config.proxy_sweeps, cache=arch.cache.setdefault(norm, {}), progress=False)
    flops_model = compress.compress_model(arch.model, format=fmt, norm=norm, key=jax.random.key(config.compress_seed),
                                          ranks=other, skip=other.is_dense, max_steps=1,
                                          covariances=arch.covariances, input_shape=INPUT_SHAPE, progress=False).model
    load = machine_load()
    timed = model_latency({"dense": arch.model, "latency": result.model, "flops": flops_model}, INPUT_SHAPE,
                          batch_sizes=(config.latency_batch,), repeats=config.latency_repeats)[config.latency_batch]
    dense_ms = sum(row["dense_ms"] for row in table["layers"].values())

    def table_ratio(selection):
        ms = 0.0
        for layer in selection.layers:
            row = table["layers"][layer.path]
            option = None if layer.ranks is None else list(layer.ranks)
            ms += row["ms"][row["options"].index(option)]
        return ms / dense_ms

    return dict(
        achieved_latency=sel.achieved("latency"),
        latency=dict(
            batch_size=config.latency_batch, repeats=config.latency_repeats,
            table_load=table["machine_load"], table_date=table["date"], model_load=[load, machine_load()],
            layers_dense_ms=dense_ms,
            layers=[dict(path=c.path, ms=c.latency, dense_ms=c.latency_before) for c in sel.layers],
            model_ms={n: t.median_ms for n, t in timed.items()},
            model_samples_ms={n: list(t.samples_ms) for n, t in timed.items()},
            measured_ratio=timed["latency"].median_ms / timed["dense"].median_ms,
            flops_selection=dict(budget="flops=0.5", achieved_flops=other.achieved("flops"),
                                 achieved_params=other.achieved("params"), predicted_latency=table_ratio(other),
                                 measured_ratio=timed["flops"].median_ms / timed["dense"].median_ms,
                                 ranks={c.path: None if c.ranks is None else list(c.ranks) for c in other.layers}),
        ),
    )


def before_cap(record, config) -> bool:
    """A global run made before ``select_ranks`` had ``max_error`` whose selection the cap changes:
    a pick above it, or a re-planned run (its re-solves saw the uncapped candidates). Runs with
    every pick at or below the cap are kept: the capped bisection tests the same λ's with the same
    outcomes and the greedy fill only moves to lower errors, so the selection is the same."""
    if not record["rule"].startswith("global") or "max_error" in record:
        return False
    picked = [layer["predicted_error"] or 0.0 for layer in record["layers"]]
    return record["rule"].endswith("_replan") or max(picked) > config.max_error


def footprint() -> dict:
    """The process's peak resident memory and its count of memory mappings.

    Three runs died with LLVM "Cannot allocate memory" while RSS was far below the machine's
    memory; every compiled executable holds mappings and Linux caps them per process
    (``vm.max_map_count``, 65 530 here), so both are recorded per cell.
    """
    try:
        maps = sum(1 for _ in open("/proc/self/maps"))
    except OSError:  # not Linux
        maps = None
    return dict(max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), maps=maps)


def run_all(config, args, results, out):
    current, stale = [], []
    for r in results["runs"]:
        (stale if before_cap(r, config) else current).append(r)
    if stale:  # kept for the README's before/after table, then measured again below
        results.setdefault("before_cap", []).extend(stale)
        results["runs"] = current
        print(f"{len(stale)} global run(s) made before the error cap moved to results['before_cap']", flush=True)
    done = {run_key(r) for r in results["runs"]}
    todo = [k for k in config.runs if k + (config.calib_images,) not in done and (not args.formats or k[1] in args.formats)
            and (not args.budgets or k[5] in args.budgets) and (not args.rules or k[4] in args.rules)][: args.limit]
    print(f"{len(todo)} run(s) to do, {len(done)} already in {out}", flush=True)
    if not todo:
        return
    train_x, _ = load_cifar10(args.data / "cifar10", "train")
    calib = cifar10_normalize(sample(train_x, None, config.calib_images, key=jax.random.key(config.calib_seed)))
    test_x, test_y = load_cifar10(args.data / "cifar10", "test", limit=config.test_images)
    test = (cifar10_normalize(test_x), test_y)
    archs = {}
    session = time.perf_counter()
    for key in todo:
        if key[0] not in archs:
            archs[key[0]] = Arch(key[0], args.data, calib, config)
        try:
            record = measure(archs[key[0]], key, test, config)
        except ValueError as error:  # e.g. a latency budget below what this machine can reach now
            results.setdefault("failures", []).append(dict(key=list(key), error=str(error), loadavg=list(os.getloadavg()),
                                                           date=datetime.datetime.now().isoformat(timespec="seconds")))
            save_results(results, out / "results.json")
            print(f"{key}: not measured: {error}", flush=True)
            continue
        record["process"] = footprint()
        jax.clear_caches()  # each cell compiles its own solvers; they are not reused by the next
        gc.collect()
        record["process"]["maps_after_clear"] = footprint()["maps"]
        add_run(results, record, run_key)
        save_results(results, out / "results.json")
        print(f"{key}: acc {record['accuracy']:.3f} (base {record['baseline_accuracy']:.3f}) params "
              f"{record['achieved_params']:.3f} flops {record['achieved_flops']:.3f} {record['seconds']:.0f} s",
              flush=True)
    results["sessions"].append(dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                                    wall_seconds=round(time.perf_counter() - session, 1), runs=len(todo)))
    save_results(results, out / "results.json")


# ------------------------------------------------------------------------- tables and figure


def table(results, calib: int = FULL.calib_images) -> str:
    rows = sorted(results["runs"], key=lambda r: (r["arch"], r["norm"], r["calibration"], r["format"],
                                                   r["budget"], r["rule"]))
    lines = ["| model | calibration | format | budget | rule | accuracy | Δ vs dense | achieved params "
             "| achieved MACs | dense layers | predicted damage |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dense = sum(layer["ranks"] is None for layer in r["layers"])
        damage = ("—" if r["predicted_damage"] is None or not r["rule"].startswith("global")
                  else f"{r['predicted_damage']:.3f}")
        cal = r["calibration"] if r["norm"] == "sigma" else f"{r['calibration']} (Frobenius)"
        if r["calib_images"] != calib:
            cal += f", {r['calib_images']} images"
        lines.append(f"| ResNet-{r['arch']} | {cal} | {r['format']} | {r['budget']} | {r['rule']} | "
                     f"{100 * r['accuracy']:.1f} | {100 * (r['accuracy'] - r['baseline_accuracy']):+.1f} | "
                     f"{r['achieved_params']:.3f} | {r['achieved_flops']:.3f} | {dense} | {damage} |")
    return "\n".join(lines)


def versus(results) -> str:
    """global − uniform at the same budget (same arch, format, norm, calibration)."""
    by = {run_key(r): r for r in results["runs"]}
    lines = ["| model | format | budget | rule | uniform | global | global − uniform (points) | achieved params u / g |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(by.items()):
        if not key[4].startswith("global"):
            continue
        u = by.get(sibling(key, rule="uniform"))
        if u is None:
            continue
        lines.append(f"| ResNet-{key[0]} {key[3]} {key[2]} | {key[1]} | {key[5]} | {key[4]} | {100 * u['accuracy']:.1f} | "
                     f"{100 * r['accuracy']:.1f} | {100 * (r['accuracy'] - u['accuracy']):+.1f} | "
                     f"{u['achieved_params']:.3f} / {r['achieved_params']:.3f} |")
    return "\n".join(lines)


def calib_versus(results, calib: int = FULL.calib_images) -> str:
    """Runs with another calibration-set size than ``calib`` (the config's), beside the same run at ``calib``."""
    by = {run_key(r): r for r in results["runs"]}
    lines = [f"| model | format | calibration | budget | rule | {calib} images | other size (images) | "
             "difference (points) | achieved params | seconds (default / other) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(by.items()):
        if key[6] == calib:
            continue
        base = by.get(sibling(key, calib_images=calib))
        was = "not run" if base is None else f"{100 * base['accuracy']:.1f}"
        diff = "–" if base is None else f"{100 * (r['accuracy'] - base['accuracy']):+.1f}"
        secs = f"{'–' if base is None else round(base['seconds'])} / {round(r['seconds'])}"
        lines.append(f"| ResNet-{key[0]} | {key[1]} | {key[3]} {key[2]} | {key[5]} | {key[4]} | {was} | "
                     f"{100 * r['accuracy']:.1f} ({key[6]}) | {diff} | {r['achieved_params']:.3f} | {secs} |")
    return "\n".join(lines)


def bias_versus(results) -> str:
    """Runs with bias correction in the sequential pass beside the same run without it."""
    by = {run_key(r): r for r in results["runs"]}
    lines = ["| model | format | budget | rule | sequential | + bias correction | difference (points) | achieved params |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(by.items()):
        if key[3] != "sequential+bias":
            continue
        base = by.get(sibling(key, calibration="sequential"))
        was = "not run" if base is None else f"{100 * base['accuracy']:.1f}"
        diff = "–" if base is None else f"{100 * (r['accuracy'] - base['accuracy']):+.1f}"
        lines.append(f"| ResNet-{key[0]} | {key[1]} | {key[5]} | {key[4]} | {was} | {100 * r['accuracy']:.1f} | {diff} | "
                     f"{r['achieved_params']:.3f} |")
    return "\n".join(lines)


def format_versus(results) -> str:
    """``global`` choosing each layer's format (``cp+tucker2``) beside the one-format selections
    (CP global, Tucker-2 global with spectral and with swept damage curves) at the same budget."""
    by = {run_key(r): r for r in results["runs"]}

    def acc(key):
        r = by.get(key)
        return "not run" if r is None else f"{100 * r['accuracy']:.1f}"

    lines = ["| model | budget | dense | cp+tucker2 global | layers CP / Tucker-2 (dense) | CP global | "
             "Tucker-2 global | Tucker-2 global_sweeps | CP uniform | achieved params |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(by.items()):
        if "+" not in key[1]:
            continue
        picks = [layer.get("format") if layer["ranks"] is not None else None for layer in r["layers"]]
        split = f"{picks.count('cp')} / {picks.count('tucker2')} ({picks.count(None)})"
        lines.append(f"| ResNet-{key[0]} | {key[5]} | {100 * r['baseline_accuracy']:.1f} | {100 * r['accuracy']:.1f} | "
                     f"{split} | {acc(sibling(key, format='cp'))} | {acc(sibling(key, format='tucker2'))} | "
                     f"{acc(sibling(key, format='tucker2', rule='global_sweeps'))} | "
                     f"{acc(sibling(key, format='cp', rule='uniform'))} | {r['achieved_params']:.3f} |")
    return "\n".join(lines)


def latency_versus(results) -> str:
    """Latency-budget runs: the table's predicted ratio, the measured whole-model ratio, accuracy,
    and the flops=0.5 global selection of the same format at the same latency table / measurement."""
    by = {run_key(r): r for r in results["runs"]}
    lines = ["| model | format | budget | accuracy (Δ vs dense) | predicted latency (layers, table) | "
             "measured whole-model latency | achieved MACs / params | flops=0.5 global: accuracy | "
             "its predicted / measured latency | dense model ms | load (1 min) table / model | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(by.items()):
        if "latency" not in r:
            continue
        lat, f = r["latency"], r["latency"]["flops_selection"]
        fr = by.get(sibling(key, budget="flops=0.5"))
        facc = "not run" if fr is None else f"{100 * fr['accuracy']:.1f} ({100 * (fr['accuracy'] - fr['baseline_accuracy']):+.1f})"
        lines.append(f"| ResNet-{key[0]} {key[2]} {key[3]} | {key[1]} | {key[5]} | {100 * r['accuracy']:.1f} "
                     f"({100 * (r['accuracy'] - r['baseline_accuracy']):+.1f}) | {r['achieved_latency']:.3f} | "
                     f"{lat['measured_ratio']:.3f} | {r['achieved_flops']:.3f} / {r['achieved_params']:.3f} | {facc} | "
                     f"{f['predicted_latency']:.3f} / {f['measured_ratio']:.3f} | {lat['model_ms']['dense']:.1f} | "
                     f"{lat['table_load'][0][0]} / {lat['model_load'][0][0]} | {r['date'][:16]} |")
    return "\n".join(lines)


def cap_versus(results) -> str:
    """Global runs measured again after ``select_ranks`` got its trust region (``max_error``):
    before, after, and uniform at the same budget."""
    by = {run_key(r): r for r in results["runs"]}
    lines = ["| model | format | calibration | budget | rule | uniform | global before the cap | global with the cap "
             "| deepest predicted ε before / after | cap used | achieved params before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def acc(r):
        return "–" if r is None else f"{100 * r['accuracy']:.1f}"

    def deepest(r):
        return "–" if r is None else f"{max(layer['predicted_error'] or 0.0 for layer in r['layers']):.2f}"

    for old in sorted(results.get("before_cap", []), key=run_key):
        key = run_key(old)
        new, uniform = by.get(key), by.get(sibling(key, rule="uniform"))
        cap = "–" if new is None or new.get("error_cap") is None else f"{new['error_cap']:.2f}"
        after = "not run yet" if new is None else acc(new)
        params = "–" if new is None else f"{new['achieved_params']:.3f}"
        lines.append(f"| ResNet-{key[0]} | {key[1]} | {key[3]} {key[2]} | {key[5]} | {key[4]} | {acc(uniform)} | "
                     f"{acc(old)} | {after} | {deepest(old)} / {deepest(new)} | {cap} | "
                     f"{old['achieved_params']:.3f} / {params} |")
    return "\n".join(lines)


def replan_versus(results) -> str:
    """global(_sweeps)_replan − global(_sweeps) at the same budget (sequential Σ): re-planned stage
    by stage or not, from the same up-front selection."""
    by = {run_key(r): r for r in results["runs"]}
    lines = ["| model | format | budget | rule | up front | re-planned | re-planned − up front (points) | achieved params u / r "
             "| layers re-ranked | seconds u / r |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(by.items()):
        g = by.get(sibling(key, rule=key[4].removesuffix("_replan")))
        if not key[4].endswith("_replan") or g is None:
            continue
        moved = sum(layer["ranks"] != layer.get("upfront_ranks") for layer in r["layers"])
        lines.append(f"| ResNet-{key[0]} | {key[1]} | {key[5]} | {key[4]} | {100 * g['accuracy']:.1f} | {100 * r['accuracy']:.1f} | "
                     f"{100 * (r['accuracy'] - g['accuracy']):+.1f} | {g['achieved_params']:.3f} / "
                     f"{r['achieved_params']:.3f} | {moved} of {len(r['layers'])} | {g['seconds']:.0f} / "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def targets(results, calib: int = FULL.calib_images) -> str:
    """The issue's targets (ResNet-20, Σ sequential, rule global), each met / missed / not measured."""
    by = {run_key(r): r for r in results["runs"]}

    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for budget, slack in (("params=0.5", 0.5), ("params=0.33", 2.0), ("flops=0.5", 1.0)):
        for cal, fmt, rule in itertools.product(("sequential", "sequential+bias"), ("tucker2", "cp"),
                                                ("global", "global_sweeps")):
            r = by.get((20, fmt, "sigma", cal, rule, budget, calib))
            if r is None:
                if rule == "global" and cal == "sequential":
                    lines.append(f"| {fmt} {budget}: within {slack} points of dense | not measured | — |")
                continue
            drop = 100 * (r["baseline_accuracy"] - r["accuracy"])
            variant = ", ".join(([rule] if rule != "global" else []) + (["bias correction"] if cal != "sequential" else []))
            lines.append(f"| {fmt} {budget}{' (' + variant + ')' if variant else ''}: within {slack} points "
                         f"of dense | {-drop:+.1f} points "
                         f"({100 * r['accuracy']:.1f} vs {100 * r['baseline_accuracy']:.1f}) | "
                         f"{'met' if drop <= slack else f'missed by {drop - slack:.1f}'} |")
    for key, g in sorted(by.items()):
        u = by.get(sibling(key, rule="uniform"))
        if key[0] != 20 or key[6] != calib or key[4] not in ("global", "global_sweeps") or u is None:
            continue
        gain = 100 * (g["accuracy"] - u["accuracy"])
        need = 3.0 if key[5] == "params=0.33" and key[1] in ("tucker2", "svd") and key[2] == "sigma" else -1.0
        what = "≥ +3 points over uniform" if need > 0 else "not below uniform by > 1 point"
        lines.append(f"| {key[1]} {key[2]} {key[3]} {key[5]}: {key[4]} {what} | {gain:+.1f} points | "
                     f"{'met' if gain >= need else f'missed by {need - gain:.1f}'} |")
    return "\n".join(lines)


def details(results) -> str:
    """Per layer of every global run: chosen ranks, predicted ε, measured error (sequential: the
    cross error E‖W x − W̃ x̂‖² / E‖W x‖², which also holds the drift of the layer's input)."""
    out = []
    for r in sorted(results["runs"], key=run_key):
        if not r["rule"].startswith("global"):
            continue
        out += [f"{r['rule']} ResNet-{r['arch']} {r['format']} {r['norm']} {r['calibration']} {r['budget']}:", "",
                "| layer | ranks | predicted ε | measured error | sensitivity (slope) |", "|---|---|---|---|---|"]
        for layer in r["layers"]:
            ranks = "dense" if layer["ranks"] is None else "×".join(map(str, layer["ranks"]))
            fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
            out.append(f"| {layer['path']} | {ranks} | {fmt(layer['predicted_error'])} | "
                       f"{fmt(layer['measured_error'])} | {fmt(layer['sensitivity'])} |")
        out.append("")
    return "\n".join(out)


def figure(results, path, calib: int = FULL.calib_images) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r["arch"] == 20 and r["norm"] == "sigma" and r["calib_images"] == calib]
    if not runs:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    markers = {"uniform": "o", "energy": "s", "vbmf": "^", "global": "*", "global_linear": "x", "global_sweeps": "P",
               "global_replan": "D", "global_sweeps_replan": "d"}
    for ax, fmt in zip(axes, ("svd", "tucker2", "cp")):
        for (rule, marker), cal in itertools.product(markers.items(), ("sequential", "sequential+bias")):
            pts = sorted((r["params_ratio"], 100 * r["accuracy"]) for r in runs
                         if r["format"] == fmt and r["rule"] == rule and r["calibration"] == cal)
            if pts:  # bias correction: the same marker, dashed
                ax.plot(*zip(*pts), marker=marker, ms=9 if rule == "global" else 6, ls="-" if cal == "sequential" else "--",
                        label=rule if cal == "sequential" else f"{rule} + bias correction")
        base = 100 * runs[0]["baseline_accuracy"]
        ax.axhline(base, color="grey", lw=0.8, ls=":")
        for pub in PUBLISHED:
            ax.plot(pub["params_ratio"], base - pub["drop"], "kx", ms=8, label=pub["method"] if fmt == "svd" else None)
        ax.set_title(f"ResNet-20, {fmt}, Σ sequential")
        ax.set_xlabel("achieved whole-model parameter ratio")
    axes[0].set_ylabel("top-1 accuracy, 512 dev images (%)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    base = SMOKE if args.smoke else FULL  # its calibration-set size is the tables' default
    config = base
    if args.calib_images is not None:
        if args.calib_images < 1:
            raise SystemExit(f"--calib-images must be positive, got {args.calib_images}")
        config = dataclasses.replace(config, calib_images=args.calib_images)
    out = args.out or (pathlib.Path(tempfile.mkdtemp(prefix="rank_selection_")) if args.smoke else HERE)
    if config.latency_tables is not None:  # beside results.json (a smoke run writes none into the repository)
        config = dataclasses.replace(config, latency_tables=str(out / config.latency_tables))
    results = load_results(out / "results.json")
    for other in args.merge:
        merge(results, load_results(other), run_key)
    if args.merge:
        save_results(results, out / "results.json")
    if not args.table and not args.merge:
        run_all(config, args, results, out)
    calib = base.calib_images
    print(table(results, calib))
    print()
    print(versus(results))
    print()
    print(replan_versus(results))
    print()
    print(calib_versus(results, calib))
    print()
    print(latency_versus(results))
    print()
    print(targets(results, calib))
    print()
    print(details(results))
    figure(results, out / "figure.png", calib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
