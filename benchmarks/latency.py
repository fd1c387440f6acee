"""Benchmark: latency of compressed CIFAR ResNets against the dense model, whole model and each
layer alone, batch 1 and 128, float32, every conv format of the layer registry.

For each format × parameter ratio, these models are timed in interleaved rounds in ONE process
(the machine may be shared and loaded: ratios from the same rounds are what to read, and
``os.getloadavg()`` is stored with every row):

* ``dense``           the pretrained model (original ``nnx.Conv`` layers);
* ``factorized_conv`` every planned conv factorized, sub-layers as XLA convs (grouped depthwise
                      convs for CP): what the package did before the fast lowerings;
* ``factorized``      every planned conv factorized with the backend's fast lowerings
                      (``sigmadecomp.layers._ops``: shift-and-add depthwise, dot_general 1×1);
* ``auto``            the latency-aware plan (``sigmadecomp.latency.choose_implementations``,
                      layers timed at the same batch size): per layer the faster of factorized /
                      rebuilt dense kernel.

Every planned layer is also timed alone on its real input shape (layers with the same shapes
and configuration once): the original conv, the factorized layer with each lowering, and the
factorized layer run with the rebuilt dense kernel. Speed-up = dense ms / variant ms; the MAC
ratio (compressed / dense, whole model) is printed beside it: the physical floor of the speed-up
is 1 / MAC ratio. Factors are fitted to the pretrained kernels (Frobenius, ``--fit-steps``
sweeps; factor values do not change the time) or random for formats without a solver.

    OPENBLAS_NUM_THREADS=1 python benchmarks/latency.py                 # ResNet-56, ratios 0.5, 0.33
    OPENBLAS_NUM_THREADS=1 python benchmarks/latency.py --smoke --out /tmp/latency.json  # seconds

Resumable: rows already in ``--out`` (keyed by arch, format, ratio, batch, variant or layer) are
skipped. ``--table`` prints the Markdown tables of benchmarks/RESULTS.md from the result file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys

import jax
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sigmadecomp as sd  # noqa: E402
from sigmadecomp.compress import solver_for  # noqa: E402
from sigmadecomp.latency import (  # noqa: E402
    choose_implementations, forward_fn, machine_load, set_implementations, time_interleaved,
)
from sigmadecomp.layers._ops import use_lowering  # noqa: E402
from sigmadecomp.formats import format_names  # noqa: E402
from sigmadecomp.layers._shapes import placeholder  # noqa: E402

INPUT_SHAPE = (1, 32, 32, 3)
SKIP = ("conv1", "linear")  # as the experiments: the 3-channel stem and the classifier stay dense


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet56", choices=("resnet20", "resnet32", "resnet56"))
    p.add_argument("--data", type=pathlib.Path, default=ROOT / ".." / "shared" / "data")
    p.add_argument("--formats", default="all", help="comma list, or 'all' (every conv format registered)")
    p.add_argument("--ratios", default="0.5,0.33")
    p.add_argument("--batches", default="1,128")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds per model timing")
    p.add_argument("--layer-repeats", type=int, default=7, help="interleaved rounds per layer timing")
    p.add_argument("--fit-steps", type=int, default=3, help="Frobenius sweeps to fit the factors")
    p.add_argument("--no-layers", dest="layers", action="store_false", help="whole models only")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "latency_results.json")
    p.add_argument("--smoke", action="store_true",
                   help="ResNet-20, cp, ratio 0.5, batches 1 and 2, 1 round: a run-through, not a measurement")
    p.add_argument("--table", action="store_true", help="print the tables from --out and exit")
    args = p.parse_args(argv)
    if args.smoke:
        args.arch, args.ratios, args.batches, args.repeats, args.layer_repeats = "resnet20", "0.5", "1,2", 1, 1
        args.formats, args.fit_steps = "cp" if args.formats == "all" else args.formats, 1
    return args


def formats_of(spec: str) -> list:
    """The registry's formats (formats registered later are picked up without editing this file)."""
    registered = list(format_names())
    if spec == "all":
        return registered
    wanted = spec.split(",")
    unknown = [f for f in wanted if f not in registered]
    if unknown:
        raise SystemExit(f"unknown format(s) {unknown}; the registry has {registered}")
    return wanted


def load_model(arch: str, data: pathlib.Path):
    depth = sd.compress.ARCHS[arch]
    weights = data / "weights" / f"{arch}_cifar10.safetensors"
    if weights.exists():
        model, source = sd.models.pretrained_resnet(depth, weights), str(weights)
    else:
        model, source = sd.models.CifarResNet(depth, rngs=nnx.Rngs(0)), "random weights (no weights file)"
    model.eval()
    return model, source


def fitted_factors(model, plan, fit_steps: int) -> tuple[dict, str]:
    """Frobenius factors of every planned kernel, or random ones for a format without a solver."""
    out, how = {}, "frobenius fit"
    for entry in plan.entries:
        kernel = sd._paths.get_by_path(model, entry.path).kernel[...]
        try:
            solver = solver_for(entry, max_steps=fit_steps)
        except ValueError:
            solver = None
        if solver is None:
            rng = np.random.default_rng(0)
            out[entry.path] = jax.tree_util.tree_map(
                lambda z: (0.1 * rng.standard_normal(z.shape)).astype(z.dtype),
                placeholder(entry.format, entry.group_kernel_shape, entry.ranks, kernel.dtype))
            how = "random factors (no solver for this format)"
        else:
            out[entry.path] = sd.decompose(kernel, solver, key=jax.random.key(0)).value
    return out, how


def lowered(model, lowering: str):
    """A forward function traced under ``lowering`` (its own jit, so its own compilation)."""
    forward = forward_fn(model)

    def run(x):
        with use_lowering(lowering):
            return forward(x)

    return run


def model_rows(model, plan, factors, batches, repeats) -> tuple:
    """Whole-model timings; ``auto`` at batch ``b`` is the plan chosen by timing layers at ``b``
    (the deployment batch size decides which implementation is faster)."""
    compressed = sd.apply(model, plan, factors)
    fixed = {"dense": forward_fn(model), "factorized_conv": lowered(compressed, "conv"),
             "factorized": forward_fn(compressed)}
    rows, implementations, left = [], {}, {}
    for batch in batches:
        auto_plan = choose_implementations(model, plan, batch_size=batch, repeats=3)
        auto = sd.apply(model, auto_plan, {e.path: factors[e.path] for e in auto_plan.entries})
        variants = dict(fixed, auto=forward_fn(set_implementations(auto, auto_plan)))
        x = jax.device_put(np.random.default_rng(0).standard_normal((batch, *INPUT_SHAPE[1:])).astype(np.float32))
        load_before = machine_load()
        timings = time_interleaved({n: (lambda f=f: f(x)) for n, f in variants.items()}, repeats=repeats)
        for name, timing in timings.items():
            rows.append(dict(section="model", batch=batch, variant=name, load_before=load_before,
                             load_after=machine_load(), **timing.to_dict()))
        implementations[str(batch)] = {e.path: [e.implementation, e.reason] for e in auto_plan.entries}
        left[str(batch)] = [list(p) for p in auto_plan.left_dense]
    return rows, implementations, left


def layer_rows(model, plan, factors, batches, repeats) -> list:
    """Each distinct planned layer alone: dense conv, factorized (both lowerings), rebuilt kernel."""
    groups: dict = {}
    for entry in plan.entries:
        groups.setdefault((entry.kernel_shape, entry.strides, entry.in_spatial, entry.ranks), []).append(entry)
    rows = []
    for same in groups.values():
        entry = same[0]
        dense = sd._paths.get_by_path(model, entry.path)
        layer = sd.factorize_layer(dense, factors[entry.path])
        rebuilt = nnx.clone(layer)
        rebuilt.implementation = "dense"
        variants = {"dense": forward_fn(dense), "factorized_conv": lowered(layer, "conv"),
                    "factorized": forward_fn(layer), "rebuilt": forward_fn(rebuilt)}
        for batch in batches:
            shape = (batch, *entry.in_spatial, entry.kernel_shape[-2] * entry.groups)
            x = jax.device_put(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
            timings = time_interleaved({n: (lambda f=f: f(x)) for n, f in variants.items()}, repeats=repeats)
            rows.append(dict(section="layer", batch=batch, path=entry.path, count=len(same),
                             kernel_shape=list(entry.kernel_shape), strides=list(entry.strides),
                             in_spatial=list(entry.in_spatial), ranks=list(entry.ranks),
                             mac_ratio=entry.flops_after / entry.flops_before, load=machine_load(),
                             ms={n: t.median_ms for n, t in timings.items()}))
    return rows


def whole_model_macs(model, plan) -> tuple[int, int]:
    """MACs per image of all conv/dense layers: dense, and with the plan's layers factorized."""
    every = sd.plan(model, format="svd", ratio=0.5, input_shape=INPUT_SHAPE)
    total = every.flops_before
    return total, total - plan.flops_before + plan.flops_after


def run(args) -> None:
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    done = {(r["arch"], r["format"], r["ratio"]) for r in results["runs"]}
    model, source = load_model(args.arch, args.data)
    batches = [int(b) for b in args.batches.split(",")]
    for fmt in formats_of(args.formats):
        for ratio in [float(r) for r in args.ratios.split(",")]:
            if (args.arch, fmt, ratio) in done:
                continue
            try:
                plan = sd.plan(model, format=fmt, ratio=ratio, skip=SKIP, input_shape=INPUT_SHAPE)
            except ValueError as err:
                print(f"{fmt} {ratio}: cannot plan ({err}); skipped")
                continue
            factors, how = fitted_factors(model, plan, args.fit_steps)
            start = datetime.datetime.now(datetime.timezone.utc)
            rows, implementations, left = model_rows(model, plan, factors, batches, args.repeats)
            layers = layer_rows(model, plan, factors, batches, args.layer_repeats) if args.layers else []
            dense_macs, macs = whole_model_macs(model, plan)
            results["runs"].append(dict(
                arch=args.arch, format=fmt, ratio=ratio, weights=source, factors=how,
                started=start.isoformat(timespec="seconds"), load=machine_load(),
                params=plan.params_after, baseline_params=plan.params_before, macs=macs,
                baseline_macs=dense_macs, mac_ratio=macs / dense_macs, rows=rows, layers=layers,
                auto_implementations=implementations, auto_left_dense=left,
                machine=dict(platform=platform.platform(), processor=platform.processor(),
                             backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
                             jax=jax.__version__, cpu_count=_cpu_count()),
                command=" ".join(sys.argv)))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
            print(summary_line(results["runs"][-1]), flush=True)


def _cpu_count():
    import os

    return os.cpu_count()


def _median(run, batch, variant):
    return next(r["median_ms"] for r in run["rows"] if r["batch"] == batch and r["variant"] == variant)


def summary_line(run) -> str:
    parts = [f"{run['arch']} {run['format']} {run['ratio']} (MACs {run['mac_ratio']:.2f}x)"]
    for batch in sorted({r["batch"] for r in run["rows"]}):
        dense = _median(run, batch, "dense")
        ups = "  ".join(f"{v} {dense / _median(run, batch, v):.2f}x"
                        for v in ("factorized_conv", "factorized", "auto"))
        parts.append(f"b{batch}: dense {dense:.1f} ms, {ups}")
    return " | ".join(parts)


def tables(results) -> str:
    """Markdown: whole-model speed-ups per batch, then the per-layer table."""
    runs = results["runs"]
    lines = ["| model | format | ratio | MAC ratio (floor 1/x) | batch | dense ms | before: factorized, XLA convs "
             "| factorized, fast lowerings | auto (latency-aware) | load (1 min) |", "|---" * 10 + "|"]
    for run in runs:
        for batch in sorted({r["batch"] for r in run["rows"]}):
            dense = _median(run, batch, "dense")
            load = next(r["load_before"][0] for r in run["rows"] if r["batch"] == batch)
            ups = " | ".join(f"{dense / _median(run, batch, v):.2f}×"
                             for v in ("factorized_conv", "factorized", "auto"))
            lines.append(f"| {run['arch']} | {run['format']} | {run['ratio']} | {run['mac_ratio']:.2f} "
                         f"({1 / run['mac_ratio']:.2f}×) | {batch} | {dense:.1f} | {ups} | {load:.1f} |")
    lines += ["", "| model | format | ratio | kernel | stride | input | ranks | ×layers | MAC ratio | batch "
              "| dense ms | factorized XLA convs | factorized fast | rebuilt dense kernel |", "|---" * 14 + "|"]
    for run in runs:
        for row in run["layers"]:
            ms = row["ms"]
            ups = " | ".join(f"{ms['dense'] / ms[v]:.2f}×" for v in ("factorized_conv", "factorized", "rebuilt"))
            lines.append(f"| {run['arch']} | {run['format']} | {run['ratio']} | {tuple(row['kernel_shape'])} "
                         f"| {row['strides'][0]} | {row['in_spatial'][0]}² | {tuple(row['ranks'])} | {row['count']} "
                         f"| {row['mac_ratio']:.2f} | {row['batch']} | {ms['dense']:.2f} | {ups} |")
    return "\n".join(lines)


TARGETS = [("svd", 0.5, 1.3), ("tucker2", 0.5, 1.3), ("cp", 0.5, 1.0), ("svd", 0.33, 1.6), ("tucker2", 0.33, 1.6)]


def targets(results, arch: str = "resnet56", batch: int = 128) -> str:
    """The issue's targets (speed-up of the latency-aware model at batch 128), met or missed, and
    whether any measured compressed model (auto) is slower than dense at any batch size."""
    runs = {(r["format"], r["ratio"]): r for r in results["runs"] if r["arch"] == arch}
    lines = [f"| target ({arch}, batch {batch}) | auto | factorized | met? |", "|---|---|---|---|"]
    for fmt, ratio, goal in TARGETS:
        run = runs.get((fmt, ratio))
        if run is None:
            lines.append(f"| {fmt} {ratio} ≥ {goal}× | not measured | | |")
            continue
        dense = _median(run, batch, "dense")
        auto, fact = dense / _median(run, batch, "auto"), dense / _median(run, batch, "factorized")
        verdict = "met" if auto >= goal else f"missed by {goal - auto:.2f}×"
        lines.append(f"| {fmt} {ratio} ≥ {goal}× | {auto:.2f}× | {fact:.2f}× | {verdict} |")
    slower = [f"{r['format']} {r['ratio']} batch {b} ({_median(r, b, 'dense') / _median(r, b, 'auto'):.2f}×)"
              for r in runs.values() for b in sorted({row["batch"] for row in r["rows"]})
              if _median(r, b, "auto") > _median(r, b, "dense")]
    lines += ["", "Latency-aware (auto) models slower than dense: " + (", ".join(slower) or "none")]
    lines += ["", where_time_goes(runs, batch)]
    loads = [row["load_before"][0] for r in runs.values() for row in r["rows"]]
    if loads:
        lines.append(f"1-minute load average during the model timings: {min(loads):.1f} to {max(loads):.1f} "
                     f"(machine with {next(iter(runs.values()))['machine']['cpu_count']} CPUs); runs started "
                     f"{min(r['started'] for r in runs.values())} to {max(r['started'] for r in runs.values())}")
    return "\n".join(lines)


def where_time_goes(runs: dict, batch: int) -> str:
    """Per input resolution: share of the planned layers' dense time and the best per-layer speed-up
    (factorized or rebuilt), and the whole-model bound those layer timings imply (Amdahl)."""
    lines = [f"| format | ratio | per input size (batch {batch}): share of planned dense time → best layer "
             "speed-up | bound from layer timings |", "|---|---|---|---|"]
    for (fmt, ratio), run in runs.items():
        rows = [r for r in run["layers"] if r["batch"] == batch]
        if not rows:
            continue
        dense = {}
        best = {}
        for r in rows:
            size = r["in_spatial"][0]
            t = r["count"] * r["ms"]["dense"]
            dense[size] = dense.get(size, 0.0) + t
            best[size] = best.get(size, 0.0) + r["count"] * min(r["ms"]["factorized"], r["ms"]["rebuilt"],
                                                                 r["ms"]["dense"])
        total = sum(dense.values())
        parts = ", ".join(f"{s}²: {dense[s] / total:.0%} → {dense[s] / best[s]:.2f}×" for s in sorted(dense, reverse=True))
        lines.append(f"| {fmt} | {ratio} | {parts} | {total / sum(best.values()):.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        results = json.loads(args.out.read_text())
        print(targets(results, args.arch) + "\n\n" + tables(results))
        return
    run(args)


if __name__ == "__main__":
    main()
