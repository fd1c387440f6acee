"""The reusable pipeline: calibrate → plan → decompose every layer → apply → evaluate.

Used by ``sigmadecomp compress``, ``sigmadecomp demo``, the experiments and the notebooks::

    covariances = calibrate(model, calib_images)                 # once per model and data
    result = compress_model(model, calib_images, format="tucker2", norm="sigma", ratio=0.5,
                            skip=("conv1",), key=jax.random.key(0), covariances=covariances)
    scores = evaluate_agreement(model, result.model, test_images, test_labels)

Every layer's :attr:`LayerReport.relative_error` is the relative Σ-error
``tr(ΔW cov ΔWᵀ) / tr(W cov Wᵀ)`` measured with that layer's calibration ``cov`` — also for layers
fitted in the Frobenius norm — so the two norms are compared on the quantity that matters: how much
the layer's output moves on real data.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import sigmadecomp as sd
from sigmadecomp._paths import get_by_path
from sigmadecomp.formats import get as get_format
from sigmadecomp.data import batches

__all__ = [
    "ARCHS",
    "CALIBRATIONS",
    "NORMS",
    "Compressed",
    "LayerReport",
    "calibrate",
    "compress_model",
    "compress_pretrained",
    "count_params",
    "evaluate_agreement",
    "predict_labels",
    "solver_for",
    "summary",
]

NORMS = ("frobenius", "sigma")
CALIBRATIONS = ("parallel", "sequential")


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """How one layer was compressed."""

    path: str
    format: str
    rank: object  # int, or (r_out, r_in) for Tucker-2
    params: int  # parameters of the factors
    baseline_params: int  # parameters of the dense kernel
    relative_error: float  # relative Σ-error w.r.t. the layer's calibration cov (both norms)
    status: str  # the solver's Status name
    num_steps: int


@dataclasses.dataclass(frozen=True)
class Compressed:
    """The compressed model (a new module; the input model is untouched) and per-layer reports."""

    model: nnx.Module
    plan: object
    layers: tuple[LayerReport, ...]
    seconds: float

    @property
    def mean_relative_error(self) -> float:
        """Mean over compressed layers of the relative Σ-error (see :class:`LayerReport`)."""
        return float(np.mean([layer.relative_error for layer in self.layers]))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` leaves) of ``model``.

    >>> from flax import nnx
    >>> count_params(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    8
    """
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    return int(sum(math.prod(leaf.shape) for leaf in leaves))


@partial(jax.jit, static_argnums=0)
def _argmax_logits(graphdef, state, images):
    return jnp.argmax(nnx.merge(graphdef, state)(images), axis=-1)


def predict_labels(model: nnx.Module, images, *, batch_size: int = 256) -> np.ndarray:
    """Top-1 predicted class of every image, in batches (the last one padded: one compilation)."""
    images = np.asarray(images)
    graphdef, state = nnx.split(model)
    size = min(batch_size, images.shape[0])
    out = []
    for start in range(0, images.shape[0], size):
        chunk = images[start : start + size]
        padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(_argmax_logits(graphdef, state, jnp.asarray(padded)))[: len(chunk)])
    return np.concatenate(out)


def evaluate_agreement(
    baseline: nnx.Module, compressed: nnx.Module, images, labels, *, batch_size: int = 256
) -> dict[str, float]:
    """Top-1 accuracy of both models and their top-1 agreement (fraction of equal predictions)."""
    labels = np.asarray(labels)
    base = predict_labels(baseline, images, batch_size=batch_size)
    comp = predict_labels(compressed, images, batch_size=batch_size)
    return {
        "accuracy": float(np.mean(comp == labels)),
        "baseline_accuracy": float(np.mean(base == labels)),
        "agreement": float(np.mean(comp == base)),
    }


def calibrate(
    model: nnx.Module,
    images,
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> dict:
    """``{path: LayerCovariance}`` of ``layers`` (default: every conv/dense) on ``images``.

    A thin wrapper of :func:`sigmadecomp.collect_covariances` over fixed-order batches, so the same
    images always give the same statistics.
    """
    stream = list(batches(images, batch_size=batch_size))
    return sd.collect_covariances(model, stream, layers=layers, progress=progress)


def solver_for(entry, *, max_steps: int | None = None) -> sd.AbstractSolver:
    """The solver configuration for one plan entry (its format and ranks)."""
    options = {} if max_steps is None else {"max_steps": int(max_steps)}
    return get_format(entry.format).solver(tuple(entry.ranks), **options)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")


def _decompose_layer(model, entry, cov, *, norm, key, max_steps) -> tuple[object, LayerReport]:
    if entry.groups != 1:
        raise ValueError(
            f"layer {entry.path!r} is a grouped conv (groups={entry.groups}); the pipeline "
            "decomposes ungrouped layers only: skip it"
        )
    kernel = get_by_path(model, entry.path).kernel[...]
    solution = sd.decompose(
        kernel, solver_for(entry, max_steps=max_steps), cov=cov if norm == "sigma" else None, key=key
    )
    layer_result = LayerReport(
        path=entry.path,
        format=entry.format,
        rank=entry.ranks[0] if len(entry.ranks) == 1 else tuple(entry.ranks),
        params=entry.params_after,
        baseline_params=entry.params_before,
        relative_error=float(sd.relative_error(kernel, solution.value, cov)),
        status=sd.Status(int(solution.status)).name,
        num_steps=int(solution.num_steps),
    )
    return solution.value, layer_result


def compress_model(
    model: nnx.Module,
    calib_images=None,
    *,
    format: str,
    norm: str,
    key: jax.Array,
    ratio: float | None = None,
    ranks: Mapping | None = None,
    skip=(),
    max_steps: int | None = None,
    covariances: Mapping | None = None,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> Compressed:
    """Calibrate, plan, decompose every planned layer and rebuild the model.

    Args:
        model: the trained NNX model (not modified; run in inference mode, e.g. ``model.eval()``).
        calib_images: preprocessed calibration inputs; not needed when ``covariances`` is given.
        format: ``"svd"``, ``"tucker2"``, ``"cp"`` or ``"cp3"`` (see :func:`sigmadecomp.plan`).
        norm: ``"frobenius"`` (classic SVD/ALS on the weights) or ``"sigma"`` (minimise the output
            error ``tr(ΔW cov ΔWᵀ)`` on the calibration data).
        key: PRNG key; layer ``i`` of the plan gets ``jax.random.split(key, n)[i]``.
        ratio, ranks, skip: as in :func:`sigmadecomp.plan` (exactly one of ``ratio``, ``ranks``).
        max_steps: ALS sweeps per layer (default: each solver's own).
        covariances: precomputed ``{path: LayerCovariance}`` (e.g. from :func:`calibrate`), to
            compare several formats/norms/ratios on the same statistics.
        input_shape: e.g. ``(1, 32, 32, 3)`` for the plan's FLOP counts; default: one
            calibration image, or no FLOPs when only ``covariances`` is given.

    Returns:
        A :class:`Compressed`: the new model, the plan and one :class:`LayerReport` per layer.

    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from sigmadecomp.models import SmallCNN
    >>> model = SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(0))
    >>> images = np.random.default_rng(0).random((16, 8, 8, 1), np.float32)
    >>> result = compress_model(model, images, format="tucker2", norm="sigma", ratio=0.5,
    ...                         skip=("conv1", "linear"), key=jax.random.key(0), progress=False)
    >>> [(layer.path, layer.rank) for layer in result.layers]
    [('conv2', (4, 2)), ('conv3', (4, 4))]
    >>> count_params(result.model) < count_params(model)
    True
    """
    start = time.perf_counter()
    _check_norm(norm)
    if input_shape is None and calib_images is not None:
        input_shape = (1, *np.shape(calib_images)[1:])
    layer_plan = sd.plan(model, format=format, ratio=ratio, ranks=ranks, skip=skip,
                         input_shape=input_shape)
    if len(layer_plan) == 0:
        raise ValueError("the plan is empty: every eligible layer is skipped; skip fewer layers")
    covariances = _covariances_for(model, layer_plan, calib_images, covariances, batch_size, progress)
    factorized, reports = {}, []
    keys = jax.random.split(key, len(layer_plan))
    entries = tqdm(layer_plan.entries, desc=f"{format}/{norm}", disable=not progress, leave=False)
    for entry, layer_key in zip(entries, keys):
        factorized[entry.path], report = _decompose_layer(
            model, entry, covariances[entry.path].cov, norm=norm, key=layer_key, max_steps=max_steps
        )
        reports.append(report)
    compressed = sd.apply(model, layer_plan, factorized)
    return Compressed(compressed, layer_plan, tuple(reports), time.perf_counter() - start)


def _covariances_for(model, layer_plan, calib_images, covariances, batch_size, progress) -> Mapping:
    if covariances is None:
        if calib_images is None:
            raise ValueError("give calib_images (to calibrate) or precomputed covariances")
        return calibrate(model, calib_images, layers=layer_plan.paths, batch_size=batch_size,
                         progress=progress)
    missing = [p for p in layer_plan.paths if p not in covariances]
    if missing:
        raise ValueError(f"covariances has no entry for planned layer(s) {missing}; calibrate them "
                         "too (calibrate(model, images, layers=plan.paths))")
    return covariances


ARCHS = {"resnet20": 20, "resnet32": 32, "resnet56": 56}


def _whole_model_counts(model, compressed, layer_plan, images) -> tuple[dict, dict]:
    """Parameters and MACs per example of the whole model before/after, measured by
    :func:`sigmadecomp.verify` on a few images (MACs of every conv/dense call, not predicted), and
    each layer's relative output error inside the compressed model (earlier layers compressed)."""
    report = sd.verify(model, compressed, [images], plan=layer_plan)
    in_model = {layer.path: layer.rel_error for layer in report.layers}
    return dict(params=report.params_after, baseline_params=report.params_before,
                flops=report.flops_after, baseline_flops=report.flops_before), in_model


def compress_pretrained(
    *,
    arch: str,
    weights,
    data_dir,
    eval_dir=None,
    format: str = "tucker2",
    norm: str = "sigma",
    ratio: float = 0.5,
    calib: int = 256,
    key: int = 0,
    max_steps: int | None = None,
    skip_first: bool = True,
    batch_size: int = 256,
    save_dir=None,
    calibration: str | None = None,
    bias_correction: bool = False,
    rank_rule: str = "uniform",
    budget: str | None = None,
    tau: float | None = None,
    progress: bool = True,
) -> dict:
    """Compress a pretrained CIFAR-10 ResNet and evaluate it: what ``sigmadecomp compress`` runs.

    Calibrates on ``calib`` images of ``data_dir``'s training batches (chosen with ``key``),
    compresses every conv except ``conv1`` (unless ``skip_first=False``) — never the classifier —
    and evaluates on ``test_batch`` of ``eval_dir`` (default ``data_dir``). Returns a JSON-ready dict:
    ``accuracy``, ``baseline_accuracy``, ``agreement`` (top-1 agreement with the uncompressed model),
    ``params``/``baseline_params`` (whole model), ``flops``/``baseline_flops`` (MACs per image of
    all conv/dense layers), ``mean_relative_error`` (see :class:`LayerReport`; with sequential
    calibration the cross error ``E‖W x − W̃ x̂‖² / E‖W x‖²`` instead), ``seconds``, the
    ``config`` and one entry per compressed layer. ``save_dir`` receives the model via
    :func:`sigmadecomp.save`.

    ``calibration`` is ``"sequential"`` (each layer fitted, in execution order, to the inputs it
    sees in the partially compressed network: :func:`sigmadecomp.calibration.compress_sequential`)
    or ``"parallel"`` (every layer's ``cov`` from the original network). ``None`` picks sequential
    for the Σ norm — it is the better one: ResNet-20, Tucker-2, ratio 0.5 goes from 81.2% to 89.6%
    (``experiments/sequential``) — and parallel for Frobenius, which uses no statistics.
    ``bias_correction`` shifts each compressed layer's mean output on the calibration images back
    to the original's (:func:`sigmadecomp.calibration.correct_bias`).

    ``rank_rule`` (``"uniform"``, ``"energy"``, ``"vbmf"``, ``"global"``), ``budget``
    (``"params=R"`` / ``"flops=R"``, relative to the compressed layers' dense counts; replaces
    ``ratio``) and ``tau`` choose the ranks with :func:`sigmadecomp.surgery.select_ranks`, on the
    original network's statistics, before any layer is fitted (also under sequential
    calibration). The report then has a ``rank_selection`` entry (rule, achieved budget,
    predicted damage) and each layer its ``predicted_error`` and ``sensitivity``.
    """
    start = time.perf_counter()
    calibration = _check_calibration(calibration, norm)
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {tuple(ARCHS)}; got {arch!r}")
    model = sd.models.pretrained_resnet(ARCHS[arch], weights)
    calib_key, solve_key = jax.random.split(jax.random.key(key))
    train_images, _ = sd.data.load_cifar10(data_dir, "train")
    test_images, test_labels = sd.data.load_cifar10(eval_dir or data_dir, "test")
    calib_images = sd.data.cifar10_normalize(sd.data.sample(train_images, None, calib, key=calib_key))
    skip = ("conv1", "linear") if skip_first else ("linear",)
    selection, ranks = None, None
    if rank_rule != "uniform" or (budget is not None and not budget.startswith("params")):
        selection = _select(model, calib_images, format=format, norm=norm, rule=rank_rule, budget=budget,
                            tau=tau, skip=skip, key=jax.random.fold_in(calib_key, 1), batch_size=batch_size,
                            progress=progress)
        ratio, ranks, skip = None, selection, selection.is_dense
    elif budget is not None:
        ratio = sd.surgery.Budget.parse(budget).ratio
    if calibration == "sequential":
        result = sd.calibration.compress_sequential(
            model, calib_images, format=format, ratio=ratio, ranks=ranks, skip=skip, key=solve_key,
            max_steps=max_steps, bias_correction=bias_correction, batch_size=batch_size,
            progress=progress)
    else:
        result = compress_model(model, calib_images, format=format, norm=norm, ratio=ratio, ranks=ranks,
                                skip=skip, key=solve_key, max_steps=max_steps,
                                batch_size=batch_size, progress=progress)
        if bias_correction:
            corrected = sd.calibration.correct_bias(model, result.model, calib_images,
                                                    plan=result.plan, batch_size=batch_size,
                                                    progress=progress)
            result = dataclasses.replace(result, model=corrected)
    scores = evaluate_agreement(model, result.model, sd.data.cifar10_normalize(test_images),
                                test_labels, batch_size=batch_size)
    counts, in_model = _whole_model_counts(model, result.model, result.plan, calib_images[:8])
    if save_dir is not None:
        sd.save(save_dir, result.model, result.plan)
    config = dict(arch=arch, weights=str(weights), data=str(data_dir),
                  eval_data=str(eval_dir or data_dir), format=format, norm=norm, ratio=ratio,
                  calib=calib, key=key, max_steps=max_steps, skip_first=skip_first,
                  calibration=calibration, bias_correction=bias_correction, rank_rule=rank_rule,
                  budget=budget, tau=tau, save=None if save_dir is None else str(save_dir))
    layers = [dict(dataclasses.asdict(layer), in_model_relative_error=in_model.get(layer.path))
              for layer in result.layers]
    extra = {}
    if selection is not None:
        extra["rank_selection"] = selection.to_dict()
        chosen = {c.path: c for c in selection.layers}
        layers = [dict(layer, predicted_error=chosen[layer["path"]].predicted_error,
                       sensitivity=chosen[layer["path"]].sensitivity) for layer in layers]
    return dict(scores, **counts, **extra, mean_relative_error=result.mean_relative_error,
                num_eval_images=int(len(test_labels)), decompose_seconds=result.seconds,
                seconds=time.perf_counter() - start, config=config, layers=layers)


def _select(model, calib_images, *, format, norm, rule, budget, tau, skip, key, batch_size, progress):
    """Rank selection on the original network's statistics (see :func:`select_ranks`)."""
    paths = sd.plan(model, format=format, ratio=1.0, skip=skip).paths
    covariances = calibrate(model, calib_images, layers=paths, batch_size=batch_size, progress=progress)
    return sd.surgery.select_ranks(model, covariances, format=format, rule=rule, budget=budget, tau=tau,
                                   norm=norm, images=calib_images, key=key, skip=skip,
                                   input_shape=(1, *np.shape(calib_images)[1:]), progress=progress)


def _check_calibration(calibration: str | None, norm: str) -> str:
    """Resolve the default calibration mode and reject combinations that mean nothing."""
    _check_norm(norm)
    if calibration is None:
        return "sequential" if norm == "sigma" else "parallel"
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}; got {calibration!r}")
    if calibration == "sequential" and norm != "sigma":
        raise ValueError("sequential calibration fits the Σ norm; use norm='sigma' with it "
                         "(the Frobenius norm uses no calibration statistics)")
    return calibration


def _ranks_text(config: dict, report: dict) -> str:
    rule = config.get("rank_rule", "uniform")
    if rule == "uniform" and config.get("budget") is None:
        return f"ratio {config['ratio']}"
    sel = report.get("rank_selection") or {}
    achieved = sel.get("achieved_params")
    tail = "" if achieved is None else f", achieved params {achieved:.3f} flops {sel['achieved_flops']:.3f}"
    return f"rank rule {rule}, budget {config.get('budget') or config.get('tau')}{tail}"


def summary(report: dict) -> str:
    """A few human-readable lines of a :func:`compress_pretrained` report."""
    c = report["config"]
    return "\n".join([
        f"{c['arch']} {c['format']}/{c['norm']} ({c.get('calibration', 'parallel')} calibration) "
        f"{_ranks_text(c, report)} ({len(report['layers'])} layers, "
        f"{c['calib']} calibration images, key {c['key']})",
        f"  accuracy  {report['accuracy']:.2%}  (uncompressed {report['baseline_accuracy']:.2%}, "
        f"top-1 agreement {report['agreement']:.2%}, {report['num_eval_images']} test images)",
        f"  params    {report['params']:,} / {report['baseline_params']:,} "
        f"({report['params'] / report['baseline_params']:.2f}x)",
        f"  MACs      {report['flops']:,} / {report['baseline_flops']:,} "
        f"({report['flops'] / report['baseline_flops']:.2f}x)",
        f"  mean relative {'cross' if c.get('calibration') == 'sequential' else 'Σ'}-error "
        f"{report['mean_relative_error']:.4f}   "
        f"time {report['seconds']:.1f} s",
    ])
