"""Data loaders for the official CIFAR-10 and MNIST files, normalisation and deterministic batching.

* :func:`load_cifar10`, :func:`cifar10_normalize` — CIFAR-10 python-version batches → uint8 NHWC;
* :func:`load_mnist`, :func:`mnist_normalize` — MNIST IDX (gzip) files → uint8 NHWC;
* :func:`load_images`, :func:`load_image_folder`, :func:`load_npz`, :func:`normalize_images` — a
  user's own images: a folder with one sub-folder per class (Pillow), or an ``.npz``;
* :func:`load_digits` — scikit-learn's 8×8 digits (no download), split with a ``key``;
* :func:`batches`, :func:`sample`, :func:`holdout` — batching, calibration subsets and validation
  splits driven by an explicit ``key``.

Loaders return numpy arrays (host memory); missing or corrupt files raise ``FileNotFoundError`` /
``ValueError`` naming the file and the format expected.
"""

from sigmadecomp.data._batching import batches, holdout, sample
from sigmadecomp.data._cifar10 import CIFAR10_MEAN, CIFAR10_STD, cifar10_normalize, load_cifar10
from sigmadecomp.data._digits import Digits, load_digits
from sigmadecomp.data._images import ImageSet, load_image_folder, load_images, load_npz, normalize_images
from sigmadecomp.data._mnist import MNIST_MEAN, MNIST_STD, load_mnist, mnist_normalize

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Digits",
    "ImageSet",
    "MNIST_MEAN",
    "MNIST_STD",
    "batches",
    "cifar10_normalize",
    "holdout",
    "load_cifar10",
    "load_digits",
    "load_image_folder",
    "load_images",
    "load_mnist",
    "load_npz",
    "mnist_normalize",
    "normalize_images",
    "sample",
]
