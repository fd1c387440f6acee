"""CIFAR-10 in the official "python version" pickle format (``cifar-10-batches-py``).

Each batch file is a pickled dict with ``data`` (uint8 ``(N, 3072)``: 1024 red, 1024 green,
1024 blue values, each a row-major 32×32 plane) and ``labels`` (N ints). Unpickling is restricted to
the few classes these files use, so a tampered file cannot run code.
"""

from __future__ import annotations

import pathlib
import pickle

import numpy as np

from sigmadecomp.data._errors import corrupt, require_file

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "cifar10_normalize", "load_cifar10"]

CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)
_FORMAT = "a CIFAR-10 python-version batch (pickled dict with b'data' uint8 (N, 3072) and b'labels')"
_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _field(batch: dict, name: str):
    """Official files (pickled by Python 2) have bytes keys; re-pickled copies may have str keys."""
    for key in (name.encode(), name):
        if key in batch:
            return batch[key]
    raise KeyError(name)


def _read_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    require_file(path, _FORMAT)
    try:
        with path.open("rb") as f:
            batch = _SafeUnpickler(f, encoding="bytes").load()
        data, labels = np.asarray(_field(batch, "data")), np.asarray(_field(batch, "labels"))
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise corrupt(path, _FORMAT, f"{type(err).__name__}: {err}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise corrupt(path, _FORMAT, f"data has dtype {data.dtype} and shape {data.shape}")
    if labels.shape != (data.shape[0],) or (labels.size and not 0 <= labels.min() <= labels.max() <= 9):
        raise corrupt(path, _FORMAT, f"labels have shape {labels.shape} for {data.shape[0]} images "
                                     "or values outside 0..9")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes (C, H, W) → NHWC
    return np.ascontiguousarray(images), labels.astype(np.int32)


def load_cifar10(
    directory: str | pathlib.Path, split: str = "train", *, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 32, 32, 3)`` (NHWC) and labels ``int32 (N,)`` of a CIFAR-10 split.

    ``directory`` holds the official ``data_batch_1..5`` (``split="train"``) and ``test_batch``
    (``split="test"``) files, of any size. ``limit`` keeps the first ``limit`` images, in file
    order, and stops reading batches once it has them.

    >>> images, labels = load_cifar10("../shared/data/cifar10", "test", limit=4)  # doctest: +SKIP
    >>> images.shape, images.dtype, labels.tolist()  # doctest: +SKIP
    ((4, 32, 32, 3), dtype('uint8'), [3, 8, 8, 0])
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    parts, count = [], 0
    for name in _SPLITS[split]:
        if limit is not None and count >= limit and parts:  # read one batch even for limit=0
            break
        images, labels = _read_batch(pathlib.Path(directory) / name)
        parts.append((images, labels))
        count += len(labels)
    images = np.concatenate([p[0] for p in parts])[:limit]
    labels = np.concatenate([p[1] for p in parts])[:limit]
    return images, labels


def cifar10_normalize(images) -> np.ndarray:
    """``uint8 (N, 32, 32, 3)`` → float32: pixels / 255, then per-channel (x − mean) / std with
    mean ``(0.485, 0.456, 0.406)`` and std ``(0.229, 0.224, 0.225)`` (what the CIFAR ResNets expect).

    >>> x = cifar10_normalize(np.full((1, 32, 32, 3), 255, np.uint8))
    >>> x.dtype, [round(float(v), 4) for v in x[0, 0, 0]]
    (dtype('float32'), [2.2489, 2.4286, 2.64])
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"cifar10_normalize expects uint8 NHWC images (N, H, W, 3) straight from load_cifar10, "
            f"got dtype {images.dtype} shape {images.shape}; normalise raw pixels only once"
        )
    mean = np.asarray(CIFAR10_MEAN, np.float32)
    std = np.asarray(CIFAR10_STD, np.float32)
    return (images.astype(np.float32) / np.float32(255) - mean) / std
