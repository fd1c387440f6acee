"""Parallel vs sequential calibration, with and without bias correction (no fine-tuning).

    .venv/bin/python experiments/sequential/main.py                 # ResNet-20, Tucker-2 Σ, ratio 0.5
    .venv/bin/python experiments/sequential/main.py --smoke --out /tmp/seq   # seconds, for CI

Rows (same model, calibration images, plan, solver and key):

* ``parallel``             — ``compress_model(norm="sigma")``: every layer's cov from the original network;
* ``parallel + bias``      — the same, then ``correct_bias`` (layer by layer in execution order);
* ``sequential``           — ``compress_sequential``: layers in execution order, each fitted to
  ``min E‖W x − W̃ x̂‖²`` on the partially compressed network's inputs;
* ``sequential + bias``    — the same with ``bias_correction=True``.

Seconds are wall time of the whole compression (calibration included) and the process CPU time.
The rows run in the order above in one process and jit caches persist, so the first row pays the
solver compilation and ``sequential + bias`` reuses what ``sequential`` compiled (same shapes and
module structure); a last row repeats ``parallel`` warm.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]  # the repository root first (see experiments/sigma_vs_frobenius)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # statistics accumulate in float64; models stay float32

from sigmadecomp import compress  # noqa: E402
from sigmadecomp.calibration import compress_sequential, correct_bias  # noqa: E402
from sigmadecomp.data import cifar10_normalize, load_cifar10, sample  # noqa: E402
from sigmadecomp.models import pretrained_resnet  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    depth: int = 20
    format: str = "tucker2"
    ratio: float = 0.5
    calib_images: int = 512  # sampled from the training batches with calib_seed
    test_images: int = 512
    calib_seed: int = 0
    compress_seed: int = 0
    max_steps: int = 30  # ALS sweeps per layer, as in experiments/sigma_vs_frobenius
    skip: tuple[str, ...] = ("conv1", "linear")
    batch_size: int = 256


FULL = Config()
SMOKE = Config(calib_images=32, test_images=64, max_steps=2, batch_size=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=pathlib.Path, default=HERE.parents[1] / ".." / "shared" / "data",
                   help="data kit with cifar10/ and weights/ (default ../shared/data)")
    p.add_argument("--out", type=pathlib.Path, default=HERE, help="where results.json goes")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    return p.parse_args(argv)


def load(data: pathlib.Path, config: Config):
    model = pretrained_resnet(config.depth, data / "weights" / f"resnet{config.depth}_cifar10.safetensors")
    train_x, _ = load_cifar10(data / "cifar10", "train")
    calib = cifar10_normalize(sample(train_x, None, config.calib_images, key=jax.random.key(config.calib_seed)))
    test_x, test_y = load_cifar10(data / "cifar10", "test", limit=config.test_images)
    return model, calib, (cifar10_normalize(test_x), test_y)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    jax.block_until_ready(jax.tree_util.tree_leaves(out.model if hasattr(out, "model") else out))
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run(model, calib, config: Config) -> list[tuple[str, object, object, float, float]]:
    """``(name, compressed model, Compressed or None, wall s, cpu s)`` for each row."""
    common = dict(format=config.format, ratio=config.ratio, key=jax.random.key(config.compress_seed),
                  skip=config.skip, max_steps=config.max_steps, batch_size=config.batch_size, progress=False)
    par, w1, c1 = timed(lambda: compress.compress_model(model, calib, norm="sigma", **common))
    seq, w2, c2 = timed(lambda: compress_sequential(model, calib, **common))
    seqb, w3, c3 = timed(lambda: compress_sequential(model, calib, bias_correction=True, **common))
    parb, w4, c4 = timed(lambda: correct_bias(model, par.model, calib, plan=par.plan,
                                              batch_size=config.batch_size, progress=False))
    # compiled functions are cached by shape and structure: a repeat shows the warm cost
    again, w5, c5 = timed(lambda: compress.compress_model(model, calib, norm="sigma", **common))
    return [("parallel", par.model, par, w1, c1), ("parallel + bias", parb, None, w1 + w4, c1 + c4),
            ("sequential", seq.model, seq, w2, c2), ("sequential + bias", seqb.model, seqb, w3, c3),
            ("parallel (warm repeat)", again.model, again, w5, c5)]


def machine() -> str:
    models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    return f"{os.cpu_count()}-core CPU, {models[0] if models else platform.processor()}"


def main(argv=None) -> None:
    args = parse_args(argv)
    config = SMOKE if args.smoke else FULL
    model, calib, test = load(args.data, config)
    rows = []
    for name, compressed, result, wall, cpu in run(model, calib, config):
        scores = compress.evaluate_agreement(model, compressed, *test, batch_size=config.batch_size)
        rows.append(dict(calibration=name, **scores, seconds=round(wall, 1), cpu_seconds=round(cpu, 1),
                         mean_relative_error=None if result is None else round(result.mean_relative_error, 4)))
        print(f"{name:18s} acc {scores['accuracy']:.4f} (base {scores['baseline_accuracy']:.4f}) "
              f"agreement {scores['agreement']:.4f} {wall:.1f} s wall {cpu:.1f} s cpu", flush=True)
    print(table(rows))
    meta = dict(config=dataclasses.asdict(config), machine=machine(), jax=jax.__version__,
                date=datetime.date.today().isoformat(), load_average=os.getloadavg(),
                command=" ".join(["python", *sys.argv]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")


def table(rows: list[dict]) -> str:
    lines = ["| calibration | accuracy | agreement | mean rel. error | wall s | CPU s |", "|---|---|---|---|---|---|"]
    for r in rows:
        err = "—" if r["mean_relative_error"] is None else f"{r['mean_relative_error']:.4f}"
        lines.append(f"| {r['calibration']} | {100 * r['accuracy']:.1f}% | {100 * r['agreement']:.1f}% | {err} "
                     f"| {r['seconds']:.1f} | {r['cpu_seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
