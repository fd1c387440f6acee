"""Your model, your data: compress any Flax model (NNX or linen) calibrated on your own images.

What ``sigmadecomp compress --model package.module:factory --data my_images/`` runs:

* the factory is imported like a console-script target (``package.module:function`` from
  ``sys.path``) and called with no arguments; it returns an NNX model with its weights loaded, or a
  linen module and its variables ``(module, variables)``;
* images come from a CIFAR-10 python folder, an image folder (one sub-folder per class, sorted
  names = label ids) or an ``.npz`` (``images``, optional ``labels``): see
  :func:`sigmadecomp.data.load_images`; pixels are scaled to ``[0, 1]`` then normalised with
  ``mean`` / ``std``;
* the report has the fields of :func:`sigmadecomp.compress.compress_pretrained`; without labels
  ``accuracy`` and ``baseline_accuracy`` are ``None`` and the top-1 ``agreement`` and
  ``output_relative_error`` (``Σ‖out_c − out_o‖² / Σ‖out_o‖²`` of the model outputs) remain.

Layers skipped by default: the first decomposable layer in execution order (``skip_first``) and the
last one (the classifier), as the ResNet path skips ``conv1`` and ``linear``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import time
from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sigmadecomp.compress as pipeline
from sigmadecomp import calibration as calib_mod
from sigmadecomp import linen as sdl
from sigmadecomp.data import CIFAR10_MEAN, CIFAR10_STD, load_images, normalize_images, sample
from sigmadecomp.surgery import save as nnx_save
from sigmadecomp.surgery._plan import trace_shapes

__all__ = ["compress_user_model", "load_factory", "load_model"]


def load_factory(spec: str):
    """The callable named by ``"package.module:function"`` (attribute paths like ``mod:obj.fn`` too),
    imported from ``sys.path`` plus the current folder (appended last, as uvicorn does).

    >>> load_factory("math:sqrt")(4.0)
    2.0
    """
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like package.module:function; got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:  # as uvicorn/gunicorn: the current folder too
        sys.path.append(os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--model {spec!r}: cannot import {module_name!r} ({err}); is its folder on "
                         "sys.path (PYTHONPATH, or the current directory)?") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"--model {spec!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"--model {spec!r} is not callable")
    return target


def load_model(spec: str):
    """Call the factory: an ``nnx.Module``, or ``(linen module, variables)``; anything else is an error."""
    model = load_factory(spec)()
    if isinstance(model, nnx.Module):
        return model
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module):
        return model
    raise ValueError(f"--model {spec!r} returned a {type(model).__name__}; it must return an nnx.Module with "
                     "its weights loaded, or a tuple (linen module, variables)")


# ----------------------------------------------------------------------------- both model kinds


@partial(jax.jit, static_argnums=0)
def _nnx_logits(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _forward_fn(model):
    """A jitted ``x -> outputs`` of an NNX model, a linen ``(module, variables)`` or a compressed one."""
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return lambda x: _nnx_logits(graphdef, state, x)
    if isinstance(model, sdl.LinenCompressed):
        run = jax.jit(lambda variables, factors, x: sdl.apply_factorized(model.module, variables, factors, x))
        return lambda x: run(model.variables, model.factors, x)
    module, variables = model
    run = jax.jit(lambda variables, x: module.apply(variables, x))
    return lambda x: run(variables, x)


def _outputs(model, images, batch_size: int) -> np.ndarray:
    """Outputs on every image, in batches (the last padded, so one compilation)."""
    forward, size, out = _forward_fn(model), min(batch_size, len(images)), []
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(forward(jnp.asarray(padded)))[: len(chunk)])
    return np.concatenate(out)


def _scores(baseline, compressed, images, labels, batch_size: int) -> dict:
    out_o, out_c = _outputs(baseline, images, batch_size), _outputs(compressed, images, batch_size)
    err = float(np.sum((out_c - out_o) ** 2) / np.sum(out_o ** 2))
    scores = dict(accuracy=None, baseline_accuracy=None, agreement=None, output_relative_error=err)
    if out_o.ndim == 2:
        base, comp = np.argmax(out_o, -1), np.argmax(out_c, -1)
        scores["agreement"] = float(np.mean(comp == base))
        if labels is not None:
            scores.update(accuracy=float(np.mean(comp == labels)), baseline_accuracy=float(np.mean(base == labels)))
    return scores


def _execution_order(model, example) -> list[str]:
    if isinstance(model, nnx.Module):
        from sigmadecomp.surgery._plan import eligible_layers

        return list(trace_shapes(model, (1, *example.shape[1:]), list(eligible_layers(model))))
    module, variables = model
    return list(sdl.describe_layers(module, variables, jax.ShapeDtypeStruct((1, *example.shape[1:]), example.dtype)))


def _skip(order: list[str], skip_first: bool) -> tuple:
    if len(order) < 2 + skip_first:
        raise ValueError(f"the model has {len(order)} conv/dense layer(s) {order}: with the first "
                         f"({'skipped' if skip_first else 'kept'}) and the classifier left dense nothing remains; "
                         "use --no-skip-first or a larger model")
    return tuple(([order[0]] if skip_first else []) + [order[-1]])


# ----------------------------------------------------------------------------- the pipeline


def _compress_nnx(model, calib_images, *, calibration, bias_correction, devices, **common):
    if calibration == "sequential":
        common.pop("norm")
        if devices is not None:
            raise ValueError("sequential calibration runs on one device; use --calibration parallel with --devices")
        return calib_mod.compress_sequential(model, calib_images, bias_correction=bias_correction, **common)
    norm = common.pop("norm")
    result = pipeline.compress_model(model, calib_images, norm=norm, devices=devices, **common)
    if bias_correction:
        corrected = calib_mod.correct_bias(model, result.model, calib_images, plan=result.plan,
                                           batch_size=common["batch_size"], progress=common["progress"])
        result = dataclasses.replace(result, model=corrected)
    return result


def _nnx_counts(model, result, images) -> tuple[dict, dict]:
    return pipeline._whole_model_counts(model, result.model, result.plan, images[:8])


def _linen_counts(model, result, images) -> tuple[dict, dict]:
    report = sdl.verify(result, model[1], [images[:8]])
    return dict(params=report.params_after, baseline_params=report.params_before,
                flops=report.flops_after, baseline_flops=report.flops_before), report.layer_errors


def _resolve_calibration(model, calibration, norm, bias_correction) -> str:
    linen = not isinstance(model, nnx.Module)
    if linen and calibration == "sequential":
        raise ValueError("sequential calibration is implemented for NNX models only; use --calibration "
                         "parallel with a linen model")
    if linen and bias_correction:
        raise ValueError("--bias-correction is implemented for NNX models only")
    if linen and calibration is None:
        pipeline._check_norm(norm)
        return "parallel"
    return pipeline._check_calibration(calibration, norm)


def compress_user_model(
    *,
    model=None,
    model_spec: str | None = None,
    data,
    eval_data=None,
    image_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    format: str = "tucker2",
    norm: str = "sigma",
    ratio: float = 0.5,
    calib: int = 256,
    key: int = 0,
    max_steps: int | None = None,
    skip_first: bool = True,
    batch_size: int = 256,
    save_dir=None,
    save_format: str = "safetensors",
    calibration: str | None = None,
    bias_correction: bool = False,
    progress: bool = True,
    devices=None,
    arch: str | None = None,
) -> dict:
    """Compress a user's model on the user's images; the report of
    :func:`sigmadecomp.compress.compress_pretrained` (see the module docstring for the differences).

    ``model`` is an ``nnx.Module`` or ``(linen module, variables)``; or give ``model_spec``
    (``"package.module:factory"``). ``calib`` images (at most all of them) are sampled from ``data``
    with ``key``; evaluation uses all of ``eval_data`` (default ``data``; for a CIFAR-10 folder the
    test batch). ``calibration=None`` picks sequential for the Σ norm on NNX models, parallel
    otherwise (linen models: parallel only). ``devices`` spreads parallel calibration and the
    layer solves over devices. ``save_dir`` receives the compressed model (NNX:
    :func:`sigmadecomp.save`; linen: :func:`sigmadecomp.linen.save`) in ``save_format``.
    """
    start = time.perf_counter()
    if model is None:
        if model_spec is None:
            raise ValueError("give model (an nnx.Module or (linen module, variables)) or model_spec")
        model = load_model(model_spec)
    calibration = _resolve_calibration(model, calibration, norm, bias_correction)
    train, test = load_images(data, "train", image_size=image_size), load_images(eval_data or data, "test",
                                                                                  image_size=image_size)
    if arch is not None and mean is None and std is None:  # the CIFAR ResNets expect these
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    calib_key, solve_key = jax.random.split(jax.random.key(key))
    n_calib = min(int(calib), len(train.images))
    calib_images = normalize_images(sample(train.images, None, n_calib, key=calib_key), mean=mean, std=std)
    test_images = normalize_images(test.images, mean=mean, std=std)
    skip = _skip(_execution_order(model, calib_images), skip_first)
    common = dict(format=format, ratio=ratio, skip=skip, key=solve_key, max_steps=max_steps,
                  batch_size=batch_size, progress=progress)
    if isinstance(model, nnx.Module):
        result = _compress_nnx(model, calib_images, calibration=calibration, bias_correction=bias_correction,
                               devices=devices, norm=norm, **common)
        compressed, counts_of = result.model, _nnx_counts
    else:
        result = sdl.compress(*model, calib_images, norm=norm, devices=devices, **common)
        compressed, counts_of = result, _linen_counts
    scores = _scores(model, compressed, test_images, test.labels, batch_size)
    counts, in_model = counts_of(model, result, calib_images)
    if save_dir is not None:
        if isinstance(model, nnx.Module):
            nnx_save(save_dir, result.model, result.plan, format=save_format)
        else:
            sdl.save(save_dir, result, format=save_format)
    config = dict(arch=arch, model=model_spec, model_kind="nnx" if isinstance(model, nnx.Module) else "linen",
                  data=str(data), eval_data=str(eval_data or data), image_size=None if image_size is None
                  else list(image_size), mean=None if mean is None else list(mean),
                  std=None if std is None else list(std), format=format, norm=norm, ratio=ratio, calib=n_calib,
                  key=key, max_steps=max_steps, skip_first=skip_first, skipped=list(skip),
                  calibration=calibration, bias_correction=bias_correction, devices=_describe(devices),
                  save=None if save_dir is None else str(save_dir), save_format=save_format)
    layers = [dict(dataclasses.asdict(layer), in_model_relative_error=in_model.get(layer.path))
              for layer in result.layers]
    return dict(scores, **counts, mean_relative_error=result.mean_relative_error,
                num_eval_images=int(len(test.images)), labelled=test.labels is not None,
                decompose_seconds=result.seconds, seconds=time.perf_counter() - start, config=config,
                layers=layers)


def _describe(devices):
    if devices is None or isinstance(devices, (int, str)):
        return devices
    return [str(d) for d in devices]
