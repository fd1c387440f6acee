"""The multilinear engine and its formats (Tucker3ALS, TTALS, TRALS, Tucker2Engine).

Every solve compiles once per (format, shape, static options), and compilation dominates on a
2-core machine, so the tests share a few configurations: one small kernel, one setting per format.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
import sigmadecomp as sd
from sigmadecomp.solvers import Tucker2Engine
from sigmadecomp.solvers import _engine as engine
from sigmadecomp.solvers._decompose import make_problem

KH = KW = 2
CIN, COUT = 5, 6
SHAPE = (KH, KW, CIN, COUT)
D = KH * KW * CIN
SOLVERS = {
    "tucker3": sd.Tucker3ALS((3, 3, 2), max_steps=25),
    "tt": sd.TTALS((3, 4, 3), max_steps=25),
    "tr": sd.TRALS((2, 2, 3, 3), max_steps=25),
}


def _kernel(seed=0, dtype="float64"):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(SHAPE), dtype)


def _cov(kind="ill", seed=2, dtype="float64"):
    return jnp.asarray(oracles.random_cov(kind, D, seed=seed), dtype)


def _sigma(kernel, approx, cov):
    w = np.asarray(sd.kernel_to_matrix(kernel), np.float64)
    a = np.asarray(sd.kernel_to_matrix(sd.to_dense(approx)), np.float64)
    return oracles.sigma_error(w, a, oracles.ridged(np.asarray(cov, np.float64)))


def _non_increasing(sol, slack):
    e = np.asarray(sol.errors)[: int(sol.num_steps) + 1]
    assert np.all(np.diff(e) <= slack * e[0]), e


@pytest.mark.parametrize("fmt", SOLVERS)
def test_sigma_fit_beats_frobenius_fit_monotonically(fmt):
    kernel, cov, solver = _kernel(), _cov(), SOLVERS[fmt]
    frob = sd.decompose(kernel, solver)
    sigma = sd.decompose(kernel, solver, cov=cov)
    _non_increasing(frob, 1e-10)
    _non_increasing(sigma, 1e-10)
    assert sigma.value.kernel_shape == SHAPE and type(sigma.value) is type(frob.value)
    assert _sigma(kernel, sigma.value, cov) < _sigma(kernel, frob.value, cov)
    # the recorded error is the Σ-error of the returned value (ridged metric)
    assert abs(sigma.final_error - _sigma(kernel, sigma.value, cov)) <= 1e-8
    assert sigma.stats["inner_iterations"].shape == (solver.max_steps,)


@pytest.mark.parametrize("fmt", SOLVERS)
def test_planted_kernel_is_recovered_under_an_ill_conditioned_cov(fmt):
    solver = SOLVERS[fmt]
    cores = solver.random_cores(SHAPE, jax.random.key(3), jnp.float64)
    planted = sd.to_dense(solver.to_factorized(cores, SHAPE))
    init = None
    if fmt == "tr":  # TR-SVD is not exact for a ring (its rank split is a heuristic): local recovery
        noise = solver.random_cores(SHAPE, jax.random.key(4), jnp.float64)
        init = solver.to_factorized(tuple(c + 1e-3 * n for c, n in zip(cores, noise)), SHAPE)
    sol = sd.decompose(planted, solver, cov=_cov(), init=init)
    assert sol.final_error < 1e-6, np.asarray(sol.errors)[: int(sol.num_steps) + 1]


def test_every_block_update_is_exact_and_never_increases_the_error():
    """TR (a ring: its block maps are not isometries): each core update equals the dense float64
    least-squares minimiser over that core (Jacobian from jax.jacfwd), and each step decreases f."""
    solver = SOLVERS["tr"]
    kernel, cov = _kernel(1), _cov("diagonal")
    problem = make_problem(kernel, cov, None, None, jnp.asarray(1e-6))
    cores = engine.canonicalise(tuple(solver.initialise(problem.matrix, SHAPE, None)), 3, solver.bonds)
    cores, err = engine.update_output(solver, problem, cores)
    m = np.asarray(problem.metric)
    w = np.asarray(problem.matrix)
    for k in (0, 1, 2):
        cores = engine.canonicalise(cores, k, solver.bonds)
        new, _, _ = engine.update_core(solver, problem, cores, k, cg_tol=1e-12)

        def approx(g, k=k, cores=cores):
            return solver.contract(cores[:k] + (g,) + cores[k + 1:], SHAPE).reshape(-1)

        jac = np.asarray(jax.jacfwd(approx)(cores[k])).reshape(COUT * D, -1)
        big_m = np.kron(np.eye(COUT), m)
        g = np.linalg.solve(jac.T @ big_m @ jac, jac.T @ big_m @ w.reshape(-1))
        np.testing.assert_allclose(np.asarray(new[k]).reshape(-1), g, rtol=1e-6, atol=1e-8)
        before = oracles.sigma_error(w, np.asarray(solver.contract(cores, SHAPE)), m)
        after = oracles.sigma_error(w, np.asarray(solver.contract(new, SHAPE)), m)
        assert after <= before + 1e-12
        cores = new


def test_cg_and_dense_block_solves_reach_the_same_fit():
    kernel, cov = _kernel(2), _cov()
    dense = sd.decompose(kernel, sd.TTALS((3, 4, 3), max_steps=25, dense_threshold=10_000), cov=cov)
    cg = sd.decompose(kernel, sd.TTALS((3, 4, 3), max_steps=25, dense_threshold=0, cg_max_steps=200,
                                       cg_tol=1e-12), cov=cov)
    assert int(cg.stats["inner_iterations"][0]) > 0 and int(dense.stats["inner_iterations"][0]) == 0
    _non_increasing(cg, 1e-10)
    assert abs(cg.final_error - dense.final_error) <= 1e-6 * dense.final_error


def test_truncated_cg_is_still_monotone_and_reports_it():
    sol = sd.decompose(_kernel(3), sd.TTALS((3, 4, 3), max_steps=8, dense_threshold=0, cg_max_steps=2),
                       cov=_cov())
    _non_increasing(sol, 1e-10)
    assert sd.Status(int(sol.status)) == sd.Status.INNER_NOT_CONVERGED
    assert np.all(np.asarray(sol.stats["inner_iterations"])[: int(sol.num_steps)] <= 2 * 3)


def test_engine_tucker2_reproduces_tucker2als():
    """Same problem, same HOSVD start: the engine's Σ fixed point equals the hand-written one.
    (A diagonal cov so that both converge within the cap; with the ill-conditioned one Tucker2ALS
    is still descending after 300 sweeps, 0.041026 vs the engine's 0.040966.)"""
    kernel, cov = _kernel(4), _cov("diagonal")
    hand = sd.decompose(kernel, sd.Tucker2ALS((3, 2), max_steps=300, rtol=1e-13), cov=cov)
    gen = sd.decompose(kernel, Tucker2Engine((3, 2), max_steps=300, rtol=1e-13), cov=cov)
    assert abs(gen.final_error - hand.final_error) <= 1e-4 * hand.final_error, (gen.final_error, hand.final_error)


def test_cross_covariance_form_and_float32_without_recompiling():
    """Sequential calibration's inputs; float32 keeps its dtype; new data does not recompile."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, D))
    x_hat = x + 0.1 * rng.standard_normal((400, D))
    moments = dict(cov=x_hat.T @ x_hat / 400, cross_cov=x.T @ x_hat / 400, target_cov=x.T @ x / 400)
    solver = sd.TTALS((3, 4, 3), max_steps=10)
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in moments.items()}
    sol = sd.decompose(_kernel(6, "float32"), solver, **f32)
    assert sol.value.in_core.dtype == jnp.float32 and np.isfinite(sol.final_error)
    _non_increasing(sol, 1e-5)
    before = engine._engine_solve._cache_size()
    again = sd.decompose(_kernel(7, "float32"), sd.TTALS((3, 4, 3), max_steps=10, rtol=1e-3, cg_tol=1e-4),
                         **f32)
    assert engine._engine_solve._cache_size() == before and np.isfinite(again.final_error)


def test_warm_start_and_bad_input():
    kernel, solver = _kernel(), SOLVERS["tt"]
    sol = sd.decompose(kernel, solver)
    warm = sd.decompose(kernel, solver, init=sol.value)
    assert float(warm.errors[0]) <= sol.final_error * (1 + 1e-9)
    with pytest.raises(ValueError, match=r"ranks must be \(r1, r2, r3\)"):
        sd.TTALS((3, 4))
    with pytest.raises(ValueError, match=r"r2.*exceeds the r1·kh mode"):
        sd.decompose(kernel, sd.TTALS((2, 5, 2)))
    with pytest.raises(ValueError, match=r"r_space.*exceeds the kh·kw mode"):
        sd.decompose(kernel, sd.Tucker3ALS((2, 2, 5)))
    with pytest.raises(ValueError, match=r"r_out\) = 3 exceeds the r_in·r_space \(core unfolding\) mode of size 2"):
        sd.decompose(kernel, sd.Tucker3ALS((3, 1, 2)))  # the core could not reach r_out = 3
    with pytest.raises(ValueError, match=r"r0·r1 = 6 exceeds the cin mode"):
        sd.decompose(kernel, sd.TRALS((2, 3, 2, 2)))
    with pytest.raises(ValueError, match="init must be a TT"):
        sd.decompose(kernel, solver, init=sd.decompose(kernel, sd.SVD(2)).value)
    with pytest.raises(ValueError, match="cg_max_steps"):
        sd.TTALS((3, 4, 3), cg_max_steps=0)


def test_left_basis_has_the_asked_width_beyond_the_matrix_rank():
    from sigmadecomp.solvers._subspace import left_basis

    a = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)))
    for rank in (1, 2, 4, 6):
        q = left_basis(a, rank)
        assert q.shape == (6, rank)
        np.testing.assert_allclose(np.asarray(q.T @ q), np.eye(rank), atol=1e-10)
    q2 = left_basis(a, 2)  # the leading columns span a's column space
    np.testing.assert_allclose(np.asarray(q2 @ (q2.T @ a)), np.asarray(a), atol=1e-10)
