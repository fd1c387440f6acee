"""Experiment 2: fortune-category classification with TT embeddings and a TT-GRU.

    .venv/bin/python experiments/tt_layers/fortunes_text.py --data ../shared/data     # full (resumable)
    .venv/bin/python experiments/tt_layers/fortunes_text.py --smoke --out /tmp/tt     # seconds, for CI

Data: the ``categories`` largest files of ``fortunes/`` (each quotation ends with a line ``%``;
overstrike backspaces removed); the label is the file name. Split: ``jax.random.permutation(key(0))``
of all quotations, the first ``test_fraction`` is the test set, never used for training, vocabulary
or calibration. Tokens: lower-cased ``[a-z0-9']+`` words; the vocabulary is id 0 = padding, 1 =
unknown, then the most frequent training words up to ``vocab`` ids; quotations are cut to
``max_len`` tokens.

Rows of ``results_text.json``:

* ``bag/dense`` — embedding-bag (masked mean of ``nnx.Embed(vocab, dim)``) + MLP, trained here;
* ``bag/fit/{frobenius,sigma}/r{r}`` — its table replaced by ``TTEmbed`` fitted by TT-matrix ALS,
  Frobenius or under Σ = diag(training token counts, padding excluded); accuracy with no training
  and after ``distill_steps`` of distillation from the dense model;
* ``bag/scratch/r{r}`` — the same model with a ``TTEmbed`` trained from scratch (seed init);
* ``gru/dense`` and ``gru/tt/r{r}`` — embedding + GRU (hidden ``hidden``) whose stacked input map
  ``dim → 3·hidden`` is dense or a ``TTLinear`` (TT-GRU), trained from scratch the same way;
  ``tokens_per_second`` of the forward pass, the two models interleaved in one process.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import pathlib
import re
import time

from common import HERE, Results, accuracy, count_params, distill, predict, train  # noqa: I001

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sigmadecomp as sd
from sigmadecomp.covariance import collect_token_counts


@dataclasses.dataclass(frozen=True)
class Config:
    categories: int = 10
    test_fraction: float = 0.2
    vocab: int = 4096
    vocab_modes: tuple = (16, 16, 16)
    dim: int = 64
    dim_modes: tuple = (4, 4, 4)
    max_len: int = 64
    hidden: int = 128
    gate_modes: tuple = (6, 8, 8)
    epochs: int = 6
    gru_epochs: int = 4
    batch: int = 64
    lr: float = 3e-3
    ranks: tuple = (4, 8)
    gru_ranks: tuple = (4,)
    max_steps: int = 5
    distill_steps: int = 300
    limit: int | None = None
    seed: int = 0


SMOKE = Config(categories=3, vocab=512, vocab_modes=(8, 8, 8), max_len=16, hidden=16, gate_modes=(2, 4, 6),
               epochs=1, gru_epochs=1, ranks=(2,), gru_ranks=(2,), max_steps=1, distill_steps=2, limit=300)


def load_fortunes(directory: pathlib.Path, categories: int, limit=None):
    texts, labels, names = [], [], []
    files = sorted(directory.iterdir(), key=lambda p: (-p.read_text(errors="replace").count("\n%\n"), p.name))
    for label, path in enumerate(files[:categories]):
        raw = re.sub(r".\x08", "", path.read_text(encoding="utf-8", errors="replace"))
        quotes = [q.strip() for q in re.split(r"^%$", raw, flags=re.M) if q.strip()]
        quotes = quotes[:limit] if limit else quotes
        texts += quotes
        labels += [label] * len(quotes)
        names.append(path.name)
    return texts, np.asarray(labels, np.int32), names


def tokenize(texts, vocab_words, max_len):
    index = {w: i + 2 for i, w in enumerate(vocab_words)}
    ids = np.zeros((len(texts), max_len), np.int32)
    for n, text in enumerate(texts):
        toks = [index.get(w, 1) for w in re.findall(r"[a-z0-9']+", text.lower())][:max_len]
        ids[n, : len(toks)] = toks
    return ids


class Bag(nnx.Module):
    def __init__(self, embed, dim, classes, *, rngs):
        self.embed = embed
        self.fc1 = nnx.Linear(dim, dim, rngs=rngs)
        self.fc2 = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, ids):
        mask = (ids > 0).astype(jnp.float32)[..., None]
        bag = jnp.sum(self.embed(ids) * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        return self.fc2(jax.nn.relu(self.fc1(bag)))


class SeqGRU(nnx.Module):
    def __init__(self, embed, gru, hidden, classes, *, rngs):
        self.embed, self.gru = embed, gru
        self.head = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, ids):
        h, _ = self.gru(self.embed(ids), ids > 0)
        return self.head(h)


def tokens_per_second(models: dict, ids, *, repeats: int = 3) -> dict:
    """Forward throughput, the models interleaved round by round (the machine is shared)."""
    fns = {k: nnx.jit(lambda m, x: m(x)) for k in models}
    for k, m in models.items():
        fns[k](m, ids).block_until_ready()
    best = {k: float("inf") for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            fns[k](m, ids).block_until_ready()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: ids.shape[0] * ids.shape[1] / v for k, v in best.items()}  # tokens (time steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE.parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    cfg = SMOKE if args.smoke else Config()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out / ("results_text_smoke.json" if args.smoke else "results_text.json"), dataclasses.asdict(cfg))

    texts, labels, names = load_fortunes(pathlib.Path(args.data) / "fortunes", cfg.categories, cfg.limit)
    key = jax.random.key(cfg.seed)
    order = np.asarray(jax.random.permutation(key, len(texts)))
    n_test = int(cfg.test_fraction * len(texts))
    test, tr = order[:n_test], order[n_test:]
    counter = collections.Counter(w for i in tr for w in re.findall(r"[a-z0-9']+", texts[i].lower()))
    words = [w for w, _ in counter.most_common(cfg.vocab - 2)]
    ids = tokenize(texts, words, cfg.max_len)
    x_tr, y_tr, x_te, y_te = ids[tr], labels[tr], ids[test], labels[test]
    res.data["sessions"][-1]["data"] = {"categories": names, "train": len(tr), "test": len(test),
                                        "unknown_rate_test": float(np.mean(x_te[x_te > 0] == 1))}
    classes, k = len(names), len(cfg.vocab_modes)

    def bag(embed, seed):
        return Bag(embed, cfg.dim, classes, rngs=nnx.Rngs(seed))

    dense = bag(nnx.Embed(cfg.vocab, cfg.dim, rngs=nnx.Rngs(1)), 1)
    t0 = time.time()
    train(dense, x_tr, y_tr, epochs=cfg.epochs, batch=cfg.batch, lr=cfg.lr, key=jax.random.fold_in(key, 1))
    dense_acc, dense_table = accuracy(dense, x_te, y_te), cfg.vocab * cfg.dim
    res.put("bag/dense", {"accuracy": dense_acc, "train_seconds": time.time() - t0, "table_params": dense_table,
                          "params": count_params(dense)})
    teacher = predict(dense, x_tr)
    counts = collect_token_counts(dense, [x_tr[i : i + 512] for i in range(0, len(x_tr), 512)])["embed"]
    counts[0] = 0.0  # padding is masked out of the bag: its row never matters

    for r in cfg.ranks:
        solver = sd.TTMatrixALS(ranks=(r,) * (k - 1), in_modes=cfg.vocab_modes, out_modes=cfg.dim_modes, max_steps=cfg.max_steps)
        for norm in ("frobenius", "sigma"):
            name = f"bag/fit/{norm}/r{r}"
            if name in res:
                continue
            student, sols = sd.to_tt(dense, {"embed": solver}, token_counts={"embed": counts} if norm == "sigma" else None,
                                   dtype=jnp.float64)
            table = dense.embed.embedding[...]
            fitted = sd.tt_to_dense(sols["embed"].value)[: cfg.vocab]
            weighted = float(jnp.sum(counts[:, None] * (fitted - table) ** 2) / jnp.sum(counts[:, None] * table**2))
            acc0 = accuracy(student, x_te, y_te)
            distill(student, teacher, x_tr, steps=cfg.distill_steps, batch=cfg.batch, lr=1e-3, key=jax.random.fold_in(key, 3))
            params = student.embed.counts().params
            res.put(name, {"norm": norm, "rank": r, "accuracy_no_training": acc0, "accuracy_distilled": accuracy(student, x_te, y_te),
                           "frequency_weighted_error": weighted, "table_params": params, "ratio": dense_table / params,
                           "dense_accuracy": dense_acc})
        name = f"bag/scratch/r{r}"
        if name not in res:
            model = bag(sd.TTEmbed(cfg.vocab, cfg.dim, ranks=(r,) * (k - 1), vocab_modes=cfg.vocab_modes,
                                   feature_modes=cfg.dim_modes, rngs=nnx.Rngs(2)), 2)
            train(model, x_tr, y_tr, epochs=cfg.epochs, batch=cfg.batch, lr=cfg.lr, key=jax.random.fold_in(key, 1))
            params = model.embed.counts().params
            res.put(name, {"rank": r, "accuracy": accuracy(model, x_te, y_te), "table_params": params,
                           "ratio": dense_table / params, "dense_accuracy": dense_acc})

    def seq(input_map, seed):
        rngs = nnx.Rngs(seed)
        gru = sd.GRU(input_map, cfg.hidden, rngs=rngs)
        return SeqGRU(nnx.Embed(cfg.vocab, cfg.dim, rngs=rngs), gru, cfg.hidden, classes, rngs=rngs)

    models = {"gru/dense": seq(nnx.Linear(cfg.dim, 3 * cfg.hidden, rngs=nnx.Rngs(3)), 3)}
    for r in cfg.gru_ranks:
        models[f"gru/tt/r{r}"] = seq(sd.TTLinear(cfg.dim, 3 * cfg.hidden, ranks=(r,) * (k - 1), in_modes=cfg.dim_modes,
                                                 out_modes=cfg.gate_modes, variance="glorot", rngs=nnx.Rngs(3)), 3)
    speed = tokens_per_second(models, jnp.asarray(x_te[: 256]))
    for name, model in models.items():
        if name in res:
            continue
        t0 = time.time()
        train(model, x_tr, y_tr, epochs=cfg.gru_epochs, batch=cfg.batch, lr=cfg.lr, key=jax.random.fold_in(key, 4))
        res.put(name, {"accuracy": accuracy(model, x_te, y_te), "train_seconds": time.time() - t0,
                       "input_map_params": count_params(model.gru.input_map), "params": count_params(model),
                       "tokens_per_second": speed[name], "speed_batch": "256 sequences × max_len, forward, jit, best of 3 interleaved"})
    res.save()


if __name__ == "__main__":
    main()
