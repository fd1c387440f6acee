"""Benchmark: collecting the input covariance of every conv of a CIFAR ResNet.

Counts the xᵀx flops only, 2·n·d² per layer (n patches, d = cin·kh·kw); the forward pass and the
patch extraction are NOT counted but are inside the measured time. The reference is a square
float32 matmul (HIGHEST precision) timed in the same run, plus the bare gram ``PᵀP`` of one
stage-1-sized patch chunk, the ceiling for the tall-skinny products the covariance does.

    .venv/bin/python benchmarks/covariance.py                 # ResNet-56, 512 CIFAR-10 images
    .venv/bin/python benchmarks/covariance.py --quick         # ResNet-20, 64 images, seconds
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.depth, args.repeats, args.batch_size = 64, 20, 1, 32

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
    rate = flops / seconds / 1e9
    print(f"ResNet-{args.depth}, {weights_note}")
    print(f"{len(covs)} convs, {args.images} CIFAR-10 images in batches of {args.batch_size}, "
          f"accumulation dtype {next(iter(covs.values())).cov.dtype}, device {jax.devices()[0].device_kind}")
    print("flops counted: xᵀx only (2·n·d² per layer); forward pass and patch extraction are timed, not counted")
    print()
    print("| measurement | seconds | GFLOP/s | vs square matmul |")
    print("|---|---|---|---|")
    print(f"| collect_covariances, first call (compile included) | {first:.2f} | {flops / first / 1e9:.1f} | "
          f"{flops / first / 1e9 / mm:.0%} |")
    print(f"| collect_covariances, steady (best of {args.repeats}) | {seconds:.2f} | {rate:.1f} | {rate / mm:.0%} |")
    print(f"| forward pass alone (jit, same batches) | {forward_s:.2f} | | |")
    print(f"| square matmul 1024³ float32 HIGHEST | | {mm:.1f} | 100% |")
    print(f"| bare gram PPᵀ, P 144×8192 float32 | | {gram:.1f} | {gram / mm:.0%} |")
    print()
    print(f"total xᵀx work {flops / 1e9:.1f} GFLOP; target ≥ 30% of the square-matmul rate: "
          f"{'met' if rate / mm >= 0.3 else 'NOT met'} ({rate / mm:.0%})")


if __name__ == "__main__":
    main()
