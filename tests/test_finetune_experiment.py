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


@pytest.mark.data
def test_gradients_script_on_a_saved_model(data_dir, tmp_path):
    """experiments/finetune/gradients.py reads a saved compressed model and writes its gradient table."""
    import jax

    from sigmadecomp import compress
    from sigmadecomp.data import cifar10_normalize, load_cifar10
    from sigmadecomp.models import pretrained_resnet
    from sigmadecomp.surgery import save

    model = pretrained_resnet(20, data_dir / "weights" / "resnet20_cifar10.safetensors")
    calib, _ = load_cifar10(data_dir / "cifar10", "train", limit=16)
    result = compress.compress_model(model, cifar10_normalize(calib), format="svd", ratio=0.5, norm="frobenius",
                                     key=jax.random.key(0), progress=False)
    save(tmp_path / "models" / "resnet20-svd-0.5-frobenius-sweeps1", result.model, result.plan)
    script = ROOT / "experiments" / "finetune" / "gradients.py"
    proc = subprocess.run([sys.executable, str(script), "resnet20-svd-0.5-frobenius-sweeps1", "--models",
                           str(tmp_path / "models"), "--data", str(data_dir), "--batch", "8", "--top", "3",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gradients-resnet20-svd-0.5-frobenius-sweeps1.json").read_text())
    assert report["batch"] == 8 and len(report["top"]) == 3 and report["global_grad_norm"] > 0
    relative = [r["relative"] for r in report["top"]]
    assert relative == sorted(relative, reverse=True)
    assert any(".factors" in r["param"] or "kernel" in r["param"] or "scale" in r["param"] for r in report["top"])
