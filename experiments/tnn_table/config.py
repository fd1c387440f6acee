"""Configurations of the TNN table: ``FULL`` (ResNet-32, the seed's rows and columns) and ``SMOKE``.

One cell is one (format, ratio): Σ-sequential compression of every 3×3 conv but the first
(``skip``) at ``ratio`` of its parameters, test accuracy with no training, then distillation from
the dense model for ``distill_steps`` steps (``sigmadecomp.finetune``) and test accuracy again.
Cells are listed most informative first (the ratios the seed reports for the reshaped rows, the
reshaped rows first), so a run cut by its budget still answers the main question.
"""

from __future__ import annotations

import dataclasses

PLAIN = ("svd", "cp", "tucker2", "tt")
RESHAPED = ("r-cp", "r-tucker", "r-tt", "r-tr")
FORMATS = PLAIN + RESHAPED
RATIOS = (0.02, 0.05, 0.1, 0.2, 0.4)


def _order(formats, ratios):
    first = [r for r in (0.05, 0.1, 0.02, 0.2, 0.4) if r in ratios]
    return tuple((f, r) for r in first for f in [f for f in RESHAPED + PLAIN if f in formats])


@dataclasses.dataclass(frozen=True)
class Config:
    arch: int = 32
    cells: tuple = _order(FORMATS, RATIOS)
    calib_images: int = 512  # from the training batches (key calib_seed)
    test_images: int = 512  # the data kit's whole test batch
    calib_seed: int = 0
    compress_seed: int = 0
    train_seed: int = 0
    max_steps: int = 6  # ALS sweeps per layer, every format
    skip: tuple = ("conv1", "linear")
    only: tuple = ()  # when given, compress only these layers (the smoke run)
    distill_steps: int = 200  # overridden by --distill-steps; 0 = no distillation
    batch_size: int = 64
    learning_rate: float = 0.002  # the fine-tuning experiment's setting (experiments/finetune)
    temperature: float = 4.0
    batch_norm: str = "frozen"
    feature_weight: float = 0.0  # β of the feature-matching term on the residual blocks' outputs
    optimizer: str = "sgd"
    mix: str = "none"  # "none", "mixup" or "cutmix" (sigmadecomp.finetune.mix)


FULL = Config()

SMOKE = Config(arch=20, cells=(("r-tt", 0.4), ("svd", 0.4)), calib_images=16, test_images=32, max_steps=1,
               distill_steps=2, batch_size=8, only=("layer1.0.conv1",))
