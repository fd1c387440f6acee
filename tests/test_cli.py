"""The command line: help works, and every user mistake is one line on stderr, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sigmadecomp.cli import main


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("argv", [[], ["--help"], ["demo", "--help"], ["compress", "--help"]])
def test_help(argv, capsys):
    if argv:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "usage: sigmadecomp" in out
    else:
        assert main(argv) == 2  # no command: help on stderr, usage exit code
        assert "demo" in capsys.readouterr().err


def test_compress_help_states_the_skip_default(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--skip-first" in out and "--no-skip-first" in out
    assert "classifier is never compressed" in out


def _compress_argv(tmp_path, **overrides) -> list[str]:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    data = tmp_path / "cifar"
    data.mkdir(exist_ok=True)
    for name in ("data_batch_1", "test_batch"):
        (data / name).write_bytes(b"")
    args = {"--arch": "resnet20", "--weights": str(weights), "--data": str(data)}
    args.update(overrides)
    return ["compress", *[x for kv in args.items() for x in kv if x is not None]]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"--ratio": "0"}, "(0, 1]"),
        ({"--ratio": "1.5"}, "(0, 1]"),
        ({"--ratio": "-0.5"}, "(0, 1]"),
        ({"--ratio": "half"}, "'half'"),
        ({"--calib": "0"}, "positive integer"),
        ({"--max-steps": "-3"}, "positive integer"),
        ({"--arch": "resnet18"}, "6n+2"),
        ({"--format": "tucker9"}, "expected a format"),
        ({"--format": "cp+tucker9"}, "expected a format"),
        ({"--format": "cp+cp"}, "distinct ones joined by '+'"),
        ({"--norm": "l1"}, "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, capsys, overrides, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(_compress_argv(tmp_path, **overrides))
    assert exit_info.value.code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and needle in lines[0], lines


def test_missing_required_argument(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--arch", "resnet20"])
    assert exit_info.value.code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "--data" in lines[0]
    argv = _compress_argv(tmp_path)  # --arch without --weights (optional since --model exists)
    del argv[argv.index("--weights") : argv.index("--weights") + 2]
    assert main(argv) == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "--arch needs --weights" in lines[0]


@pytest.mark.parametrize(
    "which, needle",
    [("--weights", "no such file"), ("--data", "data_batch_1"), ("--eval-data", "test_batch")],
)
def test_missing_files_are_one_line(tmp_path, capsys, which, needle):
    missing = str(tmp_path / "does-not-exist")
    code = main(_compress_argv(tmp_path, **{which: missing}))
    assert code == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("sigmadecomp compress: error:")
    assert which in lines[0] and needle in lines[0] and "does-not-exist" in lines[0]


def test_corrupt_weights_file_is_one_line(tmp_path, capsys, data_dir):
    """An unreadable weights file (here: empty) fails in the loader; the CLI reports one line."""
    argv = _compress_argv(tmp_path, **{"--data": str(data_dir / "cifar10"), "--calib": "8"})
    code = main([*argv, "--no-progress"])
    assert code == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("sigmadecomp compress: error:"), lines


def test_python_dash_m_reports_one_line(tmp_path):
    argv = _compress_argv(tmp_path, **{"--ratio": "2"})
    proc = subprocess.run(
        [sys.executable, "-m", "sigmadecomp", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("sigmadecomp compress: error:")


def test_sequential_with_frobenius_is_one_line(tmp_path, capsys):
    argv = _compress_argv(tmp_path, **{"--norm": "frobenius", "--calibration": "sequential"})
    assert main(argv) == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "sequential calibration fits the Σ norm" in lines[0]


def test_calibration_default_follows_the_norm():
    from sigmadecomp.compress import _check_calibration

    assert _check_calibration(None, "sigma") == "sequential"
    assert _check_calibration(None, "frobenius") == "parallel"
    assert _check_calibration("parallel", "sigma") == "parallel"
    with pytest.raises(ValueError, match="calibration must be one of"):
        _check_calibration("greedy", "sigma")


@pytest.mark.parametrize("extra", [[], ["--rank-rule", "uniform"], ["--rank-rule", "global", "--budget", "params=0.5",
                                                                    "--replan"]])
def test_several_formats_need_the_global_rule_without_replan(tmp_path, capsys, extra):
    assert main(_compress_argv(tmp_path, **{"--format": "cp+tucker2"}) + extra) == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "tries several formats per layer" in lines[0], lines
