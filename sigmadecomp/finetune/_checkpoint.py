"""Resumable training checkpoints in one safetensors file: every array of the training state, named
by its pytree path, plus a JSON header (step, configuration, history) in the file's metadata.

One file written to a temporary name and renamed, so an interrupted save never leaves a checkpoint
that cannot be read.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

__all__ = ["CHECKPOINT_NAME", "checkpoint_meta", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "finetune_checkpoint.safetensors"


def _named_leaves(trees: Mapping[str, object]) -> dict[str, np.ndarray]:
    named = {}
    for name, tree in trees.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            named[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return named


def save_checkpoint(folder, trees: Mapping[str, object], meta: Mapping) -> pathlib.Path:
    """Write every array of ``trees`` (``{name: pytree}``) and ``meta`` (JSON-ready) to
    ``folder/finetune_checkpoint.safetensors``; returns the file's path."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / CHECKPOINT_NAME
    tmp = file.with_suffix(".tmp")
    save_file(_named_leaves(trees), str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, file)
    return file


def checkpoint_meta(folder) -> dict:
    """The JSON header of the checkpoint in ``folder`` (``{}`` when there is none), arrays unread."""
    file = pathlib.Path(folder) / CHECKPOINT_NAME
    if not file.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(file), "numpy") as f:
        return json.loads(f.metadata()["meta"])


def load_checkpoint(folder, like: Mapping[str, object]) -> tuple[dict, dict] | None:
    """``(trees, meta)`` read from ``folder`` into the structure of ``like`` (same names, paths,
    shapes and dtypes), or ``None`` when the folder holds no checkpoint. A checkpoint of another
    model or optimizer is an error that names the first mismatch."""
    file = pathlib.Path(folder) / CHECKPOINT_NAME
    if not file.is_file():
        return None
    meta = checkpoint_meta(folder)
    tensors = load_file(str(file))
    expected = _named_leaves(like)
    if set(tensors) != set(expected):
        diff = sorted(set(tensors) ^ set(expected))[:3]
        raise ValueError(f"{file} does not match this model/optimizer (first differing entries: {diff}); "
                         "resume with the same student, teacher and configuration, or use a new folder")
    for name, value in expected.items():
        if tensors[name].shape != value.shape or tensors[name].dtype != value.dtype:
            raise ValueError(f"{file}: {name} is {tensors[name].dtype}{list(tensors[name].shape)}, the "
                             f"model needs {value.dtype}{list(value.shape)}")
    trees = {}
    for name, tree in like.items():
        paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
        leaves = [tensors[name + jax.tree_util.keystr(p)] for p, _ in paths]
        trees[name] = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in leaves])
    return trees, meta
