"""Experiment 1: MNIST MLP 784-1024-1024-10 with its two hidden layers as TT-matrices.

    .venv/bin/python experiments/tt_layers/mnist_mlp.py --data ../shared/data        # full (resumable)
    .venv/bin/python experiments/tt_layers/mnist_mlp.py --smoke --out /tmp/tt        # seconds, for CI

Rows of ``results_mnist.json`` (one key per setting):

* ``dense`` — the MLP trained here (Adam, ``epochs`` passes over the 17 435 training images of the
  data kit), accuracy on the full 10 000-image test set;
* ``fit/{norm}/r{rank}`` — fc1 (784→1024) and fc2 (1024→1024) replaced by ``TTLinear`` fitted with
  ``TTMatrixALS`` (4 cores, modes 784 = 4·4·7·7, 1024 = 4·4·8·8, uniform rank) in the Frobenius norm
  or under Σ (each layer's input ``cov`` from ``calib`` training images of the dense model,
  parallel calibration; ``sigma-seq``: fc2 then fitted in the cross-covariance form to the
  inputs the TT fc1 produces); accuracy with no training, then after ``distill_steps`` Adam steps of
  distillation from the dense model (training images, no labels);
* ``scratch/{init}/r{rank}`` — the same TT-MLP trained from scratch like the dense one, with the
  seed's variance rule (``tt``) or the framework initializer on each core (``naive``);
* ``prior/r{rank}`` — a TT-MLP trained from scratch at a larger rank with the group-lasso rank
  prior, then pruned: the ranks it keeps and its accuracy.

The compression ratio is dense kernel parameters / TT kernel parameters of the two hidden layers
(biases, 2 048 in both, listed separately).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

from common import HERE, Results, accuracy, count_params, distill, predict, train  # noqa: I001

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sigmadecomp as sd
from sigmadecomp.data import load_mnist, mnist_normalize


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: int = 1024
    in_modes: tuple = (4, 4, 7, 7)
    hidden_modes: tuple = (4, 4, 8, 8)
    train_limit: int | None = None
    test_limit: int | None = None
    epochs: int = 3
    batch: int = 128
    lr: float = 1e-3
    calib: int = 4096
    ranks: tuple = (4, 8, 14)
    max_steps: int = 5
    distill_steps: int = 600
    scratch_ranks: tuple = (14,)
    prior_rank: int = 24
    prior_strength: float = 1e-4
    seed: int = 0


SMOKE = Config(hidden=64, hidden_modes=(4, 4, 2, 2), train_limit=512, test_limit=256, epochs=1, calib=128,
               ranks=(3,), max_steps=1, distill_steps=3, scratch_ranks=(3,), prior_rank=4)


class MLP(nnx.Module):
    def __init__(self, fc1, fc2, hidden: int, *, rngs):
        self.fc1, self.fc2 = fc1, fc2
        self.fc3 = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


def dense_mlp(cfg, key) -> MLP:
    rngs = nnx.Rngs(key)
    return MLP(nnx.Linear(784, cfg.hidden, rngs=rngs), nnx.Linear(cfg.hidden, cfg.hidden, rngs=rngs), cfg.hidden, rngs=rngs)


def tt_mlp(cfg, rank: int, init: str, key) -> MLP:
    rngs = nnx.Rngs(key)
    k = len(cfg.in_modes)
    fc1 = sd.TTLinear(784, cfg.hidden, ranks=(rank,) * (k - 1), in_modes=cfg.in_modes, out_modes=cfg.hidden_modes,
                      init=init, rngs=rngs)
    fc2 = sd.TTLinear(cfg.hidden, cfg.hidden, ranks=(rank,) * (k - 1), in_modes=cfg.hidden_modes,
                      out_modes=cfg.hidden_modes, init=init, rngs=rngs)
    return MLP(fc1, fc2, cfg.hidden, rngs=rngs)


def hidden_counts(model: MLP) -> dict:
    kernels = sum(count_params(l) - (l.bias.size if l.bias is not None else 0) for l in (model.fc1, model.fc2))
    return {"hidden_kernel_params": int(kernels), "hidden_bias_params": int(model.fc1.bias.size + model.fc2.bias.size)}


def sequential_fit(dense, solvers, covs, calib):
    """fc1 under its Σ; then fc2 in the cross-covariance form (DESIGN §1): it sees the compressed
    fc1's output ``x̂`` and is fitted to ``min E‖W x − W̃ x̂‖²`` on the calibration images."""
    student, sols = sd.to_tt(dense, {"fc1": solvers["fc1"]}, covs=covs, dtype=jnp.float64)
    x = np.asarray(jax.nn.relu(dense.fc1(jnp.asarray(calib))), np.float64)
    xh = np.asarray(jax.nn.relu(student.fc1(jnp.asarray(calib))), np.float64)
    n = len(calib)
    kernel = dense.fc2.kernel[...].astype(jnp.float64)
    sol = sd.decompose(kernel, solvers["fc2"], cov=jnp.asarray(xh.T @ xh / n), cross_cov=jnp.asarray(x.T @ xh / n),
                       target_cov=jnp.asarray(x.T @ x / n))
    student.fc2 = sd.TTLinear.from_layer(dense.fc2, sd.TTMatrix(tuple(c.astype(jnp.float32) for c in sol.value.cores),
                                                                sol.value.in_modes, sol.value.out_modes))
    return student, {**sols, "fc2": sol}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE.parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", default="", help="run only the rows whose key starts with this (fit, scratch, prior)")
    ap.add_argument("--results", default=None, help="result file name (default results_mnist.json); "
                    "lets a second process measure other rows in parallel")
    args = ap.parse_args()
    cfg = SMOKE if args.smoke else Config()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out / (args.results or ("results_mnist_smoke.json" if args.smoke else "results_mnist.json")), dataclasses.asdict(cfg))

    data = pathlib.Path(args.data) / "mnist"
    x_tr, y_tr = load_mnist(data, "train", limit=cfg.train_limit)
    x_te, y_te = load_mnist(data, "test", limit=cfg.test_limit)
    x_tr, x_te = mnist_normalize(x_tr).reshape(len(x_tr), -1), mnist_normalize(x_te).reshape(len(x_te), -1)
    key = jax.random.key(cfg.seed)

    # --- the dense teacher (cached weights so that every rerun compresses the same network)
    dense = dense_mlp(cfg, 0)
    cache = out / "cache" / ("dense_smoke.npz" if args.smoke else "dense.npz")
    leaves, treedef = jax.tree_util.tree_flatten(nnx.state(dense, nnx.Param))
    if cache.exists():
        stored = np.load(cache)
        nnx.update(dense, jax.tree_util.tree_unflatten(treedef, [jnp.asarray(stored[f"a{i}"]) for i in range(len(leaves))]))
    else:
        t0 = time.time()
        train(dense, x_tr, y_tr, epochs=cfg.epochs, batch=cfg.batch, lr=cfg.lr, key=jax.random.fold_in(key, 1))
        cache.parent.mkdir(exist_ok=True)
        np.savez(cache, **{f"a{i}": np.asarray(a) for i, a in enumerate(jax.tree_util.tree_leaves(nnx.state(dense, nnx.Param)))})
        res.put("dense", {"accuracy": accuracy(dense, x_te, y_te), "train_seconds": time.time() - t0,
                          **hidden_counts(dense), "params": count_params(dense)})
    if "dense" not in res:  # a second result file: the cached teacher, evaluated again
        res.put("dense", {"accuracy": accuracy(dense, x_te, y_te), "train_seconds": None,
                          **hidden_counts(dense), "params": count_params(dense)})
    dense_kernels = res["dense"]["hidden_kernel_params"]
    teacher_logits = predict(dense, x_tr) if "fit".startswith(args.only) else None

    # --- Σ of each hidden layer's input, from calibration images of the training set
    calib = x_tr[np.asarray(jax.random.permutation(jax.random.fold_in(key, 2), len(x_tr)))[: cfg.calib]]
    covs = sd.collect_covariances(dense, [calib[i : i + 512] for i in range(0, len(calib), 512)],
                                  layers=["fc1", "fc2"], progress=False)

    for rank in cfg.ranks:
        for norm in ("frobenius", "sigma", "sigma-seq"):
            name = f"fit/{norm}/r{rank}"
            if name in res or not name.startswith(args.only):
                continue
            k = len(cfg.in_modes)
            solvers = {
                "fc1": sd.TTMatrixALS(ranks=(rank,) * (k - 1), in_modes=cfg.in_modes, out_modes=cfg.hidden_modes, max_steps=cfg.max_steps),
                "fc2": sd.TTMatrixALS(ranks=(rank,) * (k - 1), in_modes=cfg.hidden_modes, out_modes=cfg.hidden_modes, max_steps=cfg.max_steps),
            }
            t0 = time.time()
            if norm == "sigma-seq":
                student, sols = sequential_fit(dense, solvers, covs, calib)
            else:
                student, sols = sd.to_tt(dense, solvers, covs=covs if norm == "sigma" else None, dtype=jnp.float64)
            fit_seconds = time.time() - t0
            errors = {p: float(sd.relative_error(getattr(dense, p).kernel[...].astype(jnp.float64), sd.tt_to_dense(s.value), covs[p].cov)) for p, s in sols.items()}
            acc0 = accuracy(student, x_te, y_te)
            t0 = time.time()
            distill(student, teacher_logits, x_tr, steps=cfg.distill_steps, batch=cfg.batch, lr=cfg.lr, key=jax.random.fold_in(key, 3))
            counts = hidden_counts(student)
            res.put(name, {"norm": norm, "rank": rank, "accuracy_no_training": acc0,
                           "accuracy_distilled": accuracy(student, x_te, y_te), "distill_seconds": time.time() - t0,
                           "fit_seconds": fit_seconds, "sigma_errors": errors,
                           "steps": {p: int(s.num_steps) for p, s in sols.items()},
                           "statuses": {p: s.message for p, s in sols.items()},
                           **counts, "ratio": dense_kernels / counts["hidden_kernel_params"]})

    for rank in cfg.scratch_ranks:
        for init in ("tt", "naive"):
            name = f"scratch/{init}/r{rank}"
            if name in res or not name.startswith(args.only):
                continue
            model, t0 = tt_mlp(cfg, rank, init, 5), time.time()
            losses = train(model, x_tr, y_tr, epochs=cfg.epochs, batch=cfg.batch, lr=cfg.lr, key=jax.random.fold_in(key, 1))
            counts = hidden_counts(model)
            res.put(name, {"init": init, "rank": rank, "accuracy": accuracy(model, x_te, y_te),
                           "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])), "train_seconds": time.time() - t0,
                           **counts, "ratio": dense_kernels / counts["hidden_kernel_params"]})

    name = f"prior/r{cfg.prior_rank}"
    if name not in res and name.startswith(args.only):
        model, t0 = tt_mlp(cfg, cfg.prior_rank, "tt", 6), time.time()
        penalty = lambda m: cfg.prior_strength * (sd.rank_penalty(m.fc1) + sd.rank_penalty(m.fc2))  # noqa: E731
        train(model, x_tr, y_tr, epochs=cfg.epochs, batch=cfg.batch, lr=cfg.lr, key=jax.random.fold_in(key, 1), loss_extra=penalty)
        acc_full = accuracy(model, x_te, y_te)
        kept = {p: sd.kept_ranks(getattr(model, p), rtol=0.05) for p in ("fc1", "fc2")}
        model.fc1, model.fc2 = sd.prune_ranks(model.fc1, rtol=0.05), sd.prune_ranks(model.fc2, rtol=0.05)
        counts = hidden_counts(model)
        res.put(name, {"rank": cfg.prior_rank, "strength": cfg.prior_strength, "accuracy_before_pruning": acc_full,
                       "accuracy": accuracy(model, x_te, y_te), "kept_ranks": kept, "train_seconds": time.time() - t0,
                       **counts, "ratio": dense_kernels / counts["hidden_kernel_params"]})
    res.save()


if __name__ == "__main__":
    main()
