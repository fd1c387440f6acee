"""PyTorch ``state_dict`` → Flax NNX. The one place where PyTorch layouts are converted:
conv ``(out, in, *spatial)`` → ``(*spatial, in, out)`` and linear ``(out, in)`` → ``(in, out)``.

Names follow the module paths: the NNX sub-module at ``layer1.0.conv1`` takes
``layer1.0.conv1.weight``. Per layer type:

==============  =====================================================================
``nnx.Conv``     ``weight`` (OIHW → HWIO), ``bias``
``nnx.Linear``   ``weight`` (out, in → in, out), ``bias``
``nnx.BatchNorm`` ``weight`` → scale, ``bias``, ``running_mean`` → mean, ``running_var`` → var
==============  =====================================================================
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmadecomp._paths import path_to_str

__all__ = ["load_pytorch_checkpoint", "load_safetensors", "load_state_dict"]

_IGNORED_SUFFIXES = (".num_batches_tracked",)  # BatchNorm bookkeeping, no inference meaning


def _conv_to_flax(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (*range(2, w.ndim), 1, 0))


def _linear_to_flax(w: np.ndarray) -> np.ndarray:
    return w.T


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _torch_shape(variable: nnx.Variable, convert: Callable) -> tuple[int, ...]:
    """The PyTorch-layout shape that ``convert`` turns into ``variable``'s shape."""
    shape = variable.get_value().shape
    if convert is _conv_to_flax:
        return (shape[-1], shape[-2], *shape[:-2])
    return shape[::-1] if convert is _linear_to_flax else shape


def _slots(module: nnx.Module) -> dict[str, tuple[nnx.Variable, Callable]]:
    """PyTorch parameter name (relative) → (NNX variable, layout conversion) for one layer."""
    if isinstance(module, nnx.Conv):
        table = {"weight": ("kernel", _conv_to_flax), "bias": ("bias", _same)}
    elif isinstance(module, nnx.Linear):
        table = {"weight": ("kernel", _linear_to_flax), "bias": ("bias", _same)}
    elif isinstance(module, nnx.BatchNorm):
        table = {"weight": ("scale", _same), "bias": ("bias", _same),
                 "running_mean": ("mean", _same), "running_var": ("var", _same)}
    else:
        return {}
    slots = {}
    for torch_name, (attr, convert) in table.items():
        variable = getattr(module, attr, None)
        if isinstance(variable, nnx.Variable) and variable.get_value() is not None:
            slots[torch_name] = (variable, convert)
    return slots


def _model_slots(model: nnx.Module) -> dict[str, tuple[nnx.Variable, Callable]]:
    """Every importable variable of ``model`` by its full PyTorch name; an error if some
    parameter of the model belongs to a layer type this importer does not know."""
    slots = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            prefix = path_to_str(path)
            for name, slot in _slots(node).items():
                slots[f"{prefix}.{name}" if prefix else name] = slot
    covered = {id(variable) for variable, _ in slots.values()}
    orphans = [path_to_str(p) for p, node in nnx.iter_graph(model)
               if isinstance(node, (nnx.Param, nnx.BatchStat)) and id(node) not in covered]
    if orphans:
        raise TypeError(f"load_state_dict only fills nnx.Conv, nnx.Linear and nnx.BatchNorm layers; "
                        f"these parameters belong to other layers: {', '.join(orphans)}")
    return slots


def _strip_module_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoints saved from ``nn.DataParallel`` prefix every name with ``module.``."""
    names = [k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES)]
    if names and all(k.startswith("module.") for k in names):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return dict(state_dict)


def _mismatch_report(slots, state_dict) -> list[str]:
    problems = []
    for name in sorted(slots.keys() - state_dict.keys()):
        problems.append(f"missing: {name} (expected PyTorch shape {_torch_shape(*slots[name])})")
    for name in sorted(state_dict.keys() - slots.keys()):
        if not name.endswith(_IGNORED_SUFFIXES):
            problems.append(f"unexpected: {name} (shape {np.shape(state_dict[name])})")
    for name in sorted(slots.keys() & state_dict.keys()):
        expected, got = _torch_shape(*slots[name]), tuple(np.shape(state_dict[name]))
        if expected != got:
            problems.append(f"wrong shape: {name} expected {expected} (PyTorch layout), got {got}")
        elif not np.all(np.isfinite(np.asarray(state_dict[name], np.float64))):
            problems.append(f"non-finite values: {name}")
    return problems


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray]) -> nnx.Module:
    """Copy a PyTorch ``state_dict`` (name → array in PyTorch layout) into ``model`` in place and
    return ``model``.

    Every conv / linear / batch-norm variable of ``model`` must be present with the right shape,
    and every tensor of ``state_dict`` must be used (``*.num_batches_tracked`` is ignored, a
    ``module.`` prefix from ``nn.DataParallel`` is stripped). Otherwise one ``ValueError`` lists
    all missing, unexpected and mis-shaped tensors, and ``model`` is left unchanged. Values are
    cast to each variable's dtype.

    >>> from sigmadecomp.models import CifarResNet
    >>> model = CifarResNet(20, rngs=nnx.Rngs(0))
    >>> load_state_dict(model, {"conv1.weight": np.zeros((16, 3, 3, 3))})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: state_dict does not match the model (...
    """
    slots = _model_slots(model)
    state_dict = _strip_module_prefix(state_dict)
    problems = _mismatch_report(slots, state_dict)
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise ValueError(f"state_dict does not match the model ({len(problems)} problems):\n  "
                         + "\n  ".join(shown))
    for name, (variable, convert) in slots.items():
        array = convert(np.asarray(state_dict[name]))
        variable.set_value(jnp.asarray(array, dtype=variable.get_value().dtype))
    return model


def load_safetensors(model: nnx.Module, path: str | pathlib.Path) -> nnx.Module:
    """:func:`load_state_dict` from a ``.safetensors`` file of PyTorch-layout tensors (no torch
    needed). Returns ``model``, filled in place."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected a .safetensors file of a PyTorch state_dict")
    try:
        state_dict = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a valid safetensors file: {err}") from None
    return load_state_dict(model, state_dict)


def load_pytorch_checkpoint(model: nnx.Module, path: str | pathlib.Path) -> nnx.Module:
    """:func:`load_state_dict` from a ``.pt`` / ``.pth`` file saved by ``torch.save``: either a
    ``state_dict`` or a dict holding one under ``"state_dict"`` (common training checkpoints).
    Needs torch; loads with ``weights_only=True`` (no code from the file is run)."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            "load_pytorch_checkpoint needs PyTorch: `pip install torch`, or convert the checkpoint "
            "once to safetensors (safetensors.torch.save_file(state_dict, 'weights.safetensors')) "
            "and use load_safetensors"
        ) from None
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected a PyTorch checkpoint (.pt / .pth)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state_dict")
    return load_state_dict(model, {k: v.detach().cpu().numpy() for k, v in state_dict.items()})
