"""sigmadecomp: data-driven low-rank decompositions of trained neural networks, in JAX.

Instead of the Frobenius distance between weights, the solvers minimise how much a layer's
output changes on real data, ``‖(W − W̃) cov^{1/2}‖_F`` with ``cov = E[x xᵀ]`` of the layer's
input patches. The pieces, in the order data flows:

* :mod:`sigmadecomp.covariance` — streaming ``cov`` statistics, tapped from Flax NNX models;
* :mod:`sigmadecomp.solvers`    — pure-JAX SVD / Tucker-2 / CP solvers, Frobenius and Σ;
* :mod:`sigmadecomp.layers`     — factorized NNX layers built from the solvers' pytrees;
* :mod:`sigmadecomp.surgery`    — plan / apply / verify / save compressed models;
* :mod:`sigmadecomp.models`, :mod:`sigmadecomp.data` — CIFAR ResNets with PyTorch weight import,
  CIFAR-10 / MNIST / digits loaders.
"""

from sigmadecomp import covariance, data, layers, models, solvers, surgery
from sigmadecomp._factorized import CP, CP3, Factorized, LowRank, Tucker2, num_params, to_dense
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
    "Tucker2",
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
