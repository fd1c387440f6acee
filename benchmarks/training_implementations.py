"""Benchmark: distillation throughput of compressed CIFAR ResNets per training implementation.

A factorized layer can train as its chain of small contractions (``"factorized"``) or as one conv
with the dense kernel rebuilt from the factors at every step (``"dense"``); ``"auto"``
(``FinetuneConfig.implementation``, the default) times one forward + backward of each layer both
ways and switches where the other is at least 2× faster. For each format at one parameter ratio,
the same student is distilled for ``--steps`` steps of ``--batch-size`` random images with each
variant, in one process, the variants' order rotated per format; the throughput is the median
images/s over the steps after the first (which holds the compilation). The load average is stored
with every row: read the ratios between variants of the same row.

Factors are a 1-sweep Frobenius fit of the pretrained kernels (their values do not change the time).

    OPENBLAS_NUM_THREADS=1 python benchmarks/training_implementations.py            # ResNet-32, 10%
    OPENBLAS_NUM_THREADS=1 python benchmarks/training_implementations.py --smoke --out /tmp/t.json

Resumable: rows already in ``--out`` (keyed by arch, format, ratio, batch) are skipped.
``--table`` prints the Markdown table of benchmarks/RESULTS.md from the result file.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sigmadecomp as sd  # noqa: E402
from experiments._results import machine, now  # noqa: E402
from sigmadecomp import finetune as ft  # noqa: E402

VARIANTS = ("factorized", "dense", "auto")
FORMATS = ("cp", "tucker2", "svd", "r-cp", "r-tucker", "r-tt", "r-tr")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=pathlib.Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--arch", default="resnet32", choices=sorted(sd.compress.ARCHS))
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "training_implementations.json")
    p.add_argument("--smoke", action="store_true", help="ResNet-20, two formats, batch 8, 3 steps (seconds)")
    p.add_argument("--table", action="store_true", help="print the table from --out only")
    args = p.parse_args(argv)
    if args.smoke:
        args.arch, args.formats, args.batch_size, args.steps = "resnet20", ["cp", "r-cp"], 8, 3
    return args


def load_model(arch: str, data: pathlib.Path):
    weights = data / "weights" / f"{arch}_cifar10.safetensors"
    if weights.exists():
        return sd.models.pretrained_resnet(sd.compress.ARCHS[arch], weights)
    from flax import nnx

    model = sd.models.CifarResNet(sd.compress.ARCHS[arch], rngs=nnx.Rngs(0))
    model.eval()
    return model


def throughput(student, teacher, images, variant: str, batch_size: int) -> dict:
    config = ft.FinetuneConfig(epochs=1, batch_size=batch_size, log_every=1, implementation=variant)
    tic = time.perf_counter()
    run = ft.finetune(student, teacher, images, key=jax.random.key(0), config=config, progress=False)
    rates = [e["images_per_second"] for e in run.history["train"][1:]]
    chosen = run.history["implementations"]
    return dict(images_per_second=round(float(np.median(rates)), 2), wall_seconds=round(time.perf_counter() - tic, 2),
                dense_layers=sum(v == "dense" for v in chosen.values()), layers=len(chosen))


def run(args) -> dict:
    results = json.loads(args.out.read_text()) if args.out.exists() else {"rows": {}}
    teacher = load_model(args.arch, args.data)
    images = np.random.default_rng(0).standard_normal((args.steps * args.batch_size, 32, 32, 3)).astype(np.float32)
    calib = images[: max(16, args.batch_size)]
    for i, fmt in enumerate(args.formats):
        key = f"{args.arch}/{fmt}/{args.ratio}/b{args.batch_size}"
        if key in results["rows"]:
            continue
        student = sd.compress.compress_model(teacher, calib, format=fmt, ratio=args.ratio, norm="frobenius",
                                             key=jax.random.key(0), skip=("conv1", "linear"), max_steps=1,
                                             progress=False).model
        load = os.getloadavg()
        order = VARIANTS[i % 3:] + VARIANTS[: i % 3]
        row = {v: throughput(student, teacher, images, v, args.batch_size) for v in order}
        row.update(loadavg=[load, os.getloadavg()], order=list(order), steps=args.steps,
                   date=now())
        results["rows"][key] = row
        results["machine"] = machine()
        results["jax"] = jax.__version__
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(table_line(key, row), flush=True)
    return results


def table_line(key: str, row: dict) -> str:
    f, d, a = (row[v]["images_per_second"] for v in VARIANTS)
    return (f"| {key} | {f:.1f} | {d:.1f} | {a:.1f} | {d / f:.2f}× | {a / f:.2f}× | {row['auto']['dense_layers']}/"
            f"{row['auto']['layers']} | {row['loadavg'][0][0]:.1f} |")


def table(results: dict) -> str:
    lines = [f"Machine: {results.get('machine', '?')}, jax {results.get('jax', '?')}.", "",
             "| arch/format/ratio/batch | factorized img/s | dense img/s | auto img/s | dense / factorized | "
             "auto / factorized | layers trained dense (auto) | load (1 min) |", "|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [table_line(k, r) for k, r in results["rows"].items()])


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    print(table(run(args)))


if __name__ == "__main__":
    main()
