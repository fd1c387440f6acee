"""Cold-process cost of sequential compression (issue 10): statistics without the ``x xᵀ`` gram,
the cross form normalised by ``target_energy``, CPU compile options, and no eager compiles for the
finiteness check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sigmadecomp as sd
from sigmadecomp import covariance
from sigmadecomp._compile import fast_compile_jit
from sigmadecomp._patches import kernel_to_matrix
from sigmadecomp.compress import rejection
from sigmadecomp.covariance._stats import accumulate_chunks
from _compiles import count_compiles


def _streams(dtype, n=300, d=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    return jnp.asarray(x, dtype), jnp.asarray(x + 0.1 * rng.standard_normal((n, d)), dtype)


def _accumulate(state, x, y, weight=None):
    chunk = lambda k: (x.T[None], y.T[None])  # noqa: E731 - one row-last chunk (g, d, m)
    return accumulate_chunks(state, chunk, 1, x.shape[0], weight=weight)


def test_gram_free_cross_statistics_give_the_same_moments_and_the_output_energy(dtype, tol):
    x, y = _streams(dtype)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((5, 12)), dtype)
    full = covariance.finalize(_accumulate(covariance.init(12, cross=True, dtype=dtype), x, y))
    lean_state = covariance.init(12, cross=True, dtype=dtype, gram=False, energy=True)
    assert "xx" not in lean_state.sums and lean_state.dim == 12 and lean_state.groups == 1
    lean = covariance.finalize(_accumulate(lean_state, x, y, weight=w[None]))
    assert lean.cov is None
    for name in ("cross_cov", "cov_hat", "mean", "mean_hat"):
        np.testing.assert_array_equal(getattr(lean, name), getattr(full, name))
    want = jnp.sum((w @ full.cov) * w)  # tr(W E[x xᵀ] Wᵀ)
    np.testing.assert_allclose(lean.energy, want, rtol=50 * tol)
    with pytest.raises(ValueError, match="weight"):
        _accumulate(lean_state, x, y)


def test_target_energy_replaces_target_cov(dtype, tol):
    x, y = _streams(dtype, d=36)
    kernel = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3, 4, 6)), dtype)
    stats = covariance.finalize(_accumulate(covariance.init(36, cross=True, dtype=dtype), x, y))
    energy = jnp.sum((kernel_to_matrix(kernel) @ stats.cov) * kernel_to_matrix(kernel))
    solver = sd.Tucker2ALS((3, 2), max_steps=5)
    a = sd.decompose(kernel, solver, cov=stats.cov_hat, cross_cov=stats.cross_cov, target_cov=stats.cov)
    b = sd.decompose(kernel, solver, cov=stats.cov_hat, cross_cov=stats.cross_cov, target_energy=energy)
    np.testing.assert_allclose(np.asarray(b.errors), np.asarray(a.errors), rtol=100 * tol, atol=100 * tol)
    with pytest.raises(ValueError, match="target_energy"):
        sd.decompose(kernel, solver, cov=stats.cov_hat, target_energy=energy)
    with pytest.raises(ValueError, match="scalar"):
        sd.decompose(kernel, solver, cov=stats.cov_hat, cross_cov=stats.cross_cov, target_energy=jnp.ones(2))


def test_rejection_check_compiles_nothing():
    """The finiteness check of every solution runs on the host: no eager XLA programs per shape."""
    sol = sd.decompose(jax.random.normal(jax.random.key(0), (3, 3, 5, 7)), sd.SVD(2))
    reason, compiles = count_compiles(lambda: rejection(sol))
    assert reason is None and compiles == 0


def test_fast_compile_jit_matches_jit_and_caches():
    f = fast_compile_jit(lambda x, n: x * n, static_argnames="n")
    x, y = jnp.arange(4.0), jnp.ones(4)
    np.testing.assert_array_equal(f(x, n=3), x * 3)
    _, again = count_compiles(lambda: f(y, n=3))
    assert again == 0 and f._cache_size() == 1
    # inside another trace the plain jit is used (compiler options are top-level only)
    np.testing.assert_array_equal(jax.jit(lambda v: f(v, n=2))(x), 2 * x)
    np.testing.assert_array_equal(jax.vmap(lambda v: f(v, n=2))(x), 2 * x)
