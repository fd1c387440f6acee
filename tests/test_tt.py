"""TT-matrix format, TT-SVD, the Σ block-ALS solver, TT layers and TT surgery."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sigmadecomp as sd
from sigmadecomp.covariance import collect_token_counts
from sigmadecomp.layers._ttmatrix import _flops_one_way, _reverse_is_cheaper
from sigmadecomp.solvers._ttmatrix import _block_update, _right_canonical, _shift_right

IN_MODES, OUT_MODES = (3, 4, 2), (2, 3, 4)  # 24 × 24


def _random_tt(key, in_modes, out_modes, ranks, dtype="float64"):
    full = (1, *ranks, 1)
    keys = jax.random.split(key, len(in_modes))
    cores = tuple(
        jax.random.normal(k, (full[i], m, n, full[i + 1]), dtype)
        for i, (k, m, n) in enumerate(zip(keys, in_modes, out_modes))
    )
    return sd.TTMatrix(cores, tuple(in_modes), tuple(out_modes))


def _entry(tt, row, col):
    """Independent oracle: one entry as the product of the core slices (numpy, digit by digit)."""
    i_digits = np.unravel_index(row, tt.in_modes)
    j_digits = np.unravel_index(col, tt.out_modes)
    acc = np.eye(1)
    for core, i, j in zip(tt.cores, i_digits, j_digits):
        acc = acc @ np.asarray(core)[:, i, j, :]
    return acc[0, 0]


def _ill_cov(key, d, dtype, cond=1e4):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d, d), dtype))
    return (q * jnp.logspace(0, -math.log10(cond), d, dtype=dtype)[None, :]) @ q.T


def test_to_dense_matches_entrywise_product():
    tt = _random_tt(jax.random.key(0), IN_MODES, OUT_MODES, (3, 5))
    dense = np.asarray(sd.tt_to_dense(tt))
    assert dense.shape == (24, 24) == tt.kernel_shape
    for row, col in itertools.product(range(0, 24, 5), range(0, 24, 7)):
        np.testing.assert_allclose(dense[row, col], _entry(tt, row, col), rtol=1e-12)


def test_modes_ranks_and_counts():
    assert sd.balanced_modes(784, 4) == (4, 4, 7, 7) and math.prod(sd.balanced_modes(3072, 3)) == 3072
    with pytest.raises(ValueError, match="pad"):
        sd.balanced_modes(2 * 997, 2)
    assert math.prod(sd.padded_modes(5000, 3)) >= 5000
    assert sd.max_tt_ranks(IN_MODES, OUT_MODES) == (6, 8)
    ranks = sd.tt_rank_for_ratio((4, 4, 7, 7), (4, 4, 8, 8), 0.02)
    assert sd.tt_num_params((4, 4, 7, 7), (4, 4, 8, 8), ranks) <= 0.02 * 784 * 1024
    bigger = tuple(r + 1 for r in ranks)
    assert sd.tt_num_params((4, 4, 7, 7), (4, 4, 8, 8), bigger) > 0.02 * 784 * 1024


def test_tt_svd_exact_and_tolerance():
    w = jax.random.normal(jax.random.key(1), (24, 24), jnp.float64)
    full = sd.tt_svd(w, in_modes=IN_MODES, out_modes=OUT_MODES, ranks=sd.max_tt_ranks(IN_MODES, OUT_MODES))
    np.testing.assert_allclose(sd.tt_to_dense(full), w, atol=1e-10)
    for eps in (0.1, 0.4):
        ranks = sd.tt_ranks_for_tolerance(w, IN_MODES, OUT_MODES, eps)
        approx = sd.tt_svd(w, in_modes=IN_MODES, out_modes=OUT_MODES, ranks=ranks)
        assert float(jnp.linalg.norm(sd.tt_to_dense(approx) - w)) <= eps * float(jnp.linalg.norm(w)) * (1 + 1e-9)


def test_sigma_als_monotone_and_beats_frobenius(dtype, tol):
    key1, key2 = jax.random.split(jax.random.key(2))
    w = jax.random.normal(key1, (24, 24), dtype)
    cov = _ill_cov(key2, 24, dtype)
    solver = sd.TTMatrixALS(ranks=(3, 4), in_modes=IN_MODES, out_modes=OUT_MODES, max_steps=4)
    sol = sd.decompose(w, solver, cov=cov)
    errs = np.asarray(sol.errors)[: int(sol.num_steps) + 1]
    assert np.all(np.diff(errs) <= tol * errs[:-1] + 1e-7)
    assert sol.value.cores[0].dtype == jnp.dtype(dtype)
    frob = sd.decompose(w, sd.TTMatrixALS(ranks=(3, 4), in_modes=IN_MODES, out_modes=OUT_MODES, max_steps=0))
    assert float(sd.relative_error(w, sd.tt_to_dense(sol.value), cov)) < 0.9 * float(
        sd.relative_error(w, sd.tt_to_dense(frob.value), cov))


def test_identity_cov_is_the_frobenius_twin():
    w = jax.random.normal(jax.random.key(3), (24, 24), jnp.float64)
    solver = sd.TTMatrixALS(ranks=(3, 4), in_modes=IN_MODES, out_modes=OUT_MODES, max_steps=4, ridge=1e-12)
    a, b = sd.decompose(w, solver), sd.decompose(w, solver, cov=jnp.eye(24))
    np.testing.assert_allclose(a.errors, b.errors, rtol=1e-7)
    np.testing.assert_allclose(sd.tt_to_dense(a.value), sd.tt_to_dense(b.value), atol=1e-7)


def test_cross_covariance_form_with_unchanged_inputs_equals_plain_sigma():
    w = jax.random.normal(jax.random.key(30), (24, 24), jnp.float64)
    cov = _ill_cov(jax.random.key(31), 24, jnp.float64, cond=1e2)
    solver = sd.TTMatrixALS(ranks=(3, 4), in_modes=IN_MODES, out_modes=OUT_MODES, max_steps=4)
    plain = sd.decompose(w, solver, cov=cov)
    cross = sd.decompose(w, solver, cov=cov, cross_cov=cov, target_cov=cov)
    np.testing.assert_allclose(cross.errors, plain.errors, rtol=1e-5, atol=1e-9)


def test_planted_tt_recovered_under_ill_conditioned_cov():
    planted = sd.tt_to_dense(_random_tt(jax.random.key(4), IN_MODES, OUT_MODES, (2, 3)))
    cov = _ill_cov(jax.random.key(5), 24, jnp.float64, cond=1e6)
    sol = sd.decompose(planted, sd.TTMatrixALS(ranks=(2, 3), in_modes=IN_MODES, out_modes=OUT_MODES), cov=cov)
    assert sol.final_error < 1e-10


def test_block_update_equals_dense_normal_equations():
    """Oracle: the core-k least-squares problem built explicitly (Jacobian of W̃ in G_k)."""
    w = jax.random.normal(jax.random.key(6), (24, 24), jnp.float64)
    cov = _ill_cov(jax.random.key(7), 24, jnp.float64, cond=1e3)
    cores = _right_canonical(_random_tt(jax.random.key(8), IN_MODES, OUT_MODES, (3, 4)).cores)
    cores = list(cores)
    cores[0], cores[1] = _shift_right(cores[0], cores[1])
    k = 1

    def approx(core):
        c = list(cores)
        c[k] = core
        return sd.tt_to_dense(sd.TTMatrix(tuple(c), IN_MODES, OUT_MODES)).ravel()

    jac = np.asarray(jax.jacobian(approx)(cores[k])).reshape(24 * 24, -1)  # vec(W̃) = J g
    big_m = np.kron(np.asarray(cov), np.eye(24))  # vec(W̃) is row-major (in, out)
    g = np.linalg.solve(jac.T @ big_m @ jac, jac.T @ big_m @ np.asarray(w).ravel())
    got = _block_update(cores, k, (cov @ w), cov, None)
    np.testing.assert_allclose(np.asarray(got).ravel(), g, rtol=1e-6, atol=1e-8)


def test_diagonal_metric_path_equals_dense_diagonal_cov():
    w = jax.random.normal(jax.random.key(9), (24, 24), jnp.float64)
    weights = jnp.linspace(0.0, 2.0, 24, dtype=jnp.float64)
    solver = sd.TTMatrixALS(ranks=(3, 4), in_modes=IN_MODES, out_modes=OUT_MODES, max_steps=4)
    dense = sd.decompose(w, solver, cov=jnp.diag(weights))
    diag = sd.solve_tt_diagonal(w, weights, solver)
    np.testing.assert_allclose(diag.errors, dense.errors, rtol=1e-6)


def test_eps_ranks_use_whitened_basis_and_no_recompile():
    w = jax.random.normal(jax.random.key(10), (24, 24), jnp.float64)
    cov = _ill_cov(jax.random.key(11), 24, jnp.float64, cond=1e8)
    solver = sd.TTMatrixALS(eps=0.05, in_modes=IN_MODES, out_modes=OUT_MODES)
    sol = sd.decompose(w, solver, cov=cov)
    assert sol.final_error <= 0.05**2 * 1.01  # TT-SVD of W L meets eps; ALS only lowers the error
    fixed = sd.TTMatrixALS(ranks=(3, 4), in_modes=IN_MODES, out_modes=OUT_MODES, max_steps=4)
    from sigmadecomp.solvers._ttmatrix import _solve
    sd.decompose(w, fixed, cov=cov)
    before = _solve._cache_size()
    sd.decompose(w * 2.0, fixed, cov=cov * 3.0)
    assert _solve._cache_size() == before


def test_bad_input_errors():
    w = jnp.ones((24, 24))
    with pytest.raises(ValueError, match="exactly one"):
        sd.TTMatrixALS()
    with pytest.raises(ValueError, match="must equal"):
        sd.decompose(w, sd.TTMatrixALS(ranks=(2,), in_modes=(4, 5), out_modes=(4, 6)))
    with pytest.raises(ValueError, match="exceed"):
        sd.decompose(w, sd.TTMatrixALS(ranks=(7, 2), in_modes=IN_MODES, out_modes=OUT_MODES))
    with pytest.raises(ValueError, match="dense"):
        sd.decompose(jnp.ones((3, 3, 4, 4)), sd.TTMatrixALS(ranks=(2,)))


@pytest.mark.parametrize("shape", [((4, 4, 4), (2, 4, 3), (5, 6)), ((8, 4, 2), (2, 2, 4), (3, 4))])
def test_tt_linear_equals_dense_linear(shape, dtype, tol):
    in_modes, out_modes, ranks = shape
    tt = _random_tt(jax.random.key(12), in_modes, out_modes, ranks, dtype)
    bias = jax.random.normal(jax.random.key(13), (math.prod(out_modes),), dtype)
    layer = sd.TTLinear.from_tt(tt, bias=bias)
    dense = nnx.Linear(*tt.kernel_shape, param_dtype=dtype, rngs=nnx.Rngs(0))
    dense.kernel[...] = sd.tt_to_dense(tt)
    dense.bias[...] = bias
    x = jax.random.normal(jax.random.key(14), (3, 2, tt.kernel_shape[0]), dtype)
    y, ref = layer(x), dense(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    np.testing.assert_allclose(y, ref, rtol=50 * tol, atol=50 * tol * float(jnp.max(jnp.abs(ref))))
    flops = min(_flops_one_way(in_modes, out_modes, ranks), _flops_one_way(in_modes[::-1], out_modes[::-1], ranks[::-1]))
    assert layer.counts(tokens=6).flops == 6 * flops
    assert layer.counts().params == sd.tt_num_params(in_modes, out_modes, ranks) + math.prod(out_modes)


def test_contraction_order_is_chosen_by_flops():
    assert _reverse_is_cheaper((8, 8, 16), (2, 2, 4), (3, 4)) != _reverse_is_cheaper((16, 8, 8), (4, 2, 2), (4, 3))


def test_orthogonal_parametrisation_and_init_rules():
    layer = sd.TTLinear(64, 96, ranks=(4, 4), orthogonal=True, rngs=nnx.Rngs(0))
    for core in layer.cores[:-1]:
        mat = core.reshape(-1, core.shape[-1])
        np.testing.assert_allclose(mat.T @ mat, jnp.eye(mat.shape[1]), atol=1e-5)
    tt = _random_tt(jax.random.key(15), (4, 4, 4), (4, 4, 6), (3, 3), "float32")
    same = sd.TTLinear.from_tt(tt, orthogonal=True)
    np.testing.assert_allclose(sd.tt_to_dense(same.tt), sd.tt_to_dense(tt), rtol=1e-4, atol=1e-4)
    var = {}
    for init in ("tt", "naive"):
        ws = [sd.tt_to_dense(sd.TTLinear(64, 96, ranks=(4, 4), init=init, rngs=nnx.Rngs(s)).tt)
              for s in range(4)]
        var[init] = float(jnp.mean(jnp.stack([jnp.mean(w**2) for w in ws])))
    assert 0.5 / 64 < var["tt"] < 1.5 / 64
    assert var["naive"] < 0.05 * var["tt"]  # 1/(in·out) against 1/in


def test_tt_embed_equals_table_lookup(dtype, tol):
    tt = _random_tt(jax.random.key(16), (5, 5, 4), (2, 4, 2), (3, 3), dtype)
    emb = sd.TTEmbed.from_tt(tt, num_embeddings=97)  # padded vocabulary: 100 rows
    ids = jax.random.randint(jax.random.key(17), (4, 6), 0, 97)
    np.testing.assert_allclose(emb(ids), sd.tt_to_dense(tt)[ids], rtol=20 * tol, atol=20 * tol)
    assert emb.counts().params == sd.tt_num_params((5, 5, 4), (2, 4, 2), (3, 3))


def test_gru_equals_nnx_gru_cell():
    gru = sd.TTGRU(24, 8, ranks=(3, 4), in_modes=IN_MODES, out_modes=(2, 3, 4), rngs=nnx.Rngs(0))
    gru.input_map.bias[...] = jax.random.normal(jax.random.key(18), (24,), jnp.float32)
    x = jax.random.normal(jax.random.key(19), (2, 5, 24), jnp.float32)
    mask = jnp.array([[True] * 5, [True] * 3 + [False] * 2])
    h, hs = gru(x, mask)
    cell = nnx.GRUCell(24, 8, rngs=nnx.Rngs(1))
    cell.dense_i.kernel[...] = sd.tt_to_dense(gru.input_map.tt)
    cell.dense_i.bias[...] = gru.input_map.bias[...]
    cell.dense_h.kernel[...] = gru.hidden_kernel[...]
    ref = jnp.zeros((2, 8), jnp.float32)
    for t in range(5):
        new, _ = cell(ref, x[:, t])
        ref = jnp.where(mask[:, t : t + 1], new, ref)
        np.testing.assert_allclose(hs[:, t], ref, atol=1e-5)
    np.testing.assert_allclose(h, ref, atol=1e-5)


def test_rank_penalty_prunes_zero_slices():
    tt = _random_tt(jax.random.key(20), IN_MODES, OUT_MODES, (4, 5), "float32")
    cores = list(tt.cores)
    cores[0] = cores[0].at[..., 1].set(0.0)
    cores[1] = cores[1].at[1].set(0.0).at[..., 3:].set(0.0)
    cores[2] = cores[2].at[3:].set(0.0)
    layer = sd.TTLinear.from_tt(sd.TTMatrix(tuple(cores), IN_MODES, OUT_MODES), bias=jnp.ones(24, jnp.float32))
    assert sd.kept_ranks(layer) == (3, 3)
    pruned = sd.prune_ranks(layer)
    assert pruned.ranks == (3, 3)
    x = jax.random.normal(jax.random.key(21), (2, 24), jnp.float32)
    np.testing.assert_allclose(pruned(x), layer(x), atol=1e-5)


def test_group_lasso_training_drops_ranks():
    """A planted rank-(2, 2) target learned at ranks (6, 6) with the group lasso keeps ≤ 3 per bond.
    (Weight 3e-2: every one of six initial keys tried keeps ≤ 3 with error ≤ 0.0023; at 1e-2 half of
    them kept 4.)"""
    import optax

    target = sd.TTLinear.from_tt(_random_tt(jax.random.key(22), IN_MODES, OUT_MODES, (2, 2), "float32"))
    layer = sd.TTLinear(24, 24, ranks=(6, 6), in_modes=IN_MODES, out_modes=OUT_MODES, use_bias=False,
                        rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(23), (256, 24), jnp.float32)
    y = target(x)
    y = y / jnp.sqrt(jnp.mean(y**2))
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int and float
        opt = nnx.Optimizer(layer, optax.adam(optax.cosine_decay_schedule(3e-2, 400)), wrt=nnx.Param)

        @nnx.jit
        def step(layer, opt):
            def loss(m):
                return jnp.mean((m(x) - y) ** 2) + 3e-2 * sd.rank_penalty(m)
            opt.update(layer, nnx.grad(loss)(layer))

        for _ in range(400):
            step(layer, opt)
    kept = sd.kept_ranks(layer, rtol=0.05)
    assert all(k <= 3 for k in kept), kept
    assert float(jnp.mean((sd.prune_ranks(layer, rtol=0.05)(x) - y) ** 2)) < 0.01


def test_to_tt_surgery_with_covariances_and_token_counts():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(50, 24, rngs=rngs)
            self.hidden = nnx.Linear(24, 24, rngs=rngs)

        def __call__(self, ids):
            return self.hidden(jax.nn.relu(jnp.mean(self.embed(ids), axis=1)))

    net = Net(nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(24), (64, 7), 0, 20)  # ids 20..49 never seen
    covs = sd.collect_covariances(net, [ids], progress=False)
    counts = collect_token_counts(net, [ids])["embed"]
    assert counts.sum() == ids.size and counts[20:].sum() == 0
    solver = sd.TTMatrixALS(ranks=(3, 4), in_modes=IN_MODES, out_modes=OUT_MODES, max_steps=4)
    emb_solver = sd.TTMatrixALS(ranks=(3, 3), in_modes=(2, 5, 5), out_modes=(2, 3, 4), max_steps=4)
    tt_net, sols = sd.to_tt(net, {"hidden": solver, "embed": emb_solver}, covs=covs,
                            token_counts={"embed": counts})
    assert isinstance(tt_net.hidden, sd.TTLinear) and isinstance(tt_net.embed, sd.TTEmbed)
    assert isinstance(net.hidden, nnx.Linear)  # the original is untouched
    # The Σ fit scores its own relative error on the tapped inputs.
    k = net.hidden.kernel[...]
    np.testing.assert_allclose(
        sd.relative_error(k, sd.tt_to_dense(sols["hidden"].value), covs["hidden"].cov),
        sols["hidden"].final_error, rtol=1e-3)
    # Frequency weighting: the seen rows are fitted better than by the unweighted fit.
    frob = sd.fit_tt_embedding(net.embed.embedding[...], emb_solver)
    table = net.embed.embedding[...]
    seen = lambda sol: float(jnp.sum((sd.tt_to_dense(sol.value)[:20] - table[:20]) ** 2))
    assert seen(sols["embed"]) < seen(frob)
    assert tt_net(ids).shape == (64, 24)


def test_tt_matrix_format_registered_plan_apply_save_load(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.fc = nnx.Linear(64, 48, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.conv(x).reshape(x.shape[0], -1))

    net = Net(nnx.Rngs(0))
    assert "tt-matrix" in sd.formats.format_names()
    p = sd.plan(net, format="tt-matrix", ratio=0.2, skip=["conv"])
    (entry,) = p.entries
    assert entry.format == "tt-matrix" and entry.params_after <= 0.2 * entry.params_before + 48
    sol = sd.decompose(net.fc.kernel[...], sd.formats.get("tt-matrix").solver(entry.ranks, max_steps=4))
    comp = sd.apply(net, p, {"fc": sol.value})
    assert isinstance(comp.fc, sd.TTLinear)
    sd.save(tmp_path / "m", comp, p)
    back = sd.load(tmp_path / "m", Net(nnx.Rngs(1)))
    x = jnp.ones((2, 4, 4, 1), jnp.float32)
    np.testing.assert_array_equal(back(x), comp(x))
    with pytest.raises(ValueError, match="dense layers"):
        sd.plan(net, format="tt-matrix", ratio=0.5, skip=["fc"])
