"""Tables and target verdicts of the TT-layer experiments, printed from the result files.

    .venv/bin/python experiments/tt_layers/report.py            # markdown tables and verdicts
    .venv/bin/python experiments/tt_layers/report.py --readme   # README.md = README_head.md (tables
                                                                 # at RESULTS) + README_tail.md
"""

from __future__ import annotations

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def _load(name):
    path = HERE / name
    return json.loads(path.read_text()) if path.exists() else None


def _pct(x):
    return "—" if x is None else f"{100 * x:.2f}"


def _sessions(data):
    s = data["sessions"]
    walls = ", ".join(f"{x.get('wall_seconds', 0) / 60:.0f}" for x in s)
    loads = [r.get("loadavg", [0])[0] for r in data["runs"].values()]
    return (f"{s[0]['date'][:10]} from {s[0]['date'][11:16]} UTC, sessions of {walls} min wall (some in parallel), "
            f"{s[-1]['machine']}, 1-min load average {min(loads):.0f}–{max(loads):.0f} during the runs")


def mnist():
    data = _load("results_mnist.json")
    if not data:
        return ["(experiment 1 not run)"]
    extra = _load("results_mnist_scratch.json")  # rows measured by a second, parallel process
    if extra:
        data["runs"] = {**{k: v for k, v in extra["runs"].items() if k != "dense"}, **data["runs"]}
        data["sessions"] += extra["sessions"]
    runs, out = data["runs"], []
    dense = runs["dense"]
    out += [f"**Experiment 1 — MNIST MLP 784-1024-1024-10** ({_sessions(data)})", "",
            f"Dense MLP: {_pct(dense['accuracy'])}% on the 10 000 test images; hidden kernels {dense['hidden_kernel_params']:,} parameters.", "",
            "| hidden layers as | rank | hidden kernel params | × smaller | Σ-error fc1 / fc2 | acc. no training (%) | acc. after distillation (%) |",
            "|---|---|---|---|---|---|---|"]
    fits = sorted((r for k, r in runs.items() if k.startswith("fit/")), key=lambda r: (r["rank"], r["norm"]))
    for r in fits:
        e = r["sigma_errors"]
        out.append(f"| TT-matrix, {r['norm']} fit | {r['rank']} | {r['hidden_kernel_params']:,} | {r['ratio']:.0f} | "
                   f"{e['fc1']:.3f} / {e['fc2']:.3f} | {_pct(r['accuracy_no_training'])} | {_pct(r['accuracy_distilled'])} |")
    for k, r in sorted(runs.items()):
        if k.startswith("scratch/"):
            out.append(f"| TT-MLP from scratch, {r['init']} init | {r['rank']} | {r['hidden_kernel_params']:,} | {r['ratio']:.0f} | — | {_pct(r['accuracy'])} (trained) | — |")
        if k.startswith("prior/"):
            out.append(f"| TT-MLP from scratch + group-lasso rank prior (r={r['rank']}), pruned to {r['kept_ranks']} | — | {r['hidden_kernel_params']:,} | {r['ratio']:.0f} | — | {_pct(r['accuracy'])} (trained; {_pct(r['accuracy_before_pruning'])} before pruning) | — |")
    out += ["", "Targets (≥ 50× smaller hidden layers):"]
    ok = [r for r in fits if r["ratio"] >= 50]
    for norm in ("sigma", "frobenius"):
        best = max((r for r in ok if r["norm"] == norm), key=lambda r: r["accuracy_no_training"], default=None)
        if best:
            gap = 100 * (dense["accuracy"] - best["accuracy_no_training"])
            out.append(f"- {norm} fit, no training, best at ≥ 50×: rank {best['rank']} ({best['ratio']:.0f}×), "
                       f"{_pct(best['accuracy_no_training'])}% = {gap:.2f} points below dense "
                       f"(target ≤ 0.5: {'met' if gap <= 0.5 else 'missed'}); after distillation {_pct(best['accuracy_distilled'])}%.")
    scratch = [r for k, r in runs.items() if k.startswith("scratch/tt/") and r["ratio"] >= 50]
    for r in scratch:
        gap = 100 * (dense["accuracy"] - r["accuracy"])
        out.append(f"- from scratch (seed init) at {r['ratio']:.0f}×: {_pct(r['accuracy'])}% = {gap:.2f} points below dense (target ≤ 0.5: {'met' if gap <= 0.5 else 'missed'}).")
    return out


def text():
    data = _load("results_text.json")
    if not data:
        return ["(experiment 2 not run)"]
    runs, out = data["runs"], []
    info = data["sessions"][-1].get("data", {})
    dense = runs["bag/dense"]
    out += [f"**Experiment 2 — fortunes category classifier** ({_sessions(data)}; {len(info.get('categories', []))} categories, "
            f"{info.get('train')} train / {info.get('test')} test quotations)", "",
            f"Embedding-bag + MLP, dense table {dense['table_params']:,} parameters: {_pct(dense['accuracy'])}% test accuracy.", "",
            "| table as | rank | table params | × smaller | freq.-weighted error | acc. no training (%) | acc. after distillation (%) |",
            "|---|---|---|---|---|---|---|"]
    for k, r in sorted(runs.items()):
        if k.startswith("bag/fit/"):
            out.append(f"| TTEmbed, {r['norm']} fit | {r['rank']} | {r['table_params']:,} | {r['ratio']:.0f} | {r['frequency_weighted_error']:.3f} | {_pct(r['accuracy_no_training'])} | {_pct(r['accuracy_distilled'])} |")
        if k.startswith("bag/scratch/"):
            out.append(f"| TTEmbed from scratch | {r['rank']} | {r['table_params']:,} | {r['ratio']:.0f} | — | {_pct(r['accuracy'])} (trained) | — |")
    cands = [(k, r, r.get("accuracy_distilled", r.get("accuracy"))) for k, r in runs.items()
             if k.startswith("bag/") and k != "bag/dense" and r["ratio"] >= 50]
    if cands:
        k, r, acc = max(cands, key=lambda c: c[2])
        gap = 100 * (dense["accuracy"] - acc)
        out += ["", f"Target (table ≥ 50× smaller within 1 point): best ≥ 50× row `{k}` ({r['ratio']:.0f}×) {_pct(acc)}%, "
                f"{gap:.2f} points below dense ({'met' if gap <= 1 else 'missed'})."]
    gru = {k: r for k, r in runs.items() if k.startswith("gru/")}
    if gru:
        out += ["", "| GRU (embedding + GRU, input map dim → 3·hidden) | input-map params | total params | accuracy (%) | tokens/s (forward) |",
                "|---|---|---|---|---|"]
        for k, r in sorted(gru.items()):
            out.append(f"| {k} | {r['input_map_params']:,} | {r['params']:,} | {_pct(r['accuracy'])} | {r['tokens_per_second']:,.0f} |")
        base = gru.get("gru/dense")
        for k, r in sorted(gru.items()):
            if base and k != "gru/dense":
                out.append(f"\n- `{k}`: {base['input_map_params'] / r['input_map_params']:.1f}× fewer input-map parameters, "
                           f"{100 * (base['accuracy'] - r['accuracy']):.2f} points below the dense GRU, "
                           f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}× its tokens/s.")
    return out


def sequences():
    data = _load("results_sequences.json")
    if not data:
        return ["(experiment 3 not run)"]
    runs, out = data["runs"], []
    out += [f"**Experiment 3 — sums of 3 MNIST digits, 784 inputs per step** ({_sessions(data)})", "",
            "| GRU input map | input-map params | × fewer | total params | accuracy (%) | steps/s (forward) |", "|---|---|---|---|---|---|"]
    for k, r in sorted(runs.items()):
        out.append(f"| {k} | {r['input_map_params']:,} | {r['input_map_ratio']:.0f} | {r['params']:,} | {_pct(r['accuracy'])} | {r['steps_per_second']:,.0f} |")
    dense = runs.get("dense")
    for k, r in sorted(runs.items()):
        if k != "dense" and dense and r["input_map_ratio"] >= 100:
            gap = 100 * (dense["accuracy"] - r["accuracy"])
            out.append(f"\n- `{k}`: {r['input_map_ratio']:.0f}× fewer input-map parameters, {gap:.2f} points below the dense GRU "
                       f"(target ≤ 1: {'met' if gap <= 1 else 'missed'}), {r['steps_per_second'] / dense['steps_per_second']:.2f}× its steps/s.")
    return out


if __name__ == "__main__":
    import sys

    tables = "\n".join(mnist() + [""] + text() + [""] + sequences())
    if "--readme" in sys.argv[1:]:
        head, tail = (HERE / "README_head.md").read_text(), (HERE / "README_tail.md").read_text()
        (HERE / "README.md").write_text(head.replace("RESULTS", tables) + tail)
    else:
        print(tables)
