"""Configurations of the rank-selection experiment: ``FULL`` (what README.md reports) and ``SMOKE``.

A run is one (arch, format, norm, calibration, rule, budget). ``budget`` is ``"params=R"`` /
``"flops=R"`` relative to the compressed layers' dense counts, or ``"none"`` for ``vbmf`` (which
has no knob). ``global_linear`` is ``global`` with ``damage="linear"`` (the ablation);
``global_replan`` is ``global`` re-solved stage by stage during the sequential pass
(:class:`sigmadecomp.surgery.Replanner`, ``replan_window`` / ``proxy_sweeps``), and
``global_sweeps_replan`` the same for ``global_sweeps``. Runs are listed in priority order: an interrupted run still covers the most
important comparisons (Tucker-2 and SVD, uniform vs global at 0.33 and 0.5) first.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    runs: tuple  # ((arch, format, norm, calibration, rule, budget), ...)
    calib_images: int = 256  # sampled from the training batches with calib_seed
    test_images: int = 512  # the first images of cifar10/test_batch (the dev kit has 512)
    calib_seed: int = 0
    compress_seed: int = 0
    max_steps: int = 10  # ALS sweeps per layer (SVD is closed form)
    grid: tuple = (0.03, 0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.35, 0.42, 0.5, 0.6, 0.7, 0.8, 0.9)
    proxy_sweeps: int = 3  # ALS sweeps per grid point for the CP damage proxy (and per re-planning fit)
    replan_window: int = 2  # global_replan: hull neighbours fitted on each side of the up-front pick
    # Ratios at which CP's ε is measured by sweeps (every distinct rank compiles a solver: few points).
    sweep_grid: tuple = (0.08, 0.16, 0.25, 0.35, 0.5, 0.7)
    skip: tuple = ("conv1", "linear")
    batch_size: int = 256
    latency_batch: int = 128  # latency budget: batch at which layers (table) and models are timed
    latency_repeats: int = 7  # interleaved rounds per median (layers and whole models)
    max_error: float = 0.5  # global rules: the damage model's trust region (select_ranks(max_error=...))
    # latency budgets: the layer tables are timed once and kept in this folder (beside results.json), so the same budget selects from the same table under any later load; None: re-time
    latency_tables: str | None = "latency_tables"


def _block(formats, rules, budgets, arch=20, norm="sigma", calibration="sequential"):
    return [(arch, f, norm, calibration, r, b) for b in budgets for f in formats for r in rules]


_PRIORITY = (
    _block(("tucker2", "svd"), ("uniform", "global"), ("params=0.33", "params=0.5"))
    + _block(("tucker2",), ("global_linear",), ("params=0.33",))  # ablation: DESIGN §7's linear damage
    + _block(("cp",), ("uniform", "global"), ("params=0.33", "params=0.5"))
    + _block(("tucker2", "svd", "cp"), ("vbmf",), ("none",))
    + _block(("tucker2", "svd", "cp"), ("energy",), ("params=0.33", "params=0.5"))
    + _block(("tucker2", "svd", "cp"), ("uniform", "global"), ("params=0.25", "flops=0.5"))
    + _block(("tucker2", "svd", "cp"), ("uniform", "global"), ("flops=0.33", "params=0.15"))
    # Tucker-2's damage curves from sweeps instead of the HOSVD proxy (proxy="sweeps")
    + _block(("tucker2",), ("global_sweeps",), ("params=0.5", "params=0.33", "flops=0.5"))
    # the global selection re-planned stage by stage inside the sequential pass (Replanner)
    + _block(("tucker2", "svd"), ("global_replan",), ("params=0.5", "params=0.33"))
    # the same from the swept Tucker-2 selection: up-front ε and re-planning fits are both ALS sweeps
    + _block(("tucker2",), ("global_sweeps_replan",), ("params=0.33", "params=0.5"))
    + _block(("tucker2", "svd"), ("uniform", "global"), ("params=0.5",), norm="frobenius", calibration="parallel")
    + _block(("tucker2", "svd", "cp"), ("uniform", "global"), ("params=0.33", "params=0.5"), arch=32)
    # measured-latency budget (CPU, batch 128): predicted vs measured whole-model latency
    + _block(("tucker2", "svd", "cp"), ("global",), ("latency=0.5",))
    # 0.5 forced rank 1 in the first stage (factorized layers have a time floor on this CPU): milder budgets
    + _block(("tucker2", "svd", "cp"), ("global",), ("latency=0.7", "latency=0.85"))
    # the deepest network of the data kit (session 6)
    + _block(("tucker2", "cp"), ("uniform", "global"), ("params=0.5",), arch=56)
    # session 9: bias correction in the sequential pass (each compressed layer's mean output restored
    # through the next BatchNorm's running mean), under the global selections and uniform
    + _block(("tucker2",), ("global_sweeps", "global", "uniform"), ("params=0.33", "params=0.5"),
             calibration="sequential+bias")
    + _block(("cp", "svd"), ("global", "uniform"), ("params=0.33",), calibration="sequential+bias")
    # session 9: the rest of the budget grid on ResNet-32, then ResNet-56 at 0.33, then Frobenius at 0.33
    + _block(("tucker2", "svd", "cp"), ("uniform", "global"), ("flops=0.5", "params=0.25"), arch=32)
    + _block(("tucker2", "svd", "cp"), ("uniform", "global"), ("flops=0.33", "params=0.15"), arch=32)
    + _block(("tucker2", "svd", "cp"), ("uniform", "global"), ("params=0.33",), arch=56)
    + _block(("svd",), ("uniform", "global"), ("params=0.5",), arch=56)
    + _block(("tucker2", "svd"), ("uniform", "global"), ("params=0.33",), norm="frobenius", calibration="parallel")
    # session 10: the global rule choosing each layer's format (CP or Tucker-2, both swept) with its ranks
    + _block(("cp+tucker2",), ("global",), ("params=0.33", "params=0.5", "params=0.25"))
    + _block(("cp+tucker2",), ("global",), ("params=0.33", "params=0.5"), arch=32)
)

FULL = Config(runs=tuple(dict.fromkeys(_PRIORITY)))

# For CI: ResNet-20, SVD (closed form, the least compilation), parallel calibration (sequential
# compiles once per layer), three rules, a few images; one sequential re-planned run.
SMOKE = Config(
    runs=(
        (20, "svd", "sigma", "parallel", "uniform", "params=0.5"),
        (20, "svd", "sigma", "parallel", "global", "params=0.5"),
        (20, "svd", "sigma", "parallel", "vbmf", "none"),
        (20, "svd", "sigma", "sequential", "global_replan", "params=0.5"),  # the re-planning path
        (20, "svd", "sigma", "parallel", "global", "latency=0.9"),  # the latency path
    ),
    latency_batch=16,
    latency_repeats=1,
    calib_images=32,
    test_images=64,
    max_steps=2,
    replan_window=1,
)
