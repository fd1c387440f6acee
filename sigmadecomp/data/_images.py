"""A user's own images: an image folder (one sub-folder per class) or an ``.npz`` file.

* :func:`load_image_folder` — ``root/<class>/<image>.png|jpg|...``; the sorted class-folder names
  are the label ids ``0..K-1`` (the ``torchvision.datasets.ImageFolder`` convention), images are
  read with Pillow, converted to RGB (or kept grey when every image is grey) and optionally resized.
* :func:`load_npz` — an ``.npz`` with ``images`` (NHWC, uint8 or float) and optional ``labels``.
* :func:`normalize_images` — pixels to ``[0, 1]`` (uint8 / 255) then ``(x − mean) / std``.
* :func:`load_images` — one entry point for the command line: a CIFAR-10 python folder, an image
  folder or an ``.npz``, detected from the path.

Everything returns host numpy arrays; a bad file raises ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np

from sigmadecomp.data._cifar10 import load_cifar10
from sigmadecomp.data._errors import corrupt, require_file

__all__ = ["IMAGE_SUFFIXES", "ImageSet", "load_image_folder", "load_images", "load_npz", "normalize_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images ``(N, H, W, C)`` (uint8 straight from files, or float from an ``.npz``), labels
    ``int32 (N,)`` or ``None``, and the class names when the source has them."""

    images: np.ndarray
    labels: np.ndarray | None
    classes: tuple = ()
    source: str = ""


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_image(path: pathlib.Path, size: tuple | None, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if size is not None and image.size != (size[1], size[0]):  # Pillow sizes are (W, H)
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise corrupt(path, "an image Pillow can read (PNG, JPEG, ...)", str(err)) from None
    return array[..., None] if array.ndim == 2 else array


def _mode_of(files: list[pathlib.Path]) -> str:
    """``"L"`` when every image is grey (one channel kept), else ``"RGB"``."""
    from PIL import Image

    for path in files:
        try:
            with Image.open(path) as image:
                if image.mode not in ("L", "1", "I;16", "I"):
                    return "RGB"
        except OSError as err:
            raise corrupt(path, "an image Pillow can read (PNG, JPEG, ...)", str(err)) from None
    return "L"


def load_image_folder(root, *, image_size: Sequence[int] | None = None, limit: int | None = None) -> ImageSet:
    """Every image of ``root/<class>/`` as uint8 NHWC, labelled by the sorted class names.

    ``image_size`` ``(H, W)`` resizes (bilinear); without it all images must have one size.
    ``limit`` keeps the first ``limit`` images in (class, file name) order.

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("cat", "dog"):
    ...     (root / name).mkdir()
    ...     Image.new("RGB", (5, 4)).save(root / name / "0.png")
    >>> data = load_image_folder(root, image_size=(8, 8))
    >>> data.images.shape, data.labels.tolist(), data.classes
    ((2, 8, 8, 3), [0, 1], ('cat', 'dog'))
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; expected an image folder with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(label, f) for label, name in enumerate(classes) for f in _image_files(root / name)]
    if not files:
        raise ValueError(f"{root} has no images in class sub-folders (found classes {classes}); expected "
                         f"root/<class>/<image> with suffix in {IMAGE_SUFFIXES}")
    files = files[:limit]
    size = None if image_size is None else tuple(int(s) for s in image_size)
    mode = _mode_of([f for _, f in files])
    arrays = [_read_image(f, size, mode) for _, f in files]
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise ValueError(f"{root}: images have different sizes {shapes[:4]}; give image_size=(H, W) "
                         "(--image-size H,W) to resize them to one")
    labels = np.asarray([label for label, _ in files], np.int32)
    return ImageSet(np.stack(arrays), labels, tuple(classes), str(root))


def load_npz(path, *, limit: int | None = None) -> ImageSet:
    """``images`` (NHWC) and optional ``labels`` (int, one per image) of an ``.npz`` file."""
    path = require_file(pathlib.Path(path), "an .npz file with 'images' (N, H, W, C) and optional 'labels'")
    fmt = "an .npz file with 'images' (N, H, W, C) and optional 'labels' (N,)"
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data:
                raise corrupt(path, fmt, f"it has arrays {sorted(data.files)} but no 'images'")
            images = data["images"][:limit]
            labels = data["labels"][:limit] if "labels" in data else None
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith(str(path)):
            raise
        raise corrupt(path, fmt, str(err)) from None
    if images.ndim != 4 or not (np.issubdtype(images.dtype, np.floating) or images.dtype == np.uint8):
        raise corrupt(path, fmt, f"images have dtype {images.dtype} and shape {images.shape}")
    if labels is not None:
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise corrupt(path, fmt, f"labels have dtype {labels.dtype} and shape {labels.shape} for "
                                     f"{images.shape[0]} images")
        labels = labels.astype(np.int32)
    return ImageSet(images, labels, (), str(path))


def normalize_images(images, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """float32: uint8 pixels divided by 255 (float input is taken as already scaled), then
    per-channel ``(x − mean) / std`` when given (one value per channel, or one for all).

    >>> normalize_images(np.full((1, 1, 1, 3), 255, np.uint8), mean=(0.5,) * 3, std=(0.5,) * 3).tolist()
    [[[[1.0, 1.0, 1.0]]]]
    """
    images = np.asarray(images)
    x = images.astype(np.float32) / np.float32(255) if images.dtype == np.uint8 else images.astype(np.float32)
    channels = x.shape[-1]
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) not in (1, channels):
            raise ValueError(f"{name} has {len(values)} values but the images have {channels} channel(s); "
                             f"give one value per channel")
    if std is not None and min(std) <= 0:
        raise ValueError(f"std must be positive; got {tuple(std)}")
    if mean is not None:
        x = x - np.asarray(mean, np.float32)
    if std is not None:
        x = x / np.asarray(std, np.float32)
    return x


def load_images(path, split: str = "train", *, image_size: Sequence[int] | None = None) -> ImageSet:
    """A CIFAR-10 python folder (``split`` picks ``data_batch_*`` or ``test_batch``), an ``.npz``
    file, or an image folder (``split`` is ignored for the last two: the whole set is read)."""
    path = pathlib.Path(path)
    if path.is_dir() and not ((path / "data_batch_1").is_file() or (path / "test_batch").is_file()):
        return load_image_folder(path, image_size=image_size)
    if path.is_file() and path.suffix == ".npz":
        data = load_npz(path)
    elif path.is_dir():
        data = ImageSet(*load_cifar10(path, split), (), str(path))
    else:
        data = None
    if data is not None:
        want = None if image_size is None else tuple(int(s) for s in image_size)
        if want is not None and data.images.shape[1:3] != want:
            raise ValueError(f"{path}: images are {data.images.shape[1:3]}, not --image-size {want}; "
                             "resizing applies to image folders only")
        return data
    raise FileNotFoundError(f"{path}: expected a CIFAR-10 python folder, an image folder (one sub-folder per "
                            "class) or an .npz file with 'images' and optional 'labels'")
