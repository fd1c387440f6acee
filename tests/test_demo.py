"""``sigmadecomp demo --quick``: trains, compresses, prints the table and writes the plot."""

from __future__ import annotations

import numpy as np
import pytest

from sigmadecomp._demo import PLOT_NAME, DemoConfig, run_demo
from sigmadecomp.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines = []
    result = run_demo(out_dir=out, key=0, quick=True, progress=False, log=lines.append)
    return result, "\n".join(lines)


def test_quick_demo_writes_plot_and_table(quick_demo):
    result, text = quick_demo
    assert result.plot_path.name == PLOT_NAME
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = DemoConfig.quick()
    assert len(result.rows) == len(config.formats) * len(config.ratios) * 2
    for row in result.rows:
        assert f"{row.format:<8} {row.norm:<9}" in text
        assert 0.0 <= row.accuracy <= 1.0 and row.params < result.params
    assert "mean Σ-error" in text


def test_sigma_rows_have_lower_sigma_error_than_frobenius(quick_demo):
    """The Σ-solvers minimise the quantity reported; the Frobenius ones do not."""
    result, _ = quick_demo
    by_key = {(r.format, r.ratio, r.norm): r for r in result.rows}
    for (fmt, ratio, norm), row in by_key.items():
        if norm == "sigma":
            frobenius = by_key[(fmt, ratio, "frobenius")]
            assert row.params == frobenius.params
            assert row.mean_relative_error < frobenius.mean_relative_error, (fmt, ratio)


def test_demo_is_deterministic_given_the_key(tmp_path, quick_demo):
    """Same key, same numbers (training batches, init, calibration and solver inits all keyed)."""
    result, _ = quick_demo
    again = run_demo(out_dir=tmp_path, key=0, quick=True, progress=False, log=None)
    assert again.test_accuracy == result.test_accuracy
    np.testing.assert_allclose([r.mean_relative_error for r in again.rows],
                               [r.mean_relative_error for r in result.rows], rtol=1e-5)


def test_cli_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "figs" / PLOT_NAME).is_file()
    assert "format" in out and "sigma" in out and "frobenius" in out
