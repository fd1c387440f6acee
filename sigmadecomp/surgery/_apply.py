"""Apply a plan: a compressed copy of a model with the planned layers replaced."""

from __future__ import annotations

from collections.abc import Mapping

from flax import nnx

from sigmadecomp._paths import get_by_path
from sigmadecomp.layers._config import canonical_convs
from sigmadecomp.layers._registry import factorize_layer
from sigmadecomp.layers._shapes import format_of, ranks_of
from sigmadecomp.surgery._plan import Plan, PlanEntry, _layer_info

__all__ = ["apply"]


def apply(model: nnx.Module, plan: Plan, factorized_by_path: Mapping) -> nnx.Module:
    """A copy of ``model`` in which every layer of ``plan`` is replaced by its factorized layer.

    ``factorized_by_path[path]`` is the factorized kernel of that layer (a :class:`LowRank`,
    :class:`Tucker2`, :class:`CP` or :class:`CP3` of the plan's format and ranks; a list with one
    per group for a grouped conv). Each replacement is built with ``from_layer``: bias, strides,
    padding, dilation, groups, dtype and precision come from the original layer, and the factors
    are cast to the dtype of its kernel. ``model`` itself is not modified. Everything is checked
    before the copy is made.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sigmadecomp import LowRank
    >>> from sigmadecomp.surgery import plan as make_plan
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.linear = nnx.Linear(6, 4, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.linear(x)
    >>> net = Net(nnx.Rngs(0))
    >>> p = make_plan(net, format="svd", ranks={"linear": 2})
    >>> f = LowRank(jnp.ones((1, 1, 6, 2)), jnp.ones((2, 4)), kernel_shape=(6, 4))
    >>> type(apply(net, p, {"linear": f}).linear).__name__
    'LowRankDense'
    """
    _check_keys(plan, factorized_by_path)
    for entry in plan.entries:
        _check_layer(entry, get_by_path(model, entry.path))
        _check_factorized(entry, factorized_by_path[entry.path])
    compressed = nnx.clone(model)
    for entry in plan.entries:
        layer = get_by_path(compressed, entry.path)
        set_by_path(compressed, entry.path, factorize_layer(layer, factorized_by_path[entry.path],
                                                            implementation=entry.implementation))
    return canonical_convs(compressed)  # hashable conv settings for the jitted passes downstream


def set_by_path(model: nnx.Module, path: str, module: nnx.Module) -> None:
    """Put ``module`` at dotted ``path`` (an attribute, or an index of an ``nnx.List``)."""
    parent_path, _, name = path.rpartition(".")
    parent = get_by_path(model, parent_path) if parent_path else model
    if name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def _check_keys(plan: Plan, factorized_by_path: Mapping) -> None:
    if not isinstance(factorized_by_path, Mapping):
        raise ValueError(f"factorized_by_path must be a dict path → factorized kernel; got "
                         f"{type(factorized_by_path).__name__}")
    missing = [p for p in plan.paths if p not in factorized_by_path]
    extra = [p for p in factorized_by_path if p not in plan.paths]
    if missing or extra:
        raise ValueError(f"factorized_by_path must have exactly the plan's layers; missing {missing}, "
                         f"not in the plan {extra}")


def _check_layer(entry: PlanEntry, layer) -> None:
    """The model must be the one the plan was made for (same kernel, bias and configuration)."""
    if not isinstance(layer, (nnx.Conv, nnx.Linear)):
        raise ValueError(f"plan entry {entry.path!r} expects an nnx.Conv or nnx.Linear, the model has a "
                         f"{type(layer).__name__}: was the plan made for another model?")
    info = _layer_info(entry.path, layer)
    want = {k: getattr(entry, k) for k in info}
    if info != want:
        diff = {k: (want[k], info[k]) for k in info if info[k] != want[k]}
        raise ValueError(f"layer {entry.path!r} does not match the plan (field: (plan, model)): {diff}")


def _check_factorized(entry: PlanEntry, factorized) -> None:
    parts = list(factorized) if isinstance(factorized, (list, tuple)) else [factorized]
    if len(parts) != entry.groups:
        raise ValueError(f"{entry.path!r} has {entry.groups} feature group(s) and needs as many factorized "
                         f"kernels; got {len(parts)}")
    for part in parts:
        fmt = format_of(part)
        problems = []
        if fmt != entry.format:
            problems.append(f"format {fmt!r} instead of {entry.format!r}")
        if tuple(part.kernel_shape) != entry.group_kernel_shape:
            problems.append(f"kernel_shape {tuple(part.kernel_shape)} instead of {entry.group_kernel_shape}")
        if fmt == entry.format and ranks_of(part) != tuple(entry.ranks):
            problems.append(f"ranks {ranks_of(part)} instead of {tuple(entry.ranks)}")
        if problems:
            raise ValueError(f"factorized kernel for {entry.path!r} does not match the plan: "
                             f"{'; '.join(problems)}")
