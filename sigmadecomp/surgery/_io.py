"""Save and load compressed models.

A saved model is a directory with two files:

``plan.json``
    ``{"format": "sigmadecomp-compressed", "version": 1, "plan": Plan.to_dict(),
    "architecture": [[path, kind, kernel_shape], ...]}`` — the plan that made the model, and a
    fingerprint of the uncompressed architecture: every decomposable layer (``nnx.Conv`` /
    ``nnx.Linear``) with its kernel shape, replaced or not.
``params.safetensors`` (or the orbax checkpoint folder ``params/`` with ``format="orbax"``)
    Every variable of the compressed model's ``nnx.state`` except RNG state (parameters, batch
    statistics, ...), named by its dotted state path, e.g. ``layer1.0.conv1.core_conv.kernel``.

:func:`load` rebuilds the compressed structure from an uncompressed model of the same
architecture (``apply`` with zero placeholder factors of the planned shapes) and then writes the
saved values into it, so the loaded model computes bit-identical outputs. RNG streams (dropout)
are the template's.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from sigmadecomp._paths import get_by_path, path_to_str
from sigmadecomp.layers._common import FactorizedLayer
from sigmadecomp.layers._shapes import placeholder
from sigmadecomp.surgery._apply import apply
from sigmadecomp.surgery._plan import Plan, eligible_layers

__all__ = ["FILE_VERSION", "SAVE_FORMATS", "load", "read_tensors", "save", "write_tensors"]

FILE_VERSION = 1
_FORMAT = "sigmadecomp-compressed"
_PLAN_FILE, _PARAMS_FILE = "plan.json", "params.safetensors"
_SAVED = nnx.Not(nnx.RngState)


def save(path: Union[str, pathlib.Path], model: nnx.Module, plan: Plan, *, format: str = "safetensors") -> None:
    """Save the compressed ``model`` made with ``plan`` into directory ``path`` (created if needed;
    existing files are overwritten). ``format="orbax"`` writes the values as an orbax checkpoint
    folder ``params/`` instead of ``params.safetensors``; :func:`load` reads either.

    >>> import tempfile, jax.numpy as jnp
    >>> from flax import nnx
    >>> from sigmadecomp import LowRank
    >>> from sigmadecomp.surgery import apply, plan as make_plan
    >>> net = nnx.Sequential(nnx.Linear(6, 4, rngs=nnx.Rngs(0)))
    >>> p = make_plan(net, format="svd", ranks={"layers.0": 2})
    >>> f = LowRank(jnp.ones((1, 1, 6, 2)), jnp.ones((2, 4)), kernel_shape=(6, 4))
    >>> small = apply(net, p, {"layers.0": f})
    >>> folder = tempfile.mkdtemp()
    >>> save(folder, small, p)
    >>> bool(jnp.all(load(folder, net)(jnp.ones((1, 6))) == small(jnp.ones((1, 6)))))
    True
    """
    _check_compressed(model, plan)
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    header = dict(format=_FORMAT, version=FILE_VERSION, plan=plan.to_dict(),
                  architecture=_architecture_of_compressed(model, plan))
    (folder / _PLAN_FILE).write_text(json.dumps(header, indent=1))
    tensors = {name: np.asarray(value) for name, value in _flat_values(model).items()}
    write_tensors(folder, "params", tensors, format=format)


def load(path: Union[str, pathlib.Path], template: Union[nnx.Module, Callable[[], nnx.Module]]) -> nnx.Module:
    """The compressed model saved in directory ``path``, rebuilt from ``template``: an
    uncompressed model of the same architecture (e.g. ``CifarResNet(20, rngs=nnx.Rngs(0))``) or a
    function returning one. ``template`` is not modified. Its values are never used, so an abstract
    template skips random initialisation: ``nnx.eval_shape(lambda: CifarResNet(20, rngs=nnx.Rngs(0)))``
    (its RNG streams, which are not saved, then restart from key 0). A file that does not fit the template
    (other architecture, missing / extra / mis-shaped tensors, unknown version) raises ValueError.
    """
    if not isinstance(template, nnx.Module):
        template = template()
    template = _materialize(template)
    folder = pathlib.Path(path)
    plan = _read_header(folder, template)
    placeholders = {e.path: _placeholders(e, get_by_path(template, e.path)) for e in plan.entries}
    model = apply(template, plan, placeholders)
    _write_values(model, read_tensors(folder, "params"))
    return model


def _materialize(template: nnx.Module) -> nnx.Module:
    """An abstract (``nnx.eval_shape``) template with zeros in place of its shape-only leaves."""
    graphdef, state = nnx.split(template)
    leaves = jax.tree_util.tree_leaves(state)
    if not any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        return template

    def concrete(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), x.size).reshape(x.shape) if x.shape else jax.random.key(0)
        return jnp.zeros(x.shape, x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map(concrete, state))


def _read_header(folder: pathlib.Path, template: nnx.Module) -> Plan:
    file = folder / _PLAN_FILE
    if not file.is_file():
        raise ValueError(f"{file} not found: {folder} is not a model saved by sigmadecomp.save")
    header = json.loads(file.read_text())
    if header.get("format") != _FORMAT or header.get("version") != FILE_VERSION:
        raise ValueError(f"{file}: format {header.get('format')!r} version {header.get('version')!r} is not "
                         f"readable; this sigmadecomp reads {_FORMAT!r} version {FILE_VERSION}")
    _check_architecture(header["architecture"], _architecture(template))
    return Plan.from_dict(header["plan"])


def _architecture(model: nnx.Module) -> list:
    """``[[path, kind, kernel_shape], ...]`` of the decomposable layers, sorted by path."""
    rows = [[p, "dense" if isinstance(layer, nnx.Linear) else "conv", list(layer.kernel.shape)]
            for p, layer in eligible_layers(model).items()]
    return sorted(rows)


def _architecture_of_compressed(model: nnx.Module, plan: Plan) -> list:
    """The fingerprint of the uncompressed model, recovered from the compressed one and its plan."""
    rows = _architecture(model) + [[e.path, e.kind, list(e.kernel_shape)] for e in plan.entries]
    return sorted(rows)


def _check_architecture(saved: list, template: list) -> None:
    saved_map = {row[0]: row[1:] for row in saved}
    template_map = {row[0]: row[1:] for row in template}
    if saved_map == template_map:
        return
    only_file = sorted(set(saved_map) - set(template_map))
    only_model = sorted(set(template_map) - set(saved_map))
    differ = {p: (saved_map[p], template_map[p]) for p in saved_map
              if p in template_map and saved_map[p] != template_map[p]}
    raise ValueError(
        "the saved model's architecture does not match the template: layers only in the file "
        f"{only_file}, only in the template {only_model}, different (file, template) {differ}. "
        "Pass an uncompressed model of the architecture that was compressed."
    )


def _check_compressed(model: nnx.Module, plan: Plan) -> None:
    for entry in plan.entries:
        layer = get_by_path(model, entry.path)
        if not isinstance(layer, FactorizedLayer) or layer.format != entry.format or \
                tuple(layer.ranks) != tuple(entry.ranks):
            got = type(layer).__name__ + (f" ({layer.format}, ranks {layer.ranks})"
                                          if isinstance(layer, FactorizedLayer) else "")
            raise ValueError(f"save: {entry.path!r} should be a {entry.format} layer with ranks {entry.ranks} "
                             f"per the plan, the model has {got}; save the model that apply(...) returned")


def _placeholders(entry, layer):
    factor = placeholder(entry.format, entry.group_kernel_shape, entry.ranks, layer.kernel[...].dtype)
    return [factor] * entry.groups if entry.groups > 1 else factor


def _flat_values(model: nnx.Module) -> dict:
    flat = nnx.to_flat_state(nnx.state(model, _SAVED))
    return {path_to_str(path): var[...] for path, var in flat}


SAVE_FORMATS = ("safetensors", "orbax")


def write_tensors(folder: pathlib.Path, stem: str, tensors: dict, *, format: str = "safetensors") -> None:
    """``{name: array}`` to ``folder/stem.safetensors`` or to the orbax checkpoint ``folder/stem/``
    (a flat dict of numpy arrays, written with ``orbax.checkpoint.StandardCheckpointer``). The other
    format's file is removed, so a folder holds one version of the values."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"save format must be one of {SAVE_FORMATS}; got {format!r}")
    file, checkpoint = folder / f"{stem}.safetensors", (folder / stem).resolve()
    if format == "safetensors":
        _remove_checkpoint(checkpoint)
        safetensors.numpy.save_file(tensors, str(file), metadata={"format": _FORMAT})
        return
    import orbax.checkpoint as ocp

    file.unlink(missing_ok=True)
    _remove_checkpoint(checkpoint)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(checkpoint, tensors)


def _remove_checkpoint(checkpoint: pathlib.Path) -> None:
    import shutil

    if checkpoint.is_dir():
        shutil.rmtree(checkpoint)


def read_tensors(folder: pathlib.Path, stem: str) -> dict:
    """What :func:`write_tensors` wrote, in either format, as numpy arrays."""
    file, checkpoint = folder / f"{stem}.safetensors", (folder / stem).resolve()
    if file.is_file():
        return safetensors.numpy.load_file(str(file))
    if checkpoint.is_dir():
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(checkpoint)
        return {name: np.asarray(value) for name, value in restored.items()}
    raise ValueError(f"{file} not found (nor an orbax checkpoint {checkpoint}): the saved model is incomplete")


def _write_values(model: nnx.Module, tensors: dict) -> None:
    state = nnx.state(model, _SAVED)
    flat = list(nnx.to_flat_state(state))
    names = {path_to_str(path): var for path, var in flat}
    _check_tensors(names, tensors)
    for name, var in names.items():
        var.set_value(jnp.asarray(tensors[name]))
    nnx.update(model, state)


def _check_tensors(variables: dict, tensors: dict) -> None:
    missing = sorted(set(variables) - set(tensors))
    extra = sorted(set(tensors) - set(variables))
    described = {n: _describe(var[...]) for n, var in variables.items()}
    wrong = {n: (_describe(tensors[n]), described[n]) for n in variables
             if n in tensors and _describe(tensors[n]) != described[n]}
    if missing or extra or wrong:  # one message with every problem, so one fix suffices
        raise ValueError(f"params.safetensors does not fit the rebuilt model: missing {missing}, unexpected "
                         f"{extra}, mismatched (file, model) {wrong}")


def _describe(array) -> str:
    """``float32[3, 3, 16, 8]``: dtype and shape, what must agree between file and model."""
    return f"{np.dtype(array.dtype).name}{list(np.shape(array))}"
