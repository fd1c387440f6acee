"""Benchmark: two-device (data-parallel) calibration of a CIFAR ResNet against one device.

Runs in one process with two XLA devices (``--xla_force_host_platform_device_count=2`` on CPU,
set below before JAX starts; on a machine with two accelerators the real devices are used). For
each dtype it computes the covariances of every conv with ``devices=None`` (one device) and
``devices="all"``, in alternating order (one, two, one, two, ...), and records:

* the largest relative difference of every layer's ``cov`` (max |Δ| / max |cov|), its ``mean``
  and whether the counts agree (float64: bit-identical or rounding; float32: compensated sums);
* the best and median wall time of each variant after one warm-up (compilation) call, and the ratio.

Results go to one JSON file keyed by model, images and dtype, with the date, the devices and
``os.getloadavg()`` before and after each measurement (this machine is shared: read the ratios,
not the seconds).

    .venv/bin/python benchmarks/multidevice.py                 # ResNet-56, 512 CIFAR-10 images
    .venv/bin/python benchmarks/multidevice.py --smoke         # ResNet-8, 32 images, seconds
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "--real-devices" not in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=2").strip()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _images(data: pathlib.Path, count: int) -> np.ndarray:
    from sigmadecomp.data import cifar10_normalize, load_cifar10

    if (data / "cifar10" / "data_batch_1").is_file():
        return cifar10_normalize(load_cifar10(data / "cifar10", "train", limit=count)[0])
    return np.random.default_rng(0).standard_normal((count, 32, 32, 3)).astype(np.float32)


def _model(depth: int, data: pathlib.Path):
    from flax import nnx

    from sigmadecomp.models import CifarResNet, pretrained_resnet

    weights = data / "weights" / f"resnet{depth}_cifar10.safetensors"
    if weights.is_file():
        return pretrained_resnet(depth, weights), str(weights)
    return CifarResNet(depth, rngs=nnx.Rngs(0)), "random weights"


def _collect(model, images, batch_size, dtype, devices):
    import sigmadecomp as sd

    stream = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    covs = sd.collect_covariances(model, stream, progress=False, dtype=dtype, devices=devices)
    jax.block_until_ready(covs)
    return covs


def _differences(one: dict, two: dict) -> dict:
    cov = max(float(jnp.max(jnp.abs(one[p].cov - two[p].cov)) / jnp.max(jnp.abs(one[p].cov))) for p in one)
    mean = max(float(jnp.max(jnp.abs(one[p].mean - two[p].mean))) for p in one)
    identical = all(bool(jnp.array_equal(one[p].cov, two[p].cov)) for p in one)
    counts = all(float(one[p].count) == float(two[p].count) for p in one)
    return dict(max_rel_cov_diff=cov, max_abs_mean_diff=mean, bit_identical=identical, counts_equal=counts,
                layers=len(one))


def measure(depth: int, count: int, batch_size: int, dtype: str, repeats: int, data: pathlib.Path) -> dict:
    model, weights = _model(depth, data)
    images = _images(data, count)
    times = {"one": [], "two": []}
    load = [os.getloadavg()]
    results = {}
    for rep in range(repeats + 1):  # rep 0: warm-up (compilation), not timed
        for name, devices in (("one", None), ("two", "all")) if rep % 2 else (("two", "all"), ("one", None)):
            start = time.perf_counter()
            results[name] = _collect(model, images, batch_size, dtype, devices)
            if rep:
                times[name].append(time.perf_counter() - start)
    load.append(os.getloadavg())
    row = dict(model=f"resnet{depth}", weights=weights, images=count, batch_size=batch_size, dtype=dtype,
               repeats=repeats, devices=[str(d) for d in jax.devices()], platform=jax.devices()[0].platform,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               loadavg_before=load[0], loadavg_after=load[1],
               seconds_one_best=min(times["one"]), seconds_two_best=min(times["two"]),
               seconds_one_median=statistics.median(times["one"]),
               seconds_two_median=statistics.median(times["two"]),
               **_differences(results["one"], results["two"]))
    row["speedup_best"] = row["seconds_one_best"] / row["seconds_two_best"]
    row["speedup_median"] = row["seconds_one_median"] / row["seconds_two_median"]
    return row


def table(rows: list) -> str:
    """The markdown table of benchmarks/RESULTS.md, printed from the result file."""
    lines = ["| model | images | dtype | devices | 1 device best / median (s) | 2 devices best / median (s) | "
             "speed-up (best) | max rel. cov diff | bit-identical | load avg (1 min, before → after) | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['images']} | {r['dtype']} | {', '.join(r['devices'])} | "
            f"{r['seconds_one_best']:.2f} / {r['seconds_one_median']:.2f} | "
            f"{r['seconds_two_best']:.2f} / {r['seconds_two_median']:.2f} | {r['speedup_best']:.2f}× | "
            f"{r['max_rel_cov_diff']:.1e} | {'yes' if r['bit_identical'] else 'no'} | "
            f"{r['loadavg_before'][0]:.1f} → {r['loadavg_after'][0]:.1f} | {r['date']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--data", type=pathlib.Path, default=ROOT / ".." / "shared" / "data")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "multidevice_results.json")
    parser.add_argument("--smoke", action="store_true", help="ResNet-8, 32 images, 1 repeat")
    parser.add_argument("--real-devices", action="store_true", help="use the machine's devices as they are")
    parser.add_argument("--table", action="store_true", help="print the results table and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    if args.smoke:
        args.depth, args.images, args.batch_size, args.repeats = 8, 32, 16, 1
    jax.config.update("jax_enable_x64", True)
    if len(jax.devices()) < 2:
        raise SystemExit(f"needs two devices; JAX sees {jax.devices()}")
    rows = json.loads(args.out.read_text()) if args.out.is_file() else []
    for dtype in args.dtypes.split(","):
        key = dict(model=f"resnet{args.depth}", images=args.images, batch_size=args.batch_size, dtype=dtype,
                   platform=jax.devices()[0].platform)
        if any(all(r.get(k) == v for k, v in key.items()) for r in rows):
            print("done already:", key)
            continue
        row = measure(args.depth, args.images, args.batch_size, dtype, args.repeats, args.data)
        print(json.dumps(row))
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
