"""Configurations of the fine-tuning experiment: ``FULL`` (the table in README.md) and ``SMOKE``.

One run is one (arch, format, ratio, init). Every run measures three accuracies on the same
compressed model: as compressed, after BatchNorm re-estimation on the calibration images (no
training), and after distillation with the same fixed budget of ``steps`` × ``batch_size`` images.
Runs are listed most informative first, so a partial run still answers the main question.
"""

from __future__ import annotations

import dataclasses

# "sigma_seq": Σ-ALS, sequential calibration (the package's default); "sigma_par": Σ-ALS, every
# layer's cov from the original network; "frobenius": classic ALS/HOOI/SVD on the weights;
# "random": the Frobenius model's architecture with every factor redrawn at random;
# "sigma_seq_global": Σ-sequential with every layer's ranks chosen by
# ``select_ranks(rule="global", budget="params=<ratio>")`` (issue 12) instead of one ratio per layer.
INITS = ("sigma_seq", "frobenius", "random", "sigma_par")
ALL_INITS = ("sigma_seq", "sigma_seq_global", "sigma_par", "frobenius", "random")  # the order tables list them
# global ranks: candidate ratios relative to the cell's rate, and ALS sweeps per damage-proxy point (CP)
GLOBAL_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
GLOBAL_PROXY_SWEEPS = 3


@dataclasses.dataclass(frozen=True)
class Config:
    arch: int = 32
    # (format, ratio, init) in the order they run: tucker2 at 10% and 20% for the three main
    # inits, then Σ parallel, then CP and SVD, then 5%.
    runs: tuple = tuple(
        [("tucker2", r, i) for r in (0.1, 0.2) for i in INITS[:3]]
        + [("tucker2", r, "sigma_par") for r in (0.1, 0.2)]
        + [(f, r, i) for f in ("cp", "svd") for r in (0.1, 0.2) for i in INITS[:3]]
        + [(f, 0.05, i) for f in ("tucker2", "cp", "svd") for i in INITS[:3]]
    )
    calib_images: int = 512  # from the training batches, key calib_seed; also used for BN re-estimation
    test_images: int = 512
    calib_seed: int = 0
    compress_seed: int = 0
    train_seed: int = 0
    max_steps: int = 6  # ALS sweeps per layer (Tucker-2, CP); the same for every norm
    skip: tuple = ("conv1", "linear")
    # The distillation budget: the same number of steps for every init (equal work; wall time is
    # recorded per run, with the load average).
    steps: int = 48
    batch_size: int = 64
    learning_rate: float = 0.002
    temperature: float = 4.0
    # "frozen": BN running statistics fixed during distillation (training-mode BN was measured
    # first, with 10 sweeps: it collapsed the Σ-sequential model from 53.9% to 9.2% after 12 steps
    # before recovering to 55.5% at 48; that run stays in results.json as bn-update).
    batch_norm: str = "frozen"
    eval_every: int = 12
    label_weight: float = 0.0  # α of the cross-entropy term on the training labels (0: distillation only)
    feature_weight: float = 0.0  # β of the feature-matching term on the residual blocks' outputs
    optimizer: str = "sgd"  # "sgd" (Nesterov) or "adamw"
    mix: str = "none"  # "none", "mixup" or "cutmix" of the training images (the teacher labels the mix)
    # FinetuneConfig's divergence guard (rollback + half the lr when the loss blows up); the runs
    # before session 5 had none (their records carry no divergence_factor).
    divergence_factor: float | None = 2.0
    # FinetuneConfig.balance: equal factor norms per layer before training (session 6, --balance)
    balance: bool = False
    # labelled training images held out (never calibration images; session 8, --validation): the
    # distillation trains on the rest and returns its state with the best accuracy on them, the
    # start included (finetune's keep_best). 0: train on every image, keep the last state.
    validation: int = 0
    # what the held-out images choose by (session 9, --validation-metric): "accuracy" (highest) or
    # "kl" (lowest held-out distillation loss; sigmadecomp.finetune.held_out_metrics)
    validation_metric: str = "accuracy"


FULL = Config()

SMOKE = Config(
    arch=20, runs=(("svd", 0.5, "sigma_seq"),), calib_images=32,
    test_images=64, max_steps=1, steps=2, batch_size=16, eval_every=1,
)
