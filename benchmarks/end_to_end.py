"""Cold-process wall time of ``sigmadecomp compress`` (sequential Σ calibration), with compile time.

    python benchmarks/end_to_end.py --data ../shared/data --out benchmarks/end_to_end_results.json
    python benchmarks/end_to_end.py --data ../shared/data --src /tmp/base --label before  # another tree
    python benchmarks/end_to_end.py --data ../shared/data --quick      # ResNet-20, 64 images: a check

Each measurement starts a fresh Python process (so every XLA compilation is paid, as a user pays
it) that runs ``sigmadecomp.cli.main([...compress...])`` with a ``jax.monitoring`` listener counting
backend compilations and their seconds, and tracing/lowering seconds. The parent records the wall
time of the whole child process (interpreter start, imports, data loading, calibration, solves,
evaluation), the child's own timings, accuracy, the date and ``os.getloadavg()`` before and after:
the 2-core machine is shared, so read the load next to every number. The child's CPU seconds
(user + system, all threads) are recorded too: on a loaded machine they move far less than wall
time, and on an idle 2-core machine wall time is at least half of them. ``--src`` runs the code of
another source tree (e.g. ``git archive`` of an older commit) through ``PYTHONPATH``, so
before/after rows can be interleaved in one run (``--repeats``). Rows are appended to ``--out``,
keyed by label, settings and repeat index; an existing key is skipped (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

_EVENTS = {
    "/jax/core/compile/backend_compile_duration": "backend_compile_s",
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
}


def _child(argv: list[str], out: str) -> None:
    """Run the CLI in this (cold) process and write its compile statistics to ``out``."""
    import jax

    compile_event = "/jax/core/compile/backend_compile_duration"
    totals = {name: 0.0 for name in _EVENTS.values()}
    totals["backend_compile_cpu_s"] = 0.0
    counts = {"compiles": 0}
    # backend compiles per jitted function: [count, wall seconds, process CPU seconds]; CPU time
    # (from the compile's start event to its end) is what a loaded machine does not inflate.
    per_function: dict = {}
    started: list = []

    def on_start(event, value, **_):
        if event == compile_event:
            started.append(time.process_time())

    def listener(event, duration, fun_name=None, **_):
        if event in _EVENTS:
            totals[_EVENTS[event]] += duration
            if event == compile_event:
                cpu = time.process_time() - started.pop() if started else 0.0
                counts["compiles"] += 1
                totals["backend_compile_cpu_s"] += cpu
                entry = per_function.setdefault(str(fun_name), [0, 0.0, 0.0])
                entry[0] += 1
                entry[1] += duration
                entry[2] += cpu

    jax.monitoring.register_scalar_listener(on_start)
    jax.monitoring.register_event_duration_secs_listener(listener)
    from sigmadecomp.cli import main

    start, cpu_start = time.perf_counter(), time.process_time()
    code = main(argv)
    with open(out, "w") as f:
        json.dump(dict(totals, **counts, cli_s=time.perf_counter() - start,
                       cli_cpu_s=time.process_time() - cpu_start, exit_code=code,
                       per_function=dict(sorted(per_function.items(), key=lambda kv: -kv[1][-1]))), f)


def _settings(args) -> dict:
    arch, calib = ("resnet20", 64) if args.quick else (args.arch, args.calib)
    return dict(arch=arch, format=args.format, norm="sigma", calibration="sequential",
                ratio=args.ratio, calib=calib, max_steps=args.max_steps, key=0)


def _cli_argv(s: dict, data: pathlib.Path, json_out: str) -> list[str]:
    weights = data / "weights" / f"{s['arch']}_cifar10.safetensors"
    argv = ["compress", "--arch", s["arch"], "--weights", str(weights), "--data",
            str(data / "cifar10"), "--format", s["format"], "--norm", s["norm"], "--calibration",
            s["calibration"], "--ratio", str(s["ratio"]), "--calib", str(s["calib"]), "--key",
            str(s["key"]), "--json", json_out, "--no-progress"]
    return argv + (["--max-steps", str(s["max_steps"])] if s["max_steps"] else [])


def measure(settings: dict, data: pathlib.Path, src: str | None) -> dict:
    """One cold child process; returns its row."""
    with tempfile.TemporaryDirectory() as tmp:
        stats, report = os.path.join(tmp, "stats.json"), os.path.join(tmp, "report.json")
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        if src:
            env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        script = os.path.abspath(__file__)
        code = ("import sys; sys.argv = sys.argv[:1]; import runpy; "
                f"ns = runpy.run_path({script!r}); ns['_child']({_cli_argv(settings, data.resolve(), report)!r}, {stats!r})")
        load_before = os.getloadavg()
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        # cwd=tmp: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH,
        # so run from the repository root it would import the working tree whatever --src says.
        subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL, cwd=tmp)
        wall = time.perf_counter() - start
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        child = json.load(open(stats))
        rep = json.load(open(report))
    statuses: dict = {}
    for layer in rep["layers"]:
        statuses[layer["status"]] = statuses.get(layer["status"], 0) + 1
    return dict(wall_s=wall, cpu_s=cpu, **child, accuracy=rep["accuracy"], baseline_accuracy=rep["baseline_accuracy"],
                decompose_s=rep["decompose_seconds"], mean_relative_error=rep["mean_relative_error"],
                mean_steps=sum(la["num_steps"] for la in rep["layers"]) / len(rep["layers"]),
                statuses=statuses, load_before=load_before, load_after=os.getloadavg(),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=pathlib.Path("../shared/data"))
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--format", default="tucker2")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--max-steps", type=int, default=30,
                        help="ALS sweeps per layer (30: the setting of experiments/sigma_vs_frobenius)")
    parser.add_argument("--src", action="append", default=None,
                        help="source tree(s) to run instead of the installed package; repeat to "
                             "interleave several, paired with --label")
    parser.add_argument("--label", action="append", default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="ResNet-20, 64 images: checks the script")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    srcs = args.src or [None]
    labels = args.label or ["current"] * len(srcs)
    if len(labels) != len(srcs):
        parser.error("give one --label per --src")
    settings = _settings(args)
    rows = json.loads(args.out.read_text())["rows"] if args.out and args.out.exists() else []
    done = {(r["label"], json.dumps(r["settings"], sort_keys=True), r["repeat"]) for r in rows}
    for repeat in range(args.repeats):
        for src, label in zip(srcs, labels):
            key = (label, json.dumps(settings, sort_keys=True), repeat)
            if key in done:
                continue
            row = dict(label=label, src=src, settings=settings, repeat=repeat,
                       **measure(settings, args.data, src))
            print(json.dumps({k: row[k] for k in ("label", "repeat", "wall_s", "cpu_s", "backend_compile_s",
                                                  "compiles", "accuracy", "load_before")}), flush=True)
            rows.append(row)
            if args.out:
                args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
