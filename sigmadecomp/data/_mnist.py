"""MNIST in the official IDX format (``train-images-idx3-ubyte.gz`` and friends).

An IDX file is a big-endian header — magic ``0x00000803`` (images) or ``0x00000801`` (labels),
then the sizes of each dimension as uint32 — followed by the uint8 data. Gzipped files are the
official distribution; uncompressed copies (same name without ``.gz``) are read too.
"""

from __future__ import annotations

import gzip
import pathlib
import zlib

import numpy as np

from sigmadecomp.data._errors import corrupt, require_file

__all__ = ["MNIST_MEAN", "MNIST_STD", "load_mnist", "mnist_normalize"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
_PREFIX = {"train": "train", "test": "t10k"}
_MAGIC = {3: 0x00000803, 1: 0x00000801}  # ndim → magic (type code 0x08 = unsigned byte)


def _idx_path(directory: pathlib.Path, split: str, kind: str) -> pathlib.Path:
    ndim = 3 if kind == "images" else 1
    name = f"{_PREFIX[split]}-{kind}-idx{ndim}-ubyte"
    plain = directory / name
    return plain if plain.is_file() and not (directory / f"{name}.gz").is_file() else directory / f"{name}.gz"


def _read_idx(path: pathlib.Path, ndim: int, limit: int | None) -> np.ndarray:
    fmt = f"an IDX file (magic 0x{_MAGIC[ndim]:08x}, {ndim}-d uint8, optionally gzipped)"
    require_file(path, fmt)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise corrupt(path, fmt, f"{type(err).__name__}: {err}") from None
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise corrupt(path, fmt, f"only {len(raw)} bytes, shorter than the {header}-byte header")
    magic, *dims = np.frombuffer(raw, ">u4", count=1 + ndim).tolist()
    if magic != _MAGIC[ndim]:
        raise corrupt(path, fmt, f"magic number 0x{magic:08x}, expected 0x{_MAGIC[ndim]:08x}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise corrupt(path, fmt, f"header says dims {dims} ({expected} bytes) but the file has {len(raw)}")
    data = np.frombuffer(raw, np.uint8, offset=header).reshape(dims)
    return data[:limit].copy()


def load_mnist(
    directory: str | pathlib.Path, split: str = "train", *, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 28, 28, 1)`` (NHWC) and labels ``int32 (N,)`` of an MNIST split.

    ``directory`` holds the official ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` files (any
    number of rows; headers are validated against the file sizes). ``limit`` keeps the first
    ``limit`` examples.

    >>> images, labels = load_mnist("../shared/data/mnist", "test", limit=3)  # doctest: +SKIP
    >>> images.shape, labels.tolist()  # doctest: +SKIP
    ((3, 28, 28, 1), [7, 2, 1])
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    directory = pathlib.Path(directory)
    images_path, labels_path = _idx_path(directory, split, "images"), _idx_path(directory, split, "labels")
    images, labels = _read_idx(images_path, 3, limit), _read_idx(labels_path, 1, limit)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
                         "labels; the two files must come from the same split")
    if labels.size and labels.max() > 9:
        raise corrupt(labels_path, "an MNIST label file", f"label {labels.max()} outside 0..9")
    return images[..., None], labels.astype(np.int32)


def mnist_normalize(images) -> np.ndarray:
    """``uint8 (N, 28, 28, 1)`` → float32: pixels / 255, then ``(x − 0.1307) / 0.3081`` (the usual
    MNIST mean and std).

    >>> np.round(mnist_normalize(np.zeros((1, 28, 28, 1), np.uint8))[0, 0, 0, 0], 4)
    np.float32(-0.4242)
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(
            f"mnist_normalize expects uint8 NHWC images (N, H, W, 1) straight from load_mnist, "
            f"got dtype {images.dtype} shape {images.shape}; normalise raw pixels only once"
        )
    return (images.astype(np.float32) / np.float32(255) - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
