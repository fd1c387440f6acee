"""Engine formats vs the hand-written Tucker-2-Σ: seconds per Σ sweep on one kernel (issue 14).

    python benchmarks/engine_sweep.py                         # 512×512×3×3 (slow on a busy machine)
    python benchmarks/engine_sweep.py --size 64 --out /tmp/x.json

Kernel float32 ``(3, 3, c, c)``, N(0, 1/(9c)); cov = the realistic synthetic one of
``benchmarks/solvers.py`` (im2col of ReLU(random conv of random images)). Ranks: Tucker-2
``(c/4, c/4)`` and, for each engine format, its rank-for-ratio rule at the same parameter ratio,
so every format stores about as many parameters. Seconds per sweep are
``(t(k2 sweeps) − t(k1 sweeps)) / (k2 − k1)`` of compiled calls (best of ``repeats``); the
variants are interleaved in one process (the machine is shared: the load average and date are
recorded, and only the ratios to Tucker-2-Σ are meant to be compared).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import sigmadecomp as sd  # noqa: E402
from sigmadecomp.layers import count_format  # noqa: E402
from sigmadecomp.surgery import rank_for_ratio  # noqa: E402
from solvers import _machine, make_cov  # noqa: E402

FORMATS = ("tucker2", "tt", "tucker3", "tr")


def _solver(fmt, ranks, steps, cg_max_steps):
    options = dict(max_steps=steps, rtol=1e-30)
    if fmt == "tucker2":
        return sd.Tucker2ALS(ranks, **options)
    return sd.formats.get(fmt).solver(ranks, **options, cg_max_steps=cg_max_steps)


def _seconds(call) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cg-max-steps", type=int, default=30, help="engine CG cap per block (the speed knob)")
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args()
    c, (k1, k2) = args.size, (1, 3)
    shape = (3, 3, c, c)
    kernel = jax.random.normal(jax.random.key(0), shape, jnp.float32) / jnp.sqrt(9.0 * c)
    cov = make_cov(c, jax.random.key(1), num_images=8)
    t2 = (c // 4, c // 4)
    ratio = count_format("tucker2", shape, t2).params / count_format("dense", shape).params
    ranks = {f: t2 if f == "tucker2" else rank_for_ratio(f, shape, ratio, kernel=kernel) for f in args.formats}
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=_machine(),
                jax=jax.__version__, size=c, ratio=ratio, cg_max_steps=args.cg_max_steps,
                loadavg_start=os.getloadavg())
    print(meta, flush=True)
    calls = {(f, k): (lambda f=f, k=k: sd.decompose(kernel, _solver(f, ranks[f], k, args.cg_max_steps), cov=cov))
             for f in args.formats for k in (k1, k2)}
    for call in calls.values():  # compile every variant first
        jax.block_until_ready(call())
    best = {key: float("inf") for key in calls}
    for _ in range(args.repeats):  # interleaved: each repeat times every variant once
        for key, call in calls.items():
            best[key] = min(best[key], _seconds(call))
    rows = []
    for f in args.formats:
        sol = calls[(f, k2)]()
        per = (best[(f, k2)] - best[(f, k1)]) / (k2 - k1)
        rows.append(dict(format=f, ranks=list(ranks[f]), s_per_sweep=per, error_after_k2=sol.final_error,
                         params=count_format(f, shape, ranks[f]).params,
                         inner=[int(i) for i in sol.stats.get("inner_iterations", [])]))
    base = next((r["s_per_sweep"] for r in rows if r["format"] == "tucker2"), None)
    meta["loadavg_end"] = os.getloadavg()
    print("| format | ranks | params | s / Σ sweep | × Tucker-2-Σ | Σ-error after 3 sweeps |\n|---|---|---|---|---|---|")
    for r in rows:
        r["over_tucker2"] = r["s_per_sweep"] / base if base else None
        print(f"| {r['format']} | {r['ranks']} | {r['params']} | {r['s_per_sweep']:.3g} | "
              f"{r['over_tucker2'] if base is None else round(r['over_tucker2'], 2)} | {r['error_after_k2']:.4f} |")
    print(meta)
    if args.out:
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
