"""Benchmark: collecting the input covariance of every conv of a CIFAR ResNet.

Counts the xᵀx flops only, 2·n·d² per layer (n patches, d = cin·kh·kw); the forward pass and the
patch extraction are NOT counted but are inside the measured time. The reference is a square
float32 matmul (HIGHEST precision) timed in the same run, plus the bare gram ``PᵀP`` of one
stage-1-sized patch chunk, the ceiling for the tall-skinny products the covariance does.

    .venv/bin/python benchmarks/covariance.py                 # ResNet-56, 512 CIFAR-10 images
    .venv/bin/python benchmarks/covariance.py --quick         # ResNet-20, 64 images, seconds

Writes every number, the date and the load average to ``benchmarks/covariance_results.json``
(``--out``) and prints the RESULTS.md section rendered from that file; ``--write-md`` also puts it
into ``benchmarks/RESULTS.md``, ``--table`` re-renders from the file without measuring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HERE = pathlib.Path(__file__).resolve().parent


def _timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (after one warm-up call)."""
    jax.block_until_ready(fn())
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(size: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    f = jax.jit(lambda a: jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST))
    return 2 * size**3 / _timed(lambda: f(a), repeats) / 1e9


def gram_gflops(rows: int, d: int, repeats: int) -> float:
    p = jax.random.normal(jax.random.key(0), (d, rows), jnp.float32)
    f = jax.jit(lambda p: jnp.matmul(p, p.T, precision=jax.lax.Precision.HIGHEST))
    return 2 * rows * d * d / _timed(lambda: f(p), repeats) / 1e9


def load_model(depth: int, data: pathlib.Path):
    from sigmadecomp.models import CifarResNet, pretrained_resnet

    weights = data / "weights" / f"resnet{depth}_cifar10.safetensors"
    if weights.exists():
        return pretrained_resnet(depth, weights), f"pretrained weights from {weights}"
    model = CifarResNet(depth, rngs=nnx.Rngs(0))
    return model, "RANDOM weights (no weights file; the covariance cost does not depend on them)"


def load_images(data: pathlib.Path, count: int) -> np.ndarray:
    from sigmadecomp.data import cifar10_normalize, load_cifar10

    images, _ = load_cifar10(data / "cifar10", "train", limit=count)
    if len(images) < count:
        raise SystemExit(f"only {len(images)} images under {data / 'cifar10'}, asked for {count}")
    return cifar10_normalize(images)


def xtx_flops(covs) -> float:
    """Σ over layers (and groups) of 2·n·d², n = number of patches."""
    total = 0.0
    for c in covs.values():
        groups = 1 if c.cov.ndim == 2 else c.cov.shape[0]
        total += 2.0 * float(c.count) * groups * c.cov.shape[-1] ** 2
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=pathlib.Path("../shared/data"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="ResNet-20, 64 images, 1 repeat")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "covariance_results.json",
                        help="results file (default benchmarks/covariance_results.json)")
    parser.add_argument("--write-md", action="store_true",
                        help="also rewrite the covariance section of benchmarks/RESULTS.md from the results")
    parser.add_argument("--table", action="store_true",
                        help="only print (and with --write-md, write) the section from an existing --out")
    args = parser.parse_args(argv)
    if args.table:
        section = render(json.loads(args.out.read_text()))
        print(section)
        if args.write_md:
            write_results_md(section)
        return
    if args.quick:
        args.images, args.depth, args.repeats, args.batch_size = 64, 20, 1, 32
    load_before = os.getloadavg()

    from sigmadecomp._paths import find_layers
    from sigmadecomp.covariance import collect_covariances

    model, weights_note = load_model(args.depth, args.data)
    x = load_images(args.data, args.images)
    batches = [x[i : i + args.batch_size] for i in range(0, len(x), args.batch_size)]
    convs = [p for p, layer in find_layers(model) if isinstance(layer, nnx.Conv)]

    def collect():
        return collect_covariances(model, batches, layers=convs, progress=False)

    start = time.perf_counter()
    covs = jax.block_until_ready(collect())
    first = time.perf_counter() - start
    seconds = _timed(collect, args.repeats)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, xb: nnx.merge(graphdef, s)(xb))
    forward_s = _timed(lambda: [forward(state, b) for b in batches], args.repeats)

    flops = xtx_flops(covs)
    mm = matmul_gflops(1024, max(args.repeats, 3))
    gram = gram_gflops(8192, 144, max(args.repeats, 3))
    results = dict(
        depth=args.depth, weights=weights_note, convs=len(covs), images=args.images,
        batch_size=args.batch_size, repeats=args.repeats, quick=args.quick,
        dtype=str(next(iter(covs.values())).cov.dtype), device=jax.devices()[0].device_kind,
        xtx_gflop=flops / 1e9, first_seconds=first, steady_seconds=seconds, forward_seconds=forward_s,
        matmul_gflops=mm, gram_gflops=gram, jax=jax.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        load_average_before=load_before, load_average_after=os.getloadavg(), cpus=os.cpu_count(),
    )
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))
    if args.write_md:
        write_results_md(render(results))


MARK_BEGIN, MARK_END = "<!-- covariance:begin -->", "<!-- covariance:end -->"


def render(r: dict) -> str:
    """The RESULTS.md section, from a results file only (every number comes from it)."""
    flops, mm = r["xtx_gflop"], r["matmul_gflops"]
    rate, first = flops / r["steady_seconds"], flops / r["first_seconds"]
    load = ", ".join(f"{x:.1f}" for x in r["load_average_before"])
    return "\n".join([
        f"ResNet-{r['depth']} ({r['weights']}), {r['convs']} convs, {r['images']} CIFAR-10 images in batches of "
        f"{r['batch_size']}, accumulation dtype {r['dtype']}, device {r['device']}, {r['cpus']} CPUs, jax {r['jax']}, "
        f"{r['date']}. Load average (1, 5, 15 min) before the run: {load}"
        + (" — the machine was shared, so absolute times are inflated; the matmul reference was timed in "
           "the same run under the same load, so the ratio column is the comparable number." if
           r["load_average_before"][0] > 0.5 * r["cpus"] else "."),
        f"Flops counted: xᵀx only (2·n·d² per layer, {flops:.1f} GFLOP in total); the forward pass and patch "
        "extraction are timed, not counted. Results file: `benchmarks/covariance_results.json`.",
        "",
        "| measurement | seconds | GFLOP/s | vs square matmul |",
        "|---|---|---|---|",
        f"| collect_covariances, first call (compile included) | {r['first_seconds']:.2f} | {first:.1f} | {first / mm:.0%} |",
        f"| collect_covariances, steady (best of {r['repeats']}) | {r['steady_seconds']:.2f} | {rate:.1f} | "
        f"**{rate / mm:.0%}** |",
        f"| forward pass alone (jit, same batches) | {r['forward_seconds']:.2f} | | |",
        f"| square matmul 1024³ float32 HIGHEST | | {mm:.1f} | 100% |",
        f"| bare gram PPᵀ, P 144×8192 float32 | | {r['gram_gflops']:.1f} | {r['gram_gflops'] / mm:.0%} |",
        "",
        f"Target ≥ 30% of the square-matmul rate in steady state: **{'met' if rate / mm >= 0.3 else 'NOT met'}** "
        f"({rate / mm:.0%}; {first / mm:.0%} including compilation).",
    ])


def write_results_md(section: str, path: pathlib.Path = HERE / "RESULTS.md") -> None:
    """Replace the text between the covariance markers of RESULTS.md with ``section``."""
    text = path.read_text()
    head, rest = text.split(MARK_BEGIN)
    _, tail = rest.split(MARK_END)
    path.write_text(f"{head}{MARK_BEGIN}\n{section}\n{MARK_END}{tail}")


if __name__ == "__main__":
    main()
