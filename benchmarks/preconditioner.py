"""CG iterations of Tucker-2-Σ step B with two Kronecker preconditioners (issue 10, item 3).

    python benchmarks/preconditioner.py --sizes 64,128 --out benchmarks/preconditioner_results.json

``M ≈ M_chan ⊗ M_space`` from partial traces (the solver's ``kronecker_factors``) against the
nearest Kronecker product in Frobenius norm (Van Loan–Pitsianis: leading singular pair of the
rearranged ``M``, by alternating power iterations started from the partial traces). Each solves
step B exactly (``cg_tol`` 1e-6, no forcing term) from the same state of a Tucker-2-Σ solve
after 2 sweeps, on the synthetic conv covariance of ``benchmarks/solvers.py``; the iteration
counts are what is compared (no timing).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import sigmadecomp as sd
from sigmadecomp.solvers import _tucker2 as t2
from sigmadecomp.solvers._decompose import make_problem
from sigmadecomp.solvers._numerics import kronecker_factors, pcg, safe_cholesky

from solvers import make_cov  # noqa: E402  (benchmarks/ is the working directory's sibling)


def nearest_kronecker(metric, cin: int, iterations: int = 10):
    """Leading Kronecker term ``M ≈ A ⊗ B`` (min ‖M − A⊗B‖_F) by alternating power iterations."""
    p = metric.shape[0] // cin
    m4 = metric.reshape(cin, p, cin, p)
    _, space = kronecker_factors(metric, cin)
    for _ in range(iterations):
        chan = jnp.einsum("cpdq,pq->cd", m4, space) / jnp.sum(space * space)
        space = jnp.einsum("cpdq,cd->pq", m4, chan) / jnp.sum(chan * chan)
    return chan, space


@functools.partial(jax.jit, static_argnames=("which",))
def cg_steps(problem, u, g, x0, *, which: str):
    cin, r_in = x0.shape
    if which == "partial_trace":
        chan, space = kronecker_factors(problem.metric, cin)
    else:
        chan, space = nearest_kronecker(problem.metric, cin)
    kron = t2._Kron(safe_cholesky(0.5 * (chan + chan.T)), 0.5 * (space + space.T))
    gh = g  # U_out orthonormal after step A
    rhs = t2._rhs(problem, u, g, cin)
    _, ok, k = pcg(functools.partial(t2._matvec, problem, gh), rhs, x0,
                   precond=t2._preconditioner(kron, gh, r_in), tol=1e-6, max_steps=500)
    return k, ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for c in (int(v) for v in args.sizes.split(",")):
        key = jax.random.key(c)
        kernel = jax.random.normal(key, (3, 3, c, c), jnp.float32) / np.sqrt(9.0 * c)
        cov = make_cov(c, jax.random.fold_in(key, 1))
        r = min(c // 2, 128)
        state = sd.decompose(kernel, sd.Tucker2ALS((r, r), max_steps=2), cov=cov).value
        problem = make_problem(kernel, cov, None, None, jnp.asarray(1e-6, jnp.float32))
        x0 = state.in_factor
        gram, cross = t2.projections(problem, x0)
        u, g = t2.update_outer(gram, cross, r)
        for which in ("partial_trace", "nearest_kronecker"):
            k, ok = cg_steps(problem, u, g, x0, which=which)
            rows.append(dict(size=c, ranks=[r, r], preconditioner=which, cg_steps=int(k), converged=bool(ok)))
            print(rows[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
