"""SVD / SVD-Σ: the closed form equals independent float64 optima."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import oracles
import sigmadecomp as sd

KH = KW = 2
CIN, COUT, RANK = 3, 5, 2
D = CIN * KH * KW


def _approx(value):
    return np.asarray(sd.kernel_to_matrix(sd.to_dense(value)), np.float64)


@pytest.mark.parametrize("kind", oracles.COV_KINDS)
def test_sigma_svd_equals_whitened_optimum(kind, dtype, tol):
    w = oracles.planted_lowrank(COUT, D, RANK + 1, seed=1)
    cov = oracles.random_cov(kind, D, seed=2)
    kernel = jnp.asarray(oracles.matrix_to_conv(w, KH, KW), dtype)
    sol = sd.decompose(kernel, sd.SVD(RANK), cov=jnp.asarray(cov, dtype))
    metric = oracles.ridged(cov)
    best, _ = oracles.best_rank_sigma(w @ metric, metric, RANK)
    want = oracles.sigma_error(w, best, metric)
    assert sol.value.out_factor.dtype == jnp.dtype(dtype) and int(sol.num_steps) == 0
    # The optimum's error `want` is the problem's floor: both checks are relative to it, with a
    # dtype-scaled slack (float32 whitening by a Cholesky factor loses ~cond·eps).
    rel = 1e-3 if dtype == "float32" else 1e-8
    assert sol.final_error == pytest.approx(want, rel=rel)
    assert oracles.sigma_error(w, _approx(sol.value), metric) == pytest.approx(want, rel=10 * rel)


def test_no_local_search_beats_it():
    w = oracles.planted_lowrank(COUT, D, 4, seed=3)
    cov = oracles.random_cov("ill", D, seed=4)
    kernel = jnp.asarray(oracles.matrix_to_conv(w, KH, KW))
    ours = sd.decompose(kernel, sd.SVD(RANK), cov=jnp.asarray(cov)).final_error
    metric = oracles.ridged(cov)
    rng = np.random.default_rng(5)

    def f(theta):
        a, b = theta[: COUT * RANK].reshape(COUT, RANK), theta[COUT * RANK:].reshape(RANK, D)
        return oracles.sigma_error(w, a @ b, metric)

    for _ in range(3):
        res = scipy.optimize.minimize(f, rng.standard_normal(RANK * (COUT + D)), method="BFGS",
                                      options={"gtol": 1e-12, "maxiter": 5000})
        assert ours <= res.fun + 1e-9


def test_frobenius_is_truncated_svd_and_planted_recovery(dtype, tol):
    w = oracles.planted_lowrank(COUT, D, RANK, seed=6)
    kernel = jnp.asarray(oracles.matrix_to_conv(w, KH, KW), dtype)
    sol = sd.decompose(kernel, sd.SVD(RANK))
    eps = float(np.finfo(dtype).eps)  # w has exactly rank RANK: the floor is rounding
    np.testing.assert_allclose(_approx(sol.value), w, atol=1e3 * eps * np.abs(w).max())
    s = np.linalg.svd(w, compute_uv=False)
    sol = sd.decompose(kernel, sd.SVD(1))
    assert sol.final_error == pytest.approx(np.sum(s[1:] ** 2) / np.sum(s**2), rel=1e3 * eps)


def test_cross_covariance_form():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((400, D))
    x_hat = x + 0.3 * rng.standard_normal((400, D))  # input after upstream compression
    cov, cross, target = (x_hat.T @ x_hat, x.T @ x_hat, x.T @ x)
    w = rng.standard_normal((COUT, D))
    kernel = jnp.asarray(oracles.matrix_to_conv(w, KH, KW))
    sol = sd.decompose(kernel, sd.SVD(RANK), cov=jnp.asarray(cov), cross_cov=jnp.asarray(cross),
                       target_cov=jnp.asarray(target))
    metric = oracles.ridged(cov)
    best, _ = oracles.best_rank_sigma(w @ cross, metric, RANK)
    # E‖W x − W̃ x̂‖² / E‖W x‖², directly from the samples (no ridge in the data term).
    want = np.sum((x @ w.T - x_hat @ best.T) ** 2) / np.sum((x @ w.T) ** 2)
    assert sol.final_error == pytest.approx(want, rel=1e-5)
    got = np.sum((x @ w.T - x_hat @ _approx(sol.value).T) ** 2) / np.sum((x @ w.T) ** 2)
    assert got == pytest.approx(want, rel=1e-5)


def test_dense_kernel_layout():
    w = oracles.planted_lowrank(7, 9, 3, seed=8)
    sol = sd.decompose(jnp.asarray(w.T), sd.SVD(3))
    assert sol.value.in_kernel.shape == (1, 1, 9, 3) and sol.value.out_factor.shape == (3, 7)
    np.testing.assert_allclose(np.asarray(sd.to_dense(sol.value)), w.T, atol=1e-10)


def test_bad_config_and_rank():
    with pytest.raises(ValueError, match="rank"):
        sd.SVD(0)
    with pytest.raises(ValueError, match="ridge"):
        sd.SVD(2, ridge=-1.0)
    with pytest.raises(ValueError, match="use a rank <= 5"):
        sd.decompose(jnp.ones((2, 2, 3, 5)), sd.SVD(6))
