"""Tucker2ALS: planted recovery, exact monotone block updates, oracles, TensorLy, statuses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
import sigmadecomp as sd
from sigmadecomp.solvers import _tucker2 as t2
from sigmadecomp.solvers._decompose import make_problem

KH = KW = 2
P = KH * KW
CIN, COUT, RANKS = 5, 6, (3, 2)


def _kernel(w, dtype):
    return jnp.asarray(oracles.matrix_to_conv(w, KH, KW), dtype)


def _problem(w, cov, dtype, ridge=1e-6):
    cov = None if cov is None else jnp.asarray(cov, dtype)
    return make_problem(_kernel(w, dtype), cov, None, None, jnp.asarray(ridge, dtype))


def _solver(**kwargs):
    """Shared static settings, so that tests reuse one compilation (rtol/cg_tol/ridge are traced)."""
    return sd.Tucker2ALS(RANKS, **{"max_steps": 60, **kwargs})


_projections = jax.jit(t2.projections)
_update_outer = jax.jit(t2.update_outer, static_argnums=2)
_update_in = jax.jit(t2.update_in, static_argnames=("dense_threshold",))
_orthonormalise = jax.jit(t2.orthonormalise)


def _approx(value):
    return np.asarray(sd.kernel_to_matrix(sd.to_dense(value)), np.float64)


@pytest.mark.parametrize("kind", oracles.COV_KINDS)
def test_planted_recovery(kind, dtype, tol):
    w, (u, g, x) = oracles.planted_tucker2(COUT, CIN, P, RANKS, noise=1e-2, seed=1)
    cov = oracles.random_cov(kind, CIN * P, seed=2)
    sol = sd.decompose(_kernel(w, dtype), _solver(),
                       cov=jnp.asarray(cov, dtype))
    truth = oracles.sigma_error(w, oracles.tucker2_matrix(u, g, x, P), oracles.ridged(cov))
    ours = oracles.sigma_error(w, _approx(sol.value), oracles.ridged(cov))
    assert sol.value.core.dtype == jnp.dtype(dtype)
    # `truth` (the planted factors' error, ~1e-4 here) is the noise floor: slack is a fraction
    # of it (float32: 5%, the rounding of the solver's Gram/Cholesky steps), not an absolute 1e-2.
    rel = 5e-2 if dtype == "float32" else 1e-3
    assert ours <= truth * (1 + rel), (ours, truth)
    assert abs(sol.final_error - ours) <= rel * truth, (sol.final_error, ours)


def _run_blocks(problem, state, sweeps, dense_threshold):
    """Apply step A, step B, orthonormalise in turn; the float64 objective after each block."""
    m = np.asarray(problem.metric, np.float64)
    t, e = np.asarray(problem.target, np.float64), float(problem.energy)
    f = lambda u, g, x: oracles.objective(  # noqa: E731
        oracles.tucker2_matrix(*(np.asarray(a, np.float64) for a in (u, g, x)), P), m, t, e)
    x, u, g, history = state.in_factor, state.out_factor, state.core, []
    history.append(f(u, g, x))
    for _ in range(sweeps):
        gram, cross = _projections(problem, x)
        u, g = _update_outer(gram, cross, RANKS[0])
        history.append(f(u, g, x))
        x, ok = _update_in(problem, u, g, x, cg_tol=1e-10, dense_threshold=dense_threshold)
        assert dense_threshold > 0 or bool(ok) or problem.matrix.dtype == jnp.float32
        history.append(f(u, g, x))
        x, g = _orthonormalise(x, g)
        history.append(f(u, g, x))
    return np.array(history)


@pytest.mark.parametrize("kind", ["diagonal", "ill", "singular"])
@pytest.mark.parametrize("dense_threshold", [0, 10_000])
def test_sigma_error_never_increases_per_block(kind, dense_threshold, dtype, tol):
    w, _ = oracles.planted_tucker2(COUT, CIN, P, RANKS, noise=0.3, seed=3)
    problem = _problem(w, oracles.random_cov(kind, CIN * P, seed=4), dtype)
    state = t2._make_state(problem, *t2._initial(problem, jax.random.key(1), None, RANKS, "random"))
    history = _run_blocks(problem, state, 3, dense_threshold)
    assert np.all(np.diff(history) <= 20 * tol * history[:-1]), np.diff(history)
    assert history[-1] < history[0]


def test_cov_identity_is_frobenius_twin(dtype, tol):
    w, _ = oracles.planted_tucker2(COUT, CIN, P, RANKS, noise=0.2, seed=5)
    solver = _solver(rtol=1e-10)
    frob = sd.decompose(_kernel(w, dtype), solver)
    sigma = sd.decompose(_kernel(w, dtype), solver, cov=jnp.eye(CIN * P, dtype=dtype))
    assert abs(frob.final_error - sigma.final_error) <= 1e-4 * frob.final_error + 1e3 * np.finfo(dtype).eps
    np.testing.assert_allclose(_approx(frob.value), _approx(sigma.value), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["diagonal", "ill"])
def test_no_worse_than_dense_normal_equation_oracle(kind):
    w, _ = oracles.planted_tucker2(COUT, CIN, P, RANKS, noise=0.3, seed=6)
    cov = oracles.random_cov(kind, CIN * P, seed=7)
    problem = _problem(w, cov, "float64")
    state = t2._make_state(problem, *t2._initial(problem, jax.random.key(2), None, RANKS, "random"))
    start = tuple(np.asarray(a) for a in (state.out_factor, state.core, state.in_factor))
    m, t = np.asarray(problem.metric), np.asarray(problem.target)
    history, _ = oracles.oracle_tucker2_als(t, m, float(problem.energy), *start, P, sweeps=20)
    assert np.all(np.diff(history) <= 1e-10)  # the oracle itself is monotone
    init = sd.Tucker2(t2.matrix_to_core(jnp.asarray(start[1]), KH, KW), jnp.asarray(start[2]),
                      jnp.asarray(start[0]), kernel_shape=(KH, KW, CIN, COUT))
    sol = sd.decompose(_kernel(w, "float64"), _solver(rtol=1e-12),
                       cov=jnp.asarray(cov), init=init)
    assert sol.errors[0] == pytest.approx(history[0], rel=1e-9)
    assert sol.final_error <= history[-1] + 1e-9


def test_step_b_equals_oracle_minimiser():
    w, _ = oracles.planted_tucker2(COUT, CIN, P, RANKS, noise=0.3, seed=8)
    problem = _problem(w, oracles.random_cov("ill", CIN * P, seed=9), "float64")
    x0 = jnp.linalg.qr(jax.random.normal(jax.random.key(3), (CIN, RANKS[1]), jnp.float64))[0]
    u, g = _update_outer(*_projections(problem, x0), RANKS[0])
    want = oracles.oracle_in(np.asarray(problem.target), np.asarray(problem.metric),
                             np.asarray(u), np.asarray(g), (CIN, RANKS[1]), P)
    for threshold in (0, 10_000):  # CG and dense Cholesky paths
        x, ok = _update_in(problem, u, g, x0, cg_tol=1e-12, dense_threshold=threshold)
        assert bool(ok)
        np.testing.assert_allclose(np.asarray(x), want, rtol=1e-6, atol=1e-8)


def test_step_a_beats_oracle_out_then_core():
    w, _ = oracles.planted_tucker2(COUT, CIN, P, RANKS, noise=0.3, seed=10)
    problem = _problem(w, oracles.random_cov("diagonal", CIN * P, seed=11), "float64")
    m, t, e = np.asarray(problem.metric), np.asarray(problem.target), float(problem.energy)
    state = t2._make_state(problem, *t2._initial(problem, jax.random.key(4), None, RANKS, "random"))
    x, g = np.asarray(state.in_factor), np.asarray(state.core)
    u_o = oracles.oracle_out(t, m, g, x, P)
    g_o = oracles.oracle_core(t, m, u_o, x, P)
    oracle_f = oracles.objective(oracles.tucker2_matrix(u_o, g_o, x, P), m, t, e)
    u, g = _update_outer(state.gram, state.cross, RANKS[0])
    ours = oracles.objective(oracles.tucker2_matrix(np.asarray(u), np.asarray(g), x, P), m, t, e)
    assert ours <= oracle_f + 1e-12


def test_dense_and_cg_paths_agree():
    w, _ = oracles.planted_tucker2(COUT, CIN, P, RANKS, noise=0.3, seed=12)
    cov = jnp.asarray(oracles.random_cov("ill", CIN * P, seed=13))
    dense = sd.decompose(_kernel(w, "float64"), _solver(),
                         cov=cov)
    cg = sd.decompose(_kernel(w, "float64"), _solver(dense_threshold=0, cg_tol=1e-12, cg_forcing=0.0),
                      cov=cov)  # exact CG (no forcing term): the same iterates as the dense path
    assert int(dense.num_steps) == int(cg.num_steps)
    np.testing.assert_allclose(np.asarray(dense.errors), np.asarray(cg.errors), rtol=1e-7)
    np.testing.assert_allclose(_approx(dense.value), _approx(cg.value), atol=1e-6)


def test_frobenius_at_least_as_accurate_as_tensorly():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker

    w, _ = oracles.planted_tucker2(COUT, CIN, P, RANKS, noise=0.5, seed=14)
    kernel = _kernel(w, "float64")
    start = sd.decompose(kernel, sd.Tucker2ALS(RANKS, max_steps=1)).value  # after 1 HOOI sweep
    tensor = w.reshape(COUT, CIN, KH, KW)
    core0 = np.einsum("ocij,ob,ca->baij", tensor, np.asarray(start.out_factor),
                      np.asarray(start.in_factor))
    factors0 = [np.asarray(start.out_factor), np.asarray(start.in_factor)]
    (core, factors), _ = partial_tucker(tensor, rank=list(RANKS), modes=[0, 1], n_iter_max=20,
                                        init=(core0, factors0), tol=0, svd="truncated_svd")
    approx = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]).reshape(COUT, -1)
    theirs = np.sum((w - approx) ** 2) / np.sum(w**2)
    ours = sd.decompose(kernel, sd.Tucker2ALS(RANKS, max_steps=20, rtol=1e-14), init=start)
    assert ours.final_error <= theirs + 1e-10, (ours.final_error, theirs)


def test_warm_start_from_solution_does_not_get_worse():
    w, _ = oracles.planted_tucker2(COUT, CIN, P, RANKS, noise=0.3, seed=15)
    cov = jnp.asarray(oracles.random_cov("diagonal", CIN * P, seed=16))
    first = sd.decompose(_kernel(w, "float64"), _solver(rtol=1e-2), cov=cov)
    again = sd.decompose(_kernel(w, "float64"), _solver(), cov=cov,
                         init=first.value)
    assert float(again.errors[0]) == pytest.approx(first.final_error, rel=1e-9)
    assert again.final_error <= first.final_error + 1e-12


def test_no_recompilation_for_new_data_or_rtol():
    cov = jnp.asarray(oracles.random_cov("diagonal", CIN * P, seed=17))
    kernels = [_kernel(oracles.planted_tucker2(COUT, CIN, P, RANKS, noise=0.1, seed=s)[0],
                       "float64") for s in (18, 19, 20)]
    sd.decompose(kernels[0], _solver(), cov=cov)
    size = t2._tucker2_solve._cache_size()
    sd.decompose(kernels[1], _solver(), cov=cov * 2.0)
    sd.decompose(kernels[2], _solver(rtol=1e-3, cg_tol=1e-4, ridge=1e-3), cov=cov)
    assert t2._tucker2_solve._cache_size() == size


def test_sweeps_run_in_a_while_loop():
    w, _ = oracles.planted_tucker2(COUT, CIN, P, RANKS, seed=21)
    problem = _problem(w, oracles.random_cov("diagonal", CIN * P), "float64")
    solver = _solver()
    jaxpr = jax.make_jaxpr(lambda p: solver.solve(p, key=jax.random.key(0)))(problem)
    assert "while" in str(jaxpr)


def test_status_max_steps_and_inner_not_converged():
    w, _ = oracles.planted_tucker2(COUT, CIN, P, RANKS, noise=0.5, seed=22)
    cov = jnp.asarray(oracles.random_cov("ill", CIN * P, seed=23))
    sol = sd.decompose(_kernel(w, "float64"), sd.Tucker2ALS(RANKS, max_steps=1), cov=cov)
    assert int(sol.status) == sd.Status.MAX_STEPS and int(sol.num_steps) == 1
    assert "max_steps" in sol.message
    sol = sd.decompose(_kernel(w, "float64"),
                       _solver(cg_max_steps=1, cg_tol=1e-12, dense_threshold=0),
                       cov=cov)
    assert int(sol.status) == sd.Status.INNER_NOT_CONVERGED
    assert np.all(np.diff(np.asarray(sol.errors)[: int(sol.num_steps) + 1]) <= 1e-12)


def test_dense_kernel_and_random_init(dtype, tol):
    w = oracles.planted_lowrank(12, 10, 3, noise=0.05, seed=24)
    kernel = jnp.asarray(w.T, dtype)  # dense (in, out)
    cov = jnp.asarray(oracles.random_cov("diagonal", 10, seed=25), dtype)
    sol = sd.decompose(kernel, sd.Tucker2ALS((3, 3), init="random"), cov=cov,
                       key=jax.random.key(7))
    assert sol.value.core.shape == (1, 1, 3, 3) and sd.to_dense(sol.value).shape == (10, 12)
    assert sol.final_error < 0.01


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ranks": (0, 2)}, "r_out"),
        ({"ranks": 3}, "pair"),
        ({"ranks": (2, 2), "max_steps": 0}, "max_steps"),
        ({"ranks": (2, 2), "rtol": 0.0}, "rtol"),
        ({"ranks": (2, 2), "cg_tol": -1.0}, "cg_tol"),
        ({"ranks": (2, 2), "init": "hosvd"}, "init"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sd.Tucker2ALS(**kwargs)


def test_rank_above_mode_and_bad_init_shape():
    kernel = jnp.ones((3, 3, 4, 6))
    with pytest.raises(ValueError, match="cin mode of size 4"):
        sd.decompose(kernel, sd.Tucker2ALS((2, 5)))
    bad = sd.Tucker2(jnp.ones((3, 3, 2, 2)), jnp.ones((4, 3)), jnp.ones((6, 2)), (3, 3, 4, 6))
    with pytest.raises(ValueError, match=r"init.in_factor must have shape \(4, 2\)"):
        sd.decompose(kernel, sd.Tucker2ALS((2, 2)), init=bad)
