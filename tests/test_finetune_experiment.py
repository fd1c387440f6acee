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
