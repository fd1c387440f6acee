"""The three TT-layer experiments' --smoke configurations run end to end and record their rows."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.experiment  # minutes: opt-in with --experiments (see conftest.py)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "experiments" / "tt_layers"


def _run(script: str, data_dir, out) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), "--smoke", "--data", str(data_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = {"mnist_mlp.py": "mnist", "fortunes_text.py": "text", "mnist_sequences.py": "sequences"}[script]
    return json.loads((out / f"results_{name}_smoke.json").read_text())


@pytest.mark.data
@pytest.mark.slow
def test_mnist_mlp_smoke(data_dir, tmp_path):
    runs = _run("mnist_mlp.py", data_dir, tmp_path)["runs"]
    assert {"dense", "fit/frobenius/r3", "fit/sigma/r3", "scratch/tt/r3", "scratch/naive/r3", "prior/r4"} <= set(runs)
    sigma, frob = runs["fit/sigma/r3"], runs["fit/frobenius/r3"]
    assert sigma["ratio"] == frob["ratio"] > 1
    # The Σ fit is the better one in the Σ-norm it minimises, layer by layer.
    assert all(sigma["sigma_errors"][p] <= frob["sigma_errors"][p] * 1.001 for p in ("fc1", "fc2"))
    # Resumable: a rerun finds every row and adds none.
    again = _run("mnist_mlp.py", data_dir, tmp_path)
    assert set(again["runs"]) == set(runs) and len(again["sessions"]) == 2


@pytest.mark.data
@pytest.mark.slow
def test_fortunes_and_sequences_smoke(data_dir, tmp_path):
    runs = _run("fortunes_text.py", data_dir, tmp_path)["runs"]
    assert {"bag/dense", "bag/fit/frobenius/r2", "bag/fit/sigma/r2", "bag/scratch/r2", "gru/dense", "gru/tt/r2"} <= set(runs)
    assert runs["bag/fit/sigma/r2"]["frequency_weighted_error"] <= runs["bag/fit/frobenius/r2"]["frequency_weighted_error"]
    assert runs["gru/tt/r2"]["input_map_params"] < runs["gru/dense"]["input_map_params"]
    seq = _run("mnist_sequences.py", data_dir, tmp_path)["runs"]
    assert seq["tt/r2"]["input_map_ratio"] > 100 and seq["dense"]["steps_per_second"] > 0
