"""The ``sigmadecomp`` command line (also ``python -m sigmadecomp``).

Three commands:

* ``sigmadecomp demo`` — nothing to download: train a small CNN on scikit-learn's digits, then
  compress it with classic (Frobenius) and Σ decompositions and print/plot the comparison.
* ``sigmadecomp compress`` — compress a pretrained CIFAR-10 ResNet (``--arch``) or your own Flax
  model (``--model MODULE:FACTORY``, NNX or linen) with one format, norm and parameter ratio,
  calibrated on CIFAR-10, an image folder or an ``.npz``; print a summary and optionally write
  JSON and the compressed model.
* ``sigmadecomp finetune`` — distil a saved compressed model from its dense teacher.

Errors the user can fix (bad values, missing files, unwritable outputs) end in a one-line message
on stderr and a non-zero exit code, never a traceback; the cheap ones are found before any long
work starts. An unexpected internal exception (one not raised by sigmadecomp's own checks) keeps
its traceback, so a bug is never disguised as a user error.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import traceback
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
    if not sep or kind not in ("params", "flops", "latency"):
        raise argparse.ArgumentTypeError(f"expected params=R, flops=R or latency=R, got {text!r}")
    _ratio(value)
    return text


def _arch(text: str) -> str:
    """``resnetN`` for any CIFAR ResNet depth ``N = 6n + 2``."""
    from sigmadecomp.compress import resnet_depth  # noqa: PLC0415 - light module-level import

    try:
        resnet_depth(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _formats(text: str) -> str:
    """A registered format, or several joined by ``+`` (each layer's pick by the global rule)."""
    names = format_names()
    parts = text.split("+")
    unknown = [p for p in parts if p not in names]
    if unknown or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"expected a format of {', '.join(names)}, or distinct ones joined by '+' "
                                         f"(e.g. cp+tucker2); got {text!r}")
    return text


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _ints(count: int):
    def parse(text: str) -> tuple:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated integers, got {text!r}") from None
        if len(values) != count or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected {count} positive comma-separated integers, got {text!r}")
        return values

    return parse


def _floats(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _devices(text: str):
    if text == "all":
        return text
    return _positive_int(text)


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {value}")
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
        help="compress a pretrained CIFAR-10 ResNet or your own Flax model and evaluate it",
        description=(
            "Calibrate on --calib training images of --data (sampled with --key), decompose every "
            "3x3 conv of the ResNet with --format at --ratio of its parameters (the first conv, "
            "3 input channels, is skipped unless --no-skip-first; the linear classifier is never "
            "compressed), rebuild the model and evaluate it on test_batch of --eval-data. "
            "mean_relative_error is the mean over compressed layers of the relative Σ-error "
            "tr(ΔW cov ΔWᵀ)/tr(W cov Wᵀ) with each layer's calibration cov for parallel "
            "calibration (both norms, so they are comparable); with sequential calibration it is "
            "the cross error E‖W x − W̃ x̂‖²/E‖W x‖², which also contains the drift of each layer's "
            "input caused by the earlier compressed layers. With --model (your NNX or linen model), "
            "an image folder or an .npz, the same report comes from sigmadecomp.user_model: the first "
            "conv/dense layer run and the last (the classifier) stay dense, images are scaled to "
            "[0, 1] then normalised with --mean/--std, and unlabelled evaluation images give the "
            "top-1 agreement and the output error only."
        ),
    )
    which = compress.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", type=_arch,
                       help="resnetN, any CIFAR ResNet depth N = 6n+2 (resnet20, resnet32, "
                            "resnet44, resnet56, resnet110, ...); must match --weights")
    which.add_argument("--model", metavar="MODULE:FACTORY",
                       help="your model: a function (imported like a console-script target, "
                            "package.module:function, from sys.path) returning an NNX model with its "
                            "weights loaded, or a tuple (linen module, variables); the first conv/dense "
                            "layer run (unless --no-skip-first) and the last (the classifier) stay dense")
    compress.add_argument("--weights", type=pathlib.Path,
                          help="with --arch: PyTorch state_dict in safetensors, e.g. resnet20_cifar10.safetensors")
    compress.add_argument("--data", required=True, type=pathlib.Path,
                          help="CIFAR-10 python-version folder (data_batch_1..5, test_batch), an image "
                               "folder (one sub-folder per class; sorted names = label ids; PNG/JPEG) or "
                               "an .npz with 'images' (N, H, W, C) and optional 'labels'")
    compress.add_argument("--eval-data", type=pathlib.Path, default=None,
                          help="evaluation images, same kinds as --data (default: --data; for a CIFAR-10 "
                               "folder its test_batch). Without labels only the top-1 agreement and the "
                               "output error are reported")
    compress.add_argument("--image-size", type=_ints(2), default=None, metavar="H,W",
                          help="resize the images of an image folder to H,W (bilinear)")
    compress.add_argument("--mean", type=_floats, default=None, metavar="R,G,B",
                          help="per-channel mean subtracted after scaling pixels to [0, 1] "
                               "(default: none; CIFAR-10's for --arch)")
    compress.add_argument("--std", type=_floats, default=None, metavar="R,G,B",
                          help="per-channel std dividing after the mean (default: none; CIFAR-10's for --arch)")
    compress.add_argument("--devices", default=None, type=_devices, metavar="N|all",
                          help="calibrate data-parallel and solve layers in parallel on N devices (or "
                               "all of jax.devices()); parallel calibration only (default: one device)")
    compress.add_argument("--save-format", default="safetensors", choices=("safetensors", "orbax"),
                          help="file format of --save (default: safetensors)")
    compress.add_argument("--format", default="tucker2", type=_formats, metavar="FORMAT[+FORMAT...]",
                          help="decomposition of every compressed conv, from the format registry: "
                               f"{', '.join(format_names())}; several joined by '+' (e.g. cp+tucker2) "
                               "with --rank-rule global let each layer take the format and ranks that "
                               "damage the output least (default: tucker2)")
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
                          help="whole-model budget params=R, flops=R or latency=R (R in (0, 1], relative to the "
                               "compressed layers' dense counts, or to their summed ms measured here one layer "
                               "at a time at --deploy-batch, --rank-rule global only); replaces --ratio")
    compress.add_argument("--latency-table", type=pathlib.Path, default=None,
                          help="with --budget latency=R: reuse the latency table of an earlier --json report "
                               "(or a JSON file of one table) instead of timing the layers again")
    compress.add_argument("--replan", action="store_true",
                          help="with --rank-rule global and --calibration sequential: re-solve the global "
                               "selection stage by stage during the sequential pass, with each layer's "
                               "candidate errors measured on the inputs it sees then")
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
    _add_finetune_options(compress)
    compress.add_argument("--implementation", default="auto", choices=("auto", "factorized", "dense"),
                          help="auto: time every planned layer here (at --deploy-batch) and run each the faster "
                               "way, factorized or with the kernel rebuilt from the factors; a layer "
                               "neither faster nor smaller when factorized stays dense. factorized/dense: "
                               "force one (default: auto)")
    compress.add_argument("--deploy-batch", type=_positive_int, default=128,
                          help="batch size at which --implementation auto times the layers (default: 128)")
    compress.add_argument("--latency-repeats", type=_nonnegative_int, default=5,
                          help="interleaved rounds timing both models at batch 1 and 128 for latency_ms, "
                               "baseline_latency_ms and speedup in the JSON; 0 skips it (default: 5)")
    compress.add_argument("--json", type=pathlib.Path, default=None,
                          help="write the results and the configuration to this JSON file")
    compress.add_argument("--save", type=pathlib.Path, default=None,
                          help="write the compressed model to this folder")
    compress.add_argument("--no-progress", dest="progress", action="store_false",
                          help="hide the progress bars")
    compress.set_defaults(run=_run_compress)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _add_finetune_options(compress) -> None:
    compress.add_argument("--finetune-epochs", type=int, default=0, metavar="E",
                          help="after compressing, distil the compressed model from the dense one for E "
                               "epochs over the training batches of --finetune-data (default: 0, none); "
                               "the JSON then holds accuracy_before_finetune, finetune_seconds, "
                               "finetune_epochs")
    compress.add_argument("--finetune-lr", type=_positive_float, default=None, metavar="LR",
                          help="peak learning rate of the warm-up + cosine schedule (default: 0.002)")
    compress.add_argument("--finetune-data", type=pathlib.Path, default=None, metavar="DIR",
                          help="CIFAR-10 folder whose data_batch_* files are the fine-tuning images "
                               "(default: --data; its test_batch is never used for training)")
    compress.add_argument("--finetune-validation", type=_non_negative_int, default=0, metavar="N",
                          help="hold N labelled fine-tuning images out and keep the epoch with the best "
                               "--finetune-validation-metric on them, the start included (default: 0, keep "
                               "the last epoch)")
    compress.add_argument("--finetune-validation-metric", choices=("accuracy", "kl"), default=None,
                          help="what --finetune-validation keeps the best of: held-out accuracy (highest) or "
                               "held-out distillation loss T²·KL (lowest; still tells epochs apart when "
                               "held-out accuracy saturates) (default: accuracy)")


def _add_finetune(commands) -> None:
    tune = commands.add_parser(
        "finetune",
        help="distil a model saved by 'compress --save' from its dense teacher",
        description=(
            "Load a compressed model saved by 'sigmadecomp compress --save', distil it from the "
            "pretrained dense ResNet (loss T²·KL(teacher‖student), random crop + flip, SGD with "
            "warm-up + cosine) on the training batches of --data, and evaluate it on test_batch of "
            "--eval-data before and after."
        ),
    )
    tune.add_argument("--model", required=True, type=pathlib.Path, help="folder written by compress --save")
    tune.add_argument("--teacher-arch", required=True, choices=("resnet20", "resnet32", "resnet56"))
    tune.add_argument("--teacher-weights", required=True, type=pathlib.Path,
                      help="the dense model's PyTorch state_dict in safetensors")
    tune.add_argument("--data", required=True, type=pathlib.Path,
                      help="CIFAR-10 folder: data_batch_* are the training images")
    tune.add_argument("--eval-data", type=pathlib.Path, default=None,
                      help="folder holding test_batch for evaluation (default: --data)")
    tune.add_argument("--epochs", type=_positive_int, default=1, help="passes over the images (default: 1)")
    tune.add_argument("--lr", type=_positive_float, default=0.002, help="peak learning rate (default: 0.002)")
    tune.add_argument("--key", type=int, default=0, help="seed of the shuffles and augmentations")
    tune.add_argument("--validation", type=_non_negative_int, default=0, metavar="N",
                      help="hold N labelled training images out and keep the epoch with the best "
                           "--validation-metric on them, the start included (default: 0, keep the last epoch)")
    tune.add_argument("--validation-metric", choices=("accuracy", "kl"), default=None,
                      help="held-out accuracy (highest) or distillation loss T²·KL (lowest) (default: accuracy)")
    tune.add_argument("--checkpoint-dir", type=pathlib.Path, default=None,
                      help="save the training state here every epoch; a rerun resumes from it")
    tune.add_argument("--save", type=pathlib.Path, default=None, help="write the fine-tuned model here")
    tune.add_argument("--json", type=pathlib.Path, default=None, help="write the results to this JSON file")
    tune.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    tune.set_defaults(run=_run_finetune)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sigmadecomp",
        description="Data-driven (Σ-norm) low-rank decompositions of trained networks, in JAX.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_demo(commands)
    _add_compress(commands)
    _add_finetune(commands)
    return parser


def _run_demo(args) -> int:
    from sigmadecomp._demo import run_demo  # heavy imports only once the command line is valid

    run_demo(out_dir=args.out, key=args.key, quick=args.quick, progress=args.progress)
    return 0


def _is_cifar(folder: pathlib.Path) -> bool:
    return (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file()


def _check_paths(args) -> None:
    """Fail fast, before any computation, on paths that cannot work."""
    if args.arch is not None and args.weights is None:
        raise ValueError("--arch needs --weights (the pretrained state_dict in safetensors)")
    if args.model is not None and args.weights is not None:
        raise ValueError("--weights is for --arch; a --model factory loads its own weights")
    if args.weights is not None and not args.weights.is_file():
        raise FileNotFoundError(f"--weights: no such file: {args.weights}")
    for flag, path, name in (("--data", args.data, "data_batch_1"),
                             ("--eval-data", args.eval_data or args.data, "test_batch")):
        if path.is_dir() and _is_cifar(path) and not (path / name).is_file():
            raise FileNotFoundError(f"{flag}: the CIFAR-10 folder {path} has no {name}")
        if not (path.is_dir() or (path.is_file() and path.suffix == ".npz")):
            raise FileNotFoundError(
                f"{flag}: {path} is not a folder or an .npz file; expected a CIFAR-10 python-version "
                "folder (data_batch_1..5, test_batch), an image folder (one sub-folder per class) or "
                "an .npz with 'images' and optional 'labels'"
            )


def _cifar_only(args) -> bool:
    """The original ResNet path: --arch on CIFAR-10 folders, none of the new options."""
    folders = (args.data, args.eval_data or args.data)
    return (args.arch is not None and all(f.is_dir() and _is_cifar(f) for f in folders)
            and args.image_size is None and args.mean is None and args.std is None
            and args.devices is None and args.save_format == "safetensors")


def _run_user_model(args) -> dict:
    from sigmadecomp.user_model import compress_user_model

    model = None
    if args.arch is not None:
        from sigmadecomp.compress import resnet_depth
        from sigmadecomp.models import pretrained_resnet

        model = pretrained_resnet(resnet_depth(args.arch), args.weights)
    return compress_user_model(
        model=model, model_spec=args.model, arch=args.arch, data=args.data, eval_data=args.eval_data,
        image_size=args.image_size, mean=args.mean, std=args.std, format=args.format, norm=args.norm,
        ratio=args.ratio, calib=args.calib, key=args.key, max_steps=args.max_steps,
        skip_first=args.skip_first, batch_size=args.batch_size, save_dir=args.save,
        save_format=args.save_format, calibration=args.calibration,
        bias_correction=args.bias_correction, progress=args.progress, devices=args.devices,
    )


def _check_writable(flag: str, path: pathlib.Path, *, folder: bool) -> None:
    """``path`` can be created (or overwritten): its nearest existing ancestor is a writable
    folder and ``path`` itself is not of the wrong kind."""
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise ValueError(f"{flag}: {path} is {kind}; give a {'folder' if folder else 'file'} path")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag}: cannot create {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot create {path}: {ancestor} is not writable")


def _check_replan_flags(args) -> None:
    if not args.replan:
        return
    if args.rank_rule != "global":
        raise ValueError(f"--replan re-solves a global rank selection: add --rank-rule global --budget params=R "
                         f"(got --rank-rule {args.rank_rule})")
    if args.calibration == "parallel" or (args.calibration is None and args.norm != "sigma"):
        raise ValueError("--replan re-plans during sequential calibration: use --calibration sequential "
                         "(with --norm sigma)")


def _check_validation_flags(metric, validation, metric_flag: str, validation_flag: str) -> None:
    if metric is not None and not validation:
        raise ValueError(f"{metric_flag} chooses the epoch by held-out images: add {validation_flag} N")


def _run_compress(args) -> int:
    if "+" in args.format and (args.rank_rule != "global" or args.replan):
        raise ValueError(f"--format {args.format} tries several formats per layer: use it with --rank-rule global "
                         "--budget params=R (or flops=R), without --replan")
    _check_replan_flags(args)
    _check_validation_flags(args.finetune_validation_metric, args.finetune_validation,
                            "--finetune-validation-metric", "--finetune-validation")
    _check_paths(args)
    if args.finetune_epochs < 0:
        raise ValueError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.finetune_data is not None and not (args.finetune_data / "data_batch_1").is_file():
        raise FileNotFoundError(f"--finetune-data: {args.finetune_data} has no data_batch_1")
    if args.json is not None:
        _check_writable("--json", args.json, folder=False)
    if args.save is not None:
        _check_writable("--save", args.save, folder=True)
    if not _cifar_only(args):
        if args.replan:
            raise ValueError("--replan applies to --arch on CIFAR-10 folders only, for now")
        if args.finetune_epochs:
            raise ValueError("--finetune-* applies to --arch on CIFAR-10 folders only, for now")
        if args.rank_rule != "uniform" or args.budget is not None or args.tau is not None or args.latency_table:
            raise ValueError("--rank-rule/--budget/--tau apply to --arch on CIFAR-10 folders only, for now "
                             "(other models take --ratio)")
        return _finish(args, _run_user_model(args))
    from sigmadecomp.compress import compress_pretrained

    report = compress_pretrained(
        arch=args.arch, weights=args.weights, data_dir=args.data,
        eval_dir=args.eval_data or args.data, format=args.format, norm=args.norm,
        ratio=args.ratio, calib=args.calib, key=args.key, max_steps=args.max_steps,
        skip_first=args.skip_first, batch_size=args.batch_size, save_dir=args.save,
        calibration=args.calibration, bias_correction=args.bias_correction,
        rank_rule=args.rank_rule, budget=args.budget, tau=args.tau, replan=args.replan,
        finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
        finetune_data=args.finetune_data, finetune_validation=args.finetune_validation,
        finetune_validation_metric=args.finetune_validation_metric or "accuracy",
        progress=args.progress, implementation=args.implementation,
        latency_repeats=args.latency_repeats, deploy_batch=args.deploy_batch,
        **({} if args.latency_table is None else {"latency_table": args.latency_table}),
    )
    return _finish(args, report)


def _finish(args, report: dict) -> int:
    from sigmadecomp.compress import summary

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    return 0


def _run_finetune(args) -> int:
    _check_validation_flags(args.validation_metric, args.validation, "--validation-metric", "--validation")
    for flag, path, name in (("--model", args.model, "plan.json"), ("--data", args.data, "data_batch_1"),
                             ("--eval-data", args.eval_data or args.data, "test_batch")):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{flag}: {path} has no {name}")
    if not args.teacher_weights.is_file():
        raise FileNotFoundError(f"--teacher-weights: no such file: {args.teacher_weights}")
    from sigmadecomp.finetune import finetune_saved

    report = finetune_saved(
        model_dir=args.model, teacher_arch=args.teacher_arch, teacher_weights=args.teacher_weights,
        data_dir=args.data, eval_dir=args.eval_data, epochs=args.epochs, learning_rate=args.lr, key=args.key,
        validation=args.validation, validation_metric=args.validation_metric or "accuracy", save_dir=args.save, checkpoint_dir=args.checkpoint_dir, progress=args.progress)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"fine-tuned {report['finetune_epochs']} epoch(s) in {report['finetune_seconds']:.1f} s: accuracy "
          f"{report['accuracy_before_finetune']:.2%} -> {report['accuracy']:.2%} "
          f"(dense teacher {report['baseline_accuracy']:.2%}, {report['num_eval_images']} test images)")
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
    except (ValueError, KeyError, OSError) as error:
        if not _is_user_error(error):
            raise  # an internal error: keep the traceback
        print(f"sigmadecomp {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR


_PACKAGE = pathlib.Path(__file__).resolve().parent


def _is_user_error(error: BaseException) -> bool:
    """A file-system error, or a ValueError/KeyError raised by sigmadecomp's own checks (the
    innermost frame is in the package); anything raised inside JAX, NumPy, Flax, ... is internal."""
    if isinstance(error, OSError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and _PACKAGE in pathlib.Path(frames[-1].filename).resolve().parents
