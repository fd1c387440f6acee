"""The ``sigmadecomp`` command line (also ``python -m sigmadecomp``).

Two commands:

* ``sigmadecomp demo`` — nothing to download: train a small CNN on scikit-learn's digits, then
  compress it with classic (Frobenius) and Σ decompositions and print/plot the comparison.
* ``sigmadecomp compress`` — compress a pretrained CIFAR-10 ResNet with one format, norm and
  parameter ratio; print a summary and optionally write JSON and the compressed model.

Errors the user can fix (bad values, missing files) end in a one-line message on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

from sigmadecomp.formats import format_names

__all__ = ["main"]

EXIT_USAGE = 2  # argparse's code for a bad command line
EXIT_ERROR = 1  # a value or file the command could not use


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage block), still exiting with 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"the parameter ratio must lie in (0, 1] (kept parameters / original), got {value}"
        )
    return value


def _budget(text: str) -> str:
    kind, sep, value = text.partition("=")
    if not sep or kind not in ("params", "flops"):
        raise argparse.ArgumentTypeError(f"expected params=R or flops=R, got {text!r}")
    _ratio(value)
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's digits and compare Frobenius and Σ compression",
        description=(
            "Train a small CNN on scikit-learn's 8x8 digits (shipped with scikit-learn, nothing "
            "to download), calibrate on a few hundred training images, compress conv2 and conv3 "
            "with classic ALS (Frobenius) and Σ-ALS (Tucker-2 and CP) at several parameter "
            "ratios, print a table and write the plot sigmadecomp_demo.png."
        ),
    )
    demo.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."),
                      help="folder for sigmadecomp_demo.png (created if missing; default: .)")
    demo.add_argument("--key", type=int, default=0,
                      help="seed of every random choice (split, init, batches, calibration)")
    demo.add_argument("--quick", action="store_true",
                      help="a tiny, seconds-long run (smoke test), not a meaningful comparison")
    demo.add_argument("--no-progress", dest="progress", action="store_false",
                      help="hide the progress bars")
    demo.set_defaults(run=_run_demo)


def _add_compress(commands) -> None:
    compress = commands.add_parser(
        "compress",
        help="compress a pretrained CIFAR-10 ResNet and evaluate it",
        description=(
            "Calibrate on --calib training images of --data (sampled with --key), decompose every "
            "3x3 conv of the ResNet with --format at --ratio of its parameters (the first conv, "
            "3 input channels, is skipped unless --no-skip-first; the linear classifier is never "
            "compressed), rebuild the model and evaluate it on test_batch of --eval-data. "
            "mean_relative_error is the mean over compressed layers of the relative Σ-error "
            "tr(ΔW cov ΔWᵀ)/tr(W cov Wᵀ) with each layer's calibration cov for parallel "
            "calibration (both norms, so they are comparable); with sequential calibration it is "
            "the cross error E‖W x − W̃ x̂‖²/E‖W x‖², which also contains the drift of each layer's "
            "input caused by the earlier compressed layers."
        ),
    )
    compress.add_argument("--arch", required=True, choices=("resnet20", "resnet32", "resnet56"))
    compress.add_argument("--weights", required=True, type=pathlib.Path,
                          help="PyTorch state_dict in safetensors, e.g. resnet20_cifar10.safetensors")
    compress.add_argument("--data", required=True, type=pathlib.Path,
                          help="CIFAR-10 python-version folder (data_batch_1..5, test_batch)")
    compress.add_argument("--eval-data", type=pathlib.Path, default=None,
                          help="folder holding test_batch for evaluation (default: --data)")
    compress.add_argument("--format", default="tucker2", choices=format_names(),
                          help="decomposition of every compressed conv, from the format registry "
                               "(default: tucker2)")
    compress.add_argument("--norm", default="sigma", choices=("frobenius", "sigma"),
                          help="frobenius: classic ALS/SVD on the weights; sigma: minimise the "
                               "output error on calibration data (default: sigma)")
    compress.add_argument("--ratio", type=_ratio, default=0.5,
                          help="kept parameters / original per compressed layer, in (0, 1] "
                               "(default: 0.5)")
    compress.add_argument("--rank-rule", default="uniform", choices=("uniform", "energy", "vbmf", "global"),
                          help="how each layer's ranks are chosen: uniform (every layer at --ratio or "
                               "the --budget ratio), energy (keep --tau of the Σ-whitened spectrum's "
                               "energy, or the τ that meets --budget), vbmf (EVBMF on the whitened "
                               "unfoldings), global (minimise predicted output damage under --budget; "
                               "a layer may stay dense). Default: uniform")
    compress.add_argument("--budget", type=_budget, default=None,
                          help="whole-model budget params=R or flops=R (R in (0, 1], relative to the "
                               "compressed layers' dense counts); replaces --ratio")
    compress.add_argument("--tau", type=_ratio, default=None,
                          help="kept energy fraction for --rank-rule energy without --budget")
    compress.add_argument("--calib", type=_positive_int, default=256,
                          help="number of calibration images (default: 256)")
    compress.add_argument("--key", type=int, default=0,
                          help="seed for the calibration sample and solver inits (default: 0)")
    compress.add_argument("--max-steps", type=_positive_int, default=None,
                          help="ALS sweeps per layer (default: the solver's own default)")
    compress.add_argument("--skip-first", action=argparse.BooleanOptionalAction, default=True,
                          help="leave the first (3-input-channel) conv dense (default: skip it)")
    compress.add_argument("--batch-size", type=_positive_int, default=256,
                          help="images per batch for calibration and evaluation (default: 256)")
    compress.add_argument("--calibration", default=None, choices=("parallel", "sequential"),
                          help="parallel: every layer's cov from the original network; sequential: "
                               "layers in execution order, each fitted to the inputs it sees in the "
                               "partially compressed network (Σ norm only). Default: sequential for "
                               "--norm sigma (better: see experiments/sequential), parallel for "
                               "frobenius")
    compress.add_argument("--bias-correction", action="store_true",
                          help="shift each compressed layer's mean output on the calibration images "
                               "back to the original's (recommended with sequential only: it hurt "
                               "parallel calibration in experiments/sequential)")
    compress.add_argument("--json", type=pathlib.Path, default=None,
                          help="write the results and the configuration to this JSON file")
    compress.add_argument("--save", type=pathlib.Path, default=None,
                          help="write the compressed model to this folder")
    compress.add_argument("--no-progress", dest="progress", action="store_false",
                          help="hide the progress bars")
    compress.set_defaults(run=_run_compress)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sigmadecomp",
        description="Data-driven (Σ-norm) low-rank decompositions of trained networks, in JAX.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_demo(commands)
    _add_compress(commands)
    return parser


def _run_demo(args) -> int:
    from sigmadecomp._demo import run_demo  # heavy imports only once the command line is valid

    run_demo(out_dir=args.out, key=args.key, quick=args.quick, progress=args.progress)
    return 0


def _check_paths(args) -> None:
    """Fail fast, before any computation, on paths that cannot work."""
    if not args.weights.is_file():
        raise FileNotFoundError(f"--weights: no such file: {args.weights}")
    for flag, folder, name in (("--data", args.data, "data_batch_1"),
                               ("--eval-data", args.eval_data or args.data, "test_batch")):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{flag}: {folder} has no {name}; point it at a CIFAR-10 python-version folder "
                "(data_batch_1..5, test_batch)"
            )


def _run_compress(args) -> int:
    _check_paths(args)
    from sigmadecomp.compress import compress_pretrained, summary

    report = compress_pretrained(
        arch=args.arch, weights=args.weights, data_dir=args.data,
        eval_dir=args.eval_data or args.data, format=args.format, norm=args.norm,
        ratio=args.ratio, calib=args.calib, key=args.key, max_steps=args.max_steps,
        skip_first=args.skip_first, batch_size=args.batch_size, save_dir=args.save,
        calibration=args.calibration, bias_correction=args.bias_correction,
        rank_rule=args.rank_rule, budget=args.budget, tau=args.tau, progress=args.progress,
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    return 0


def _one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 on success).

    >>> main(["--help"])  # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, KeyError, OSError) as error:
        print(f"sigmadecomp {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
