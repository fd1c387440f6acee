"""experiments/tnn_table: the report's merge of its own cells with the fine-tuning runs (fast, by
default), and the smoke run end to end with the compressed-model cache (opt-in, minutes)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = ROOT / "experiments" / "tnn_table"


def _load(name: str):
    sys.path.insert(0, str(HERE))
    try:
        spec = importlib.util.spec_from_file_location(f"tnn_{name}", HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(HERE))


def _cell(fmt, ratio, distill_steps, no_training, distilled=None, **recipe):
    return dict(arch=32, format=fmt, ratio=ratio, max_steps=6, distill_steps=distill_steps, batch_size=64,
                conv_param_rate=ratio, accuracy_dense=0.93, accuracy_no_training=no_training,
                accuracy_distilled=distilled, compress_seconds=1.0, distill_seconds=None, distill="not run",
                loadavg=[[1.0, 1.0, 1.0]] * 2, device="cpu", date="d", test_images=512, **recipe)


def test_report_takes_distilled_rows_from_the_finetune_runs(tmp_path):
    report = _load("report")
    (tmp_path / "results_0of1.json").write_text(json.dumps({"cells": [
        _cell("cp", 0.05, 0, 0.40), _cell("r-cp", 0.05, 0, 0.35)]}))
    ft_run = dict(arch=32, format="r-cp", ratio=0.05, init="sigma_seq", max_steps=6, steps=10, batch_size=128,
                  learning_rate=0.01, conv_param_rate=0.05, baseline_accuracy=0.93, accuracy_compressed=0.30,
                  accuracy_finetuned=0.70, finetune_seconds=5.0, loadavg=[[1.0] * 3] * 2, date="d2",
                  test_images=512, cpu_budget=dict(images=1280))
    others = [dict(ft_run, init="frobenius"), dict(ft_run, cpu_budget=None)]  # not Σ-sequential / no budget
    (tmp_path / "ft.json").write_text(json.dumps({"runs": [ft_run, *others]}))
    cells = report.merge([tmp_path]) + report.from_finetune(tmp_path / "ft.json")
    assert len(cells) == 3
    text = report.accuracy_table(cells)
    assert "| r-cp | ours: Σ-sequential, no training | – | 35.00 |" in text  # the table's own cell wins
    assert "| r-cp | ours: + distillation, 10 steps × batch 128 (1280 images), sgd lr 0.01, 5 085 images | – | 70.00 |" in text
    assert "- r-cp 5% distilled ≥ 89.86: 70.00 (missed by 19.86 points)" in report.targets(cells)
    assert "best plain cp 40.00" in report.targets(cells)


def test_cell_keys_separate_recipes():
    main = _load("main")
    base = dict(arch=32, format="cp", ratio=0.1, max_steps=6, distill_steps=100)
    assert main.record_key(base) == "resnet32/cp/0.1/sweeps6/distill100"
    assert main.record_key(dict(base, learning_rate=0.01, mix="mixup")) == "resnet32/cp/0.1/sweeps6/distill100/lr0.01/mixup"
    assert main.record_key(dict(base, distill_steps=0, learning_rate=0.01)) == "resnet32/cp/0.1/sweeps6/distill0"


@pytest.mark.experiment
@pytest.mark.data
def test_smoke_runs_and_reuses_its_compressed_models(data_dir, tmp_path):
    def run(out, *extra):
        proc = subprocess.run([sys.executable, str(HERE / "main.py"), "--smoke", "--data", str(data_dir), "--out",
                               str(out), "--models", str(tmp_path / "models"), *extra],
                              capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "results_0of1.json").read_text())["cells"]

    first = run(tmp_path / "a")
    assert {c["format"] for c in first} == {"r-tt", "svd"} and not any(c["model_from_cache"] for c in first)
    again = run(tmp_path / "b", "--lr", "0.01")
    assert all(c["model_from_cache"] and c["learning_rate"] == 0.01 for c in again)
    assert [c["accuracy_no_training"] for c in again] == [c["accuracy_no_training"] for c in first]
