"""sigmadecomp: data-driven low-rank decompositions of trained neural networks, in JAX.

Instead of the Frobenius distance between weights, the solvers minimise how much a layer's
output changes on real data, ``‖(W − W̃) cov^{1/2}‖_F`` with ``cov = E[x xᵀ]`` of the layer's
input patches. The pieces, in the order data flows:

* :mod:`sigmadecomp.covariance` — streaming ``cov`` statistics, tapped from Flax NNX models;
* :mod:`sigmadecomp.solvers`    — pure-JAX SVD / Tucker-2 / CP solvers, Frobenius and Σ;
* :mod:`sigmadecomp.layers`     — factorized NNX layers built from the solvers' pytrees;
* :mod:`sigmadecomp.surgery`    — plan / apply / verify / save compressed models;
* :mod:`sigmadecomp.latency`    — measured latency and latency-aware implementation choices;
* :mod:`sigmadecomp.models`, :mod:`sigmadecomp.data` — CIFAR ResNets with PyTorch weight import,
  CIFAR-10 / MNIST / digits loaders.
"""

import os as _os

# The solvers' LAPACK calls (Cholesky, eigh, triangular solves on matrices of at most d×d) go
# through OpenBLAS, whose spinning worker threads fight XLA's own CPU thread pool: measured on a
# 2-core machine, a Σ Tucker-2 solve of a 64×64×3×3 kernel took 12 s with OpenBLAS threads and
# 0.2 s without. One OpenBLAS thread is the default unless the user chose otherwise; it only
# takes effect when sigmadecomp is imported before NumPy/SciPy load OpenBLAS.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from sigmadecomp import covariance, data, formats, latency, layers, models, solvers, surgery
from sigmadecomp._factorized import CP, CP3, TR, TT, Factorized, LowRank, Tucker2, Tucker3, num_params, to_dense
from sigmadecomp._ttmatrix import (
    TTMatrix, balanced_modes, max_tt_ranks, padded_modes, tt_num_params, tt_rank_for_ratio, tt_ranks_for_tolerance,
    tt_svd, tt_to_dense,
)
from sigmadecomp._reshaped import RCP, RTR, RTT, RTucker, balanced_factors, default_modes
from sigmadecomp._patches import extract_patches, kernel_to_matrix, matrix_to_kernel
from sigmadecomp.covariance import *  # noqa: F403
from sigmadecomp.layers import *  # noqa: F403
from sigmadecomp.solvers import *  # noqa: F403
from sigmadecomp.surgery import *  # noqa: F403
from sigmadecomp import calibration  # last: it imports sigmadecomp.compress

__version__ = "0.1.0"

__all__ = [
    "CP",
    "CP3",
    "Factorized",
    "LowRank",
    "TR",
    "TT",
    "Tucker2",
    "Tucker3",
    "TTMatrix",
    "RCP",
    "RTR",
    "RTT",
    "RTucker",
    "balanced_factors",
    "default_modes",
    "balanced_modes",
    "max_tt_ranks",
    "padded_modes",
    "tt_num_params",
    "tt_rank_for_ratio",
    "tt_ranks_for_tolerance",
    "tt_svd",
    "tt_to_dense",
    "extract_patches",
    "kernel_to_matrix",
    "matrix_to_kernel",
    "num_params",
    "to_dense",
    *solvers.__all__,
    *covariance.__all__,
    *layers.__all__,
    *surgery.__all__,
]
