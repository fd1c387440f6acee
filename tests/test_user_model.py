"""Your model, your data: image folders and .npz files, and `compress --model MODULE:FACTORY` for a
user's NNX and linen CNNs from one command, with the report fields of the ResNet path."""

from __future__ import annotations

import json
import pathlib
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sigmadecomp.cli import main
from sigmadecomp.data import load_image_folder, load_images, load_npz, normalize_images
from sigmadecomp.user_model import load_factory

# The fields of compress_pretrained's report (the ResNet path), which every report must have.
RESNET_FIELDS = {"accuracy", "baseline_accuracy", "agreement", "params", "baseline_params", "flops",
                 "baseline_flops", "mean_relative_error", "num_eval_images", "decompose_seconds", "seconds",
                 "config", "layers"}
LAYER_FIELDS = {"path", "format", "rank", "params", "baseline_params", "relative_error", "status",
                "num_steps", "in_model_relative_error"}

USER_MODULE = textwrap.dedent('''
    import jax, jax.numpy as jnp, flax.linen as nn
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs)
            self.body = nnx.Conv(8, 16, (3, 3), strides=2, padding="SAME", rngs=rngs)
            self.head = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.body(nnx.relu(self.stem(x))))
            return self.head(x.mean(axis=(1, 2)))

    def make_nnx():
        return Net(nnx.Rngs(0))

    class LinenNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(16, (3, 3), strides=2)(nn.relu(nn.Conv(8, (3, 3))(x))))
            return nn.Dense(3)(x.mean(axis=(1, 2)))

    def make_linen():
        module = LinenNet()
        return module, jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 12, 12, 3), jnp.float32))

    def not_a_model():
        return 42
''')


def _write_folder(root: pathlib.Path, *, per_class=4, size=(14, 10), mode="RGB") -> pathlib.Path:
    rng = np.random.default_rng(0)
    channels = 3 if mode == "RGB" else 1
    for name in ("cat", "dog", "emu"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, channels), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(root / name / f"{i}.png")
    (root / "notes.txt").write_text("ignored: not a class folder")
    return root


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "usernets_tmp.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "usernets_tmp"
    sys.modules.pop("usernets_tmp", None)


# ----------------------------------------------------------------------------- data


def test_image_folder(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    data = load_image_folder(root, image_size=(12, 12))
    assert data.images.shape == (12, 12, 12, 3) and data.images.dtype == np.uint8
    assert data.classes == ("cat", "dog", "emu") and data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    unresized = load_image_folder(root)
    first = np.asarray(Image.open(root / "cat" / "0.png"))
    assert np.array_equal(unresized.images[0], first)  # file order within a class, pixels untouched
    grey = load_image_folder(_write_folder(tmp_path / "grey", mode="L"))
    assert grey.images.shape == (12, 14, 10, 1)


def test_image_folder_errors(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    Image.new("RGB", (5, 5)).save(root / "cat" / "odd.png")
    with pytest.raises(ValueError, match="different sizes"):
        load_image_folder(root)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(root, image_size=(8, 8))


def test_npz_and_normalize(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "with.npz", images=images, labels=np.arange(5))
    np.savez(tmp_path / "without.npz", images=images)
    np.savez(tmp_path / "bad.npz", pixels=images)
    assert load_npz(tmp_path / "with.npz").labels.tolist() == [0, 1, 2, 3, 4]
    assert load_images(tmp_path / "without.npz").labels is None
    with pytest.raises(ValueError, match="no 'images'"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="resizing applies to image folders"):
        load_images(tmp_path / "with.npz", image_size=(8, 8))
    x = normalize_images(images, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.1))
    np.testing.assert_allclose(x, (images / 255.0 - [0.5, 0.4, 0.3]) / [0.2, 0.2, 0.1], atol=1e-6)
    with pytest.raises(ValueError, match="3 channel"):
        normalize_images(images, mean=(0.5, 0.5))


def test_load_factory(user_module):
    assert isinstance(load_factory(f"{user_module}:make_nnx")(), nnx.Module)
    for spec, needle in [("nocolon", "package.module:function"), ("no_such_module_xyz:f", "cannot import"),
                         (f"{user_module}:missing", "no attribute")]:
        with pytest.raises(ValueError, match=needle):
            load_factory(spec)


# ----------------------------------------------------------------------------- one command


def _compress(tmp_path, capsys, *args) -> dict:
    out = tmp_path / "report.json"
    code = main(["compress", *args, "--format", "svd", "--image-size", "12,12", "--no-progress",
                 "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    report = json.loads(out.read_text())
    words = "accuracy" if report["accuracy"] is not None else "unlabelled"
    assert words in captured.out  # the summary printed for both kinds of evaluation data
    return report


def test_cli_nnx_model_and_image_folder(tmp_path, capsys, user_module):
    root = _write_folder(tmp_path / "imgs")
    report = _compress(tmp_path, capsys, "--model", f"{user_module}:make_nnx", "--data", str(root),
                       "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--calib", "8",
                       "--save", str(tmp_path / "saved"), "--save-format", "orbax")
    assert RESNET_FIELDS <= set(report) and all(LAYER_FIELDS <= set(layer) for layer in report["layers"])
    assert [layer["path"] for layer in report["layers"]] == ["body"]  # stem and head stay dense
    assert report["config"]["calibration"] == "sequential" and report["config"]["calib"] == 8
    assert report["num_eval_images"] == 12 and 0 <= report["accuracy"] <= 1
    assert report["params"] < report["baseline_params"] and report["flops"] < report["baseline_flops"]
    assert (tmp_path / "saved" / "params").is_dir()  # the orbax checkpoint
    from sigmadecomp.surgery import load

    loaded = load(tmp_path / "saved", load_factory(f"{user_module}:make_nnx")())
    assert type(loaded.body).__name__ == "LowRankConv"


def test_cli_linen_model_unlabelled_npz(tmp_path, capsys, user_module):
    root = _write_folder(tmp_path / "imgs")
    np.savez(tmp_path / "eval.npz", images=np.random.default_rng(1).random((6, 12, 12, 3), np.float32))
    report = _compress(tmp_path, capsys, "--model", f"{user_module}:make_linen", "--data", str(root),
                       "--eval-data", str(tmp_path / "eval.npz"), "--save", str(tmp_path / "saved"))
    assert RESNET_FIELDS <= set(report) and all(LAYER_FIELDS <= set(layer) for layer in report["layers"])
    assert report["accuracy"] is None and report["baseline_accuracy"] is None  # no labels
    assert 0 <= report["agreement"] <= 1 and report["output_relative_error"] > 0
    assert report["config"]["model_kind"] == "linen" and report["config"]["calibration"] == "parallel"
    assert [layer["path"] for layer in report["layers"]] == ["Conv_0"]  # built first, run second
    assert report["layers"][0]["in_model_relative_error"] is not None
    assert (tmp_path / "saved" / "factors.safetensors").is_file()


@pytest.mark.parametrize("extra, needle", [
    (["--model", "{m}:not_a_model"], "returned a int"),
    (["--model", "{m}:make_linen", "--calibration", "sequential"], "NNX models only"),
    (["--model", "{m}:make_nnx", "--weights", "w.safetensors"], "--weights is for --arch"),
])
def test_cli_model_errors_are_one_line(tmp_path, capsys, user_module, extra, needle):
    root = _write_folder(tmp_path / "imgs")
    (tmp_path / "w.safetensors").write_bytes(b"")
    extra = [e.format(m=user_module).replace("w.safetensors", str(tmp_path / "w.safetensors")) for e in extra]
    assert main(["compress", *extra, "--data", str(root), "--no-progress"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0], err


def test_cli_arch_and_model_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--arch", "resnet20", "--model", "a:b", "--data", "."])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.data
@pytest.mark.slow
def test_cli_resnet_on_an_image_folder(tmp_path, capsys, data_dir):
    """--arch with an image folder goes through the same pipeline (CIFAR normalisation by default)."""
    from sigmadecomp.data import load_cifar10

    images, labels = load_cifar10(data_dir / "cifar10", "test", limit=30)
    for i, (image, label) in enumerate(zip(images, labels)):
        (tmp_path / "imgs" / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "imgs" / f"class{label}" / f"{i:03d}.png")
    report = _compress(tmp_path, capsys, "--arch", "resnet20", "--weights",
                       str(data_dir / "weights" / "resnet20_cifar10.safetensors"), "--data",
                       str(tmp_path / "imgs"), "--calib", "30", "--image-size", "32,32")
    assert RESNET_FIELDS <= set(report) and report["config"]["mean"] is not None
    assert report["agreement"] > 0.5
