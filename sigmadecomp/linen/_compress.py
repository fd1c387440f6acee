"""Compress a Flax **linen** model without editing its code: factors live in a separate pytree.

A linen module is a description applied to ``variables``; its layers cannot be swapped the way
NNX surgery swaps sub-modules. Instead :func:`apply_factorized` runs ``module.apply`` under an
``nn.intercept_methods`` interceptor that, for every layer named in a factor pytree
``{path: LowRank | Tucker2 | CP | CP3}``, computes the layer's output with the factorized layer of
:mod:`sigmadecomp.layers` (built from the factors plus the linen layer's bias, strides, padding,
dilation, dtype and precision) instead of calling the dense layer. The dense kernels of replaced
layers are never read, so :class:`LinenCompressed` drops them from its ``variables``.

Everything else is shared with the NNX path: the :class:`sigmadecomp.surgery.Plan` (same entries,
rank rules and counts), the solvers, the per-layer reports, and the factor layouts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from sigmadecomp.data import batches as make_batches
from sigmadecomp.layers._config import ConvConfig
from sigmadecomp.formats._registry import spec_of
from sigmadecomp.layers._shapes import placeholder
from sigmadecomp.linen._tap import _conv_tap, collect_covariances, describe_layers, is_tapped, layer_path
from sigmadecomp.surgery._plan import (
    Plan, _check_arguments, _check_rank_bounds, _check_ranks_cover, _choose_format, _finish_entry,
    _normalize_ranks, _skip_predicate,
)
from sigmadecomp.surgery._ranks import rank_for_ratio

__all__ = ["LinenCompressed", "apply_factorized", "compress", "kernels_of", "load", "plan", "save"]

_FILE_FORMAT, _FILE_VERSION = "sigmadecomp-linen-factors", 1


# ----------------------------------------------------------------------------- the interceptor


def _factorized_layer(module: nn.Module, factorized):
    """The NNX factorized layer computing ``module`` (a bound ``nn.Conv`` / ``nn.Dense``)."""
    params = module.variables.get("params", {})
    bias = params.get("bias") if module.use_bias else None
    common = dict(bias=bias, dtype=module.dtype, precision=module.precision)
    parts = list(factorized) if isinstance(factorized, (list, tuple)) else [factorized]
    spec = spec_of(parts[0])  # the format registry names each format's layers
    if isinstance(module, nn.Dense):
        if spec.dense_layer is None:
            raise ValueError(f"linen layer {layer_path(module)!r} is dense: format {spec.name!r} has no dense layer")
        return spec.dense_layer(factorized, **common)
    tap = _conv_tap(layer_path(module), module, parts[0].kernel_shape[2] * len(parts))
    config = ConvConfig(tap.strides, tap.padding, tap.dilation, tap.groups)
    return spec.layer(factorized, strides=config.strides, padding=config.padding,
                      kernel_dilation=config.kernel_dilation, **common)


def _interceptor(factors: Mapping) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        if is_tapped(context):
            path = layer_path(context.module)
            if path in factors:
                return _factorized_layer(context.module, factors[path])(args[0])
        return next_fun(*args, **kwargs)

    return interceptor


def apply_factorized(module: nn.Module, variables, factors: Mapping, x, *, method=None, **apply_kwargs):
    """``module.apply(variables, x)`` with every layer in ``factors`` computed in factorized form.

    ``factors`` maps layer paths (see :func:`sigmadecomp.linen.describe_layers`) to factorized
    kernels; ``variables`` may lack the kernels of those layers (they are not read). Works under
    ``jax.jit`` with ``factors`` as a traced argument.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from sigmadecomp import LowRank
    >>> net = nn.Dense(3)
    >>> variables = net.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> f = LowRank(jnp.ones((1, 1, 4, 2)), jnp.ones((2, 3)), kernel_shape=(4, 3))
    >>> apply_factorized(net, variables, {"": f}, jnp.ones((1, 4))).tolist()
    [[8.0, 8.0, 8.0]]
    """
    with nn.intercept_methods(_interceptor(factors)):
        return module.apply(variables, x, method=method, **apply_kwargs)


# ----------------------------------------------------------------------------- plan and kernels


def _layer_info(layer) -> dict:
    info = dict(kernel_shape=tuple(layer.kernel_shape), use_bias=layer.use_bias, kind=layer.kind)
    if layer.kind == "dense":
        return info
    tap = layer.tap
    config = ConvConfig(tap.strides, tap.padding, tap.dilation, tap.groups)
    return dict(info, strides=config.strides, padding=config.padding,
                kernel_dilation=config.kernel_dilation, groups=config.groups)


def plan(module: nn.Module, variables, example, *, format: str, ratio=None, ranks=None, skip=(),
         formats=None, apply_kwargs: dict | None = None) -> Plan:
    """The :class:`sigmadecomp.surgery.Plan` of a linen model, as :func:`sigmadecomp.plan` makes
    for NNX (same arguments, rank rules and counts); ``example`` is one input batch (or its shape),
    whose first example sets the FLOP counts."""
    formats = {} if formats is None else formats
    _check_arguments(format, ratio, ranks, formats)
    shape = tuple(np.shape(example)) if not isinstance(example, tuple) else example
    dtype = getattr(example, "dtype", jnp.float32)
    layers = describe_layers(module, variables, jax.ShapeDtypeStruct((1, *shape[1:]), dtype),
                             **(apply_kwargs or {}))
    unknown = [p for p in formats if p not in layers]
    if unknown:
        raise ValueError(f"formats names unknown layer path(s) {unknown}; layers are: {', '.join(layers)}")
    is_skipped = _skip_predicate(skip, layers)
    chosen = [p for p in layers if not is_skipped(p)]
    if ranks is not None:
        _check_ranks_cover(ranks, chosen, layers)
    entries = []
    for path in chosen:
        info = _layer_info(layers[path])
        fmt = _choose_format(path, info["kind"], format, formats)
        groups = info.get("groups", 1)
        if ranks is not None:
            chosen_ranks = _normalize_ranks(fmt, ranks[path], path)
            _check_rank_bounds(fmt, chosen_ranks, info["kernel_shape"], groups, path)
        else:
            kernel = jnp.asarray(_subtree(variables["params"], path)["kernel"])
            chosen_ranks = rank_for_ratio(fmt, info["kernel_shape"], ratio, groups=groups,
                                          kernel=kernel[..., : info["kernel_shape"][-1] // groups])
        spec = dict(info, path=path, format=fmt, ranks=chosen_ranks)
        entries.append(_finish_entry(spec, (layers[path].in_shape, layers[path].out_shape)))
    return Plan(tuple(entries), (1, *shape[1:]))


def _subtree(params, path: str):
    node = params
    for part in path.split(".") if path else []:
        node = node[part]
    return node


def kernels_of(variables, plan: Plan) -> dict:
    """``{path: kernel}`` of the planned layers, read from ``variables["params"]``."""
    params, out = variables["params"], {}
    for entry in plan.entries:
        try:
            kernel = _subtree(params, entry.path)["kernel"]
        except (KeyError, TypeError):
            raise ValueError(f"variables['params'] has no kernel at {entry.path!r}; layers inside lifted "
                             "transforms (nn.scan, nn.vmap) are not supported: skip them") from None
        if tuple(kernel.shape) != tuple(entry.kernel_shape):
            raise ValueError(f"the kernel at {entry.path!r} has shape {tuple(kernel.shape)}, the layer's "
                             f"calls need {entry.kernel_shape}: skip it")
        out[entry.path] = jnp.asarray(kernel)
    return out


def _without_kernels(variables, paths) -> dict:
    variables = unfreeze(variables) if not isinstance(variables, dict) else jax.tree.map(lambda v: v, variables)
    for path in paths:
        _subtree(variables["params"], path).pop("kernel")
    return variables


# ----------------------------------------------------------------------------- the compressed model


@dataclasses.dataclass(frozen=True)
class LinenCompressed:
    """A compressed linen model: the user's ``module``, its ``variables`` without the replaced
    kernels, the ``factors`` pytree ``{path: factorized kernel}`` and the :class:`Plan`.
    Calling it runs :func:`apply_factorized`. ``layers`` / ``seconds`` are the compression's
    per-layer reports and wall time (empty / 0 after :func:`load`)."""

    module: nn.Module
    variables: dict
    factors: dict
    plan: Plan
    layers: tuple = ()
    seconds: float = 0.0
    apply_kwargs: tuple = ()

    def __call__(self, x):
        return apply_factorized(self.module, self.variables, self.factors, x, **dict(self.apply_kwargs))

    @property
    def mean_relative_error(self) -> float:
        return float(np.mean([layer.relative_error for layer in self.layers]))

    def num_params(self) -> int:
        """Parameters of ``variables["params"]`` (replaced kernels removed) plus the factors."""
        leaves = jax.tree_util.tree_leaves(self.variables["params"]) + jax.tree_util.tree_leaves(self.factors)
        return int(sum(math.prod(np.shape(v)) for v in leaves))


def compress(module: nn.Module, variables, calib_images=None, *, format: str, norm: str, key: jax.Array,
             ratio=None, ranks=None, skip=(), max_steps: int | None = None, covariances=None,
             batch_size: int = 256, progress: bool = True, apply_kwargs: dict | None = None,
             devices=None) -> LinenCompressed:
    """Calibrate (parallel), plan and decompose a linen model: the twin of
    :func:`sigmadecomp.compress.compress_model` (same arguments and per-layer reports).

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> net = nn.Sequential([nn.Conv(8, (3, 3)), nn.relu, nn.Conv(8, (3, 3))])
    >>> images = jax.random.normal(jax.random.key(1), (8, 6, 6, 3))
    >>> variables = net.init(jax.random.key(0), images)
    >>> small = compress(net, variables, images, format="tucker2", norm="sigma", ratio=0.5,
    ...                  key=jax.random.key(0), progress=False)
    >>> small(images).shape, [layer.rank for layer in small.layers]
    ((8, 6, 6, 8), [(4, 1), (4, 4)])
    """
    from sigmadecomp.compress import _check_norm, _reports, solver_for
    from sigmadecomp.distributed import solve_layers

    start = time.perf_counter()
    _check_norm(norm)
    example = calib_images if calib_images is not None else None
    if example is None:
        raise ValueError("give calib_images: the linen path needs inputs to find and calibrate the layers")
    layer_plan = plan(module, variables, example, format=format, ratio=ratio, ranks=ranks, skip=skip,
                      apply_kwargs=apply_kwargs)
    if len(layer_plan) == 0:
        raise ValueError("the plan is empty: every eligible layer is skipped; skip fewer layers")
    _check_ungrouped(layer_plan)
    if covariances is None:
        stream = list(make_batches(calib_images, batch_size=batch_size))
        covariances = collect_covariances(module, variables, stream, layers=layer_plan.paths,
                                          progress=progress, apply_kwargs=apply_kwargs, devices=devices)
    kernels = kernels_of(variables, layer_plan)
    keys = jax.random.split(key, len(layer_plan))
    solutions = solve_layers([kernels[e.path] for e in layer_plan.entries],
                             [solver_for(e, max_steps=max_steps) for e in layer_plan.entries],
                             [covariances[e.path].cov if norm == "sigma" else None for e in layer_plan.entries],
                             list(keys), devices=devices)
    reports = _reports(layer_plan, kernels, covariances, solutions)
    here = jax.local_devices()[0]  # solves may have run on other devices
    factors = {e.path: jax.device_put(s.value, here) for e, s in zip(layer_plan.entries, solutions)}
    return LinenCompressed(module, _without_kernels(variables, layer_plan.paths), factors, layer_plan,
                           reports, time.perf_counter() - start, tuple(sorted((apply_kwargs or {}).items())))


def _check_ungrouped(layer_plan: Plan) -> None:
    grouped = [e.path for e in layer_plan.entries if e.groups != 1]
    if grouped:
        raise ValueError(f"layer(s) {grouped} are grouped convs; the pipeline decomposes ungrouped "
                         "layers only: skip them")


# ----------------------------------------------------------------------------- save / load


def _leaf_name(path: str, key_path) -> str:
    """``"conv2/in_kernel"``, ``"conv2/0/core"`` (group 0), ``"conv2/cores/1"``: one name per leaf."""
    parts = [str(getattr(k, "name", getattr(k, "idx", getattr(k, "key", k)))) for k in key_path]
    return "/".join([path, *parts])


def _flat_factors(factors: Mapping) -> dict:
    """``{name: numpy array}`` of every leaf of every layer's factor pytree (any registered format)."""
    return {_leaf_name(path, key_path): np.asarray(leaf)
            for path, factorized in factors.items()
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(factorized)[0]}


def save(path, compressed: LinenCompressed, *, format: str = "safetensors") -> None:
    """Write ``compressed.plan`` and ``compressed.factors`` into folder ``path``: ``plan.json``
    plus ``factors.safetensors`` (or an orbax checkpoint ``factors/`` with ``format="orbax"``).
    The module and its other variables are the user's; :func:`load` takes them back.

    >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn
    >>> net = nn.Sequential([nn.Conv(8, (3, 3)), nn.relu, nn.Dense(4)])
    >>> x = jnp.ones((2, 6, 6, 3))
    >>> variables = net.init(jax.random.key(0), x)
    >>> small = compress(net, variables, x, format="svd", norm="frobenius", ratio=0.5,
    ...                  key=jax.random.key(0), progress=False)
    >>> folder = tempfile.mkdtemp()
    >>> save(folder, small)
    >>> bool(jnp.all(load(folder, net, variables)(x) == small(x)))
    True
    """
    from sigmadecomp.surgery._io import write_tensors

    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    header = dict(format=_FILE_FORMAT, version=_FILE_VERSION, plan=compressed.plan.to_dict())
    (folder / "plan.json").write_text(json.dumps(header, indent=1))
    write_tensors(folder, "factors", _flat_factors(compressed.factors), format=format)


def _placeholders(entry, dtype):
    one = placeholder(entry.format, entry.group_kernel_shape, entry.ranks, dtype)
    return [one] * entry.groups if entry.groups > 1 else one


def load(path, module: nn.Module, variables, *, apply_kwargs: dict | None = None) -> LinenCompressed:
    """The :class:`LinenCompressed` saved in folder ``path``, for the user's ``module`` and its
    uncompressed ``variables`` (whose planned kernels must have the saved shapes)."""
    from sigmadecomp.surgery._io import read_tensors

    folder = pathlib.Path(path)
    file = folder / "plan.json"
    if not file.is_file():
        raise ValueError(f"{file} not found: {folder} is not a linen model saved by sigmadecomp.linen.save")
    header = json.loads(file.read_text())
    if header.get("format") != _FILE_FORMAT or header.get("version") != _FILE_VERSION:
        raise ValueError(f"{file}: format {header.get('format')!r} version {header.get('version')!r} is not "
                         f"readable; expected {_FILE_FORMAT!r} version {_FILE_VERSION}")
    layer_plan = Plan.from_dict(header["plan"])
    kernels = kernels_of(variables, layer_plan)  # checks the variables fit the plan
    templates = {e.path: _placeholders(e, kernels[e.path].dtype) for e in layer_plan.entries}
    tensors = read_tensors(folder, "factors")
    expected = _flat_factors(templates)
    problems = sorted(set(expected) ^ set(tensors)) + [
        n for n in expected if n in tensors and np.shape(tensors[n]) != np.shape(expected[n])]
    if problems:
        raise ValueError(f"{folder}: the saved factors do not fit the plan (missing, extra or mis-shaped: "
                         f"{problems})")
    factors = {}
    for path, template in templates.items():
        leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
        factors[path] = jax.tree_util.tree_unflatten(
            treedef, [jnp.asarray(tensors[_leaf_name(path, key_path)]) for key_path, _ in leaves])
    return LinenCompressed(module, _without_kernels(variables, layer_plan.paths), factors, layer_plan,
                           apply_kwargs=tuple(sorted((apply_kwargs or {}).items())))
