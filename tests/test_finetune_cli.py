"""``sigmadecomp compress --finetune-epochs`` and ``sigmadecomp finetune``: arguments, errors, and
one end-to-end run on the data kit (ResNet-20, a 64-image fine-tuning folder so it stays short)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from sigmadecomp.cli import main


def test_finetune_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--teacher-arch", "--teacher-weights", "--data", "--epochs", "--checkpoint-dir",
                 "--validation"):
        assert flag in out
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = capsys.readouterr().out
    assert "--finetune-epochs" in out and "--finetune-validation" in out


def test_finetune_missing_model_is_one_line(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    code = main(["finetune", "--model", str(tmp_path / "nope"), "--teacher-arch", "resnet20",
                 "--teacher-weights", str(weights), "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "--model" in err and "plan.json" in err and len(err.strip().splitlines()) == 1


def test_bad_finetune_lr_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--arch", "resnet20", "--weights", "w", "--data", "d", "--finetune-lr", "-1"])
    assert exit_info.value.code == 2 and "positive" in capsys.readouterr().err
    for command in (["compress", "--arch", "resnet20", "--weights", "w", "--data", "d", "--finetune-validation", "-1"],
                    ["finetune", "--model", "m", "--teacher-arch", "resnet20", "--teacher-weights", "w",
                     "--data", "d", "--validation", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 2 and "non-negative integer" in capsys.readouterr().err
    for command in (["compress", "--arch", "resnet20", "--weights", "w", "--data", "d",
                     "--finetune-validation-metric", "kl"],
                    ["finetune", "--model", "m", "--teacher-arch", "resnet20", "--teacher-weights", "w",
                     "--data", "d", "--validation-metric", "kl"]):
        assert main(command) == 1
        assert "held-out images: add --" in capsys.readouterr().err


def _tiny_training_folder(folder, data_dir, n_per_batch=13):
    """Five official-format training batches holding the first 65 images of the data kit."""
    from sigmadecomp.data import load_cifar10

    images, labels = load_cifar10(data_dir / "cifar10", "train", limit=5 * n_per_batch)
    folder.mkdir()
    for i in range(5):
        part = slice(i * n_per_batch, (i + 1) * n_per_batch)
        data = images[part].transpose(0, 3, 1, 2).reshape(n_per_batch, 3072)
        batch = {b"labels": labels[part].tolist(), b"data": data}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch, protocol=2))
    return folder


@pytest.mark.experiment
@pytest.mark.data
@pytest.mark.slow
def test_compress_then_finetune_end_to_end(data_dir, tmp_path, capsys):
    tiny = _tiny_training_folder(tmp_path / "tiny", data_dir)
    weights = data_dir / "weights" / "resnet20_cifar10.safetensors"
    common = ["--data", str(data_dir / "cifar10"), "--no-progress"]
    code = main(["compress", "--arch", "resnet20", "--weights", str(weights), "--format", "svd",
                 "--norm", "frobenius", "--ratio", "0.5", "--calib", "32", "--max-steps", "1",
                 "--finetune-epochs", "1", "--finetune-data", str(tiny), "--save", str(tmp_path / "model"),
                 "--json", str(tmp_path / "compress.json"), *common])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "compress.json").read_text())
    assert report["finetune_epochs"] == 1 and report["finetune_steps"] == 1 and report["finetune_seconds"] > 0
    assert 0 <= report["accuracy_before_finetune"] <= 1
    assert report["config"]["finetune_data"] == str(tiny)
    code = main(["finetune", "--model", str(tmp_path / "model"), "--teacher-arch", "resnet20",
                 "--teacher-weights", str(weights), "--data", str(tiny), "--eval-data", str(data_dir / "cifar10"),
                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--save", str(tmp_path / "tuned"), "--validation", "1",
                 "--validation-metric", "kl", "--json", str(tmp_path / "finetune.json"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    tuned = json.loads((tmp_path / "finetune.json").read_text())
    # The saved model is the fine-tuned one: the second run starts where the first ended.
    assert tuned["accuracy_before_finetune"] == pytest.approx(report["accuracy"])
    assert tuned["finetune_steps"] == 1 and np.isfinite(tuned["history"]["train"][-1]["loss"])
    assert tuned["finetune_best"]["step"] in (0, 1) and tuned["config"]["validation"] == 1
    assert tuned["finetune_best"]["metric"] == "validation_kl" and tuned["finetune_best"]["mode"] == "min"
    assert tuned["config"]["validation_metric"] == "kl"
    assert (tmp_path / "ckpt" / "finetune_checkpoint.safetensors").is_file()
    assert (tmp_path / "tuned" / "plan.json").is_file()
    assert "accuracy" in capsys.readouterr().out
