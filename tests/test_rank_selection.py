"""Rank rules: EVBMF on planted problems, closed-form spectra against the solvers, the knapsack
against brute force, sensitivities, and select_ranks end to end on small networks."""

from __future__ import annotations

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sigmadecomp as sd
from sigmadecomp.compress import calibrate
from sigmadecomp.surgery import (
    Budget, allocate, damage_curves, energy_rank, evbmf, layer_sensitivities, select_ranks,
)
from sigmadecomp.surgery import _rank_rules as rr
from sigmadecomp.surgery._allocate import _error_cap

# ----------------------------------------------------------------------------- EVBMF


@pytest.mark.parametrize("shape, rank, scale", [((40, 100), 3, 3.0), ((64, 576), 8, 1.0),
                                                ((100, 100), 5, 2.0), ((576, 64), 6, 1.0)])
def test_evbmf_recovers_planted_rank_and_noise(shape, rank, scale):
    rng = np.random.default_rng(rank)
    noise = 0.5
    signal = rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1])) * scale
    s = np.linalg.svd(signal + noise * rng.normal(size=shape), compute_uv=False)
    result = evbmf(s, shape)
    assert result.rank == rank
    assert abs(result.noise_variance - noise**2) < 0.1 * noise**2
    assert len(result.estimates) == rank and all(0 < e < g for e, g in zip(result.estimates, s))  # shrinkage


def test_evbmf_keeps_nothing_of_pure_noise_and_is_symmetric():
    rng = np.random.default_rng(0)
    s = np.linalg.svd(rng.normal(size=(30, 300)), compute_uv=False)
    assert evbmf(s, (30, 300)).rank == 0
    assert evbmf(s, (300, 30)) == evbmf(s, (30, 300))
    assert evbmf(np.zeros(4), (4, 9)).rank == 0


def test_evbmf_tau_bar_matches_the_paper_constant():
    assert rr._tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)  # τ̲ ≈ 2.5129 √α, exact at α = 1


def test_evbmf_rejects_wrong_length():
    with pytest.raises(ValueError, match="min\\(shape\\) = 4"):
        evbmf(np.ones(3), (4, 9))


# ----------------------------------------------------------------------------- spectra


def _problem(key=0, shape=(3, 3, 4, 6)):
    rng = np.random.default_rng(key)
    kernel = rng.normal(size=shape)
    x = rng.normal(size=(200, int(np.prod(shape[:-1])))) * np.geomspace(1, 0.05, int(np.prod(shape[:-1])))
    return kernel, x.T @ x / 200


def test_svd_errors_are_the_sigma_svd_optimum():
    kernel, cov = _problem()
    errors = rr.svd_errors(rr.whitened_spectrum(kernel, cov))
    for r in (1, 3, 5):
        sol = sd.decompose(jnp.asarray(kernel), sd.SVD(r), cov=jnp.asarray(cov))
        assert errors[r] == pytest.approx(float(sd.relative_error(kernel, sol.value, cov)), rel=1e-5)
    assert errors[0] == 1.0 and errors[-1] == 0.0


def test_frobenius_fit_errors_are_sigma_errors_of_the_plain_svd():
    kernel, cov = _problem(1)
    errors = rr.frobenius_fit_errors(kernel, cov)
    for r in (1, 4):
        sol = sd.decompose(jnp.asarray(kernel), sd.SVD(r))
        assert errors[r] == pytest.approx(float(sd.relative_error(kernel, sol.value, cov)), rel=1e-6)


def test_tucker2_proxy_bounds_the_frobenius_tucker2_error():
    kernel, _ = _problem(2, (3, 3, 8, 10))
    s_out, s_in = rr.tucker2_mode_spectra(kernel)
    for ranks in ((3, 2), (6, 5)):
        proxy = rr.svd_errors(s_out)[ranks[0]] + rr.svd_errors(s_in)[ranks[1]]
        sol = sd.decompose(jnp.asarray(kernel), sd.Tucker2ALS(ranks, max_steps=20))
        assert float(sd.relative_error(kernel, sol.value)) <= proxy + 1e-9  # HOSVD bound ≥ optimum


def test_energy_rank():
    assert energy_rank([3.0, 2.0, 1.0], 1.0) == 3
    assert energy_rank([3.0, 2.0, 1.0], 9 / 14) == 1
    with pytest.raises(ValueError, match="tau"):
        energy_rank([1.0], 0.0)


# ----------------------------------------------------------------------------- knapsack


def _brute(costs, damages, budget):
    best = np.inf
    for picks in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[j] for c, j in zip(costs, picks)) <= budget:
            best = min(best, sum(e[j] for e, j in zip(damages, picks)))
    return best


def test_allocate_is_optimal_on_convex_problems_and_feasible_on_others():
    rng = np.random.default_rng(0)
    for trial in range(20):
        costs, damages = [], []
        for _ in range(4):
            n = 5
            c = np.arange(n, dtype=float) + rng.integers(1, 3)
            gaps = np.sort(rng.random(n - 1))[::-1] if trial < 10 else rng.random(n - 1)  # convex, then not
            damages.append(gaps.sum() - np.concatenate([[0], np.cumsum(gaps)]))  # largest gain first
            costs.append(c)
        budget = float(sum(c.min() for c in costs) + rng.integers(0, 12))
        picks = allocate(costs, damages, budget)
        assert sum(c[j] for c, j in zip(costs, picks)) <= budget + 1e-9
        got, opt = sum(e[j] for e, j in zip(damages, picks)), _brute(costs, damages, budget)
        if trial < 10:
            assert got == pytest.approx(opt, abs=1e-12)
        else:
            assert got <= opt + max(max(e) for e in damages)  # within one option of the optimum


def test_allocate_rejects_an_impossible_budget():
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate([np.array([2.0, 3.0])], [np.array([1.0, 0.0])], 1.0)


def test_budget_parse():
    assert Budget.parse("params=0.33") == Budget("params", 0.33)
    assert Budget.parse("latency=0.5") == Budget("latency", 0.5)
    for bad in ("params", "time=0.5", "latency=0", "flops=2", "flops=x"):
        with pytest.raises(ValueError, match="budget"):
            Budget.parse(bad)


# ----------------------------------------------------------------------------- sensitivity


def test_sensitivity_of_the_last_layer_is_one():
    # An error of relative energy δ put into the logits themselves changes them by exactly δ
    # (in expectation for Gaussian noise; exactly for the truncation-shaped error of a bias-free layer).
    net = nnx.Sequential(nnx.Linear(6, 16, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(16, 5, use_bias=False, rngs=nnx.Rngs(1)))
    images = np.asarray(jax.random.normal(jax.random.key(1), (512, 6)), np.float32)
    paths = ["layers.0", "layers.2"]
    noisy = layer_sensitivities(net, images, paths, key=jax.random.key(0), repeats=4, progress=False)
    assert noisy["layers.2"] == pytest.approx(1.0, rel=0.05)
    shaped = layer_sensitivities(net, images, paths, covariances=calibrate(net, images, progress=False),
                                 progress=False)
    assert shaped["layers.2"] == pytest.approx(1.0, rel=1e-3)
    assert 0 < noisy["layers.0"] < 5 and 0 < shaped["layers.0"] < 5


def test_damage_curve_of_the_last_layer_is_the_identity():
    # Cutting the bias-free logit layer to relative Σ-error ε changes the logits by exactly ε.
    net = nnx.Sequential(nnx.Linear(6, 16, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(16, 5, use_bias=False, rngs=nnx.Rngs(1)))
    images = np.asarray(jax.random.normal(jax.random.key(1), (256, 6)), np.float32)
    curves = damage_curves(net, images, ["layers.0", "layers.2"], calibrate(net, images, progress=False),
                           progress=False)
    eps, dmg = curves["layers.2"]
    assert eps[0] == 0 and eps[-1] == pytest.approx(1.0) and len(eps) >= 4
    np.testing.assert_allclose(dmg, eps, rtol=1e-4, atol=1e-6)
    assert (np.diff(curves["layers.0"][1]) >= 0).all()


# ----------------------------------------------------------------------------- select_ranks


@pytest.fixture(scope="module")
def small_net():
    net = nnx.Sequential(nnx.Conv(3, 12, (3, 3), rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Conv(12, 16, (3, 3), rngs=nnx.Rngs(1)), nnx.relu,
                         nnx.Conv(16, 16, (3, 3), rngs=nnx.Rngs(2)))
    images = np.asarray(jax.random.normal(jax.random.key(0), (32, 8, 8, 3)), np.float32)
    return net, images, calibrate(net, images, progress=False)


def _select(small_net, **kw):
    net, images, cov = small_net
    return select_ranks(net, cov, images=images, key=jax.random.key(0), input_shape=(1, 8, 8, 3),
                        progress=False, **kw)


@pytest.mark.parametrize("fmt", ["svd", "tucker2"])
def test_global_meets_budget_and_beats_uniform_on_predicted_damage(small_net, fmt):
    cache: dict = {}  # max_error=None: the knapsack's optimum over every candidate
    glob = _select(small_net, format=fmt, rule="global", budget="params=0.4", cache=cache, max_error=None)
    uni = _select(small_net, format=fmt, rule="uniform", budget="params=0.4", cache=cache)
    assert glob.achieved("params") <= 0.4
    eps_damage = cache["curves"]
    uni_damage = sum(np.interp(c.predicted_error, *eps_damage[c.path]) for c in uni.layers)
    assert glob.predicted_damage <= uni_damage * (1 + 1e-9)
    linear = _select(small_net, format=fmt, rule="global", budget="params=0.4", damage="linear", cache=cache,
                     max_error=None)
    s = cache["sensitivity", 0.01]
    assert linear.predicted_damage <= sum(s[c.path] * c.predicted_error for c in uni.layers) * (1 + 1e-9)
    report = glob.to_dict()
    assert report["achieved_params"] <= 0.4 and len(report["layers"]) == 3


def test_error_cap_is_the_smallest_that_fits():
    costs = [np.array([4.0, 2.0, 1.0]), np.array([4.0, 2.0, 1.0])]
    errors = [np.array([0.0, 0.3, 0.9]), np.array([0.0, 0.4, 0.7])]
    assert _error_cap(costs, errors, 4.0, 0.5) == 0.5  # the cheapest capped choices (2 + 2) fit
    assert _error_cap(costs, errors, 3.0, 0.5) == 0.7  # one deep cut needed: the shallower one
    assert _error_cap(costs, errors, 2.0, 0.5) == 0.9
    assert _error_cap(costs, errors, 1.0, 0.5) is None  # nothing fits: allocate explains
    assert _error_cap(costs, errors, 4.0, None) is None


@pytest.mark.parametrize("fmt", ["svd", "tucker2"])
def test_global_keeps_every_cut_inside_the_error_cap_when_the_budget_allows(small_net, fmt):
    cache: dict = {}
    free = _select(small_net, format=fmt, rule="global", budget="params=0.2", cache=cache, max_error=None)
    deepest = max(c.predicted_error for c in free.layers)
    cap = 0.9 * deepest  # a cap that forbids the free optimum's deepest cut
    capped = _select(small_net, format=fmt, rule="global", budget="params=0.2", cache=cache, max_error=cap)
    assert capped.achieved("params") <= 0.2
    assert capped.options["max_error"] == cap and capped.options["error_cap"] >= cap
    assert max(c.predicted_error for c in capped.layers) <= capped.options["error_cap"]
    if capped.options["error_cap"] == cap:
        assert max(c.predicted_error for c in capped.layers) < deepest
    tight = _select(small_net, format=fmt, rule="global", budget="params=0.2", cache=cache, max_error=1e-6)
    assert tight.options["error_cap"] > 1e-6  # raised until the budget fits, not ignored
    assert tight.achieved("params") <= 0.2
    with pytest.raises(ValueError, match="max_error"):
        _select(small_net, format=fmt, rule="global", budget="params=0.2", cache=cache, max_error=0.0)


def test_selection_feeds_plan_with_dense_layers_left_out(small_net):
    net, _, _ = small_net
    sel = _select(small_net, format="svd", rule="global", budget="params=0.9")
    p = sd.plan(net, format="svd", ranks=sel, skip=sel.is_dense)
    assert p.paths == tuple(sel) and all(p[path].ranks == sel[path] for path in sel)


def test_uniform_equals_rank_for_ratio_and_flops_budget_fits(small_net):
    sel = _select(small_net, format="tucker2", rule="uniform", budget="params=0.5")
    net, _, _ = small_net
    assert dict(sel) == {e.path: e.ranks for e in sd.plan(net, format="tucker2", ratio=0.5).entries}
    flops = _select(small_net, format="tucker2", rule="uniform", budget="flops=0.5")
    assert flops.achieved("flops") <= 0.5


def test_energy_and_vbmf_rules(small_net):
    full = _select(small_net, format="svd", rule="energy", tau=1.0)
    assert len(full) == 0  # keeping all the energy never saves parameters: every layer stays dense
    low = _select(small_net, format="svd", rule="energy", tau=0.5)
    assert all(c.predicted_error <= 0.5 + 1e-9 for c in low.layers)  # SVD-Σ: error = 1 − kept energy
    fitted = _select(small_net, format="tucker2", rule="energy", budget="params=0.5")
    assert fitted.achieved("params") <= 0.5
    vb = _select(small_net, format="cp", rule="vbmf")
    assert all(c.ranks is None or c.ranks[0] >= 1 for c in vb.layers)


def test_global_cp_uses_sweeps(small_net):
    sel = _select(small_net, format="cp", rule="global", budget="params=0.5", grid=(0.2, 0.45), sweeps=1)
    assert sel.achieved("params") <= 0.5
    assert all(c.predicted_error is not None and 0 <= c.predicted_error <= 1 for c in sel.layers)
    # the swept ranks' compiled solvers are released group by group (they would pile up: ~500
    # memory mappings each on XLA:CPU, and a process may hold 65 530)
    assert sd.compiled_solver_count() == 0


def test_global_chooses_each_layers_format_from_several(small_net):
    from sigmadecomp.calibration import compress_sequential

    net, images, _ = small_net
    cache: dict = {}
    mixed = _select(small_net, format=("svd", "tucker2"), rule="global", budget="params=0.4", cache=cache,
                    grid=(0.2, 0.45), sweeps=1, max_error=None)  # no cap: every candidate stays offered
    single = {f: _select(small_net, format=f, rule="global", budget="params=0.4", cache=cache, proxy="sweeps",
                         grid=(0.2, 0.45), sweeps=1, max_error=None) for f in ("svd", "tucker2")}
    assert mixed.achieved("params") <= 0.4 and mixed.options["formats"] == ["svd", "tucker2"]
    assert mixed.options["proxy"] == "sweeps"  # every format's errors measured alike
    offered = set()
    for table, choice in zip(mixed.candidates, mixed.layers):
        assert table.formats[0] is None and len(table.formats) == len(table.options)
        offered |= set(table.formats[1:])
        assert choice.format == (table.formats[table.pick] or choice.format)
        assert choice.ranks == table.options[table.pick]
    assert offered == {"svd", "tucker2"}
    # the same candidates (shared cache) as the one-format selections: each single pick is on offer
    for f, sel in single.items():
        for table, choice in zip(mixed.candidates, sel.layers):
            assert choice.ranks is None or any(o == choice.ranks and g == f
                                               for o, g in zip(table.options, table.formats))
    p = sd.plan(net, format="svd", ranks=mixed, skip=mixed.is_dense)  # the plan takes each layer's format
    assert {e.path: e.format for e in p.entries} == mixed.formats
    assert all(e.ranks == mixed[e.path] for e in p.entries)
    out = compress_sequential(net, images, format="svd", ranks=mixed, skip=mixed.is_dense, key=jax.random.key(0),
                              max_steps=2, progress=False)
    assert {e.path: e.format for e in out.plan.entries} == mixed.formats
    with pytest.raises(ValueError, match="need rule 'global'"):
        _select(small_net, format=("svd", "tucker2"), rule="uniform", budget="params=0.4")
    with pytest.raises(ValueError, match="distinct"):
        _select(small_net, format=("svd", "svd"), rule="global", budget="params=0.4")
    with pytest.raises(ValueError, match="tried several"):
        mixed.replanner()


def test_global_tucker3_offers_only_ranks_the_core_can_reach(small_net):
    # Regression: the grid once offered (2, 1, 2)-like ranks on the 3-channel first layer (r_out
    # above r_in·r_space), on which the HOOI start failed inside a scan.
    sel = _select(small_net, format="tucker3", rule="global", budget="params=0.5", grid=(0.3,), sweeps=1)
    assert sel.achieved("params") <= 0.5
    for c in sel.layers:
        r = c.ranks or (1, 1, 1)
        assert all(r[k] <= math.prod(r[:k] + r[k + 1:]) for k in range(3)), c


@pytest.mark.experiment  # every conv format's solver compiles at every grid rank: minutes in all
@pytest.mark.parametrize("fmt", [f for f in sd.formats.format_names() if f != "tt-matrix"])
@pytest.mark.parametrize("rule", ["uniform", "energy", "vbmf", "global"])
def test_every_rule_works_with_every_conv_format(small_net, fmt, rule):
    budget = None if rule == "vbmf" else "params=0.5"
    sel = _select(small_net, format=fmt, rule=rule, budget=budget, grid=(0.3,), sweeps=1)
    if budget is not None:
        assert sel.achieved("params") <= 0.5 + 1e-9
    net = small_net[0]
    p = sd.plan(net, format=fmt, ranks=sel, skip=sel.is_dense)  # the plan accepts every choice
    assert set(p.paths) | {c.path for c in sel.layers if c.ranks is None} == {c.path for c in sel.layers}


def test_bad_arguments(small_net):
    with pytest.raises(ValueError, match="rule must be"):
        _select(small_net, format="svd", rule="best")
    with pytest.raises(ValueError, match="needs a budget"):
        _select(small_net, format="svd", rule="global")
    with pytest.raises(ValueError, match="needs tau"):
        _select(small_net, format="svd", rule="energy")
    net, images, cov = small_net
    with pytest.raises(ValueError, match="input_shape"):
        select_ranks(net, cov, format="svd", rule="uniform", budget="flops=0.5", progress=False)
    with pytest.raises(ValueError, match="images= and key="):
        select_ranks(net, cov, format="svd", rule="global", budget="params=0.5", progress=False)


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("argv, needle", [(["--budget", "params"], "params=R"),
                                          (["--budget", "time=0.5"], "latency=R"),
                                          (["--budget", "latency=1.5"], "(0, 1]"),
                                          (["--budget", "flops=1.5"], "(0, 1]"),
                                          (["--rank-rule", "best"], "invalid choice")])
def test_cli_rejects_bad_rank_options(tmp_path, capsys, argv, needle):
    from sigmadecomp.cli import main

    base = ["compress", "--arch", "resnet20", "--weights", str(tmp_path / "w"), "--data", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(base + argv)
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.experiment
@pytest.mark.data
@pytest.mark.slow
def test_cli_global_rule_writes_the_selection(data_dir, tmp_path):
    from sigmadecomp.cli import main

    out = tmp_path / "r.json"
    code = main(["compress", "--arch", "resnet20", "--weights", str(data_dir / "weights" / "resnet20_cifar10.safetensors"),
                 "--data", str(data_dir / "cifar10"), "--format", "svd", "--calibration", "parallel",
                 "--rank-rule", "global", "--budget", "flops=0.5", "--calib", "32", "--json", str(out),
                 "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    sel = report["rank_selection"]
    assert sel["rule"] == "global" and sel["achieved_flops"] <= 0.5
    assert report["config"]["budget"] == "flops=0.5"
    assert all("predicted_error" in layer and layer["sensitivity"] > 0 for layer in report["layers"])


# ----------------------------------------------------------------------------- re-planning


def _replanned(small_net, sel, key=0):
    from sigmadecomp.calibration import compress_sequential

    net, images, _ = small_net
    return compress_sequential(net, images, format=sel.layers[0].format, key=jax.random.key(key),
                               replan=sel.replanner(window=1), progress=False)  # 3 fits a layer: fast


def test_replanned_ranks_fit_the_budget_are_valid_and_deterministic(small_net):
    net, _, _ = small_net
    sel = _select(small_net, format="svd", rule="global", budget="params=0.4")
    out = _replanned(small_net, sel)
    report = out.replan
    assert report["achieved_params"] <= 0.4 and report["budget"] == {"kind": "params", "ratio": 0.4}
    assert [r["path"] for r in report["layers"]] == [c.path for c in sel.layers]
    used = {r["path"]: r["used"] for r in report["layers"]}
    assert {layer.path: [layer.rank] for layer in out.layers} == {p: r for p, r in used.items() if r is not None}
    assert all(r["replanned"] == r["used"] and "upfront" in r for r in report["layers"])
    params = sum(e.params_after for e in out.plan.entries) + sum(
        c.params_before for c in sel.layers if used[c.path] is None)
    assert params == pytest.approx(report["achieved_params"] * sum(c.params_before for c in sel.layers))
    sd.plan(net, format="svd", ranks={e.path: e.ranks for e in out.plan.entries},
            skip=lambda p: p not in used or used[p] is None)  # valid ranks of each layer
    assert _replanned(small_net, sel).replan == report  # deterministic for a fixed key


def test_replanning_the_first_layer_repeats_the_upfront_choice(small_net):
    # Nothing upstream has changed at the first layer: given the predicted errors as its measured
    # ones, the re-solve is the up-front knapsack. Under SVD-Σ the real fit measures exactly them.
    for fmt in ("svd", "tucker2"):
        sel = _select(small_net, format=fmt, rule="global", budget="params=0.4")
        first = sel.candidates[0]
        replanner = sel.replanner()
        same = dict(zip(first.options, first.errors))
        assert replanner.ranks_for(first.path, None, lambda r, _: same[r]) == first.options[first.pick]
    sel = _select(small_net, format="svd", rule="global", budget="params=0.4")
    out, first = _replanned(small_net, sel), sel.candidates[0]
    record = out.replan["layers"][0]
    candidates = {str(None if o is None else list(o)): e for o, e in zip(first.options, first.errors)}
    assert record["floor"] == pytest.approx(0.0, abs=1e-9)
    for ranks, error in record["measured"].items():
        assert error == pytest.approx(candidates[ranks], rel=1e-4, abs=1e-7)
    assert record["replanned"] == record["upfront"]


def test_replan_rejects_bad_input(small_net):
    from sigmadecomp.calibration import compress_sequential

    net, images, _ = small_net
    with pytest.raises(ValueError, match="rule='global'"):
        _select(small_net, format="svd", rule="uniform", budget="params=0.5").replanner()
    sel = _select(small_net, format="svd", rule="global", budget="params=0.5")
    with pytest.raises(ValueError, match="window"):
        sel.replanner(window=-1)
    for kw, needle in (({"ratio": 0.5}, "leave out ratio="), ({"format": "tucker2"}, "format 'svd'")):
        with pytest.raises(ValueError, match=needle):
            compress_sequential(net, images, key=jax.random.key(0), replan=sel.replanner(),
                                **{"format": "svd", **kw})
    with pytest.raises(ValueError, match="replanner"):
        compress_sequential(net, images, format="svd", key=jax.random.key(0), replan=object())


@pytest.mark.parametrize("argv, needle", [(["--replan"], "--rank-rule global"),
                                          (["--replan", "--rank-rule", "global", "--budget", "params=0.5",
                                            "--calibration", "parallel"], "--calibration sequential")])
def test_cli_replan_errors_are_clear(tmp_path, capsys, argv, needle):
    from sigmadecomp.cli import main

    base = ["compress", "--arch", "resnet20", "--weights", str(tmp_path / "w"), "--data", str(tmp_path)]
    assert main(base + argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err and len(err.strip().splitlines()) == 1


def _tiny_resnet_cli(tmp_path, *flags) -> dict:
    """``sigmadecomp compress`` of a random ResNet-8 on a tiny CIFAR folder with ``flags``; the report."""
    from safetensors.numpy import save_file
    from test_hardening import _random_torch_state_dict, _write_cifar

    from sigmadecomp.cli import main
    from sigmadecomp.models import CifarResNet

    save_file(_random_torch_state_dict(nnx.eval_shape(lambda: CifarResNet(8, rngs=nnx.Rngs(0)))),
              str(tmp_path / "w.safetensors"))
    out = tmp_path / "r.json"
    code = main(["compress", "--arch", "resnet8", "--weights", str(tmp_path / "w.safetensors"),
                 "--data", str(_write_cifar(tmp_path / "cifar")), "--rank-rule", "global", "--calib", "16",
                 "--batch-size", "16", "--implementation", "factorized", "--latency-repeats", "0",
                 "--json", str(out), "--no-progress", *flags])
    assert code == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_cli_replan_end_to_end_on_a_tiny_resnet(tmp_path):
    report = _tiny_resnet_cli(tmp_path, "--format", "svd", "--budget", "params=0.5", "--replan")
    assert report["config"]["replan"] is True and report["config"]["calibration"] == "sequential"
    replan = report["replan"]
    assert replan["achieved_params"] <= 0.5 and len(replan["layers"]) == len(report["rank_selection"]["layers"])
    assert {layer["path"] for layer in report["layers"]} == {r["path"] for r in replan["layers"] if r["used"]}


@pytest.mark.experiment  # every candidate of both formats swept on seven layers: 5.5 minutes under load
def test_cli_several_formats_end_to_end_on_a_tiny_resnet(tmp_path):
    report = _tiny_resnet_cli(tmp_path, "--format", "svd+tucker2", "--budget", "params=0.4", "--max-steps", "2")
    assert report["config"]["format"] == "svd+tucker2"
    chosen = {c["path"]: c["format"] for c in report["rank_selection"]["layers"] if c["ranks"] is not None}
    assert {layer["path"]: layer["format"] for layer in report["layers"]} == chosen
    assert report["rank_selection"]["achieved_params"] <= 0.4


@pytest.mark.parametrize("budget", ["params=0.5", "latency=0.5"])
def test_cli_rank_rules_are_refused_where_they_would_be_ignored(tmp_path, capsys, budget):
    """Other models and image folders take --ratio only: a rank rule there is an error, not a no-op."""
    from sigmadecomp.cli import main

    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "images").mkdir()
    argv = ["compress", "--arch", "resnet20", "--weights", str(tmp_path / "w.safetensors"), "--data",
            str(tmp_path / "images"), "--rank-rule", "global", "--budget", budget]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--rank-rule/--budget/--tau apply to --arch on CIFAR-10" in err
