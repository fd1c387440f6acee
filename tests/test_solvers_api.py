"""decompose / relative_error: validation messages, dtypes, ridge, driver statuses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
import sigmadecomp as sd
from sigmadecomp.solvers._driver import iterate

KERNEL_SHAPE = (3, 3, 4, 6)
D = 36


@pytest.fixture
def kernel():
    return jax.random.normal(jax.random.key(0), KERNEL_SHAPE, jnp.float64)


@pytest.fixture
def cov():
    return jnp.asarray(oracles.random_cov("diagonal", D, seed=1))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda k, c: dict(kernel=jnp.ones((3, 4, 5))), r"got shape \(3, 4, 5\)"),
        (lambda k, c: dict(kernel=k.at[0, 0, 0, 0].set(jnp.nan)), "non-finite"),
        (lambda k, c: dict(kernel=jnp.zeros(KERNEL_SHAPE)), "all zeros"),
        (lambda k, c: dict(kernel=k.astype(jnp.int32)), "float32 or float64"),
        (lambda k, c: dict(cov=jnp.eye(35)), r"\(36, 36\).*channel-major"),
        (lambda k, c: dict(cov=c.at[0, 1].add(1.0)), "symmetric"),
        (lambda k, c: dict(cov=c.at[2, 2].set(jnp.inf)), "non-finite"),
        (lambda k, c: dict(cov=c, cross_cov=c), "without target_cov"),
        (lambda k, c: dict(cov=c, target_cov=c), "without cross_cov"),
        (lambda k, c: dict(cross_cov=c, target_cov=c), "need cov"),
        (lambda k, c: dict(cov=-c), "negative diagonal"),
        (lambda k, c: dict(solver="svd"), "solver must be"),
    ],
)
def test_bad_input_raises_useful_value_error(kernel, cov, make, match):
    args = {"kernel": kernel, "solver": sd.SVD(2), **make(kernel, cov)}
    with pytest.raises(ValueError, match=match):
        sd.decompose(args.pop("kernel"), args.pop("solver"), **args)


def test_init_shape_is_checked(kernel):
    bad = sd.Tucker2(jnp.ones((3, 3, 2, 2)), jnp.ones((4, 3)), jnp.ones((6, 2)), KERNEL_SHAPE)
    with pytest.raises(ValueError, match=r"init.in_factor must have shape \(4, 2\).*got \(4, 3\)"):
        sd.decompose(kernel, sd.Tucker2ALS((2, 2)), init=bad)
    lowrank = sd.LowRank(jnp.ones((3, 3, 4, 2)), jnp.ones((2, 6)), KERNEL_SHAPE)
    with pytest.raises(ValueError, match="init must be a Tucker2.*got LowRank"):
        sd.decompose(kernel, sd.Tucker2ALS((2, 2)), init=lowrank)
    with pytest.raises(ValueError, match="does not take a warm start"):
        sd.decompose(kernel, sd.SVD(2), init=bad)


def test_cov_is_cast_to_kernel_dtype(kernel, cov):
    sol = sd.decompose(kernel.astype(jnp.float32), sd.SVD(2), cov=cov)  # float64 cov
    ref = sd.decompose(kernel.astype(jnp.float32), sd.SVD(2), cov=cov.astype(jnp.float32))
    assert sol.value.in_kernel.dtype == jnp.float32
    assert sol.final_error == pytest.approx(ref.final_error, rel=1e-6)


def test_singular_cov_works_through_ridge(kernel):
    x = jax.random.normal(jax.random.key(2), (10, D), jnp.float64).at[:, :9].set(0.0)
    cov = x.T @ x / 10  # rank <= 10, nine dead inputs
    for solver in (sd.SVD(3), sd.Tucker2ALS((3, 2), max_steps=10)):
        sol = sd.decompose(kernel, solver, cov=cov)
        assert np.all(np.isfinite(np.asarray(sd.to_dense(sol.value))))
        assert 0 <= sol.final_error < 1
        assert float(sd.relative_error(kernel, sol.value, cov)) == pytest.approx(
            sol.final_error, rel=1e-3, abs=1e-5)


def test_random_start_needs_an_explicit_key(kernel, cov):
    solver = sd.Tucker2ALS((3, 2), init="random", max_steps=3)
    with pytest.raises(ValueError, match="pass key="):
        sd.decompose(kernel, solver, cov=cov)
    b = sd.decompose(kernel, solver, cov=cov, key=jax.random.key(0))
    c = sd.decompose(kernel, solver, cov=cov, key=jax.random.key(1))
    assert not np.array_equal(np.asarray(b.errors), np.asarray(c.errors))


def test_cross_form_with_identical_inputs_is_plain_sigma(kernel, cov):
    plain = sd.decompose(kernel, sd.Tucker2ALS((3, 2), max_steps=10), cov=cov)
    cross = sd.decompose(kernel, sd.Tucker2ALS((3, 2), max_steps=10), cov=cov, cross_cov=cov,
                         target_cov=cov)
    # the only difference: the cross form's T uses the unridged cov (a 1e-6 relative change)
    assert cross.final_error == pytest.approx(plain.final_error, rel=1e-4)


def test_relative_error_dense_and_factorized(kernel, cov):
    sol = sd.decompose(kernel, sd.SVD(2), cov=cov)
    dense = sd.to_dense(sol.value)
    assert float(sd.relative_error(kernel, sol.value, cov)) == pytest.approx(
        float(sd.relative_error(kernel, dense, cov)))
    assert float(sd.relative_error(kernel, kernel)) == 0.0
    with pytest.raises(ValueError, match="must match"):
        sd.relative_error(kernel, dense[..., :3])


def test_public_names():
    for name in ("decompose", "relative_error", "SVD", "Tucker2ALS", "Solution", "Status",
                 "AbstractSolver", "Problem"):
        assert name in sd.solvers.__all__ and hasattr(sd, name)


def _counting_sweep(nan_at):
    def sweep(state):
        x, k = state
        x = jnp.where(k + 1 == nan_at, jnp.nan, x * 0.5)
        return (x, k + 1), jnp.bool_(True)

    return sweep


def test_driver_statuses():
    error = lambda s: s[0] ** 2  # noqa: E731
    state0 = (jnp.float64(1.0), jnp.int32(0))
    state, status, errors, k, _ = iterate(_counting_sweep(3), error, state0, max_steps=10, rtol=1e-3)
    assert int(status) == sd.Status.NONFINITE and int(k) == 2
    assert float(state[0]) == 0.25  # the last finite iterate
    assert np.isnan(np.asarray(errors)[3])
    _, status, errors, k, _ = iterate(_counting_sweep(-1), error, state0, max_steps=4, rtol=1e-3)
    assert int(status) == sd.Status.MAX_STEPS and int(k) == 4
    np.testing.assert_allclose(np.asarray(errors), 0.25 ** np.arange(5))
    _, status, _, k, _ = iterate(_counting_sweep(-1), error, state0, max_steps=50, rtol=0.8)
    assert int(status) == sd.Status.CONVERGED and int(k) < 50
