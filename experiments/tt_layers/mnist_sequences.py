"""Experiment 3: TT-GRU vs GRU on sequences of MNIST images (784 inputs per step).

    .venv/bin/python experiments/tt_layers/mnist_sequences.py --data ../shared/data   # full (resumable)
    .venv/bin/python experiments/tt_layers/mnist_sequences.py --smoke --out /tmp/tt   # seconds, for CI

Task: a sequence shows ``length`` MNIST digits (normalised 28×28 images flattened to 784); the
label is the SUM of the digits (``9·length + 1`` classes), so the GRU must read every image and
carry a running total. ``train_sequences`` sequences are drawn (key ``seed``) from the 17 435
training images of the data kit, ``test_sequences`` from the 10 000 test images.

Rows of ``results_sequences.json``: ``dense`` (GRU whose stacked input map ``784 → 3·hidden`` is
an ``nnx.Linear``) and ``tt/r{r}`` (the same GRU with a ``TTLinear`` input map, modes 784 = 4·4·7·7,
``3·hidden`` = ``gate_modes``), both trained from scratch with the same optimiser, epochs and key:
input-map parameters, total parameters, test accuracy, and forward steps/s (interleaved).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

from common import HERE, Results, accuracy, count_params, train  # noqa: I001

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sigmadecomp as sd
from sigmadecomp.data import load_mnist, mnist_normalize
from fortunes_text import tokens_per_second


@dataclasses.dataclass(frozen=True)
class Config:
    length: int = 3
    hidden: int = 128
    in_modes: tuple = (4, 4, 7, 7)
    gate_modes: tuple = (4, 4, 4, 6)
    train_sequences: int = 60000
    test_sequences: int = 5000
    epochs: int = 4
    batch: int = 64
    lr: float = 2e-3
    ranks: tuple = (4,)
    train_limit: int | None = None
    test_limit: int | None = None
    seed: int = 0


SMOKE = Config(hidden=16, gate_modes=(2, 2, 2, 6), train_sequences=256, test_sequences=128, epochs=1, ranks=(2,),
               train_limit=512, test_limit=256)


class SeqModel(nnx.Module):
    def __init__(self, input_map, hidden, classes, *, rngs):
        self.gru = sd.GRU(input_map, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        h, _ = self.gru(x)
        return self.head(h)


def sequences(images, labels, n, length, key):
    idx = np.asarray(jax.random.randint(key, (n, length), 0, len(images)))
    return images[idx], labels[idx].sum(axis=1).astype(np.int32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE.parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    cfg = SMOKE if args.smoke else Config()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out / ("results_sequences_smoke.json" if args.smoke else "results_sequences.json"), dataclasses.asdict(cfg))
    data = pathlib.Path(args.data) / "mnist"
    x_tr, y_tr = load_mnist(data, "train", limit=cfg.train_limit)
    x_te, y_te = load_mnist(data, "test", limit=cfg.test_limit)
    x_tr, x_te = mnist_normalize(x_tr).reshape(len(x_tr), -1), mnist_normalize(x_te).reshape(len(x_te), -1)
    key = jax.random.key(cfg.seed)
    s_tr, l_tr = sequences(x_tr, y_tr, cfg.train_sequences, cfg.length, jax.random.fold_in(key, 1))
    s_te, l_te = sequences(x_te, y_te, cfg.test_sequences, cfg.length, jax.random.fold_in(key, 2))
    classes, k = 9 * cfg.length + 1, len(cfg.in_modes)

    models = {"dense": SeqModel(nnx.Linear(784, 3 * cfg.hidden, rngs=nnx.Rngs(1)), cfg.hidden, classes, rngs=nnx.Rngs(1))}
    for r in cfg.ranks:
        tt = sd.TTLinear(784, 3 * cfg.hidden, ranks=(r,) * (k - 1), in_modes=cfg.in_modes, out_modes=cfg.gate_modes,
                         variance="glorot", rngs=nnx.Rngs(1))
        models[f"tt/r{r}"] = SeqModel(tt, cfg.hidden, classes, rngs=nnx.Rngs(1))
    speed = tokens_per_second(models, jnp.asarray(s_te[:256]))
    dense_map = count_params(models["dense"].gru.input_map)
    for name, model in models.items():
        if name in res:
            continue
        t0 = time.time()
        losses = train(model, s_tr, l_tr, epochs=cfg.epochs, batch=cfg.batch, lr=cfg.lr, key=jax.random.fold_in(key, 3))
        in_map = count_params(model.gru.input_map)
        res.put(name, {"accuracy": accuracy(model, s_te, l_te), "last_loss": float(np.mean(losses[-50:])),
                       "train_seconds": time.time() - t0, "input_map_params": in_map, "params": count_params(model),
                       "input_map_ratio": dense_map / in_map, "steps_per_second": speed[name],
                       "speed_batch": "256 sequences, forward, jit, best of 3 interleaved; a step = one 784-pixel image"})
    res.save()


if __name__ == "__main__":
    main()
