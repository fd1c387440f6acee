"""XLA:CPU compile options for the Tucker-2 Σ solver: compile CPU seconds and run time per option.

    python benchmarks/compile_options.py --out benchmarks/compile_options.json

One process; the same lowered program (ranks ``(r, r)`` on a ``(3, 3, c, c)`` kernel, a ReLU-feature
cov, the cross form of sequential calibration, 30 sweeps) compiled with each option set, then run
3 times (best CPU time). CPU seconds (``time.process_time``) are used because the machine is
shared; the date and load are recorded. Chose ``xla_backend_optimization_level=1`` for
:func:`sigmadecomp._compile.fast_compile_jit`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

import sigmadecomp as sd
from sigmadecomp.solvers import _tucker2 as t2
from sigmadecomp.solvers._decompose import make_problem

OPTIONS = {"default (-O2)": None, "-O1": {"xla_backend_optimization_level": 1},
           "-O0": {"xla_backend_optimization_level": 0}}


def measure(c: int, r: int) -> list[dict]:
    kernel = jax.random.normal(jax.random.key(0), (3, 3, c, c))
    x = jax.nn.relu(jax.random.normal(jax.random.key(1), (4000, 9 * c)) + 0.3)
    cov = x.T @ x / 4000
    problem = make_problem(kernel, cov, cov, cov, jnp.float32(1e-6))
    solver = sd.Tucker2ALS((r, r), max_steps=30)
    tols = {n: jnp.asarray(getattr(solver, n), jnp.float32) for n in ("rtol", "cg_tol", "cg_forcing")}
    dense = t2._step_b_dense(problem.conv_shape, (r, r), None)
    lowered = t2._tucker2_solve._other.lower(problem, jax.random.key(0), None, tols, ranks=(r, r), max_steps=30,
                                             cg_max_steps=200, dense=dense, init_method="svd")
    rows = []
    for name, opts in OPTIONS.items():
        t0 = time.process_time()
        compiled = lowered.compile(compiler_options=opts) if opts else lowered.compile()
        compile_cpu = time.process_time() - t0
        jax.block_until_ready(compiled(problem, jax.random.key(0), None, tols))
        runs = []
        for _ in range(3):
            t0 = time.process_time()
            sol = jax.block_until_ready(compiled(problem, jax.random.key(0), None, tols))
            runs.append(time.process_time() - t0)
        rows.append(dict(channels=c, ranks=[r, r], step_b="dense" if dense else "cg", option=name,
                         compile_cpu_s=compile_cpu, run_cpu_s=min(runs), error=float(sol.final_error),
                         sweeps=int(sol.num_steps)))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/compile_options.json")
    args = parser.parse_args()
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_before=os.getloadavg(),
                jax=jax.__version__, backend=jax.default_backend())
    rows = measure(64, 38) + measure(16, 9)
    meta["load_after"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
