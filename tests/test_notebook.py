"""notebooks/compare_als_vs_sigma.ipynb runs top to bottom at smoke size (SIGMADECOMP_SMOKE=1)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

pytestmark = pytest.mark.experiment  # minutes: opt-in with --experiments (see conftest.py)

nbclient = pytest.importorskip("nbclient", reason="nbclient is needed to execute notebooks (dev extra)")
nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to execute notebooks (dev extra)")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "compare_als_vs_sigma.ipynb"
KERNEL = "sigmadecomp-test"


@pytest.fixture
def kernel_for_this_interpreter(tmp_path, monkeypatch):
    """A kernelspec that starts ``sys.executable``, so the notebook sees this venv's packages
    whatever ``python3`` kernel (if any) the machine has installed."""
    spec = tmp_path / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return KERNEL


def test_notebook_runs_at_smoke_size(data_dir, kernel_for_this_interpreter, monkeypatch):
    pytest.importorskip("ipykernel", reason="ipykernel is needed to execute notebooks (dev extra)")
    monkeypatch.setenv("SIGMADECOMP_SMOKE", "1")
    monkeypatch.setenv("SIGMADECOMP_DATA", str(data_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name=kernel_for_this_interpreter, timeout=600,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any failure
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "smoke run" in text and "ResNet-20:" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # rank, convergence, accuracy plots
