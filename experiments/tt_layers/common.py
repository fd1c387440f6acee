"""Shared pieces of the TT-layer experiments: a resumable result file keyed by every setting,
training / evaluation / distillation loops (optax Adam, jitted steps), machine information."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]  # the repository root first

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # statistics and TT fits in float64; models stay float32

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402


class Results:
    """``{"runs": {key: row}, "sessions": [...]}`` in one JSON file; a row is written as soon as it
    is measured, and a rerun skips keys already present (resumable)."""

    def __init__(self, path: pathlib.Path, config: dict):
        self.path = pathlib.Path(path)
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"runs": {}, "sessions": []}
        self.data["sessions"].append({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared), no GPU",
            "loadavg_start": os.getloadavg(), "config": config,
        })
        self.start = time.time()

    def __contains__(self, key: str) -> bool:
        return key in self.data["runs"]

    def __getitem__(self, key: str) -> dict:
        return self.data["runs"][key]

    def put(self, key: str, row: dict) -> None:
        row = dict(row, loadavg=os.getloadavg())
        self.data["runs"][key] = row
        self.save()
        print(key, json.dumps({k: v for k, v in row.items() if not isinstance(v, (list, dict))}), flush=True)

    def save(self) -> None:
        self.data["sessions"][-1]["wall_seconds"] = round(time.time() - self.start, 1)
        self.data["sessions"][-1]["loadavg_end"] = os.getloadavg()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def count_params(module: nnx.Module) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param))))


def _batches(n: int, batch: int, key):
    order = np.asarray(jax.random.permutation(key, n))
    for i in range(0, n - batch + 1, batch):
        yield order[i : i + batch]


def train(model, xs, ys, *, epochs: int, batch: int, lr: float, key, loss_extra=None, forward=None):
    """Adam on cross-entropy (plus ``loss_extra(model)``) for ``epochs`` passes, batches drawn by ``key``.
    ``xs`` may be a tuple of arrays (model inputs), ``forward(model, *inputs)`` defaults to ``model(*inputs)``."""
    xs = xs if isinstance(xs, tuple) else (xs,)
    forward = forward or (lambda m, *a: m(*a))
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, inputs, labels):
        def loss(m):
            logits = forward(m, *inputs)
            value = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return value + (loss_extra(m) if loss_extra is not None else 0.0)

        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    losses = []
    for epoch in range(epochs):
        for idx in _batches(len(ys), batch, jax.random.fold_in(key, epoch)):
            losses.append(float(step(model, opt, tuple(jnp.asarray(x[idx]) for x in xs), jnp.asarray(ys[idx]))))
    return losses


def distill(student, teacher_logits, xs, *, steps: int, batch: int, lr: float, key, temperature: float = 4.0,
            forward=None):
    """DESIGN §8: ``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` on training inputs (no labels)."""
    xs = xs if isinstance(xs, tuple) else (xs,)
    forward = forward or (lambda m, *a: m(*a))
    opt = nnx.Optimizer(student, optax.adam(lr), wrt=nnx.Param)
    t = temperature

    @nnx.jit
    def step(model, opt, inputs, target):
        def loss(m):
            logp = jax.nn.log_softmax(forward(m, *inputs) / t)
            p_t = jax.nn.softmax(target / t)
            return t * t * jnp.mean(jnp.sum(p_t * (jnp.log(p_t + 1e-12) - logp), axis=-1))

        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    n, done = len(teacher_logits), 0
    while done < steps:
        for idx in _batches(n, batch, jax.random.fold_in(key, done)):
            step(student, opt, tuple(jnp.asarray(x[idx]) for x in xs), jnp.asarray(teacher_logits[idx]))
            done += 1
            if done >= steps:
                break


def predict(model, xs, *, batch: int = 1000, forward=None) -> np.ndarray:
    xs = xs if isinstance(xs, tuple) else (xs,)
    forward = forward or (lambda m, *a: m(*a))
    fn = nnx.jit(lambda m, *a: forward(m, *a))
    n = len(xs[0])
    return np.concatenate([np.asarray(fn(model, *(jnp.asarray(x[i : i + batch]) for x in xs))) for i in range(0, n, batch)])


def accuracy(model, xs, ys, **kwargs) -> float:
    return float(np.mean(np.argmax(predict(model, xs, **kwargs), axis=-1) == ys))
