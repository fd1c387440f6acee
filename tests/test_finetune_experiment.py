"""experiments/finetune --smoke runs end to end and records every field the README's table uses."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.experiment  # minutes: opt-in with --experiments (see conftest.py)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "finetune" / "main.py"
FIELDS = {
    "arch", "format", "ratio", "init", "conv_param_rate", "params", "baseline_params", "accuracy_compressed",
    "accuracy_bn", "accuracy_finetuned", "baseline_accuracy", "finetune_seconds", "compress_seconds",
    "bn_seconds", "steps", "batch_size", "compilations", "history", "loadavg", "date", "batch_norm",
    "start_from", "calib_kl",
}


@pytest.mark.data
@pytest.mark.slow
def test_smoke_records_every_field_and_resumes(data_dir, tmp_path):
    run = lambda: subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--data", str(data_dir),  # noqa: E731
                                  "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    proc = run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert FIELDS <= set(record), FIELDS - set(record)
    assert record["steps"] == 2 and record["compilations"] == 1
    assert [e["step"] for e in record["history"]["eval"]] == [0, 1, 2]
    assert record["history"]["eval"][0]["accuracy"] == record["accuracy_compressed"]
    assert 0.3 < record["conv_param_rate"] < 0.7 and record["baseline_accuracy"] > 0.8
    assert (tmp_path / "figure.png").stat().st_size > 0
    again = run()  # resumable: nothing left to do, the table is printed from the file
    assert again.returncode == 0 and "0 run(s) to do" in again.stdout and "| svd |" in again.stdout


def test_training_implementations_benchmark_smoke(tmp_path):
    """benchmarks/training_implementations.py runs end to end and its table reads its result file."""
    out = tmp_path / "t.json"
    script = ROOT / "benchmarks" / "training_implementations.py"
    subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"resnet20/cp/0.1/b8", "resnet20/r-cp/0.1/b8"}
    assert all(r[v]["images_per_second"] > 0 for r in rows.values() for v in ("factorized", "dense", "auto"))
    table = subprocess.run([sys.executable, str(script), "--table", "--out", str(out)], check=True,
                           capture_output=True, text=True).stdout
    assert "resnet20/r-cp/0.1/b8" in table
