"""Sequential (error-correcting) calibration and bias correction of a whole model.

Parallel calibration fits every layer to the original network's inputs ``x``; once earlier layers
are compressed a layer sees ``x̂`` instead, and the errors compound with depth. Here the planned
layers are compressed in forward execution order, each one fitted to

    min_W̃ E‖W x − W̃ x̂‖²     (the cross-covariance form, DESIGN.md §1)

with ``x`` its input in the original network and ``x̂`` its input in the partially compressed
network, both on the same calibration images. The layer is replaced before the next one is fitted.
Activations of both networks are cached at the current stage boundary and advanced stage by stage
(see :mod:`sigmadecomp.calibration._activations`).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from tqdm.auto import tqdm

import sigmadecomp as sd
from sigmadecomp import covariance
from sigmadecomp._factorized import to_dense
from sigmadecomp._paths import get_by_path
from sigmadecomp._patches import kernel_to_matrix, matrix_to_kernel
from sigmadecomp.calibration._activations import (
    advance_stage, check_stages, cross_statistics, forward_stages, input_batches, stage_layers, whole_model,
)
from sigmadecomp.calibration._bias import apply_shift, bias_sites, output_shift
from sigmadecomp.compress import Compressed, LayerReport, checked_fit, history_increase, solver_for
from sigmadecomp.covariance._collect import layer_tap
from sigmadecomp.layers._config import canonical_convs
from sigmadecomp.layers._counts import count_format
from sigmadecomp.surgery._plan import Plan
from sigmadecomp.surgery._tap import input_spec

__all__ = ["compress_sequential", "correct_bias"]


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """The calibration batches, the stages of the forward pass and the layers each stage calls."""

    batches: list
    stages: tuple
    per_stage: list

    def sites(self, model, paths):
        return bias_sites(model, self.stages, self.per_stage, self.batches[0], paths)


def _schedule(model: nnx.Module, images, paths, *, batch_size: int, cache_activations: bool) -> _Schedule:
    batches = input_batches(images, batch_size, input_spec(model, (1,)).dtype)
    stages = forward_stages(model) if cache_activations else (whole_model,)
    if not check_stages(model, stages, batches[0]):
        warnings.warn(f"the forward stages of {type(model).__name__} do not compose to model(x); falling "
                      "back to one full forward pass per layer", stacklevel=3)
        stages = (whole_model,)
    per_stage = stage_layers(model, stages, batches[0])
    called = {p for paths_k in per_stage for p in paths_k}
    missing = [p for p in paths if p not in called]
    if missing:
        raise ValueError(f"planned layer(s) {missing} are never called by a forward pass on the calibration "
                         "images; skip them")
    return _Schedule(batches, tuple(stages), per_stage)


def _walk(schedule: _Schedule, original, compressed, planned, on_layer: Callable, *, progress, desc,
          gram: bool = True):
    """Call ``compressed = on_layer(compressed, path, stats)`` for the planned layers in execution
    order; ``stats`` are the cross statistics of the layer's inputs in both networks. With
    ``gram=False`` they hold ``energy = E‖W x‖²`` instead of ``cov = E[x xᵀ]`` (a third less
    matmul work; the fit needs ``E[x xᵀ]`` only for that normaliser)."""
    cache = [(b, b) for b in schedule.batches]
    remaining = [p for paths in schedule.per_stage for p in paths if p in planned]
    bar = tqdm(total=len(remaining), desc=desc, disable=not progress, leave=False)
    for stage, called in zip(schedule.stages, schedule.per_stage):
        for path in (p for p in called if p in planned):
            tap = layer_tap(path, get_by_path(original, path))
            state = covariance.init(tap.dim, groups=tap.groups, cross=True, gram=gram, energy=not gram)
            stats = covariance.finalize(cross_statistics(stage, tap, original, compressed, state, cache))
            compressed = on_layer(compressed, path, stats)
            remaining.remove(path)
            bar.update()
        if not remaining:
            break
        cache = _advance_cache(stage, original, compressed, cache)
    bar.close()
    return compressed


def _advance_cache(stage, original, compressed, cache) -> list:
    return [(advance_stage(stage, original, h), advance_stage(stage, compressed, h_hat)) for h, h_hat in cache]


# ----------------------------------------------------------------------------- one layer


def _same_inputs(stats) -> bool:
    """Whether both networks fed the layer bitwise the same patches (nothing upstream changed):
    then ``E[x x̂ᵀ]`` (symmetrised) equals ``E[x̂ x̂ᵀ]``, computed by the same matmul.

    On the host: eager jnp comparisons would compile several programs per layer shape."""
    cov_hat, cross = np.asarray(stats.cov_hat), np.asarray(stats.cross_cov)
    return bool(np.array_equal(0.5 * (cross + cross.T), cov_hat)
                and np.array_equal(np.asarray(stats.mean_hat), np.asarray(stats.mean)))


@jax.jit
def _output_error(w, w_approx, energy, cross_cov, cov_hat, shift):
    """``E‖W x − W̃ x̂ − δ‖² / E‖W x‖²`` from the unridged moments (``δ = 0``: no correction)."""
    hi = lax.Precision.HIGHEST
    if cross_cov is None:  # same inputs (cov_hat = cov): the direct form has no cancellation
        delta = w - w_approx
        f = jnp.sum(jnp.dot(delta, cov_hat, precision=hi) * delta)
    else:
        f = (energy - 2.0 * jnp.sum(jnp.dot(w, cross_cov, precision=hi) * w_approx)
             + jnp.sum(jnp.dot(w_approx, cov_hat, precision=hi) * w_approx))
    # E[e] = δ, so removing the mean lowers the error by exactly ‖δ‖².
    return jnp.maximum(f - jnp.sum(shift * shift), 0.0) / energy


def relative_output_error(kernel, approx_kernel, stats, *, same: bool, shift=None) -> float:
    """The relative error reported per layer: of the corrected output when ``shift`` is given."""
    dtype = stats.cov_hat.dtype
    w = kernel_to_matrix(jnp.asarray(kernel)).astype(dtype)
    w_approx = kernel_to_matrix(jnp.asarray(approx_kernel)).astype(dtype)
    shift = jnp.zeros(w.shape[0], dtype) if shift is None else shift.astype(dtype)
    cross = None if same else stats.cross_cov
    return float(_output_error(w, w_approx, _energy(w, stats), cross, stats.cov_hat, shift))


def _energy(w, stats):
    """``E‖W x‖²``: accumulated from the layer's outputs, or from ``cov`` when the stats have it."""
    if stats.energy is not None:
        return jnp.sum(stats.energy).astype(w.dtype)
    return jnp.sum(jnp.dot(w, stats.cov.astype(w.dtype), precision=lax.Precision.HIGHEST) * w)


def _fit(kernel, entry, stats, *, same, key, max_steps):
    # same inputs: cov_hat is E[x xᵀ] (the same matmul on the same patches)
    moments = {"cov": stats.cov_hat} if same else {
        "cov": stats.cov_hat, "cross_cov": stats.cross_cov, "target_energy": stats.energy}
    return sd.decompose(kernel, solver_for(entry, max_steps=max_steps), key=key, **moments)


def _with_ranks(entry, ranks):
    """``entry`` at other ranks of its format, with the counts that go with them."""
    c = count_format(entry.format, entry.kernel_shape, tuple(ranks), groups=entry.groups, bias=entry.use_bias,
                     in_spatial=entry.in_spatial, out_spatial=entry.out_spatial)
    return dataclasses.replace(entry, ranks=tuple(int(r) for r in ranks), params_after=c.params,
                               flops_after=None if entry.flops_before is None else c.flops)


def _best_linear_map(kernel, stats, *, same):
    """``W* = W E[x x̂ᵀ] E[x̂ x̂ᵀ]⁺`` as a kernel: the unconstrained minimiser of
    ``E‖W x − W' x̂‖²``, whose error is the floor every fit of this layer sits on (0 with the
    same inputs). On the host in float64: a pseudo-inverse, since ``E[x̂ x̂ᵀ]`` is often singular."""
    if same:
        return kernel
    w = np.asarray(kernel_to_matrix(np.asarray(kernel, np.float64)), np.float64)
    cross, cov_hat = np.asarray(stats.cross_cov, np.float64), np.asarray(stats.cov_hat, np.float64)
    best = (w @ cross) @ np.linalg.pinv(cov_hat, rcond=1e-10, hermitian=True)
    return jnp.asarray(matrix_to_kernel(best, np.shape(kernel)), jnp.asarray(kernel).dtype)


def _measuring_fit(kernel, entry, stats, *, same, key):
    """``fit(ranks, sweeps)`` for a replanner: the relative output error of the layer fitted at
    ``ranks``; ``fit(None, 0)``: the floor, the error of the best unconstrained linear map (what
    the input's drift alone costs; 0 when nothing upstream changed)."""
    def fit(ranks, sweeps):
        if ranks is None:
            return relative_output_error(kernel, _best_linear_map(kernel, stats, same=same), stats, same=same)
        solution = _fit(kernel, _with_ranks(entry, ranks), stats, same=same, key=key, max_steps=sweeps)
        return relative_output_error(kernel, to_dense(solution.value), stats, same=same)
    return fit


def _report(entry, solution, error: float) -> LayerReport:
    return LayerReport(
        path=entry.path, format=entry.format,
        rank=entry.ranks[0] if len(entry.ranks) == 1 else tuple(entry.ranks),
        params=entry.params_after, baseline_params=entry.params_before, relative_error=error,
        status=sd.Status(int(solution.status)).name, num_steps=int(solution.num_steps),
        max_increase=history_increase(solution),
    )


# ----------------------------------------------------------------------------- public


def _check_groups(layer_plan: Plan) -> None:
    grouped = [e.path for e in layer_plan.entries if e.groups != 1]
    if grouped:
        raise ValueError(f"layer(s) {grouped} are grouped convs; sequential calibration decomposes "
                         "ungrouped layers only: skip them")


def compress_sequential(
    model: nnx.Module,
    calib_images,
    *,
    format: str,
    key: jax.Array,
    ratio: float | None = None,
    ranks: Mapping | None = None,
    skip=(),
    formats: Mapping | None = None,
    max_steps: int | None = None,
    bias_correction: bool = False,
    batch_size: int = 256,
    progress: bool = True,
    cache_activations: bool = True,
    replan=None,
) -> Compressed:
    """Compress ``model`` layer by layer in forward execution order, each layer fitted (Σ-norm) to
    the inputs it sees in the partially compressed network: ``min E‖W x − W̃ x̂‖²``.

    Args:
        model: the trained NNX model in inference mode (not modified).
        calib_images: preprocessed calibration inputs ``(N, ...)``; both networks see them all.
        format, ratio, ranks, skip, formats: as in :func:`sigmadecomp.plan`.
        key: PRNG key; layer ``i`` of the plan gets ``jax.random.split(key, n)[i]``, as in
            :func:`sigmadecomp.compress.compress_model`.
        max_steps: ALS sweeps per layer (default: each solver's own).
        bias_correction: after each layer, shift its output by ``W·E[x] − W̃·E[x̂]`` so its mean
            on the calibration data equals the original's (see :func:`correct_bias` for where
            the shift is stored).
        batch_size: images per cached activation batch.
        cache_activations: advance cached activations of both networks stage by stage (default;
            :func:`forward_stages` — CifarResNet and models with ``forward_stages()``; other models
            get one stage). ``False`` runs both networks from the input for every layer.
        replan: instead of ``ratio``/``ranks``/``skip``: an object with ``paths`` (the layers to
            compress), ``ranks_for(path, stats, fit) -> ranks | None`` (asked when the pass
            reaches a layer; ``fit(ranks, sweeps)`` returns the layer's relative output error
            fitted at ``ranks`` with ``sweeps`` sweeps, ``fit(None, 0)`` the floor under every
            fit: that of the best unconstrained linear map ``W E[x x̂ᵀ] E[x̂ x̂ᵀ]⁺``),
            ``settle(path, ranks)`` (told the ranks used, ``None``: dense) and ``report()``
            (stored as the result's ``replan``): e.g. ``selection.replanner()``
            (:class:`sigmadecomp.surgery.Replanner`) re-solves a ``global`` rank selection
            stage by stage. A layer it keeps dense is listed in ``kept_dense``.

    Returns:
        A :class:`sigmadecomp.compress.Compressed` (reports in plan order). Each report's
        ``relative_error`` is ``E‖W x − W̃ x̂ (− δ)‖² / E‖W x‖²`` on the calibration data, with
        unridged statistics, after bias correction when it is on. A layer that nothing
        upstream changed (bitwise the same inputs) is solved in the plain Σ form, exactly as
        ``compress_model(..., norm="sigma")`` would.

    >>> from flax import nnx
    >>> net = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.relu,
    ...                      nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(1)))
    >>> images = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
    >>> out = compress_sequential(net, images, format="svd", ranks={"layers.0": 2, "layers.2": 2},
    ...                           key=jax.random.key(0), progress=False)
    >>> [layer.path for layer in out.layers]
    ['layers.0', 'layers.2']
    """
    start = time.perf_counter()
    model = canonical_convs(model)  # one normalised conv configuration for every jitted stage
    if replan is not None:
        _check_replan(replan, format, ratio, ranks, skip)
        ratio, skip = 1.0, (lambda path: path not in replan.paths)  # entries re-ranked layer by layer
    layer_plan = sd.plan(model, format=format, ratio=ratio, ranks=ranks, skip=skip, formats=formats,
                         input_shape=(1, *np.shape(calib_images)[1:]))
    if len(layer_plan) == 0:
        raise ValueError("the plan is empty: every eligible layer is skipped; skip fewer layers")
    _check_groups(layer_plan)
    schedule = _schedule(model, calib_images, layer_plan.paths, batch_size=batch_size,
                         cache_activations=cache_activations)
    sites = schedule.sites(model, layer_plan.paths) if bias_correction else {}
    keys = dict(zip(layer_plan.paths, jax.random.split(key, len(layer_plan))))
    reports, replaced, kept, entries = {}, [], [], {e.path: e for e in layer_plan.entries}

    def on_layer(compressed, path, stats):
        entry, kernel = layer_plan[path], get_by_path(model, path).kernel[...]
        same = not replaced or _same_inputs(stats)
        if replan is not None:
            chosen = replan.ranks_for(path, stats, _measuring_fit(kernel, entry, stats, same=same, key=keys[path]))
            if chosen is None:
                replan.settle(path, None)
                kept.append(dict(path=path, status="REPLANNED_DENSE", reason="re-planning kept it dense"))
                return compressed
            entry = entries[path] = _with_ranks(entry, chosen)
        solution, dense = checked_fit(path, lambda: _fit(kernel, entry, stats, same=same, key=keys[path],
                                                          max_steps=max_steps))
        if replan is not None:
            replan.settle(path, None if dense is not None else entry.ranks)
        if dense is not None:  # stays dense; later layers see this layer's true output
            kept.append(dense)
            return compressed
        compressed = sd.apply(compressed, Plan((entry,), layer_plan.input_shape), {path: solution.value})
        approx, shift = to_dense(solution.value), None
        if path in sites:
            shift = output_shift(kernel, approx, stats)
            apply_shift(compressed, sites[path], shift)
        error = relative_output_error(kernel, approx, stats, same=same, shift=shift)
        reports[path] = _report(entry, solution, error)
        replaced.append(path)
        return compressed

    compressed = _walk(schedule, model, nnx.clone(model), set(layer_plan.paths), on_layer,
                       progress=progress, desc=f"{format}/sequential", gram=False)
    layers = tuple(reports[p] for p in layer_plan.paths if p in reports)
    used = Plan(tuple(entries[p] for p in layer_plan.paths if p in reports), layer_plan.input_shape)
    return Compressed(compressed, used, layers, time.perf_counter() - start, tuple(kept),
                      None if replan is None else replan.report())


def _check_replan(replan, format, ratio, ranks, skip) -> None:
    missing = [m for m in ("paths", "ranks_for", "settle", "report") if not hasattr(replan, m)]
    if missing:
        raise ValueError(f"replan must be a replanner (e.g. selection.replanner()); {type(replan).__name__} "
                         f"has no {missing}")
    if ratio is not None or ranks is not None or skip not in ((), None):
        raise ValueError("replan chooses the ranks and the layers: leave out ratio=, ranks= and skip=")
    if getattr(replan, "format", format) != format:
        raise ValueError(f"the replanner's selection is for format {replan.format!r}, not {format!r}")


def correct_bias(
    original: nnx.Module,
    compressed: nnx.Module,
    calib_images,
    *,
    plan: Plan,
    batch_size: int = 256,
    progress: bool = True,
    cache_activations: bool = True,
) -> nnx.Module:
    """A copy of ``compressed`` whose planned layers have the original's mean output on
    ``calib_images``: for use after parallel calibration (``compress_model``).

    The layers are visited in forward execution order and each shift ``δ = W·E[x] − W̃·E[x̂]``
    (per output channel, from patch means, which count zero padding as the conv does) is measured
    with the earlier corrections already in place, so every layer's mean matches, not only the
    first. ``δ`` is added to the factorized layer's bias when the original layer has one;
    a bias-free layer feeding straight into a ``BatchNorm`` gets ``δ`` subtracted from that
    BatchNorm's running mean (exact in inference mode, and the model keeps the structure of its
    plan, so :func:`sigmadecomp.save` / ``load`` work). Any other bias-free layer raises
    ``ValueError``.

    Args:
        original: the uncompressed model; compressed: ``apply(original, plan, ...)``'s result
            (neither is modified); calib_images: calibration inputs ``(N, ...)``.
        plan: the plan that made ``compressed``; batch_size, cache_activations: as in
            :func:`compress_sequential`.

    >>> from flax import nnx
    >>> from sigmadecomp.compress import compress_model
    >>> net = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.relu,
    ...                      nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(1)))
    >>> images = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
    >>> out = compress_model(net, images, format="svd", norm="sigma", ratio=0.3,
    ...                      key=jax.random.key(0), progress=False)
    >>> fixed = correct_bias(net, out.model, images, plan=out.plan, progress=False)
    >>> bool(jnp.allclose(fixed(images).mean((0, 1, 2)), net(images).mean((0, 1, 2)), atol=1e-4))
    True
    """
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be the sigmadecomp.Plan that made `compressed`; got {type(plan).__name__}")
    _check_groups(plan)
    original, compressed = canonical_convs(original), canonical_convs(compressed)
    schedule = _schedule(original, calib_images, plan.paths, batch_size=batch_size,
                         cache_activations=cache_activations)
    sites = schedule.sites(original, plan.paths)

    def on_layer(model, path, stats):
        kernel = get_by_path(original, path).kernel[...]
        layer = get_by_path(model, path)
        if not hasattr(layer, "dense_kernel"):
            raise ValueError(f"{path!r} in `compressed` is a {type(layer).__name__}, not a factorized layer: "
                             "pass the model that apply(original, plan, ...) returned")
        apply_shift(model, sites[path], output_shift(kernel, layer.dense_kernel(), stats))
        return model

    return _walk(schedule, original, nnx.clone(compressed), set(plan.paths), on_layer,
                 progress=progress, desc="bias correction")
