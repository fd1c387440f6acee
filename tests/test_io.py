"""save / load of compressed models: bit-identical round trip and clear errors for bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy
from _surgery_models import TinyNet, inputs, random_factors, run, state_arrays

from sigmadecomp.layers import CPConv, LowRankDense
from sigmadecomp.surgery import apply, load, plan, save


def compressed_tiny(dtype="float32", fmt="cp"):
    model = TinyNet(dtype=dtype)
    p = plan(model, format=fmt, ratio=0.4, formats={"linear": "svd"}, input_shape=(1, 9, 9, 3))
    return model, p, apply(model, p, random_factors(p, seed=3, dtype=dtype))


@pytest.mark.parametrize("fmt", ["cp", "tucker2"])
def test_round_trip_is_bit_identical(tmp_path, dtype, fmt):
    model, p, compressed = compressed_tiny(dtype, fmt)
    save(tmp_path / "model", compressed, p)
    assert sorted(f.name for f in (tmp_path / "model").iterdir()) == ["params.safetensors", "plan.json"]
    template = TinyNet(dtype=dtype, seed=7)  # other weights: everything must come from the file
    before = state_arrays(template)
    loaded = load(tmp_path / "model", template)
    x = inputs(dtype=dtype)
    np.testing.assert_array_equal(np.asarray(run(loaded, x)), np.asarray(run(compressed, x)))
    saved, got = state_arrays(compressed), state_arrays(loaded)
    assert saved.keys() == got.keys() and all(np.array_equal(saved[k], got[k]) for k in saved)
    after = state_arrays(template)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # template untouched
    assert type(loaded.blocks[1]) is type(compressed.blocks[1]) and loaded.blocks[1].groups == 2


def test_load_accepts_a_factory_and_the_plan_is_in_the_file(tmp_path):
    model, p, compressed = compressed_tiny()
    save(tmp_path, compressed, p)
    loaded = load(tmp_path, lambda: TinyNet(seed=5))
    assert isinstance(loaded.conv1, CPConv) and isinstance(loaded.linear, LowRankDense)
    header = json.loads((tmp_path / "plan.json").read_text())
    assert header["version"] == 1 and [e["path"] for e in header["plan"]["entries"]] == list(p.paths)
    assert ["conv1", "conv", [3, 3, 3, 8]] in header["architecture"]


def test_load_rejects_another_architecture(tmp_path):
    _, p, compressed = compressed_tiny()
    save(tmp_path, compressed, p)
    with pytest.raises(ValueError, match="architecture does not match"):
        load(tmp_path, TinyNet(width=4))


def test_load_rejects_bad_tensors(tmp_path):
    _, p, compressed = compressed_tiny()
    save(tmp_path, compressed, p)
    file = tmp_path / "params.safetensors"
    tensors = safetensors.numpy.load_file(str(file))
    good = dict(tensors)
    del tensors["bn.mean"]
    tensors["stray"] = np.zeros(3, np.float32)
    tensors["conv1.in_conv.kernel"] = np.zeros((1, 1, 3, 99), np.float32)
    safetensors.numpy.save_file(tensors, str(file))
    with pytest.raises(ValueError, match=r"missing \['bn.mean'\], unexpected \['stray'\], mismatched .*conv1.in_conv"):
        load(tmp_path, TinyNet())
    good["bn.var"] = good["bn.var"].astype(np.float64)
    safetensors.numpy.save_file(good, str(file))
    with pytest.raises(ValueError, match="bn.var"):
        load(tmp_path, TinyNet())
    file.unlink()
    with pytest.raises(ValueError, match="params.safetensors not found"):
        load(tmp_path, TinyNet())


def test_load_rejects_wrong_version_and_missing_directory(tmp_path):
    _, p, compressed = compressed_tiny()
    save(tmp_path, compressed, p)
    header = json.loads((tmp_path / "plan.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps(dict(header, version=99)))
    with pytest.raises(ValueError, match="version 99 is not readable"):
        load(tmp_path, TinyNet())
    with pytest.raises(ValueError, match="not a model saved by"):
        load(tmp_path / "nowhere", TinyNet())


def test_save_rejects_a_model_that_does_not_follow_the_plan(tmp_path):
    model, p, _ = compressed_tiny()
    with pytest.raises(ValueError, match="should be a cp layer"):
        save(tmp_path, model, p)
