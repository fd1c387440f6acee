"""The rank-selection experiment's --smoke configuration runs end to end and records every field."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.experiment  # minutes: opt-in with --experiments (see conftest.py)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "rank_selection" / "main.py"


@pytest.mark.data
@pytest.mark.slow
def test_smoke_runs_records_and_resumes(data_dir, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=900, cwd=ROOT)
    proc = run("--data", str(data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    every = json.loads((tmp_path / "results.json").read_text())["runs"]
    runs = {r["rule"]: r for r in every if not r["budget"].startswith("latency")}
    assert set(runs) == {"uniform", "global", "vbmf", "global_replan"}
    (lat,) = [r for r in every if r["budget"].startswith("latency")]  # the latency-budget path
    assert lat["achieved_latency"] <= 0.9 and lat["latency"]["measured_ratio"] > 0
    frozen = json.loads((tmp_path / "latency_tables" / "resnet20-svd-sigma-b16.json").read_text())
    assert frozen["date"] == lat["latency"]["table_date"]  # later latency runs select from this table
    assert lat["latency"]["flops_selection"]["predicted_latency"] > 0 and lat["latency"]["model_load"]
    for r in every:
        assert 0 <= r["accuracy"] <= 1 and r["baseline_accuracy"] > 0.8
        assert len(r["layers"]) == 18 and r["loadavg"] and r["date"]
    for rule in ("uniform", "global"):
        assert runs[rule]["achieved_params"] <= 0.5
    glob = runs["global"]
    assert glob["predicted_damage"] > 0 and all(layer["sensitivity"] > 0 for layer in glob["layers"])
    for layer in glob["layers"]:  # parallel SVD-Σ: the measured error is the closed-form prediction
        if layer["ranks"] is not None:
            assert layer["measured_error"] == pytest.approx(layer["predicted_error"], rel=1e-3, abs=1e-6)
    replan = runs["global_replan"]
    assert replan["achieved_params"] <= 0.5 and replan["replan"]["achieved_params"] == replan["achieved_params"]
    assert all("upfront_ranks" in layer for layer in replan["layers"])
    assert "| ResNet-20 | parallel | svd | params=0.5 | global |" in proc.stdout
    assert (tmp_path / "figure.png").stat().st_size > 0
    again = run("--data", str(tmp_path / "missing"))  # nothing left to do: no data needed
    assert again.returncode == 0 and "0 run(s) to do" in again.stdout, again.stderr[-3000:]
    for r in every:  # the process footprint behind the out-of-memory crashes, per cell
        assert r["process"]["max_rss_mb"] > 0 and r["calib_images"] == 32
    more = run("--data", str(data_dir), "--calib-images", "48", "--rules", "uniform", "--budgets", "params=0.5")
    assert more.returncode == 0 and "1 run(s) to do" in more.stdout, more.stderr[-3000:]
    keyed = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted(r["calib_images"] for r in keyed if r["rule"] == "uniform") == [32, 48]
    assert "| ResNet-20 | svd | parallel sigma | params=0.5 | uniform | " in more.stdout  # the calibration-size table
    assert "(48) |" in more.stdout
