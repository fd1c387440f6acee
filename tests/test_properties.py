"""Property-based check of every solver (Hypothesis, a small fixed example budget).

Over random kernel shapes, ranks, dtypes and PSD or degenerate ``cov`` (low rank, dead
channels): a success status never comes with NaN, the error history never increases, and the
reported final error is the relative error of the returned factors under the ridged metric the
solver minimised (``cov + stats["ridge"]·I``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sigmadecomp as sd  # noqa: E402

# Few shapes, so the example budget is spent on ranks, dtypes and covariances, not on compiling.
SHAPES = [(3, 3, 3, 5), (1, 1, 6, 4), (2, 2, 3, 4)]
SUCCESS = (sd.Status.CONVERGED, sd.Status.MAX_STEPS, sd.Status.INNER_NOT_CONVERGED)
# Noise floor of a relative error computed in the dtype: a few eps (the expanded Σ-error form
# cancels terms of size 1 = energy / energy). (monotone slack, atol, rtol of the final error)
TOL = {dt: (32 * float(np.finfo(dt).eps), 1e3 * float(np.finfo(dt).eps), 1e-3 if dt == "float32" else 1e-6)
       for dt in ("float32", "float64")}


@st.composite
def cases(draw):
    kh, kw, cin, cout = draw(st.sampled_from(SHAPES))
    d, p = kh * kw * cin, kh * kw
    kind = draw(st.sampled_from(["svd", "tucker2", "cp"]))
    if kind == "svd":
        solver = sd.SVD(draw(st.integers(1, min(cout, d))))
    elif kind == "tucker2":
        r_in = draw(st.integers(1, min(cin, cout * p)))
        r_out = draw(st.integers(max(1, -(-r_in // p)), min(cout, r_in * p)))
        solver = sd.Tucker2ALS((r_out, r_in), max_steps=6)
    else:
        solver = sd.CPALS(draw(st.integers(1, 4)), max_steps=6, merge_spatial=draw(st.booleans()))
    cov_kind = draw(st.sampled_from(["full", "low_rank", "dead_channels"]))
    return (kh, kw, cin, cout), solver, draw(st.sampled_from(["float32", "float64"])), cov_kind, \
        draw(st.integers(0, 2**16))


def _cov(d, cin, kind, rng):
    n = {"full": 4 * d, "low_rank": max(1, d // 3), "dead_channels": 4 * d}[kind]
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d)
    if kind == "dead_channels":  # patch order is channel-major: zero one input channel's block
        x.reshape(n, cin, -1)[:, 0] = 0.0
    return x.T @ x / n


@settings(max_examples=6, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate))  # no shrinking: each example compiles
@given(cases())
def test_solver_properties(case):
    shape, solver, dtype, cov_kind, seed = case
    rng = np.random.default_rng(seed)
    kernel = jnp.asarray(rng.normal(size=shape), dtype)
    d = shape[0] * shape[1] * shape[2]
    cov = jnp.asarray(_cov(d, shape[2], cov_kind, rng), dtype)
    sol = sd.decompose(kernel, solver, cov=cov, key=jax.random.key(seed))
    status, steps = sd.Status(int(sol.status)), int(sol.num_steps)
    leaves = jax.tree_util.tree_leaves(sol.value)
    if status in SUCCESS:
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves), status
        assert np.isfinite(sol.final_error)
    slack, atol, rtol = TOL[dtype]
    errors = np.asarray(sol.errors, np.float64)[: steps + 1]
    assert np.all(np.diff(errors) <= slack), errors
    ridged = cov + sol.stats["ridge"] * jnp.eye(d, dtype=cov.dtype)
    measured = float(sd.relative_error(kernel, sol.value, ridged))
    assert measured == pytest.approx(sol.final_error, rel=rtol, abs=atol)
