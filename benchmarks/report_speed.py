"""Print the issue-10 tables of benchmarks/RESULTS.md from the result files (numbers in prose are
generated here, not typed).

    python benchmarks/report_speed.py
    python benchmarks/report_speed.py --gpu /work/device_out/gpu10   # tables of benchmarks/gpu.py's files
"""

from __future__ import annotations

import json
import pathlib

HERE = pathlib.Path(__file__).parent


def _load(name):
    path = HERE / name
    return json.loads(path.read_text()) if path.exists() else None


def _f(v, digits=3):
    if v is None:
        return "—"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def end_to_end():
    data = _load("end_to_end_results.json")
    if not data:
        print("(no end_to_end_results.json)")
        return
    print("| label | date (UTC) | load before (1/5/15 min) | wall s | CPU s | XLA compiles | "
          "backend compile s | trace+lower s | accuracy | statuses |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        load = "/".join(f"{x:.1f}" for x in r["load_before"])
        print(f"| {r['label']} | {r['date']} | {load} | {r['wall_s']:.1f} | {r.get('cpu_s', 0):.1f} | "
              f"{r['compiles']} | {r['backend_compile_s']:.1f} | {r['trace_s'] + r['lower_s']:.1f} | "
              f"{100 * r['accuracy']:.2f}% | {r['statuses']} |")
    by = {r["label"]: r for r in data["rows"]}
    if "before" in by and "after" in by:
        b, a = by["before"], by["after"]
        print(f"\nafter/before: wall {a['wall_s'] / b['wall_s']:.2f}, CPU {a['cpu_s'] / b['cpu_s']:.2f}, "
              f"compiles {a['compiles']}/{b['compiles']}, backend compile time "
              f"{a['backend_compile_s'] / b['backend_compile_s']:.2f}; compile share of wall: before "
              f"{b['backend_compile_s'] / b['wall_s']:.0%}, after {a['backend_compile_s'] / a['wall_s']:.0%}")


def _groups(per_function: dict) -> dict:
    """Backend compiles per kind of work: solver, calibration stages, whole-model runs, eager ops."""
    kinds = {"solver": ("_tucker2_solve", "_solve", "_svd_solve", "make_problem"),
             "cross statistics": ("_cross_update",), "stages": ("advance", "stage"),
             "latency timing (jit(<lambda>))": ("<lambda>",), "evaluation": ("_argmax_logits",),
             "verify (MACs, in-model errors)": ("step",)}
    out: dict = {}
    for name, (n, sec, *cpu) in per_function.items():
        inner = name[4:-1] if name.startswith("jit(") else name
        kind = next((k for k, names in kinds.items() if inner in names), "eager ops and others")
        c = out.setdefault(kind, [0, 0.0, None])
        c[0] += n
        c[1] += sec
        c[2] = (c[2] or 0.0) + cpu[0] if cpu else c[2]
    return out


def cold_profile(name="end_to_end_s3.json"):
    """Cold runs of this session, with the compile time per kind of jitted function."""
    data = _load(name)
    if not data:
        print(f"(no {name})")
        return
    print(f"{name}: cold process, ResNet-56 Tucker-2 Σ sequential, ratio 0.5, 512 images, --max-steps 30")
    print("| label | date (UTC) | load before/after (1 min) | wall s | CPU s | CPU/wall | XLA compiles | "
          "backend compile wall s | accuracy | statuses |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        print(f"| {r['label']} | {r['date']} | {r['load_before'][0]:.1f}/{r['load_after'][0]:.1f} | "
              f"{r['wall_s']:.0f} | {r['cpu_s']:.1f} | {r['cpu_s'] / r['wall_s']:.2f} | {r['compiles']} | "
              f"{r['backend_compile_s']:.0f} | {100 * r['accuracy']:.2f}% | {r['statuses']} |")
    rows = [r for r in data["rows"] if "per_function" in r]
    kinds = sorted({k for r in rows for k in _groups(r["per_function"])})
    print("\ncompiles per kind of jitted function: count / backend-compile wall s (inflated by the load) "
          "/ CPU s (where recorded)")
    print("| kind | " + " | ".join(r["label"] for r in rows) + " |\n|---|" + "---|" * len(rows))
    for kind in kinds:
        cells = [_groups(r["per_function"]).get(kind, [0, 0.0, None]) for r in rows]
        print(f"| {kind} | " + " | ".join(f"{n} / {sec:.1f} / {_f(cpu)}" for n, sec, cpu in cells) + " |")
    for r in rows:
        if "backend_compile_cpu_s" in r:
            print(f"{r['label']}: compile CPU {r['backend_compile_cpu_s']:.1f} s of {r['cpu_s']:.1f} CPU s "
                  f"({r['backend_compile_cpu_s'] / r['cpu_s']:.0%}); CLI call CPU {r.get('cli_cpu_s', 0):.1f} s")


def gpu(folder):
    """Tables from the files benchmarks/gpu.py wrote (``folder``: its --out)."""
    folder = pathlib.Path(folder)
    for name in ("end_to_end", "sweeps", "precision"):
        path = folder / f"{name}.json"
        if not path.exists():
            print(f"({path} absent)")
            continue
        data = json.loads(path.read_text())
        m = data.get("meta", {})
        print(f"{name}.json: {m.get('date')}, {m.get('device')} ({m.get('backend')}), jax {m.get('jax')}, "
              f"budget {m.get('budget_s')} s")
        if name == "end_to_end":
            print("| call | wall s | XLA compiles | backend compile s | compile share | accuracy | decompose s | statuses |")
            print("|---|---|---|---|---|---|---|---|")
            for c in data.get("calls", []):
                print(f"| {c['label']} | {c['wall_s']:.1f} | {c['compiles']} | {c['backend_compile_s']:.1f} | "
                      f"{_f(c['compile_share'])} | {100 * (c['accuracy'] or 0):.2f}% | {_f(c['decompose_s'])} | "
                      f"{c['statuses']} |")
            print(f"process {_f(data.get('process_s'))} s; errors: {[e[-300:] for e in data.get('errors', [])]}")
        elif name == "sweeps":
            print("| method | norm | size | s / sweep | error | CG / sweep |\n|---|---|---|---|---|---|")
            for r in data["rows"]:
                c = r["cell"]
                print(f"| {c['method']} | {c['norm']} | {c['size']} | {_f(r['s_per_sweep'])} | {_f(r['error'], 4)} | "
                      f"{_f(r['cg_per_sweep'])} |")
            for r in data.get("ratios", []):
                print(f"{r['method']} {r['size']}: Σ sweep / F sweep {_f(r['sigma_over_frobenius'])}×")
        else:
            print("| cg_precision | seconds | sweeps | final error | max increase | CG steps |\n|---|---|---|---|---|---|")
            for r in data["rows"]:
                print(f"| {r['cell']['cg_precision']} | {_f(r['seconds'])} | {r['sweeps']} | {_f(r['error'], 6)} | "
                      f"{_f(r['max_increase'])} | {r['cg_history']} |")
        for k in ("skipped", "errors"):
            if data.get(k) and name != "end_to_end":
                print(f"{k}: {[str(e)[-200:] for e in data[k]]}")
        print()


def solvers(name):
    data = _load(name)
    if not data:
        print(f"(no {name})")
        return
    meta = data.get("meta", {})
    print(f"{name}: {meta.get('date')}, load before {meta.get('load_before')}, after {meta.get('load_after')}")
    print("| size | method | norm | s / sweep | s to converge | sweeps | error | CG steps / sweep |")
    print("|---|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        print(f"| {r['size']} | {r['method']} | {r['norm']} | {_f(r.get('s_per_sweep'))} | "
              f"{_f(r.get('s_to_converge'))} | {_f(r.get('steps'))} | {_f(r.get('error'), 4)} | "
              f"{_f(r.get('cg_per_sweep'))} |")
    for r in data["ratios"]:
        print(f"\n{r['size']} {r['method']}: F sweep speed-up over TensorLy {_f(r['speedup_vs_tensorly'])}×; "
              f"Σ sweep / F sweep {_f(r['sigma_over_frob'])}× (exact Σ: {_f(r.get('sigma_exact_over_frob'))}×)")
    for r in data.get("same_time", []):
        print(f"same wall time ({_f(r['same_time_budget_s'])} s, the exact solver's run): exact error "
              f"{_f(r['exact_error'], 4)}, truncated-CG error {_f(r['error_within_budget'], 4)} after "
              f"{r['sweeps_within_budget']} sweeps")


def preconditioner():
    data = _load("preconditioner_results.json")
    if not data:
        print("(no preconditioner_results.json)")
        return
    print(f"preconditioner ({data['date']}): CG steps to 1e-6, exact step B")
    print("| size | ranks | partial traces | nearest Kronecker product |\n|---|---|---|---|")
    rows = {}
    for r in data["rows"]:
        rows.setdefault((r["size"], tuple(r["ranks"])), {})[r["preconditioner"]] = r["cg_steps"]
    for (size, ranks), v in rows.items():
        print(f"| {size} | {ranks} | {v.get('partial_trace')} | {v.get('nearest_kronecker')} |")


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "--gpu":
        gpu(sys.argv[2])
        raise SystemExit
    end_to_end()
    print()
    cold_profile()
    print()
    for name in ("solvers_tucker2_512.json", "solvers_cp_512.json"):
        solvers(name)
        print()
    preconditioner()
