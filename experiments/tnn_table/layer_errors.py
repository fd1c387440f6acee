"""Per-layer relative Σ-error of every format of the table at equal parameter rates (no network
evaluation): a quick look at which format fits ResNet-32's kernels best under Σ.

    python experiments/tnn_table/layer_errors.py --out experiments/tnn_table/layer_errors.json

For each chosen layer, ``cov`` of its input patches comes from the dense model on ``--images``
calibration images; every format is fitted at each ratio with ``max_steps`` sweeps (Σ, parallel
calibration) and its relative Σ-error and parameter count are written to one JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import sigmadecomp as sd  # noqa: E402
from sigmadecomp import compress, formats  # noqa: E402
from sigmadecomp._paths import get_by_path  # noqa: E402
from sigmadecomp.data import cifar10_normalize, load_cifar10, sample  # noqa: E402
from sigmadecomp.models import pretrained_resnet  # noqa: E402
from sigmadecomp.surgery import rank_for_ratio  # noqa: E402

from config import FORMATS  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=pathlib.Path, default=HERE.parents[1] / ".." / "shared" / "data")
    p.add_argument("--out", type=pathlib.Path, default=HERE / "layer_errors.json")
    p.add_argument("--layers", nargs="+", default=["layer1.0.conv1", "layer3.0.conv2"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.05, 0.1])
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--num-modes", nargs="+", type=int, default=[3],
                   help="channel modes m of the reshaped formats (balanced factors of cin and cout; the "
                        "registry's default is 3; the registry's rank rule with those modes). "
                        "Rows are added to --out (same layer, ratio, format and m replaced)")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out only")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    model = pretrained_resnet(32, args.data / "weights" / "resnet32_cifar10.safetensors")
    train_x, _ = load_cifar10(args.data / "cifar10", "train")
    calib = cifar10_normalize(sample(train_x, None, args.images, key=jax.random.key(0)))
    covs = compress.calibrate(model, calib, layers=args.layers, progress=False)
    old = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    rows = []
    for path in args.layers:
        kernel = get_by_path(model, path).kernel[...]
        cov = jax.numpy.asarray(covs[path].cov, kernel.dtype)
        for ratio in args.ratios:
            for fmt, m in [(f, m) for f in args.formats for m in (args.num_modes if f.startswith("r-") else [3])]:
                solver, ranks = solver_at(fmt, m, tuple(kernel.shape), ratio, args.max_steps)
                tic = time.perf_counter()
                sol = sd.decompose(kernel, solver, cov=cov, key=jax.random.key(0))
                error = float(sd.relative_error(kernel, sol.value, cov=cov))
                rows.append(dict(layer=path, kernel_shape=list(kernel.shape), ratio=ratio, format=fmt, ranks=list(ranks),
                                 num_modes=m if fmt.startswith("r-") else None,
                                 params=sd.num_params(sol.value), dense_params=int(kernel.size), relative_sigma_error=error,
                                 status=sd.Status(int(sol.status)).name, seconds=round(time.perf_counter() - tic, 2),
                                 loadavg=os.getloadavg()[0]))
                print(f"{path} {ratio:.0%} {column(rows[-1]):9s} ranks {ranks} params {rows[-1]['params']:6d} "
                      f"Σ-error {error:.4f} ({rows[-1]['status']}, {rows[-1]['seconds']} s)", flush=True)
    new = {_row_key(r) for r in rows}
    rows = [r for r in old if _row_key(r) not in new] + rows
    args.out.write_text(json.dumps(dict(rows=rows, images=args.images, max_steps=args.max_steps, loadavg=os.getloadavg(),
                                         date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
                                    indent=1))


def _row_key(r) -> tuple:
    return r["layer"], r["ratio"], column(r)


def column(r) -> str:
    """The table column of a row: the format, with ``(m=…)`` for a reshaped format at m != 3."""
    m = r.get("num_modes")
    return r["format"] if m in (None, 3) else f"{r['format']} (m={m})"


def solver_at(fmt: str, m: int, kernel_shape: tuple, ratio: float, max_steps: int):
    """``(solver, ranks)`` of ``fmt`` at ``ratio`` of the kernel's parameters: the registry's rank
    rule, for a reshaped format at m != 3 with m balanced factors of cin and cout as its modes."""
    spec = formats.get(fmt)
    if m == 3 or not fmt.startswith("r-"):
        ranks = rank_for_ratio(fmt, kernel_shape, ratio)
        return spec.solver(ranks, max_steps=max_steps), ranks
    from sigmadecomp import _reshaped as rs
    from sigmadecomp.formats._reshaped import reshaped_ranks_for_ratio

    modes = dict(in_modes=rs.balanced_factors(kernel_shape[2], m), out_modes=rs.balanced_factors(kernel_shape[3], m))
    ranks = reshaped_ranks_for_ratio(fmt, kernel_shape, ratio, **modes)
    return spec.solver(ranks, max_steps=max_steps, **modes), ranks


def table(results) -> str:
    """Relative Σ-error (parameters) per layer and ratio, one column per format."""
    rows = results["rows"]
    fmts = sorted({column(r) for r in rows}, key=lambda c: (FORMATS.index(c.split(" ")[0]), c))
    lines = ["| layer | ratio | " + " | ".join(fmts) + " |", "|" + "---|" * (2 + len(fmts))]
    for layer, ratio in dict.fromkeys((r["layer"], r["ratio"]) for r in rows):
        cell = {column(r): r for r in rows if (r["layer"], r["ratio"]) == (layer, ratio)}
        lines.append(f"| {layer} {tuple(cell[fmts[0]]['kernel_shape'])} | {ratio:.0%} | " + " | ".join(
            f"{cell[f]['relative_sigma_error']:.3f} ({cell[f]['params']})" if f in cell else "–" for f in fmts) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
