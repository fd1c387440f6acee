"""experiments/gpu_grid.py: the priority list, claiming, core split, result helpers; --smoke end to end."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import _results  # noqa: E402
import gpu_grid  # noqa: E402


def test_units_are_valid_distinct_and_targets_come_first():
    units = gpu_grid.full_units()
    cells = [json.dumps(c, sort_keys=True) for u in units for c in u["cells"]]
    assert len(cells) == len(set(cells)), "a cell is listed twice"
    for unit in units:
        for cell in unit["cells"]:
            if unit["exp"] == "finetune":
                assert cell["format"] in ("svd", "tucker2", "cp") and cell["init"] in ("sigma_seq", "frobenius", "random", "sigma_par")
                assert cell["ratio"] in (0.05, 0.1, 0.2, 0.4)
            else:
                arch, fmt, norm, calibration, rule, budget = cell
                assert arch in (20, 32, 56) and rule in ("uniform", "energy", "vbmf", "global")
                assert budget == "none" or budget.split("=")[0] in ("params", "flops")
    top = units[:6]
    assert {"format": "cp", "ratio": 0.1, "init": "sigma_seq"}.items() <= top[0]["cells"][0].items()
    assert [20, "tucker2", "sigma", "sequential", "global", "params=0.5"] in top[1]["cells"]
    # Every issue-13 grid cell (4 rates × 3 formats × 4 inits) is somewhere in the list.
    ft = {(c["format"], c["ratio"], c["init"]) for u in units if u["exp"] == "finetune" for c in u["cells"]}
    assert len(ft) == 48


def test_claim_is_exclusive(tmp_path):
    (tmp_path / "claims").mkdir()
    assert gpu_grid.claim(tmp_path, 3) and not gpu_grid.claim(tmp_path, 3) and gpu_grid.claim(tmp_path, 4)


def test_worker_cores_are_disjoint_and_avoid_the_cpu_measurement(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    sets = gpu_grid.cores_for(16, 5, [10, 11, 12, 13, 14, 15])
    flat = [c for s in sets for c in s]
    assert len(sets) == 5 and len(flat) == len(set(flat)) == 10 and max(flat) == 9
    assert gpu_grid.cores_for(2, 2, []) == [None, None]  # too few cores: no pinning


def test_results_helpers_replace_by_key_and_write_atomically(tmp_path):
    path = tmp_path / "r.json"
    results = _results.load_results(path)
    assert results == {"runs": [], "sessions": []}
    _results.add_run(results, {"k": 1, "v": "a"}, lambda r: r["k"])
    _results.add_run(results, {"k": 1, "v": "b"}, lambda r: r["k"])
    _results.merge(results, {"runs": [{"k": 2, "v": "c"}], "sessions": [{"s": 1}], "meta": 5}, lambda r: r["k"])
    _results.save_results(results, path)
    again = _results.load_results(path)
    assert [r["v"] for r in again["runs"]] == ["b", "c"] and again["meta"] == 5 and again["sessions"] == [{"s": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


@pytest.mark.experiment
@pytest.mark.data
@pytest.mark.slow
def test_smoke_grid_runs_both_experiments_within_four_files(data_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu_grid.py"), "--smoke", "--data", str(data_dir),
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["cpu_throughput.json", "finetune.json", "grid_log.txt",
                                                     "rank_selection.json"]
    ft = json.loads((out / "finetune.json").read_text())
    (record,) = ft["runs"]
    assert not ft["failures"] and record["cpu_budget"]["images"] >= 1 and record["steps"] >= 1
    assert record["batch_size"] == gpu_grid.BATCH_SIZE and record["device"] and record["worker"] in (0, 1)
    rs = json.loads((out / "rank_selection.json").read_text())
    assert not rs["failures"] and {r["rule"] for r in rs["runs"]} == {"uniform"}
    cpu = json.loads((out / "cpu_throughput.json").read_text())["formats"]["svd@0.5"]
    assert cpu["images_per_second"] > 0 and cpu["backend"] == "cpu"


def _finetune_record(fmt, ratio, init, acc):
    return dict(arch=32, format=fmt, ratio=ratio, init=init, batch_norm="frozen", learning_rate=0.002, label_weight=0.0,
                steps=10, batch_size=128, cpu_budget=dict(cpu_seconds=600.0, cpu_images_per_second=2.2, images=1320,
                                                          source="measured", waited_seconds=0.0),
                finetune_seconds=3.0, steady_images_per_second=900.0, conv_param_rate=ratio, compress_wall_seconds=9.0,
                device="test", accuracy_compressed=acc - 0.2, accuracy_bn=acc - 0.3, accuracy_finetuned=acc,
                baseline_accuracy=0.93, history={"eval": [dict(step=0, seconds=0.0, accuracy=acc - 0.2),
                                                          dict(step=10, seconds=3.0, accuracy=acc)],
                                                 "train": [dict(step=s, loss=10.0 - s / 2) for s in (2, 4, 6, 8, 10)]},
                train_images=5085)


def test_report_folds_grid_runs_and_writes_verdicts(tmp_path):
    import grid_report

    grid, ft_dir, rs_dir = tmp_path / "grid", tmp_path / "ft", tmp_path / "rs"
    for d in (grid, ft_dir, rs_dir):
        d.mkdir()
    runs = [_finetune_record("cp", 0.1, "sigma_seq", 0.9), _finetune_record("cp", 0.1, "frobenius", 0.8)]
    (grid / "finetune.json").write_text(json.dumps({"runs": runs, "failures": [], "grid": {"date": "d"}}))
    (grid / "rank_selection.json").write_text(json.dumps({"runs": [], "failures": [], "grid": {"date": "d"}}))
    (grid / "cpu_throughput.json").write_text(json.dumps({"formats": {}}))
    grid_report.main(["--grid", str(grid), "--finetune-dir", str(ft_dir), "--rank-dir", str(rs_dir)])
    grid_report.main(["--grid", str(grid), "--finetune-dir", str(ft_dir), "--rank-dir", str(rs_dir)])  # idempotent
    assert len(json.loads((ft_dir / "results.json").read_text())["runs"]) == 2
    text = (ft_dir / "README.md").read_text()
    assert ("| 10%: ≥ 89.0% (best format) | 90.00% (cp, sigma_seq, sgd lr 0.002; formats run: cp; 1 recipe(s)) | "
            "met; test time to 89.0%: 3.0 s |") in text
    assert ("| cp 10%, sgd lr 0.002: Σ-sequential beats the other inits after the same budget | Σ-seq 90.00 vs "
            "frobenius 80.00 | met") in text
    assert "| cp | sigma_seq | distilled, sgd lr 0.002 | – | 90.00 | – | – |" in text
    assert (rs_dir / "README.md").exists()


def test_no_cell_starts_that_a_running_one_shows_cannot_finish(tmp_path):
    import time
    import types

    (tmp_path / "shards").mkdir()
    now = time.time()
    worker = types.SimpleNamespace(args=types.SimpleNamespace(work=tmp_path, worker=0, deadline=now + 300, hard=now + 360))
    fits = lambda exp: gpu_grid.Worker.fits(worker, exp)  # noqa: E731
    assert not fits("rank_selection") and fits("finetune")  # prior guesses only (a rank cell: 400 s)
    worker.args.hard = now + 1000
    assert fits("rank_selection")
    gpu_grid.Worker.track(worker, "rank_selection", now - 1200, None)  # another worker's cell, still running
    gpu_grid.Worker.track(worker, "finetune", now - 50, 30.0)
    assert not fits("rank_selection") and fits("finetune")


def test_cells_already_measured_are_not_run_again():
    units = gpu_grid.full_units()
    ft_runs = [dict(format="cp", ratio=0.1, init="sigma_seq", learning_rate=gpu_grid.LEARNING_RATE, label_weight=0.0,
                    cpu_budget={"images": 1}), dict(format="cp", ratio=0.1, init="frobenius", learning_rate=0.002)]  # CPU run
    rs_runs = [dict(arch=20, format="tucker2", norm="sigma", calibration="sequential", rule="global", budget=b)
               for b in gpu_grid.BUDGETS_A]
    left = gpu_grid.without_done(units, ft_runs, rs_runs)
    cells = [c for u in left for c in u["cells"]]
    assert len(left) == len(units) - 2 and len(cells) == sum(len(u["cells"]) for u in units) - 4
    assert {"format": "cp", "ratio": 0.1, "init": "frobenius", "lr": 0.002, "label_weight": 0.0} in cells
