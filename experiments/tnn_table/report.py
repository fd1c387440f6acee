"""Merge the shard files of ``main.py`` into the README tables, with the TNN seed's numbers beside ours.

    python experiments/tnn_table/report.py --out experiments/tnn_table/results
    python experiments/tnn_table/report.py --out DIR [DIR …] --readme experiments/tnn_table/README.md

Reads every ``results_*.json`` in the given folders (a later file's cell replaces an earlier one
with the same key only if it is complete), prints the markdown tables, and with ``--readme``
rewrites the part of the README between ``<!-- tables:start -->`` and ``<!-- tables:end -->``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from config import FORMATS, RATIOS  # noqa: E402

# experiments/finetune's per-layer-rank runs (init sigma_seq_global: select_ranks' global rule at
# params=R, then Σ-sequential) get rows of their own, under this name, after their format's
GLOBAL_SUFFIX = " (per-layer ranks)"
ROWS = tuple(x for f in FORMATS for x in (f, f + GLOBAL_SUFFIX))

# The TNN seed's ResNet-32 table, % test accuracy after full retraining on CIFAR-10's 50 000 images
# (dense 93.2%). Plain rows SVD/CP/Tucker-2 as quoted in experiments/finetune (5/10/20%); reshaped
# rows as quoted in issue 15. "–" where we have no number from the seed.
SEED = {
    "svd": {0.05: 83.09, 0.1: 87.27, 0.2: 89.58},
    "cp": {0.05: 84.02, 0.1: 86.93, 0.2: 88.75},
    "tucker2": {0.05: 83.57, 0.1: 86.00, 0.2: 88.03},
    "tt": {0.05: 77.44, 0.1: 82.92, 0.2: 84.13},  # quoted in issue 13 (plain TT)
    "r-cp": {0.02: 85.7, 0.05: 89.86, 0.1: 91.28},
    "r-tucker": {0.02: 61.06, 0.05: 71.34, 0.1: 81.59, 0.2: 87.11},
    "r-tt": {0.02: 78.95, 0.05: 84.26, 0.1: 87.89},
    "r-tr": {0.05: 80.80, 0.2: 90.60},
}
SEED_DENSE = 93.2
MARK = ("<!-- tables:start -->", "<!-- tables:end -->")


def _key(r) -> tuple:
    return (r["arch"], r["format"], r["ratio"], r["max_steps"], _recipe(r))


def _own_last(cells) -> list:
    """Cells with the table's own undistilled runs last, so that their no-training accuracy wins
    over the starting points of the fine-tuning runs when cells are keyed by (format, ratio)."""
    return sorted(cells, key=lambda r: r["distill_steps"] == 0)


def _recipe(r) -> tuple:
    """(steps, batch, lr, feature β, optimizer, mix, CE weight) of a cell; one table row per recipe."""
    return (r["distill_steps"], r.get("batch_size", 64), r.get("learning_rate", 0.002), r.get("feature_weight", 0.0),
            r.get("optimizer", "sgd"), r.get("mix", "none"), r.get("label_weight", 0.0))


def _recipe_text(recipe) -> str:
    steps, batch, lr, beta, opt, mix, ce = recipe
    return (f"{steps} steps × batch {batch} ({steps * batch} images), {opt} lr {lr}"
            + (f", features β {beta}" if beta else "") + (f", {mix}" if mix != "none" else "")
            + (f", CE {ce}" if ce else ""))


errors: list = []  # cells that raised (listed in the report, left out of the tables)


def from_finetune(path: pathlib.Path) -> list:
    """The ResNet-32 Σ-sequential runs of ``experiments/finetune`` distilled with issue 13's
    10-CPU-minute image budget, as cells of this table (one distillation pipeline for both)."""
    if not path.is_file():
        return []
    cells = []
    for r in json.loads(path.read_text())["runs"]:
        if (r["arch"] != 32 or r["init"] not in ("sigma_seq", "sigma_seq_global") or not r.get("cpu_budget")
                or r.get("validation")):
            continue  # (runs with held-out images train on fewer images and keep their best state)
        cells.append(dict(
            arch=32, format=r["format"] + (GLOBAL_SUFFIX if r["init"] == "sigma_seq_global" else ""), ratio=r["ratio"], max_steps=r["max_steps"], distill_steps=r["steps"],
            batch_size=r["batch_size"], learning_rate=r["learning_rate"], feature_weight=r.get("feature_weight", 0.0),
            optimizer=r.get("optimizer", "sgd"), mix=r.get("mix", "none"), label_weight=r.get("label_weight", 0.0),
            conv_param_rate=r["conv_param_rate"], accuracy_dense=r["baseline_accuracy"],
            accuracy_no_training=r["accuracy_compressed"], accuracy_distilled=r["accuracy_finetuned"],
            compress_seconds=r.get("compress_seconds") or 0.0, distill_seconds=r["finetune_seconds"],
            distill="done (experiments/finetune, 10-CPU-minute image budget)", loadavg=r["loadavg"],
            device=r.get("device", "–"), date=r["date"], test_images=r["test_images"], file=str(path)))
    return cells


def merge(folders) -> list:
    cells = {}
    for folder in folders:
        for path in sorted(pathlib.Path(folder).glob("results_*.json")):
            for r in json.loads(path.read_text())["cells"]:
                if "error" in r:
                    errors.append(dict(r, file=str(path)))
                    continue
                old = cells.get(_key(r))
                if old is None or r.get("accuracy_distilled") is not None or old.get("accuracy_distilled") is None:
                    cells[_key(r)] = dict(r, file=str(path))
    return list(cells.values())


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def accuracy_table(cells) -> str:
    """One block per format: the seed's row, ours with no training, ours distilled."""
    distills = sorted({_recipe(r) for r in cells if r["distill_steps"] > 0})
    head = "| format | row | " + " | ".join(f"{r:.0%}" for r in RATIOS) + " |"
    lines = [head, "|" + "---|" * (2 + len(RATIOS))]
    for f in [f for f in ROWS if any(r["format"] == f for r in cells) or SEED.get(f)]:
        mine = {r["ratio"]: r for r in _own_last(cells) if r["format"] == f}
        seed = [f"{SEED[f][r]:.2f}" if r in SEED.get(f, {}) else "–" for r in RATIOS]
        if f in SEED:  # (no seed row for our per-layer-rank variant)
            lines.append(f"| {f} | TNN seed: full retraining, 50 000 images | " + " | ".join(seed) + " |")
        row = [_pct(mine[r]["accuracy_no_training"]) if r in mine else "–" for r in RATIOS]
        lines.append(f"| {f} | ours: Σ-sequential, no training | " + " | ".join(row) + " |")
        for recipe in distills:
            got = {r["ratio"]: r for r in cells if r["format"] == f and _recipe(r) == recipe}
            if not got:
                continue
            row = [_pct(got[r]["accuracy_distilled"]) if r in got else "–" for r in RATIOS]
            lines.append(f"| {f} | ours: + distillation, {_recipe_text(recipe)}, 5 085 images | " + " | ".join(row) + " |")
    return "\n".join(lines)


def rate_table(cells) -> str:
    """Achieved fraction of the conv parameters (the rank rules round down; rank ≥ 1 on small layers)."""
    lines = ["| format | " + " | ".join(f"{r:.0%}" for r in RATIOS) + " |", "|" + "---|" * (1 + len(RATIOS))]
    for f in ROWS:
        mine = {r["ratio"]: r for r in sorted(cells, key=lambda r: r["distill_steps"]) if r["format"] == f}
        if mine:
            lines.append(f"| {f} | " + " | ".join(f"{mine[r]['conv_param_rate']:.3f}" if r in mine else "–" for r in RATIOS) + " |")
    return "\n".join(lines)


def details(cells) -> str:
    lines = ["| cell | compress s | distil s | distillation | load (1 min) | device | date |", "|---|---|---|---|---|---|---|"]
    for r in sorted(cells, key=lambda r: (ROWS.index(r["format"]), r["ratio"], r["distill_steps"])):
        lines.append(f"| {r['format']} {r['ratio']:.0%} (distil {r['distill_steps']}) | {r['compress_seconds']:.0f} | "
                     f"{r['distill_seconds'] if r['distill_seconds'] is not None else '–'} | {r['distill']} | "
                     f"{r['loadavg'][0][0]:.1f} | {r['device']} | {r['date']} |")
    return "\n".join(lines)


def targets(cells) -> str:
    """Issue 15's targets, each met / missed by how much / not measured."""
    out = []
    for f in ("r-cp", "r-tucker", "r-tt", "r-tr"):
        for ratio, goal in sorted(SEED[f].items()):
            got = [r["accuracy_distilled"] for r in cells if r["format"] == f and r["ratio"] == ratio
                   and r["accuracy_distilled"] is not None]
            if not got:
                out.append(f"- {f} {ratio:.0%} distilled ≥ {goal}: not measured")
                continue
            best = 100 * max(got)
            verdict = "met" if best >= goal else f"missed by {goal - best:.2f} points"
            out.append(f"- {f} {ratio:.0%} distilled ≥ {goal}: {best:.2f} ({verdict})")
    cells = _own_last(cells)
    for ratio in (0.02, 0.05, 0.1):
        plain = {r["format"]: r["accuracy_no_training"] for r in cells if r["ratio"] == ratio and r["format"] in SEED
                 and not r["format"].startswith("r-")}
        reshaped = {r["format"]: r["accuracy_no_training"] for r in cells if r["ratio"] == ratio and r["format"].startswith("r-")}
        if not plain or not reshaped:
            out.append(f"- {ratio:.0%}, no training, reshaped Σ formats ahead of the plain ones: not measured")
            continue
        best_plain = max(plain, key=plain.get)
        ahead = sorted(f for f, a in reshaped.items() if a > plain[best_plain])
        out.append(f"- {ratio:.0%}, no training: best plain {best_plain} {100 * plain[best_plain]:.2f}; reshaped "
                   + ", ".join(f"{f} {100 * a:.2f}" for f, a in sorted(reshaped.items()))
                   + f": {len(ahead)} of {len(reshaped)} reshaped ahead of every plain format measured"
                   + f" ({len(plain)} plain measured)")
    return "\n".join(out)


def report(cells) -> str:
    dense = sorted({round(100 * r["accuracy_dense"], 2) for r in cells})
    return "\n\n".join([
        f"Test accuracy (%) on the data kit's {cells[0]['test_images'] if cells else '–'} test images; dense ResNet-"
        f"{cells[0]['arch'] if cells else 32} here: {', '.join(map(str, dense))}% (the seed's dense: {SEED_DENSE}%).",
        accuracy_table(cells), "Achieved fraction of the conv parameters:", rate_table(cells),
        "Targets (issue 15):", targets(cells), "Cells:", details(cells)]
        + ([f"Failed cells ({len(errors)}): " + "; ".join(f"{e['format']} {e['ratio']} ({e['file']}): "
                                                       f"{e['error'].strip().splitlines()[-1]}" for e in errors)]
           if errors else []))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", nargs="+", type=pathlib.Path, default=[HERE / "results"], help="folders of results_*.json")
    p.add_argument("--readme", type=pathlib.Path, default=None, help="README whose tables block is rewritten")
    p.add_argument("--finetune", type=pathlib.Path, default=HERE.parent / "finetune" / "results.json",
                   help="fine-tuning results whose budgeted ResNet-32 Σ-sequential runs fill the distilled rows")
    args = p.parse_args(argv)
    text = report(merge(args.out) + from_finetune(args.finetune))
    print(text)
    if args.readme is not None:
        readme = args.readme.read_text()
        start, end = readme.index(MARK[0]) + len(MARK[0]), readme.index(MARK[1])
        args.readme.write_text(readme[:start] + "\n" + text + "\n" + readme[end:])
    return text


if __name__ == "__main__":
    main()
