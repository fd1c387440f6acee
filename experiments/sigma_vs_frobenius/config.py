"""Configurations of the Σ-vs-Frobenius experiment: ``FULL`` (the table in README.md) and ``SMOKE``.

Every run is one (architecture, calibration, format, norm, ratio). ``calibrations`` is an axis so
that sequential calibration (issue 6) can add rows without restructuring: ``"parallel"`` means every
layer's ``cov`` is measured on the uncompressed model, once per architecture, and reused for every
format, norm and ratio.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    archs: tuple[int, ...] = (20, 32, 56)
    formats: tuple[str, ...] = ("svd", "tucker2", "cp")
    norms: tuple[str, ...] = ("frobenius", "sigma")
    ratios: tuple[float, ...] = (0.7, 0.5, 0.33, 0.25)
    calibrations: tuple[str, ...] = ("parallel", "sequential", "sequential+bias")
    # Sequential calibration (issue 6) is Σ-only and, for cost, run at these ratios only.
    sequential_ratios: tuple[float, ...] = (0.5, 0.33)
    calib_images: int = 512  # sampled from the training batches with calib_seed
    test_images: int = 512  # the first images of cifar10/test_batch (the dev kit has 512)
    calib_seed: int = 0
    compress_seed: int = 0  # PRNG key of compress_model (random padding / init of the solvers)
    # ALS sweeps per layer (SVD is closed form). Both norms get the same budget; rtol stops earlier.
    max_steps: tuple[tuple[str, int], ...] = (("tucker2", 30), ("cp", 30), ("tucker3", 30), ("tt", 30),
                                              ("tr", 30))
    # Customary: the first conv (3 input channels) and the classifier stay dense.
    skip: tuple[str, ...] = ("conv1", "linear")
    batch_size: int = 256

    def sweeps(self, format: str) -> int | None:
        return dict(self.max_steps).get(format)

    def runs(self):
        """All run keys in execution order: architecture first, so a partial run covers whole models."""
        for arch in self.archs:
            for calibration in self.calibrations:
                for format in self.formats:
                    for ratio in self.ratios:
                        for norm in self.norms:
                            if calibration == "parallel" or (
                                norm == "sigma" and ratio in self.sequential_ratios
                            ):
                                yield (arch, calibration, format, norm, ratio)


FULL = Config()

# Issue 14: the engine formats, at the ratios, sequential Σ at all three of them.
ENGINE = Config(
    formats=("tucker3", "tt", "tr"),
    ratios=(0.5, 0.33, 0.25),
    calibrations=("parallel", "sequential"),
    sequential_ratios=(0.5, 0.33, 0.25),
)

# For CI: ResNet-20, one format (SVD: closed form, the least compilation), both norms, one ratio,
# few images and sweeps (the sweeps apply when --formats picks an ALS format).
SMOKE = Config(
    archs=(20,),
    formats=("svd",),
    ratios=(0.5,),
    calib_images=32,
    test_images=128,
    max_steps=(("tucker2", 3), ("cp", 3), ("tucker3", 3), ("tt", 3), ("tr", 3)),
)
