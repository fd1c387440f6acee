"""Solver timings: seconds per sweep and to convergence, Frobenius and Σ, against TensorLy.

    python benchmarks/solvers.py                      # 64, 256, 512 (slow: run on a quiet machine)
    python benchmarks/solvers.py --quick              # tiny sizes, checks the script works
    python benchmarks/solvers.py --sizes 256 --out results.json

Kernels are float32 ``(3, 3, c, c)`` with N(0, 1/(9c)) entries. The Σ problems use a *realistic
synthetic* cov: im2col (3×3 patches) of ReLU(random 3×3 conv of random 64-channel images) +0.1,
i.e. correlated, non-negative, spatially smooth inputs like a conv layer's. Ranks: Tucker-2
``(c/2, c/2)`` capped at 128, CP 64 / 128 / 256 for c = 64 / 256 / 512, SVD rank = the Tucker-2 rank. Seconds per sweep
are ``(t(k2 sweeps) − t(k1 sweeps)) / (k2 − k1)`` of compiled calls (best of ``repeats``) (init and setup cancel);
TensorLy (numpy backend) iterations are timed the same way, in the same run, on the same kernel.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import sigmadecomp as sd


def _ranks(c: int, quick: bool):
    tucker = min(c // 2, 128)
    cp = {64: 64, 256: 128, 512: 256}.get(c, c)
    return (tucker, tucker), cp


def make_cov(c: int, key, num_images: int = 32):
    k1, k2 = jax.random.split(key)
    images = jax.random.normal(k1, (num_images, 18, 18, 64), jnp.float32)
    w0 = jax.random.normal(k2, (3, 3, 64, c), jnp.float32) / 24.0
    feat = jax.lax.conv_general_dilated(
        images, w0, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    patches = sd.extract_patches(jax.nn.relu(feat + 0.1), (3, 3)).reshape(-1, 9 * c)
    return jnp.matmul(patches.T, patches, precision="highest") / patches.shape[0]


def _seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)  # the least-disturbed run: the machine may be shared


def _per_sweep(make_solver, kernel, cov, k1, k2, repeats):
    run = lambda k: lambda: sd.decompose(kernel, make_solver(k), cov=cov, key=jax.random.key(0))  # noqa: E731
    return (_seconds(run(k2), repeats) - _seconds(run(k1), repeats)) / (k2 - k1)


def _ours(name, make_solver, kernel, cov, args):
    per_sweep = _per_sweep(lambda k: make_solver(max_steps=k, rtol=1e-30), kernel, cov,
                           args.k1, args.k2, args.repeats)
    solver = make_solver()
    # A run to convergence can take minutes at 512: timed once (after its compile), not best-of.
    total = _seconds(lambda: sd.decompose(kernel, solver, cov=cov, key=jax.random.key(0)), 1)
    sol = sd.decompose(kernel, solver, cov=cov, key=jax.random.key(0))
    steps = int(sol.num_steps)
    inner = np.asarray(getattr(sol, "stats", {}).get("inner_iterations", np.zeros(0)))[:steps]
    return {"method": name, "norm": "Σ" if cov is not None else "F", "s_per_sweep": per_sweep,
            "s_to_converge": total, "steps": steps, "error": sol.final_error,
            "status": sd.Status(int(sol.status)).name,
            "cg_per_sweep": float(inner.mean()) if inner.size else None,
            "cg_history": inner.tolist()}


def _error_within(make_solver, kernel, cov, budget: float, max_steps: int):
    """The lowest error reached by a run of at most ``budget`` seconds (compiled; sweeps doubled
    until a run takes longer): ``(error, sweeps, seconds)`` of the last run within budget."""
    best, steps = None, 1
    while steps <= max_steps:
        solver = make_solver(max_steps=steps, rtol=1e-30)
        t = _seconds(lambda s=solver: sd.decompose(kernel, s, cov=cov, key=jax.random.key(0)), 1)
        if t > budget:
            break
        best = (sd.decompose(kernel, solver, cov=cov, key=jax.random.key(0)).final_error, steps, t)
        steps *= 2
    return best


def _same_time(rows, make, kernel, cov, name, args):
    """The default (truncated-CG) solver's error within the wall time of the exact solver's
    to-converge run (``cg_forcing=0``, ``dense_threshold=2048``: the solver before issue 10)."""
    exact = next(r for r in rows if r["method"] == name + " exact")
    got = _error_within(make, kernel, cov, exact["s_to_converge"], args.max_steps)
    return {"method": name, "norm": "Σ", "same_time_budget_s": exact["s_to_converge"],
            "exact_error": exact["error"], "error_within_budget": None if got is None else got[0],
            "sweeps_within_budget": None if got is None else got[1],
            "seconds_within_budget": None if got is None else got[2]}


def _tensorly(kernel, tucker_ranks, cp_rank, args, want_cp, want_tucker=True):
    from tensorly.decomposition import parafac, partial_tucker

    tensor = np.asarray(jnp.transpose(kernel, (3, 2, 0, 1)))  # (cout, cin, kh, kw)

    def per_iter(call):
        t = [_seconds(lambda k=k: call(k), args.repeats) for k in (args.k1, args.k2)]
        return (t[1] - t[0]) / (args.k2 - args.k1)

    rows = [] if not want_tucker else [{"method": "tensorly partial_tucker", "norm": "F", "s_per_sweep": per_iter(
        lambda k: partial_tucker(tensor, rank=list(tucker_ranks), modes=[0, 1], n_iter_max=k,
                                 tol=0.0, init="svd"))}]
    if want_cp:
        rows.append({"method": "tensorly parafac", "norm": "F", "s_per_sweep": per_iter(
            lambda k: parafac(tensor, cp_rank, n_iter_max=k, tol=0.0, init="random",
                              random_state=0))})
    return rows


def bench_size(c: int, args):
    key = jax.random.key(c)
    kernel = jax.random.normal(key, (3, 3, c, c), jnp.float32) / np.sqrt(9.0 * c)
    cov = make_cov(c, jax.random.fold_in(key, 1))
    tucker_ranks, cp_rank = _ranks(c, args.quick)
    solvers = {
        "SVD": None,
        "Tucker2ALS": lambda **kw: sd.Tucker2ALS(tucker_ranks, **{"max_steps": args.max_steps, **kw}),
    }
    cpals = getattr(sd, "CPALS", None)
    if cpals is None:
        print("note: sigmadecomp.CPALS not available yet; CP rows skipped")
    else:
        solvers["CPALS"] = lambda **kw: cpals(cp_rank, **{"max_steps": args.max_steps, **kw})
    if args.methods:
        solvers = {k: v for k, v in solvers.items() if k in args.methods.split(",")}
    rows, same_time = [], []
    for norm_cov in (None, cov):
        rows.append({"method": "SVD", "norm": "Σ" if norm_cov is not None else "F",
                     "s_per_sweep": None, "steps": 0,
                     "s_to_converge": _seconds(lambda: sd.decompose(
                         kernel, sd.SVD(tucker_ranks[0]), cov=norm_cov), args.repeats)})
        for name, make in solvers.items():
            if make is None:
                continue
            rows.append(_ours(name, make, kernel, norm_cov, args))
            if norm_cov is not None and args.exact:
                exact = lambda m=make, **kw: m(**{"cg_forcing": 0.0, "dense_threshold": 2048, **kw})  # noqa: E731
                rows.append(_ours(name + " exact", exact, kernel, norm_cov, args))
                same_time.append(dict(_same_time(rows, make, kernel, norm_cov, name, args), size=c))
    rows += _tensorly(kernel, tucker_ranks, cp_rank, args, "CPALS" in solvers, "Tucker2ALS" in solvers)
    args.same_time += same_time
    for row in rows:
        rank = {"SVD": tucker_ranks[0]}.get(row["method"], cp_rank)
        row.update(size=c, ranks=str(tucker_ranks if "ucker" in row["method"] else rank))
    return rows


def _ratios(rows):
    """ours/TensorLy speed-up per sweep (Frobenius) and Σ sweep / Frobenius sweep."""
    by = {(r["size"], r["method"], r["norm"]): r["s_per_sweep"] for r in rows}
    out = []
    for size in sorted({r["size"] for r in rows}):
        for ours, theirs in (("Tucker2ALS", "tensorly partial_tucker"), ("CPALS", "tensorly parafac")):
            f, s, t = (by.get((size, ours, "F")), by.get((size, ours, "Σ")),
                       by.get((size, theirs, "F")))
            exact = by.get((size, ours + " exact", "Σ"))
            if f:
                out.append({"size": size, "method": ours,
                            "speedup_vs_tensorly": t / f if t else None,
                            "sigma_over_frob": s / f if s else None,
                            "sigma_exact_over_frob": exact / f if exact else None})
    return out


def _machine() -> str:
    import os
    import platform

    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,512", help="comma-separated channel counts")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few sweeps")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--repeats", type=int, default=3, help="best-of repeats of sweep timings")
    parser.add_argument("--max-steps", type=int, default=50,
                        help="sweep limit of the to-convergence runs (rtol 1e-6)")
    parser.add_argument("--methods", default=None, help="e.g. Tucker2ALS or CPALS (default both)")
    parser.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the exact Σ solvers (cg_forcing=0, dense_threshold=2048) and "
                             "the default's error within the exact run's wall time")
    args = parser.parse_args()
    args.same_time = []
    sizes = [16, 32] if args.quick else [int(s) for s in args.sizes.split(",")]
    args.k1, args.k2 = 1, (2 if args.quick else 3)
    if args.quick:
        args.repeats, args.max_steps = 1, 5
    import os

    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=_machine(),
                jax=jax.__version__, load_before=os.getloadavg(), sizes=sizes, repeats=args.repeats,
                max_steps=args.max_steps)
    print(meta)
    rows = [row for c in sizes for row in bench_size(c, args)]
    meta["load_after"] = os.getloadavg()
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    cols = ["size", "method", "norm", "ranks", "s_per_sweep", "s_to_converge", "steps", "error",
            "status", "cg_per_sweep"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
    ratios = _ratios(rows)
    print("\n| size | method | ours/TensorLy speed-up (F sweep) | Σ sweep / F sweep | exact Σ sweep / F sweep |"
          "\n|---|---|---|---|---|")
    for r in ratios:
        print(f"| {r['size']} | {r['method']} | {fmt(r['speedup_vs_tensorly'])} | "
              f"{fmt(r['sigma_over_frob'])} | {fmt(r['sigma_exact_over_frob'])} |")
    for r in args.same_time:
        print(f"same wall time, {r['size']} {r['method']}-Σ: exact {fmt(r['exact_error'])} in "
              f"{fmt(r['same_time_budget_s'])} s; truncated CG {fmt(r['error_within_budget'])} after "
              f"{r['sweeps_within_budget']} sweeps in {fmt(r['seconds_within_budget'])} s")
    print(f"load average before {meta['load_before']}, after {meta['load_after']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "ratios": ratios, "same_time": args.same_time}, f, indent=1)


if __name__ == "__main__":
    main()
