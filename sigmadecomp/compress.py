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
import re
import time
import warnings
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
from sigmadecomp.layers._config import canonical_convs

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
    "checked_fit",
    "keep_dense",
    "predict_labels",
    "predict_logits",
    "resnet_depth",
    "rejection",
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
    max_increase: float = 0.0  # largest rise of the solver's error history in one sweep, relative
    # to its first value (0 when the history never increases)


def history_increase(solution) -> float:
    """Largest rise of ``solution.errors`` from one sweep to the next, relative to the first
    value (0.0 when non-increasing, as every exact block-ALS solver must be)."""
    errors = np.asarray(solution.errors)[: int(solution.num_steps) + 1]
    if len(errors) < 2 or not errors[0] > 0:
        return 0.0
    return float(max(0.0, np.max(np.diff(errors)) / errors[0]))


@dataclasses.dataclass(frozen=True)
class Compressed:
    """The compressed model (a new module; the input model is untouched) and per-layer reports."""

    model: nnx.Module
    plan: object  # the layers actually replaced (kept-dense layers are left out)
    layers: tuple[LayerReport, ...]
    seconds: float
    kept_dense: tuple = ()  # {"path", "status", "reason"} of planned layers left dense
    replan: dict | None = None  # compress_sequential(replan=...): ranks up front / re-planned, achieved budget

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
def _logits(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


def predict_logits(model: nnx.Module, images, *, batch_size: int = 256) -> np.ndarray:
    """The model's outputs on every image, in batches (the last one padded: one compilation).

    >>> from sigmadecomp.models import SmallCNN
    >>> predict_logits(SmallCNN(rngs=nnx.Rngs(0)), np.zeros((3, 8, 8, 1), np.float32)).shape
    (3, 10)
    """
    images = np.asarray(images)
    graphdef, state = nnx.split(canonical_convs(model))
    size = min(batch_size, images.shape[0])
    out = []
    for start in range(0, images.shape[0], size):
        chunk = images[start : start + size]
        padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(_logits(graphdef, state, jnp.asarray(padded)))[: len(chunk)])
    return np.concatenate(out)


def predict_labels(model: nnx.Module, images, *, batch_size: int = 256) -> np.ndarray:
    """Top-1 predicted class of every image (:func:`predict_logits`' argmax)."""
    return np.argmax(predict_logits(model, images, batch_size=batch_size), axis=-1)


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
    devices=None,
) -> dict:
    """``{path: LayerCovariance}`` of ``layers`` (default: every conv/dense) on ``images``.

    A thin wrapper of :func:`sigmadecomp.collect_covariances` over fixed-order batches, so the same
    images always give the same statistics; ``devices`` splits each batch over several devices.
    """
    stream = list(batches(images, batch_size=batch_size))
    return sd.collect_covariances(model, stream, layers=layers, progress=progress, devices=devices)


def solver_for(entry, *, max_steps: int | None = None) -> sd.AbstractSolver:
    """The solver configuration for one plan entry (its format and ranks)."""
    options = {} if max_steps is None else {"max_steps": int(max_steps)}
    return get_format(entry.format).solver(tuple(entry.ranks), **options)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")


def rejection(solution) -> str | None:
    """Why ``solution`` must not be inserted into a model, or ``None`` when it may be.

    A non-finite solve (status ``NONFINITE``), an invalid metric (``NOT_PSD``) or any non-finite
    factor entry disqualifies it; ``MAX_STEPS`` and ``INNER_NOT_CONVERGED`` do not (the error
    never increased, the factors are usable). Host function (call outside ``jit``).
    """
    status = sd.Status(int(solution.status))
    if status in (sd.Status.NONFINITE, sd.Status.NOT_PSD):
        return f"status {status.name}: {status.message}"
    leaves = jax.tree_util.tree_leaves(solution.value)
    # On the host: an eager jnp.isfinite would compile two programs per factor shape (issue 10).
    if not all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves):
        return f"status {status.name} but the factors have non-finite entries"
    return None


def keep_dense(path: str, status: str, reason: str) -> dict:
    """Warn once that layer ``path`` stays dense, and return its ``kept_dense`` record."""
    warnings.warn(f"layer {path!r} kept dense: {reason}", RuntimeWarning, stacklevel=3)
    return {"path": path, "status": status, "reason": reason}


def _not_psd(path: str, error: Exception) -> dict:
    return keep_dense(path, sd.Status.NOT_PSD.name, " ".join(str(error).split()))


def checked_fit(path: str, fit):
    """``(solution, None)`` from ``fit()``, or ``(None, kept_dense record)`` when the solve is
    unusable (:func:`rejection`) or its ``cov`` is not PSD (:class:`sigmadecomp.NotPSDError`)."""
    try:
        solution = fit()
    except sd.NotPSDError as error:
        return None, _not_psd(path, error)
    reason = rejection(solution)
    if reason is not None:
        return None, keep_dense(path, sd.Status(int(solution.status)).name, reason)
    return solution, None


def _decompose_layer(model, entry, cov, *, norm, key, max_steps) -> tuple[object, LayerReport]:
    if entry.groups != 1:
        raise ValueError(
            f"layer {entry.path!r} is a grouped conv (groups={entry.groups}); the pipeline "
            "decomposes ungrouped layers only: skip it"
        )
    kernel = get_by_path(model, entry.path).kernel[...]

    def fit():
        solution = sd.decompose(kernel, solver_for(entry, max_steps=max_steps),
                                cov=cov if norm == "sigma" else None, key=key)
        if cov is not None:  # also validates cov for the Frobenius fit's Σ-error report
            sd.solvers._validation.check_second_moments(kernel, cov, None, None)
        return solution

    solution, kept = checked_fit(entry.path, fit)
    if kept is not None:
        return kept, None
    layer_result = LayerReport(
        path=entry.path,
        format=entry.format,
        rank=entry.ranks[0] if len(entry.ranks) == 1 else tuple(entry.ranks),
        params=entry.params_after,
        baseline_params=entry.params_before,
        relative_error=float(sd.relative_error(kernel, solution.value, cov)),
        status=sd.Status(int(solution.status)).name,
        num_steps=int(solution.num_steps),
        max_increase=history_increase(solution),
    )
    return solution, layer_result


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
    formats: Mapping | None = None,
    max_steps: int | None = None,
    covariances: Mapping | None = None,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 256,
    progress: bool = True,
    devices=None,
) -> Compressed:
    """Calibrate, plan, decompose every planned layer and rebuild the model.

    Args:
        model: the trained NNX model (not modified; run in inference mode, e.g. ``model.eval()``).
        calib_images: preprocessed calibration inputs; not needed when ``covariances`` is given.
        format: ``"svd"``, ``"tucker2"``, ``"cp"`` or ``"cp3"`` (see :func:`sigmadecomp.plan`).
        norm: ``"frobenius"`` (classic SVD/ALS on the weights) or ``"sigma"`` (minimise the output
            error ``tr(ΔW cov ΔWᵀ)`` on the calibration data).
        key: PRNG key; layer ``i`` of the plan gets ``jax.random.split(key, n)[i]``.
        ratio, ranks, skip, formats: as in :func:`sigmadecomp.plan` (exactly one of ``ratio``,
            ``ranks``; ``formats`` overrides ``format`` per layer, and a ``global`` rank selection
            over several formats passed as ``ranks`` brings its own).
        max_steps: ALS sweeps per layer (default: each solver's own).
        covariances: precomputed ``{path: LayerCovariance}`` (e.g. from :func:`calibrate`), to
            compare several formats/norms/ratios on the same statistics.
        input_shape: e.g. ``(1, 32, 32, 3)`` for the plan's FLOP counts; default: one
            calibration image, or no FLOPs when only ``covariances`` is given.
        devices: ``None`` (one device), ``"all"``, a count or a list of devices: calibration
            data-parallel over them and the layers' solves spread over them
            (:mod:`sigmadecomp.distributed`); same results as one device up to rounding of the
            covariance sums.

    Returns:
        A :class:`Compressed`: the new model, the plan and one :class:`LayerReport` per layer.
        A layer whose solve is unusable (:func:`rejection`: non-finite, or ``cov`` not PSD) is
        not inserted: it stays dense, a ``RuntimeWarning`` names it and the reason, and it is
        listed in ``kept_dense`` instead of ``layers`` (and left out of the returned ``plan``).

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
    model = canonical_convs(model)
    if input_shape is None and calib_images is not None:
        input_shape = (1, *np.shape(calib_images)[1:])
    layer_plan = sd.plan(model, format=format, ratio=ratio, ranks=ranks, skip=skip, formats=formats,
                         input_shape=input_shape)
    if len(layer_plan) == 0:
        raise ValueError("the plan is empty: every eligible layer is skipped; skip fewer layers")
    covariances = _covariances_for(model, layer_plan, calib_images, covariances, batch_size, progress,
                                   devices)
    if devices is not None:  # independent layers spread over devices (sigmadecomp.distributed)
        factorized, reports, kept = _decompose_on_devices(model, layer_plan, covariances, norm=norm, key=key,
                                                          max_steps=max_steps, devices=devices)
    else:
        factorized, reports, kept = _decompose_here(model, layer_plan, covariances, norm=norm, key=key,
                                                    max_steps=max_steps, progress=progress,
                                                    desc=f"{format}/{norm}")
    used = sd.Plan(tuple(e for e in layer_plan.entries if e.path in factorized), layer_plan.input_shape)
    compressed = sd.apply(model, used, factorized)
    return Compressed(compressed, used, tuple(reports), time.perf_counter() - start, tuple(kept))


def _decompose_here(model, layer_plan, covariances, *, norm, key, max_steps, progress, desc):
    """Every planned layer solved on the default device, in plan order (progress bar ``desc``):
    ``(factorized, reports, kept_dense)``."""
    factorized, reports, kept = {}, [], []
    keys = jax.random.split(key, len(layer_plan))
    entries = tqdm(layer_plan.entries, desc=desc, disable=not progress, leave=False)
    for entry, layer_key in zip(entries, keys):
        solution, report = _decompose_layer(
            model, entry, covariances[entry.path].cov, norm=norm, key=layer_key, max_steps=max_steps
        )
        if report is None:  # `solution` is the kept_dense record
            kept.append(solution)
            continue
        factorized[entry.path] = solution.value
        reports.append(report)
    return factorized, reports, kept


def _decompose_on_devices(model, layer_plan, covariances, *, norm, key, max_steps, devices):
    """Every planned layer solved with :func:`sigmadecomp.distributed.solve_layers` (same keys and
    solvers as the one-device loop, so the same results)."""
    from sigmadecomp.distributed import solve_layers

    for entry in layer_plan.entries:
        if entry.groups != 1:
            raise ValueError(f"layer {entry.path!r} is a grouped conv (groups={entry.groups}); the pipeline "
                             "decomposes ungrouped layers only: skip it")
    kernels = {e.path: get_by_path(model, e.path).kernel[...] for e in layer_plan.entries}
    keys = dict(zip(layer_plan.paths, jax.random.split(key, len(layer_plan))))
    kept = {}
    for e in layer_plan.entries:  # a cov that is not PSD keeps its layer dense, as on one device
        try:
            sd.solvers._validation.check_second_moments(kernels[e.path], covariances[e.path].cov, None, None)
        except sd.NotPSDError as error:
            kept[e.path] = _not_psd(e.path, error)
    todo = [e for e in layer_plan.entries if e.path not in kept]
    solutions = solve_layers(
        [kernels[e.path] for e in todo], [solver_for(e, max_steps=max_steps) for e in todo],
        [covariances[e.path].cov if norm == "sigma" else None for e in todo], [keys[e.path] for e in todo],
        devices=devices)
    here = jax.local_devices()[0]
    good = []
    for e, s in zip(todo, solutions):
        s = jax.device_put(s, here)
        reason = rejection(s)
        if reason is None:
            good.append((e, s))
        else:
            kept[e.path] = keep_dense(e.path, sd.Status(int(s.status)).name, reason)
    factorized = {e.path: s.value for e, s in good}
    reports = _reports(sd.Plan(tuple(e for e, _ in good), layer_plan.input_shape), kernels, covariances,
                       [s for _, s in good])
    return factorized, reports, [kept[p] for p in layer_plan.paths if p in kept]


def _reports(layer_plan, kernels, covariances, solutions) -> tuple[LayerReport, ...]:
    """One :class:`LayerReport` per plan entry, from its kernel, calibration cov and solution
    (gathered on one local device: solves and statistics may live on others)."""
    here = jax.local_devices()[0]
    reports = []
    for e, s in zip(layer_plan.entries, solutions):
        kernel, value, cov = jax.device_put((kernels[e.path], s.value, covariances[e.path].cov), here)
        reports.append(LayerReport(
            path=e.path, format=e.format, rank=e.ranks[0] if len(e.ranks) == 1 else tuple(e.ranks),
            params=e.params_after, baseline_params=e.params_before,
            relative_error=float(sd.relative_error(kernel, value, cov)),
            status=sd.Status(int(s.status)).name, num_steps=int(s.num_steps),
            max_increase=history_increase(s)))
    return tuple(reports)


def _covariances_for(model, layer_plan, calib_images, covariances, batch_size, progress,
                     devices=None) -> Mapping:
    if covariances is None:
        if calib_images is None:
            raise ValueError("give calib_images (to calibrate) or precomputed covariances")
        return calibrate(model, calib_images, layers=layer_plan.paths, batch_size=batch_size,
                         progress=progress, devices=devices)
    missing = [p for p in layer_plan.paths if p not in covariances]
    if missing:
        raise ValueError(f"covariances has no entry for planned layer(s) {missing}; calibrate them "
                         "too (calibrate(model, images, layers=plan.paths))")
    return covariances


ARCHS = {"resnet20": 20, "resnet32": 32, "resnet56": 56}  # the data kit's pretrained ones


def resnet_depth(arch: str) -> int:
    """The depth ``N`` of ``"resnetN"`` for any CIFAR ResNet depth ``N = 6n + 2`` (``n >= 1``).

    >>> resnet_depth("resnet44")
    44
    """
    match = re.fullmatch(r"resnet(\d+)", str(arch))
    depth = int(match.group(1)) if match else None
    if depth is None or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"arch must be resnetN with N = 6n+2 (resnet8, resnet14, resnet20, ..., "
                         f"resnet56, resnet110, ...); got {arch!r}")
    return depth


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
    replan: bool = False,
    finetune_epochs: int = 0,
    finetune_lr: float | None = None,
    finetune_data=None,
    finetune_validation: int = 0,
    finetune_validation_metric: str = "accuracy",
    progress: bool = True,
    implementation: str = "auto",
    latency_repeats: int = 5,
    deploy_batch: int = 128,
    latency_table=None,
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

    ``format`` is a registered format, or several joined by ``+`` (``"cp+tucker2"``) with
    ``rank_rule="global"``: every layer then gets the format and ranks the knapsack prefers
    (:func:`sigmadecomp.surgery.select_ranks` over several formats); the report's layers say which.

    ``calibration`` is ``"sequential"`` (each layer fitted, in execution order, to the inputs it
    sees in the partially compressed network: :func:`sigmadecomp.calibration.compress_sequential`)
    or ``"parallel"`` (every layer's ``cov`` from the original network). ``None`` picks sequential
    for the Σ norm — it is the better one: ResNet-20, Tucker-2, ratio 0.5 goes from 81.2% to 89.6%
    (``experiments/sequential``) — and parallel for Frobenius, which uses no statistics.
    ``bias_correction`` shifts each compressed layer's mean output on the calibration images back
    to the original's (:func:`sigmadecomp.calibration.correct_bias`).

    ``rank_rule`` (``"uniform"``, ``"energy"``, ``"vbmf"``, ``"global"``), ``budget``
    (``"params=R"`` / ``"flops=R"`` / ``"latency=R"``, relative to the compressed layers' dense
    counts or summed measured ms at ``deploy_batch``, rule ``global`` only; replaces ``ratio``; a
    measured ``latency_table`` — dict or JSON file, e.g. an earlier report — skips the timing) and ``tau`` choose the ranks with :func:`sigmadecomp.surgery.select_ranks`, on the
    original network's statistics, before any layer is fitted (also under sequential
    calibration). The report then has a ``rank_selection`` entry (rule, achieved budget,
    predicted damage) and each layer its ``predicted_error`` and ``sensitivity``. ``replan=True``
    (rule ``global`` with sequential calibration) re-solves that selection stage by stage during
    the sequential pass (:class:`sigmadecomp.surgery.Replanner`); the report's ``replan`` entry
    lists each layer's up-front and re-planned ranks and the achieved budget.

    ``implementation``: ``"auto"`` times every planned layer on this machine (at ``deploy_batch``) and runs
    each the faster way, factorized or with the kernel rebuilt from the factors; a layer whose
    factorized form is neither faster nor smaller stays dense (``left_dense`` in the report, with
    the reason). ``"factorized"`` / ``"dense"`` force one implementation. With
    ``latency_repeats > 0`` the report gains ``latency_ms`` and ``baseline_latency_ms`` (median
    ms of a jitted forward pass at batch 1 and 128, both models interleaved, on this machine),
    ``speedup`` (baseline / compressed) and ``latency_load`` (``os.getloadavg()``).

    ``finetune_epochs > 0`` then distils the compressed model from the dense one for that many
    epochs over the training batches of ``finetune_data`` (default ``data_dir``; never a test
    batch) with learning rate ``finetune_lr`` (:func:`sigmadecomp.finetune.distill_on_cifar10`);
    the report's ``accuracy`` is after fine-tuning and ``accuracy_before_finetune`` before it;
    ``finetune_validation`` labelled training images are then held out and the epoch with the best
    ``finetune_validation_metric`` on them (``"accuracy"``, or ``"kl"``: the distillation loss) is
    kept (``finetune_best``).
    """
    start = time.perf_counter()
    calibration = _check_calibration(calibration, norm)
    _check_replan(replan, rank_rule, calibration)
    tried = tuple(format.split("+"))
    if len(tried) > 1 and (rank_rule != "global" or replan):
        raise ValueError(f"format {format!r} tries several formats: the global rank rule chooses each layer's "
                         f"(rank_rule='global' with a budget, no replan); got rank_rule={rank_rule!r}, "
                         f"replan={replan}")
    format = tried[0]  # the plan's default; a selection over several formats gives each layer its own
    if implementation not in sd.latency.MODES:
        raise ValueError(f"implementation must be one of {sd.latency.MODES}; got {implementation!r}")
    model = sd.models.pretrained_resnet(resnet_depth(arch), weights)
    calib_key, solve_key = jax.random.split(jax.random.key(key))
    train_images, _ = sd.data.load_cifar10(data_dir, "train")
    if calib > len(train_images):
        raise ValueError(f"calib = {calib} is more than the {len(train_images)} training images in "
                         f"{data_dir}; use --calib {len(train_images)} or fewer")
    test_images, test_labels = sd.data.load_cifar10(eval_dir or data_dir, "test")
    calib_images = sd.data.cifar10_normalize(sd.data.sample(train_images, None, calib, key=calib_key))
    skip = ("conv1", "linear") if skip_first else ("linear",)
    selection, ranks, formats = None, None, None
    if rank_rule != "uniform" or (budget is not None and not budget.startswith("params")):
        selection = _select(model, calib_images, formats=tried, norm=norm, rule=rank_rule, budget=budget,
                            tau=tau, skip=skip, key=jax.random.fold_in(calib_key, 1), batch_size=batch_size,
                            progress=progress, latency_batch=deploy_batch, latency_table=latency_table)
        ratio, ranks, skip = None, selection, selection.is_dense
    elif budget is not None:
        ratio = sd.surgery.Budget.parse(budget).ratio
    if replan:  # ranks decided during the pass; implementations chosen for the layers it compressed
        result = sd.calibration.compress_sequential(
            model, calib_images, format=format, replan=selection.replanner(), key=solve_key, max_steps=max_steps,
            bias_correction=bias_correction, batch_size=batch_size, progress=progress)
        chosen = _implementations_after(model, result.plan, implementation, deploy_batch)
    else:
        chosen = sd.latency.choose_implementations(
            model, sd.plan(model, format=format, ratio=ratio, ranks=ranks, skip=skip, input_shape=_INPUT_SHAPE),
            mode=implementation, batch_size=deploy_batch)
        slow = tuple(path for path, _ in chosen.left_dense)
        if selection is not None:  # the selection's dense layers, and those the latency check keeps dense
            ranks = {p: r for p, r in selection.items() if p not in slow}
            formats = {p: f for p, f in selection.formats.items() if p in ranks}
            skip = lambda path: path not in ranks  # noqa: E731
        else:
            skip = skip + slow
        result = _compress_fixed(model, calib_images, calibration=calibration, format=format, norm=norm,
                                 ratio=ratio, ranks=ranks, skip=skip, formats=formats, key=solve_key,
                                 max_steps=max_steps, bias_correction=bias_correction, batch_size=batch_size,
                                 progress=progress)
    result = _with_implementations(result, chosen)
    test_images = sd.data.cifar10_normalize(test_images)
    result, tuned = _maybe_finetune(model, result, test_images, test_labels, epochs=finetune_epochs,
                                    lr=finetune_lr, data_dir=finetune_data or data_dir, key=key,
                                    batch_size=batch_size, validation=finetune_validation,
                                    validation_metric=finetune_validation_metric, progress=progress)
    scores = evaluate_agreement(model, result.model, test_images, test_labels, batch_size=batch_size)
    counts, in_model = _whole_model_counts(model, result.model, result.plan, calib_images[:8])
    if save_dir is not None:
        sd.save(save_dir, result.model, result.plan)
    config = dict(arch=arch, weights=str(weights), data=str(data_dir),
                  eval_data=str(eval_dir or data_dir), format="+".join(tried), norm=norm, ratio=ratio,
                  calib=calib, key=key, max_steps=max_steps, skip_first=skip_first,
                  calibration=calibration, bias_correction=bias_correction, rank_rule=rank_rule,
                  budget=budget, tau=tau, replan=replan,
                  finetune_lr=finetune_lr, finetune_data=str(finetune_data or data_dir),
                  finetune_validation=finetune_validation, finetune_validation_metric=finetune_validation_metric,
                  save=None if save_dir is None else str(save_dir), implementation=implementation,
                  deploy_batch=deploy_batch)
    how = {e.path: dict(implementation=e.implementation, implementation_reason=e.reason)
           for e in result.plan.entries}
    layers = [dict(dataclasses.asdict(layer), in_model_relative_error=in_model.get(layer.path),
                   **how.get(layer.path, {})) for layer in result.layers]
    extra = {}
    if result.replan is not None:
        extra["replan"] = result.replan
    if selection is not None:
        extra["rank_selection"] = selection.to_dict()
        picked = {c.path: c for c in selection.layers}
        layers = [dict(layer, predicted_error=picked[layer["path"]].predicted_error,
                       sensitivity=picked[layer["path"]].sensitivity) for layer in layers]
    latency = _latency_report(model, result.model, latency_repeats)
    tuned.setdefault("accuracy_before_finetune", scores["accuracy"])
    return dict(scores, **tuned, **counts, **latency, **extra,
                left_dense=[list(p) for p in result.plan.left_dense],
                kept_dense=list(result.kept_dense),
                mean_relative_error=result.mean_relative_error,
                num_eval_images=int(len(test_labels)), decompose_seconds=result.seconds,
                seconds=time.perf_counter() - start, config=config, layers=layers)


def _compress_fixed(model, calib_images, *, calibration, format, norm, ratio, ranks, skip, key, max_steps,
                    bias_correction, batch_size, progress, formats=None) -> Compressed:
    """Compress with ranks decided beforehand, sequential or parallel (+ bias correction)."""
    if calibration == "sequential":
        return sd.calibration.compress_sequential(
            model, calib_images, format=format, ratio=ratio, ranks=ranks, skip=skip, formats=formats, key=key,
            max_steps=max_steps, bias_correction=bias_correction, batch_size=batch_size,
            progress=progress)
    result = compress_model(model, calib_images, format=format, norm=norm, ratio=ratio, ranks=ranks,
                            skip=skip, formats=formats, key=key, max_steps=max_steps, batch_size=batch_size,
                            progress=progress)
    if bias_correction:
        corrected = sd.calibration.correct_bias(model, result.model, calib_images, plan=result.plan,
                                                batch_size=batch_size, progress=progress)
        result = dataclasses.replace(result, model=corrected)
    return result


def _check_replan(replan: bool, rank_rule: str, calibration: str) -> None:
    if replan and (rank_rule != "global" or calibration != "sequential"):
        raise ValueError(f"replan re-solves a global rank selection during sequential calibration: use it with "
                         f"rank_rule='global' and calibration='sequential' (got {rank_rule!r}, {calibration!r})")


def _implementations_after(model, plan, implementation: str, deploy_batch: int):
    """Implementations for layers already compressed: one that is neither faster nor smaller
    factorized runs with its kernel rebuilt from the factors (it cannot be left out any more)."""
    chosen = sd.latency.choose_implementations(model, plan, mode=implementation, batch_size=deploy_batch)
    slow = dict(chosen.left_dense)
    done = {e.path: e for e in chosen.entries}
    entries = tuple(done.get(e.path) or dataclasses.replace(e, implementation="dense", reason=slow[e.path])
                    for e in plan.entries)
    return dataclasses.replace(chosen, entries=entries, left_dense=())


def _select(model, calib_images, *, formats, norm, rule, budget, tau, skip, key, batch_size, progress,
            latency_batch=128, latency_table=None):
    """Rank selection on the original network's statistics (see :func:`select_ranks`); ``formats``:
    the format tried, or several (rule ``global``)."""
    paths = sd.plan(model, format=formats[0], ratio=1.0, skip=skip).paths
    covariances = calibrate(model, calib_images, layers=paths, batch_size=batch_size, progress=progress)
    return sd.surgery.select_ranks(model, covariances, format=formats, rule=rule, budget=budget, tau=tau,
                                   norm=norm, images=calib_images, key=key, skip=skip,
                                   input_shape=(1, *np.shape(calib_images)[1:]), progress=progress,
                                   batch_size=latency_batch, latency_table=latency_table)


def _maybe_finetune(model, result, test_images, test_labels, *, epochs, lr, data_dir, key, batch_size,
                    validation, validation_metric, progress) -> tuple[Compressed, dict]:
    """Distil ``result.model`` from ``model`` when ``epochs > 0``; the report fields either way."""
    if not epochs:
        return result, dict(finetune_epochs=0, finetune_seconds=0.0)
    from sigmadecomp.finetune import FinetuneConfig, distill_on_cifar10

    before = evaluate_agreement(model, result.model, test_images, test_labels, batch_size=batch_size)
    run = distill_on_cifar10(result.model, model, data_dir, epochs=epochs,
                             learning_rate=FinetuneConfig.learning_rate if lr is None else lr,
                             key=jax.random.fold_in(jax.random.key(key), 1), validation=validation,
                             validation_metric=validation_metric, progress=progress)
    return dataclasses.replace(result, model=run.model), dict(
        accuracy_before_finetune=before["accuracy"], finetune_epochs=epochs,
        finetune_seconds=run.seconds, finetune_steps=run.steps, finetune_stopped=run.stopped,
        finetune_rollbacks=run.rollbacks, finetune_best=run.history.get("best"))


_INPUT_SHAPE = (1, 32, 32, 3)
LATENCY_BATCHES = (1, 128)


def _with_implementations(result: Compressed, chosen) -> Compressed:
    """The compressed result with the chosen implementation per layer, in its model and plan."""
    by_path = {e.path: e for e in chosen.entries}
    entries = tuple(dataclasses.replace(e, implementation=by_path[e.path].implementation,
                                        reason=by_path[e.path].reason) for e in result.plan.entries)
    plan = dataclasses.replace(result.plan, entries=entries, left_dense=chosen.left_dense)
    return dataclasses.replace(result, model=sd.latency.set_implementations(result.model, plan), plan=plan)


def _latency_report(model, compressed, repeats: int) -> dict:
    """Median forward latency (ms) of both models at batch 1 and 128, interleaved, on this machine."""
    if repeats < 1:
        return {}
    load = sd.latency.machine_load()
    timings = sd.latency.model_latency({"baseline": model, "compressed": compressed}, _INPUT_SHAPE,
                                       batch_sizes=LATENCY_BATCHES, repeats=repeats)
    base = {str(b): t["baseline"].median_ms for b, t in timings.items()}
    comp = {str(b): t["compressed"].median_ms for b, t in timings.items()}
    return dict(latency_ms=comp, baseline_latency_ms=base,
                speedup={b: base[b] / comp[b] for b in base},
                latency_load=dict(before=load, after=sd.latency.machine_load()),
                latency_device=str(jax.devices()[0]))


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
    if sel.get("achieved_latency") is not None:
        tail += f" latency {sel['achieved_latency']:.3f} (layers alone, measured here)"
    return f"rank rule {rule}, budget {config.get('budget') or config.get('tau')}{tail}"


def summary(report: dict) -> str:
    """A few human-readable lines of a :func:`compress_pretrained` report."""
    c = report["config"]
    if report["accuracy"] is not None:
        scores = (f"  accuracy  {report['accuracy']:.2%}  (uncompressed {report['baseline_accuracy']:.2%}, "
                  f"top-1 agreement {report['agreement']:.2%}, {report['num_eval_images']} test images)")
    else:  # unlabelled evaluation images (sigmadecomp.user_model)
        agreement = "n/a" if report["agreement"] is None else f"{report['agreement']:.2%}"
        scores = (f"  top-1 agreement {agreement}, output relative error "
                  f"{report['output_relative_error']:.4g} ({report['num_eval_images']} unlabelled images)")
    return "\n".join([
        f"{c.get('arch') or c.get('model')} {c['format']}/{c['norm']} ({c.get('calibration', 'parallel')} "
        f"calibration) {_ranks_text(c, report)} ({len(report['layers'])} layers, "
        f"{c['calib']} calibration images, key {c['key']})",
        scores,
        f"  params    {report['params']:,} / {report['baseline_params']:,} "
        f"({report['params'] / report['baseline_params']:.2f}x)",
        f"  MACs      {report['flops']:,} / {report['baseline_flops']:,} "
        f"({report['flops'] / report['baseline_flops']:.2f}x)",
        *([f"  fine-tuned {report['finetune_epochs']} epoch(s) in {report['finetune_seconds']:.1f} s: "
           f"accuracy {report['accuracy_before_finetune']:.2%} -> {report['accuracy']:.2%}"]
          if report.get("finetune_epochs") else []),
        *(["  latency   " + ", ".join(
            f"batch {b}: {report['latency_ms'][b]:.1f} ms vs {report['baseline_latency_ms'][b]:.1f} ms "
            f"({report['speedup'][b]:.2f}x)" for b in report["latency_ms"])] if "latency_ms" in report else []),
        f"  mean relative {'cross' if c.get('calibration') == 'sequential' else 'Σ'}-error "
        f"{report['mean_relative_error']:.4f}   "
        f"time {report['seconds']:.1f} s",
    ])
