"""CP-ALS (CP and CP3), Frobenius and Σ: planted recovery, exact block updates, oracles."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sigmadecomp as sd
from sigmadecomp.solvers._cp import CPALS, _solve, block_update
from sigmadecomp.solvers._decompose import make_problem

KH, KW, CIN, COUT, RANK = 3, 3, 5, 6, 4
SHORT = 8  # sweeps of the fixed-length runs (one static value: the tests share compilations)
D = KH * KW * CIN


# ---------------------------------------------------------------------------------- fixtures


def planted_factors(dtype, *, merged=False, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    a = jax.random.normal(k[0], (COUT, RANK), dtype)
    b = jax.random.normal(k[1], (CIN, RANK), dtype)
    if merged:
        return sd.CP3(a, b, jax.random.normal(k[2], (KH, KW, RANK), dtype), kernel_shape=(KH, KW, CIN, COUT))
    c, e = jax.random.normal(k[2], (KH, RANK), dtype), jax.random.normal(k[3], (KW, RANK), dtype)
    return sd.CP(a, b, c, e, kernel_shape=(KH, KW, CIN, COUT))


def planted(dtype, *, merged=False, noise=1e-3, seed=0):
    """A rank-RANK CP (or CP3) kernel plus Gaussian noise of relative size ``noise``."""
    clean = sd.to_dense(planted_factors(dtype, merged=merged, seed=seed))
    scale = jnp.sqrt(jnp.mean(clean * clean))
    key = jax.random.fold_in(jax.random.key(seed), 99)
    return clean + noise * scale * jax.random.normal(key, clean.shape, dtype), clean


def make_cov(kind, dtype, seed=1):
    """SPD / singular second moments of size D."""
    rng = np.random.default_rng(seed)
    if kind == "identity":
        cov = np.eye(D)
    elif kind == "diagonal":
        cov = np.diag(rng.uniform(0.1, 3.0, D))
    elif kind == "illcond":
        q, _ = np.linalg.qr(rng.standard_normal((D, D)))
        cov = (q * np.logspace(0, -6, D)[None, :]) @ q.T
    elif kind == "singular":
        x = rng.standard_normal((D // 2, D))  # fewer samples than d: rank D/2
        cov = x.T @ x / (D // 2)
    else:
        x = np.maximum(rng.standard_normal((400, D)) + 0.3, 0.0)  # ReLU-like, correlated
        cov = x.T @ x / 400
    return jnp.asarray(0.5 * (cov + cov.T), dtype)


def problem_of(kernel, cov=None, ridge=1e-6):
    return make_problem(kernel, cov, None, None, jnp.asarray(ridge, kernel.dtype))


def objective64(problem, cp, tau=0.0):
    """``f(W̃) + τ Σ‖X_k‖²`` in float64 numpy, straight from the definition."""
    w = np.asarray(problem.matrix, np.float64)
    approx = np.asarray(sd.kernel_to_matrix(sd.to_dense(cp)), np.float64)
    delta = w - approx
    m = np.eye(D) if problem.metric is None else np.asarray(problem.metric, np.float64)
    f = np.sum((delta @ m) * delta)
    leaves = jax.tree_util.tree_leaves(cp)
    return f + tau * sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves)


def random_cp(dtype, seed=7, merged=False):
    return planted_factors(dtype, merged=merged, seed=seed)


# ---------------------------------------------------------------------------------- recovery


def perturbed(cp, size, seed=11):
    """``cp`` with every factor perturbed by ``size`` relative Gaussian noise."""
    leaves, tree = jax.tree_util.tree_flatten(cp)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + size * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, noisy)


@pytest.mark.parametrize("cov_kind", [None, "identity", "diagonal"])
def test_recovers_planted_cp_from_default_start(dtype, cov_kind):
    kernel, clean = planted(dtype)
    cov = None if cov_kind is None else make_cov(cov_kind, dtype)
    sol = sd.decompose(kernel, CPALS(RANK, max_steps=300, rtol=1e-9), cov=cov, key=jax.random.key(3))
    noise_level = float(sd.relative_error(kernel, clean, cov=cov))
    assert sol.value.out_factor.dtype == dtype
    assert sol.final_error <= 1.05 * noise_level + 10 * np.finfo(dtype).eps
    assert float(sd.relative_error(kernel, sol.value, cov=cov)) <= 1.05 * noise_level + 1e-5


@pytest.mark.parametrize("cov_kind", ["illcond", "singular"])
def test_recovers_planted_cp_near_truth_with_hard_cov(dtype, cov_kind):
    # With cond(cov) = 1e6 or a rank-d/2 cov the weighted CP landscape has swamps and local minima
    # (as for CP with missing data): from the SVD start ALS can stall at ~1e-3 relative error.
    # Local convergence to the noise level from a 10%-perturbed start is what we can promise.
    kernel, clean = planted(dtype)
    cov = make_cov(cov_kind, dtype)
    start = perturbed(planted_factors(dtype), 0.1)
    sol = sd.decompose(kernel, CPALS(RANK, max_steps=300, rtol=1e-9), cov=cov, init=start)
    noise_level = float(sd.relative_error(kernel, clean, cov=cov))
    assert sol.final_error <= 1.05 * noise_level + 10 * np.finfo(dtype).eps


@pytest.mark.parametrize("cov_kind", [None, "relu"])
def test_recovers_planted_cp3(dtype, cov_kind):
    kernel, clean = planted(dtype, merged=True)
    cov = None if cov_kind is None else make_cov(cov_kind, dtype)
    solver = CPALS(RANK, merge_spatial=True, max_steps=300, rtol=1e-9)
    sol = sd.decompose(kernel, solver, cov=cov, key=jax.random.key(3))
    assert isinstance(sol.value, sd.CP3) and sol.value.spatial_factor.shape == (KH, KW, RANK)
    noise_level = float(sd.relative_error(kernel, clean, cov=cov))
    assert sol.final_error <= 1.05 * noise_level + 10 * np.finfo(dtype).eps


def test_scales_live_in_out_factor_and_error_history_matches():
    kernel, _ = planted(jnp.float64)
    cov = make_cov("relu", jnp.float64)
    sol = sd.decompose(kernel, CPALS(RANK, max_steps=SHORT, rtol=0.0), cov=cov, key=jax.random.key(0))
    for x in (sol.value.in_factor, sol.value.kh_factor, sol.value.kw_factor):
        np.testing.assert_allclose(np.linalg.norm(np.asarray(x), axis=0), 1.0, rtol=1e-12)
    problem = problem_of(kernel, cov)
    exact = objective64(problem, sol.value) / float(problem.energy)
    np.testing.assert_allclose(sol.final_error, exact, rtol=1e-8)


def test_rank_above_mode_sizes_is_padded(dtype):
    kernel, _ = planted(dtype)
    sol = sd.decompose(kernel, CPALS(12, max_steps=SHORT, rtol=0.0), cov=make_cov("relu", dtype), key=jax.random.key(0))
    errors = np.asarray(sol.errors)[: int(sol.num_steps) + 1]
    assert np.all(np.isfinite(errors)) and errors[-1] < 1e-2


# ------------------------------------------------------------------- exact, monotone updates


@pytest.mark.parametrize(
    "cov_kind, merged", [(None, False), ("illcond", False), ("singular", True)]
)
def test_every_block_update_decreases_objective(dtype, tol, cov_kind, merged):
    kernel, _ = planted(dtype, merged=merged, noise=0.3)
    cov = None if cov_kind is None else make_cov(cov_kind, dtype)
    problem = problem_of(kernel, cov)
    blocks = ("in", "kh", "out") if merged else ("in", "kh", "kw", "out")
    for tikhonov, threshold in ((0.0, 2048), (0.05, 1)):  # dense solves; penalised CG solves
        solver = CPALS(RANK, merge_spatial=merged, tikhonov=tikhonov, dense_threshold=threshold, cg_tol=1e-9)
        tau = tikhonov * float(problem.energy) / float(jnp.sum(problem.matrix**2)) ** (1 / len(blocks))
        cp = random_cp(dtype, merged=merged)
        values = [objective64(problem, cp, tau)]
        for _ in range(2):
            for block in blocks:
                cp, _ = block_update(solver, problem, cp, block)
                values.append(objective64(problem, cp, tau))
        steps = np.diff(values)
        assert np.all(steps <= tol * values[0]), (tikhonov, steps)
        assert values[-1] < 0.9 * values[0]


def test_driver_history_never_increases(dtype, tol):
    kernel, _ = planted(dtype, noise=0.3)
    sol = sd.decompose(kernel, CPALS(RANK, max_steps=SHORT, rtol=0.0), cov=make_cov("relu", dtype), key=jax.random.key(0))
    errors = np.asarray(sol.errors)[: int(sol.num_steps) + 1]
    assert np.all(np.diff(errors) <= tol * errors[0])


def test_block_update_rejects_unknown_block():
    kernel, _ = planted(jnp.float64)
    with pytest.raises(ValueError, match="block must be one of"):
        block_update(CPALS(RANK, merge_spatial=True), problem_of(kernel), random_cp(jnp.float64, merged=True), "kw")


# ----------------------------------------------------------------------------------- oracles


def test_identity_cov_equals_frobenius_twin(dtype, tol):
    kernel, _ = planted(dtype, noise=0.1)
    solver = CPALS(RANK, max_steps=SHORT, rtol=0.0)
    frob = sd.decompose(kernel, solver, key=jax.random.key(0))
    sigma = sd.decompose(kernel, solver, cov=jnp.eye(D, dtype=dtype), key=jax.random.key(0))
    # Same problem by two arithmetic paths: the gap is rounding, scaled to the kernel (float32 was
    # allowed 0.2 absolute before, ~100x the planted noise).
    rtol, scale = (1e-3, 1e-3) if dtype == "float32" else (50 * tol, 1e3 * tol)
    np.testing.assert_allclose(sigma.errors, frob.errors, rtol=rtol)
    dense = np.asarray(sd.to_dense(frob.value))
    np.testing.assert_allclose(sd.to_dense(sigma.value), dense, rtol=0, atol=scale * np.abs(dense).max())


def _dense_als(problem, cp, sweeps):
    """Independent CP-Σ ALS: for each block, the full normal equations ``Jᵀ (I ⊗ M) J x = Jᵀ vec(T)``
    with ``J`` the (linear) map from the block to ``vec(W̃)``, solved densely in float64."""
    m = np.asarray(problem.metric, np.float64)
    t = np.asarray(problem.target, np.float64).reshape(-1)
    big = np.kron(np.eye(COUT), m)
    f = [np.asarray(x, np.float64) for x in (cp.out_factor, cp.in_factor, cp.kh_factor, cp.kw_factor)]

    def approx(a, b, c, e):  # W̃ (cout × d), columns in (cin, kh, kw) order
        return np.einsum("or,ar,ir,jr->oaij", a, b, c, e).reshape(COUT, D)

    for _ in range(sweeps):
        for k in (1, 2, 3, 0):  # in, kh, kw, out: the library's sweep order
            cols = []
            for idx in np.ndindex(f[k].shape):
                unit = np.zeros_like(f[k])
                unit[idx] = 1.0
                cols.append(approx(*[unit if j == k else f[j] for j in range(4)]).reshape(-1))
            jac = np.stack(cols, axis=1)
            x = np.linalg.solve(jac.T @ big @ jac, jac.T @ t)
            f[k] = x.reshape(f[k].shape)
    delta = np.asarray(problem.matrix, np.float64) - approx(*f)
    return np.sum((delta @ m) * delta) / float(problem.energy)


@pytest.mark.parametrize("cov_kind", ["illcond", "relu"])
def test_sigma_matches_dense_normal_equation_oracle(cov_kind):
    kernel, _ = planted(jnp.float64, noise=0.3)
    cov = make_cov(cov_kind, jnp.float64)
    problem = problem_of(kernel, cov)
    start = random_cp(jnp.float64)
    sol = CPALS(RANK, max_steps=SHORT, rtol=0.0).solve(problem, key=jax.random.key(0), init=start)
    oracle = _dense_als(problem, start, sweeps=SHORT)
    assert sol.final_error <= oracle * (1 + 1e-7) + 1e-14


def test_frobenius_at_least_as_accurate_as_tensorly():
    tl = pytest.importorskip("tensorly")
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import parafac

    tl.set_backend("numpy")
    kernel, _ = planted(jnp.float64, noise=0.3)
    problem = problem_of(kernel)
    start, _ = block_update(CPALS(RANK), problem, random_cp(jnp.float64), "out")  # A exact for (B, C, E)
    n_iter = SHORT
    ours = CPALS(RANK, max_steps=n_iter, rtol=0.0).solve(problem, key=jax.random.key(0), init=start)
    w4 = np.asarray(problem.matrix).reshape(COUT, CIN, KH, KW)
    factors = [np.array(x) for x in (start.out_factor, start.in_factor, start.kh_factor, start.kw_factor)]
    theirs = parafac(w4, RANK, n_iter_max=n_iter, init=CPTensor((np.ones(RANK), factors)), tol=0)
    err = np.sum((w4 - tl.cp_to_tensor(theirs)) ** 2) / np.sum(w4**2)
    assert ours.final_error <= err * (1 + 1e-9) + 1e-15


def test_dense_and_cg_paths_agree():
    kernel, _ = planted(jnp.float64, noise=0.3)
    cov = make_cov("relu", jnp.float64)
    for merged in (False, True):
        dense = CPALS(RANK, merge_spatial=merged, max_steps=SHORT, rtol=0.0, dense_threshold=2048)
        cg = dataclasses.replace(dense, dense_threshold=1, cg_tol=1e-12, cg_forcing=0.0)  # exact CG
        a = sd.decompose(kernel, dense, cov=cov, key=jax.random.key(0))
        b = sd.decompose(kernel, cg, cov=cov, key=jax.random.key(0))
        assert int(b.status) == sd.Status.MAX_STEPS
        np.testing.assert_allclose(b.errors, a.errors, rtol=1e-7)
        np.testing.assert_allclose(sd.to_dense(b.value), sd.to_dense(a.value), atol=1e-6)


def test_cg_non_convergence_is_reported():
    kernel, _ = planted(jnp.float64, noise=0.3)
    solver = CPALS(RANK, max_steps=SHORT, dense_threshold=1, cg_max_steps=1)
    sol = sd.decompose(kernel, solver, cov=make_cov("illcond", jnp.float64), key=jax.random.key(0))
    assert int(sol.status) == sd.Status.INNER_NOT_CONVERGED
    assert "cg_max_steps" in sol.message


def test_cross_covariance_form_with_equal_moments_equals_plain(dtype, tol):
    kernel, _ = planted(dtype, noise=0.1)
    cov = make_cov("relu", dtype)
    solver = CPALS(RANK, max_steps=SHORT, rtol=0.0, ridge=0.0)  # so that T = W·cov in both forms
    plain = sd.decompose(kernel, solver, cov=cov, key=jax.random.key(0))
    cross = sd.decompose(kernel, solver, cov=cov, cross_cov=cov, target_cov=cov, key=jax.random.key(0))
    scale = 1e-3 if dtype == "float32" else 1e3 * tol
    dense = np.asarray(sd.to_dense(plain.value))
    np.testing.assert_allclose(sd.to_dense(cross.value), dense, rtol=0, atol=scale * np.abs(dense).max())
    # The cross form's error is the expanded (cancelling) formula: compare at its precision.
    np.testing.assert_allclose(cross.errors, plain.errors, rtol=0, atol=1e3 * np.finfo(dtype).eps)


# ------------------------------------------------------------------------ jit and the loop


def test_no_recompilation_for_new_data_or_tolerances():
    kernel, _ = planted(jnp.float32)
    cov = make_cov("relu", jnp.float32)
    sd.decompose(kernel, CPALS(RANK, max_steps=SHORT), cov=cov, key=jax.random.key(0))
    size = _solve._cache_size()
    kernel2, _ = planted(jnp.float32, seed=5)
    sd.decompose(kernel2, CPALS(RANK, max_steps=SHORT, rtol=1e-3, tikhonov=1e-3, cg_tol=1e-5), cov=2.0 * cov,
                 key=jax.random.key(1))
    assert _solve._cache_size() == size


def test_sweeps_run_in_a_while_loop():
    kernel, _ = planted(jnp.float32)
    problem = problem_of(kernel, make_cov("relu", jnp.float32))

    def jaxpr_lines(steps):
        fn = lambda p: CPALS(RANK, max_steps=steps).solve(p, key=jax.random.key(0)).errors  # noqa: E731
        return str(jax.make_jaxpr(fn)(problem)).splitlines()

    short, long = jaxpr_lines(2), jaxpr_lines(40)
    assert any("while" in line for line in short)
    # the sweep is traced once, not unrolled per step (38 more sweeps would add ~1000 lines; the
    # history length changes a shape, which may re-wrap a line or two)
    assert abs(len(short) - len(long)) <= 4


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"rank": 2.5}, "rank must be an integer >= 1"),
        ({"rank": 4, "init": "hosvd"}, "init must be one of"),
        ({"rank": 4, "tikhonov": -1.0}, "tikhonov must be a finite number >= 0"),
        ({"rank": 4, "cg_tol": 0.0}, "cg_tol must be a finite number > 0"),
        ({"rank": 4, "merge_spatial": 1}, "merge_spatial must be True or False"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, match):
    rank = kwargs.pop("rank")
    with pytest.raises(ValueError, match=match):
        CPALS(rank, **kwargs)


def test_rank_above_maximal_cp_rank_is_rejected():
    kernel, _ = planted(jnp.float64)
    with pytest.raises(ValueError, match=r"maximal CP rank 45"):
        sd.decompose(kernel, CPALS(46), key=jax.random.key(0))


def test_bad_warm_start_is_rejected():
    kernel, _ = planted(jnp.float64)
    with pytest.raises(ValueError, match="CP3"):
        sd.decompose(kernel, CPALS(RANK, merge_spatial=True), init=random_cp(jnp.float64))
    with pytest.raises(ValueError, match="in_factor"):
        bad = dataclasses.replace(random_cp(jnp.float64), in_factor=jnp.ones((CIN + 1, RANK)))
        sd.decompose(kernel, CPALS(RANK), init=bad)


def test_direct_solve_without_key_needing_randomness_is_rejected():
    kernel, _ = planted(jnp.float64)
    with pytest.raises(ValueError, match="pass key="):
        CPALS(RANK, init="random").solve(problem_of(kernel))
