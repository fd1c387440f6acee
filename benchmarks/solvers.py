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
    run = lambda k: lambda: sd.decompose(kernel, make_solver(k), cov=cov)  # noqa: E731
    return (_seconds(run(k2), repeats) - _seconds(run(k1), repeats)) / (k2 - k1)


def _ours(name, make_solver, kernel, cov, args):
    per_sweep = _per_sweep(lambda k: make_solver(max_steps=k, rtol=1e-30), kernel, cov,
                           args.k1, args.k2, args.repeats)
    solver = make_solver()
    # A run to convergence can take minutes at 512: timed once (after its compile), not best-of.
    total = _seconds(lambda: sd.decompose(kernel, solver, cov=cov), 1)
    sol = sd.decompose(kernel, solver, cov=cov)
    return {"method": name, "norm": "Σ" if cov is not None else "F", "s_per_sweep": per_sweep,
            "s_to_converge": total, "steps": int(sol.num_steps), "error": sol.final_error,
            "status": sd.Status(int(sol.status)).name}


def _tensorly(kernel, tucker_ranks, cp_rank, args, want_cp):
    from tensorly.decomposition import parafac, partial_tucker

    tensor = np.asarray(jnp.transpose(kernel, (3, 2, 0, 1)))  # (cout, cin, kh, kw)

    def per_iter(call):
        t = [_seconds(lambda k=k: call(k), args.repeats) for k in (args.k1, args.k2)]
        return (t[1] - t[0]) / (args.k2 - args.k1)

    rows = [{"method": "tensorly partial_tucker", "norm": "F", "s_per_sweep": per_iter(
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
    rows = []
    for norm_cov in (None, cov):
        rows.append({"method": "SVD", "norm": "Σ" if norm_cov is not None else "F",
                     "s_per_sweep": None, "steps": 0,
                     "s_to_converge": _seconds(lambda: sd.decompose(
                         kernel, sd.SVD(tucker_ranks[0]), cov=norm_cov), args.repeats)})
        for name, make in solvers.items():
            if make is not None:
                rows.append(_ours(name, make, kernel, norm_cov, args))
    rows += _tensorly(kernel, tucker_ranks, cp_rank, args, cpals is not None)
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
            if f:
                out.append({"size": size, "method": ours,
                            "speedup_vs_tensorly": t / f if t else None, "sigma_over_frob": s / f})
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
    args = parser.parse_args()
    sizes = [16, 32] if args.quick else [int(s) for s in args.sizes.split(",")]
    args.k1, args.k2 = 1, (2 if args.quick else 3)
    if args.quick:
        args.repeats, args.max_steps = 1, 5
    print(f"{time.strftime('%Y-%m-%d %H:%M')} | {_machine()} | jax {jax.__version__}, "
          f"devices {jax.devices()} | sizes {sizes}, repeats {args.repeats}, "
          f"max_steps {args.max_steps}")
    rows = [row for c in sizes for row in bench_size(c, args)]
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    cols = ["size", "method", "norm", "ranks", "s_per_sweep", "s_to_converge", "steps", "error",
            "status"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
    ratios = _ratios(rows)
    print("\n| size | method | ours/TensorLy speed-up (F sweep) | Σ sweep / F sweep |\n|---|---|---|---|")
    for r in ratios:
        print(f"| {r['size']} | {r['method']} | {fmt(r['speedup_vs_tensorly'])} | "
              f"{fmt(r['sigma_over_frob'])} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
