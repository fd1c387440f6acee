"""Loaders on the real data kit and on tiny files written in the official formats; corrupt and
missing files; normalisation; deterministic batching and sampling."""

from __future__ import annotations

import gzip
import pickle

import jax
import numpy as np
import pytest

from sigmadecomp.data import (
    batches,
    cifar10_normalize,
    holdout,
    load_cifar10,
    load_mnist,
    mnist_normalize,
    sample,
)

# ------------------------------------- the real data kit -------------------------------------------

@pytest.mark.data
def test_cifar10_real_files(data_dir):
    images, labels = load_cifar10(data_dir / "cifar10", "test")
    assert images.shape == (512, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (512,) and labels.dtype == np.int32
    assert labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # official test_batch order
    train, train_labels = load_cifar10(data_dir / "cifar10", "train")
    assert train.shape == (5 * 1017, 32, 32, 3) and set(np.unique(train_labels)) == set(range(10))
    assert train_labels[:5].tolist() == [6, 9, 9, 4, 1]
    with open(data_dir / "cifar10" / "data_batch_2", "rb") as f:  # the kit's own file, trusted
        assert train_labels[1017] == pickle.load(f, encoding="bytes")[b"labels"][0]
    head, head_labels = load_cifar10(data_dir / "cifar10", "train", limit=1500)
    np.testing.assert_array_equal(head, train[:1500])
    np.testing.assert_array_equal(head_labels, train_labels[:1500])


@pytest.mark.data
def test_mnist_real_files(data_dir):
    images, labels = load_mnist(data_dir / "mnist", "test")
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(labels).tolist()[:3] == [980, 1135, 1032]  # official class counts
    train, train_labels = load_mnist(data_dir / "mnist", "train", limit=5)
    assert train.shape == (5, 28, 28, 1) and train_labels.tolist() == [5, 0, 4, 1, 9]


# ------------------------------- tiny files in the official formats -------------------------------

def _write_cifar_batch(path, images, labels, *, str_keys=False):
    """Pixels as the official files store them: (N, 3072) = R plane, G plane, B plane."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batch = {b"batch_label": b"synthetic", b"labels": labels.tolist(), b"data": data}
    if str_keys:
        batch = {k.decode(): v for k, v in batch.items()}
    path.write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture
def cifar_dir(tmp_path):
    rng, sizes = np.random.default_rng(0), [3, 5, 2, 4, 1]
    images = rng.integers(0, 256, (sum(sizes) + 2, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, sum(sizes) + 2)
    starts = np.cumsum([0, *sizes])
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:]), start=1):
        _write_cifar_batch(tmp_path / f"data_batch_{i}", images[a:b], labels[a:b], str_keys=i == 2)
    _write_cifar_batch(tmp_path / "test_batch", images[-2:], labels[-2:])
    return tmp_path, images, labels, starts[-1]


def test_cifar10_synthetic_any_batch_size(cifar_dir):
    directory, images, labels, n_train = cifar_dir
    got, got_labels = load_cifar10(directory, "train")
    np.testing.assert_array_equal(got, images[:n_train])  # pixel layout and batch order
    np.testing.assert_array_equal(got_labels, labels[:n_train])
    got, _ = load_cifar10(directory, "train", limit=9)  # crosses three batches
    np.testing.assert_array_equal(got, images[:9])
    got, got_labels = load_cifar10(directory, "test")
    np.testing.assert_array_equal(got, images[-2:])
    assert load_cifar10(directory, "test", limit=0)[0].shape == (0, 32, 32, 3)


def test_cifar10_missing_and_corrupt_files(cifar_dir, tmp_path_factory):
    directory = cifar_dir[0]
    with pytest.raises(FileNotFoundError, match="data_batch_1 not found; expected a CIFAR-10"):
        load_cifar10(tmp_path_factory.mktemp("empty"), "train")
    whole = (directory / "test_batch").read_bytes()
    (directory / "test_batch").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="test_batch is not a CIFAR-10"):
        load_cifar10(directory, "test")
    (directory / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                                         b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"shape \(2, 100\)"):
        load_cifar10(directory, "test")
    (directory / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="test_batch is not a CIFAR-10"):
        load_cifar10(directory, "test")
    with pytest.raises(ValueError, match="split must be"):
        load_cifar10(directory, "val")


def test_cifar10_pickle_cannot_run_code(cifar_dir):
    class Exploit:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    directory = cifar_dir[0]
    (directory / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(ValueError, match="builtins.eval is not allowed"):
        load_cifar10(directory, "test")


def _idx_bytes(array, magic):
    header = np.array([magic, *array.shape], ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x803)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels, 0x801)))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images[:4], 0x803))  # uncompressed
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels[:4], 0x801))
    return tmp_path, images, labels


def test_mnist_synthetic_any_size(mnist_dir):
    directory, images, labels = mnist_dir
    got, got_labels = load_mnist(directory, "test")
    np.testing.assert_array_equal(got[..., 0], images)
    assert got.shape == (7, 28, 28, 1) and got_labels.dtype == np.int32
    np.testing.assert_array_equal(got_labels, labels)
    got, got_labels = load_mnist(directory, "train", limit=3)
    np.testing.assert_array_equal(got[..., 0], images[:3])


def test_mnist_missing_and_corrupt_files(mnist_dir):
    directory, images, labels = mnist_dir
    path = directory / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(images, 0x801)))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is not an IDX.*magic number 0x00000801"):
        load_mnist(directory, "test")
    path.write_bytes(gzip.compress(_idx_bytes(images, 0x803)[:-10]))
    with pytest.raises(ValueError, match=r"header says dims \[7, 28, 28\]"):
        load_mnist(directory, "test")
    path.write_bytes(gzip.compress(_idx_bytes(images, 0x803))[:-20])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is not an IDX"):
        load_mnist(directory, "test")
    path.write_bytes(gzip.compress(_idx_bytes(images[:5], 0x803)))
    with pytest.raises(ValueError, match="has 5 images but .* has 7 labels"):
        load_mnist(directory, "test")
    path.unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz not found"):
        load_mnist(directory, "test")


# --------------------------------------- normalisation --------------------------------------------

def test_normalize_values():
    pixels = np.zeros((1, 32, 32, 3), np.uint8)
    pixels[0, 0, 0] = [255, 0, 128]
    x = cifar10_normalize(pixels)
    assert x.dtype == np.float32 and x.shape == pixels.shape
    expected = [(1 - 0.485) / 0.229, -0.456 / 0.224, (128 / 255 - 0.406) / 0.225]
    np.testing.assert_allclose(x[0, 0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(x[0, 1, 1], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    m = mnist_normalize(np.full((2, 28, 28, 1), 255, np.uint8))
    assert m.dtype == np.float32
    np.testing.assert_allclose(m, (1 - 0.1307) / 0.3081, rtol=1e-6)
    with pytest.raises(ValueError, match="normalise raw pixels only once"):
        cifar10_normalize(x)
    with pytest.raises(ValueError, match=r"\(N, H, W, 1\)"):
        mnist_normalize(pixels)


# ------------------------------------ batching and sampling ---------------------------------------

def test_batches_in_order_without_key():
    x, y = np.arange(20).reshape(10, 2), np.arange(10)
    out = list(batches(x, y, batch_size=4))
    assert [b[1].tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.shape[0] for b in batches(x, batch_size=4, drop_remainder=True)] == [4, 4]


def test_batches_shuffle_is_determined_by_the_key():
    x, y = np.arange(20).reshape(10, 2), np.arange(10)
    run = lambda key: np.concatenate([b[1] for b in batches(x, y, batch_size=3, key=key)])  # noqa: E731
    first, again, other = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(first, again)
    assert sorted(first.tolist()) == list(range(10)) and not np.array_equal(first, other)
    np.testing.assert_array_equal(first, np.asarray(jax.random.permutation(jax.random.key(0), 10)))
    for images, labels in batches(x, y, batch_size=3, key=jax.random.key(0)):
        np.testing.assert_array_equal(images[:, 0], 2 * labels)  # pairs stay aligned


def test_batches_and_sample_reject_bad_input():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        next(batches(x, batch_size=0))
    with pytest.raises(ValueError, match="same length"):
        next(batches(x, np.zeros(4), batch_size=2))
    with pytest.raises(ValueError, match=r"n must be an int in 1\.\.5"):
        sample(x, None, 6, key=jax.random.key(0))


def test_holdout_splits_disjointly_avoids_excluded_indices_and_rejects_bad_sizes():
    x, y = np.arange(50) * 10, np.arange(50)
    calib = np.arange(0, 50, 2)
    (x_rest, y_rest), (x_val, y_val) = holdout(x, y, 20, key=jax.random.key(0), exclude=calib)
    assert len(y_val) == 20 and len(y_rest) == 30 and not set(y_val) & set(calib.tolist())
    assert sorted(y_rest.tolist() + y_val.tolist()) == list(range(50))
    np.testing.assert_array_equal(x_rest, 10 * y_rest)  # pairs stay aligned, the order is kept
    assert np.all(np.diff(y_rest) > 0)
    again = holdout(x, y, 20, key=jax.random.key(0), exclude=calib)[1][1]
    np.testing.assert_array_equal(y_val, again)
    with pytest.raises(ValueError, match=r"n must be an int in 1\.\.25"):
        holdout(x, y, 26, key=jax.random.key(0), exclude=calib)
    with pytest.raises(ValueError, match="n must be an int"):
        holdout(x, y, 0, key=jax.random.key(0))


def test_sample_is_deterministic_and_distinct():
    x, y = np.arange(100) * 10, np.arange(100)
    a_images, a_labels = sample(x, y, 30, key=jax.random.key(3))
    b_images, _ = sample(x, y, 30, key=jax.random.key(3))
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_images, 10 * a_labels)
    assert len(set(a_labels.tolist())) == 30
    assert sample(x, None, 30, key=jax.random.key(4)).shape == (30,)
