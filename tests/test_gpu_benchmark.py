"""benchmarks/gpu.py (issue 10): the safetensors stand-in reads and writes what the real package
does, and the reduced-precision workload runs under --smoke and respects its budget."""

from __future__ import annotations

import json
import pathlib
import runpy
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _load_shim(tmp_path):
    ns = runpy.run_path(str(SCRIPT))
    pkg = tmp_path / "safetensors"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(ns["_SAFETENSORS_INIT"])
    (pkg / "numpy.py").write_text(ns["_SAFETENSORS_NUMPY"])
    code = ("import sys, json, numpy as np; sys.path.insert(0, sys.argv[1]); import safetensors, safetensors.numpy as stn;"
            "assert safetensors.__file__.startswith(sys.argv[1]);"
            "stn.save_file({'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.array([1, -2], np.int64)}, sys.argv[2]);"
            "t = stn.load_file(sys.argv[3]); print(json.dumps({k: [str(v.dtype), list(v.shape), v.ravel().tolist()] for k, v in t.items()}))")
    return code


def test_safetensors_stand_in_matches_the_package(tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    code = _load_shim(tmp_path)
    written, real_file = tmp_path / "shim.safetensors", tmp_path / "real.safetensors"
    safetensors.save_file({"w": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), "n": np.arange(3)}, real_file)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(written), str(real_file)],
                         capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got["w"][:2] == ["float32", [3, 4]] and np.allclose(got["w"][2], np.linspace(0, 1, 12))
    assert got["n"] == ["int64", [3], [0, 1, 2]]
    back = safetensors.load_file(written)  # the stand-in's file, read by the real package
    np.testing.assert_array_equal(back["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(back["b"], [1, -2])


@pytest.mark.experiment
@pytest.mark.slow
def test_smoke_precision_workload(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--workloads", "precision", "--out",
                           str(tmp_path), "--budget-s", "300"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "precision.json").read_text())["rows"]
    assert [r["cell"]["cg_precision"] for r in rows] == ["highest", "tf32", "bf16"]
    for row in rows:
        errors = np.asarray(row["errors"])
        assert np.all(np.diff(errors) <= 1e-6 * errors[:-1]) and row["seconds"] > 0
