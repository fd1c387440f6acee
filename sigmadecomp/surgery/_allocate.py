"""Rank selection for a whole model: ``uniform``, ``energy``, ``vbmf`` and a Σ-aware ``global`` budget.

:func:`select_ranks` is the entry point. It returns a :class:`RankSelection`, a mapping
path → ranks that :func:`sigmadecomp.surgery.plan` takes as ``ranks=`` (with
``skip=selection.is_dense``, since a layer may stay dense), and that records for every layer
the predicted relative error at the chosen ranks, the sensitivity and the counts.

Rules (``ε_ℓ(ρ)`` = layer ``ℓ``'s relative Σ-error at ranks ``ρ`` of the fit the norm makes):

* ``uniform`` — every layer at the same parameter ratio (:func:`rank_for_ratio`); with a FLOPs
  budget the common ratio is bisected until the FLOPs fit.
* ``energy`` — keep a fraction ``τ`` of each layer's spectrum energy (Σ-whitened for the Σ norm,
  see :mod:`sigmadecomp.surgery._rank_rules`); with a budget, ``τ`` is bisected until it fits.
* ``vbmf`` — EVBMF on the (whitened) kernel matrix; Tucker-2 on both channel-mode unfoldings.
  No knob: the achieved ratio is whatever the data say.
* ``global`` — DESIGN §7: candidates ``ρ`` per layer (dense is one) with cost ``c_ℓ(ρ)`` (params
  or MACs, or the layer's measured milliseconds for a latency budget: see below) and damage
  ``e_ℓ(ρ)``; minimise ``Σ e`` subject to ``Σ c ≤ budget`` by Lagrangian bisection (each layer
  picks ``argmin e + λ c`` independently), then spend what the bisection left on the best
  damage-per-cost upgrades that still fit. The damage is measured on the calibration images:
  by default ``e_ℓ(ρ) = D_ℓ(ε_ℓ(ρ))`` with ``D_ℓ`` the layer's :func:`damage_curves` (logit
  change when the layer alone is cut to Σ-error ``ε``, a few levels, interpolated); ``damage="linear"`` uses DESIGN §7's ``s_ℓ · ε_ℓ(ρ)`` with the slope
  ``s_ℓ`` of :func:`layer_sensitivities`, which cannot see that deep cuts hurt more than
  linearly and lost 36 points on ResNet-20 Tucker-2 at 0.33 (experiments/rank_selection). ``ε`` comes from the whitened spectrum for
  SVD (exact) and Tucker-2 (output-mode tail + Kronecker-whitened input-mode tail, an
  HOSVD-style proxy), or, with ``proxy="sweeps"`` (the default of every other format), from a
  few ALS sweeps at a grid of parameter ratios.

The damages of ``global`` add up layer by layer, and each curve is measured with one layer cut at
a time: a model that holds while every cut is moderate. A deep cut breaks it: with sequential
calibration the layers after it are refitted on what is left of their input, so cutting a
block's first conv to relative error ~1 also ruins its second (ResNet-20, Tucker-2, params 0.15:
the knapsack cut ``layer3.2.conv1`` to ranks (2, 2), predicted ε = 1, and its neighbour's
measured error rose to 0.84; the network fell 29 points below ``uniform``). ``max_error``
(default 0.5, ``MAX_ERROR``) is the model's trust region: no candidate above it is offered unless
the budget cannot be met without; then the cap rises to the smallest candidate error at which the
cheapest choices fit, so the deepest cut is as shallow as the budget allows.

A ``latency=R`` budget (rule ``global`` only) costs each candidate by its measured forward time:
:func:`sigmadecomp.latency.layer_latency_table` times every layer alone at its real input shape
(``batch_size``, default 128) for the dense layer and every candidate ranks, factorized
implementation, interleaved medians made monotone in the ranks; ``R`` is relative to the summed
dense milliseconds of the eligible layers. The table (raw and monotone ms, machine load) goes into
the selection's report; ``latency_table=`` reuses a measured one (dict or JSON file) instead of
timing again. The costs are what *this* machine measured at *that* load: a ratio, not a promise
for another machine.

Given several formats (``format=("cp", "tucker2")``), ``global`` puts every format's candidates
for a layer into that layer's option list, so the knapsack chooses the format with the ranks
(``selection.formats``); all candidates are then measured by sweeps, so their errors are fits of
the same kind.

Formats without a native spectral rule (CP, CP-3 and any format registered later) translate the
SVD-Σ rank a rule picks into that layer's parameter ratio and use the format's own
:func:`rank_for_ratio`; costs always come from :func:`sigmadecomp.layers.count_format`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sigmadecomp._patches import kernel_to_matrix, matrix_to_kernel
from sigmadecomp._paths import get_by_path
from sigmadecomp.layers._counts import count_format
from sigmadecomp.surgery import _rank_rules as rr
from sigmadecomp.surgery._plan import PlanEntry, _check_rank_bounds, plan
from sigmadecomp.surgery._ranks import rank_for_ratio, svd_rank_for_ratio
from sigmadecomp.surgery._replan import LayerCandidates, Replanner
from sigmadecomp.surgery._tap import input_spec, intercept

__all__ = ["RANK_RULES", "Budget", "LayerChoice", "RankSelection", "allocate", "damage_curves", "layer_sensitivities",
           "select_ranks", "truncation_direction"]

RANK_RULES = ("uniform", "energy", "vbmf", "global")
BUDGET_KINDS = ("params", "flops", "latency")
MAX_ERROR = 0.5
DEFAULT_GRID = (0.03, 0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.35, 0.42, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclasses.dataclass(frozen=True)
class Budget:
    """``kind`` (``"params"``, ``"flops"`` or ``"latency"``) and ``ratio``: the planned layers'
    total after compression over their dense total, in (0, 1] (latency: summed measured ms of the
    layers alone, see the module docstring).

    >>> Budget.parse("flops=0.5")
    Budget(kind='flops', ratio=0.5)
    """

    kind: str
    ratio: float

    def __post_init__(self):
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind must be one of {BUDGET_KINDS}; got {self.kind!r}")
        if not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise ValueError(f"budget ratio must be in (0, 1]; got {self.ratio!r}")

    @classmethod
    def parse(cls, text) -> Budget:
        """``"params=0.5"`` / ``"flops=0.33"`` / ``"latency=0.5"`` (a Budget passes through)."""
        if isinstance(text, Budget):
            return text
        kind, sep, value = str(text).partition("=")
        try:
            return cls(kind.strip(), float(value)) if sep else cls("?", 0.0)
        except ValueError as err:
            raise ValueError(f"budget must look like params=R, flops=R or latency=R with R in (0, 1]; "
                             f"got {text!r} ({err})") from None


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """What a rule chose for one layer. ``ranks`` is ``None`` when the layer stays dense.
    ``predicted_error`` is ``ε`` at the chosen ranks (``None`` where the rule has no cheap
    prediction for the format), ``sensitivity`` ``s`` (``None`` unless measured)."""

    path: str
    format: str
    ranks: tuple | None
    predicted_error: float | None
    sensitivity: float | None
    params: int
    params_before: int
    flops: int | None
    flops_before: int | None
    predicted_damage: float | None = None  # from the measured damage curve (global rule)
    latency: float | None = None  # ms of the chosen option in the latency table (latency budget)
    latency_before: float | None = None  # ms of the dense layer in the latency table

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"ranks": None if self.ranks is None else list(self.ranks)}


@dataclasses.dataclass(frozen=True)
class RankSelection(Mapping):
    """A mapping path → ranks of the compressed layers (dense ones are left out: pass
    ``skip=selection.is_dense`` to :func:`plan`) plus everything needed to judge the choice."""

    rule: str
    budget: Budget | None
    layers: tuple
    options: dict
    seconds: float
    # rule "global": every layer's options, predicted errors and counts (for re-planning)
    candidates: tuple = dataclasses.field(default=(), compare=False, repr=False)
    # latency budget: the table of layer_latency_table (raw and monotone ms, load, batch size)
    latency_table: dict | None = dataclasses.field(default=None, compare=False, repr=False)

    def __getitem__(self, path):
        for layer in self.layers:
            if layer.path == path and layer.ranks is not None:
                return layer.ranks
        raise KeyError(path)

    def __iter__(self):
        return (layer.path for layer in self.layers if layer.ranks is not None)

    def __len__(self):
        return sum(layer.ranks is not None for layer in self.layers)

    @property
    def formats(self) -> dict:
        """``{path: format}`` of the compressed layers (one format, or each layer's pick when
        ``global`` tried several); :func:`plan` reads it from ``ranks=selection``."""
        return {layer.path: layer.format for layer in self.layers if layer.ranks is not None}

    def is_dense(self, path: str) -> bool:
        """Whether ``path`` is left uncompressed (chosen dense, or never selectable)."""
        return path not in self

    def achieved(self, kind: str) -> float | None:
        """Total ``kind`` (params/flops/latency) of the selected layers over their dense total
        (latency: the table's ms of the chosen options over the dense ms; ``None`` without a table)."""
        before = [getattr(layer, f"{kind}_before") for layer in self.layers]
        after = [getattr(layer, kind) for layer in self.layers]
        if any(v is None for v in before + after) or not sum(before):
            return None
        return sum(after) / sum(before)

    @property
    def predicted_damage(self) -> float | None:
        """Predicted relative change of the logits: the sum of the layers' damage-curve values
        (``global``), else ``Σ s_ℓ ε_ℓ`` (when both are known)."""
        chosen = [layer for layer in self.layers if layer.ranks]
        if chosen and all(layer.predicted_damage is not None for layer in chosen):
            return float(sum(layer.predicted_damage for layer in chosen))
        terms = [(layer.sensitivity, layer.predicted_error) for layer in chosen]
        if not terms or any(s is None or e is None for s, e in terms):
            return None
        return float(sum(s * e for s, e in terms))

    def replanner(self, *, window: int = 2, sweeps: int = 3):
        """A :class:`sigmadecomp.surgery.Replanner` that re-solves this ``global`` selection
        stage by stage inside ``compress_sequential(..., replan=...)`` (see its docstring)."""
        return Replanner(self, window=window, sweeps=sweeps)

    def to_dict(self) -> dict:
        return dict(rule=self.rule, budget=None if self.budget is None else dataclasses.asdict(self.budget),
                    achieved_params=self.achieved("params"), achieved_flops=self.achieved("flops"),
                    achieved_latency=self.achieved("latency"),
                    predicted_damage=self.predicted_damage, options=self.options, seconds=self.seconds,
                    layers=[layer.to_dict() for layer in self.layers],
                    **({} if self.latency_table is None else {"latency_table": self.latency_table}))


# ------------------------------------------------------------------------------ knapsack


def _lagrangian_choice(costs, damages, lam: float) -> list:
    """Each layer's ``argmin e + λ c``; ties go to the cheaper option, then the lower index."""
    picks = []
    for c, e in zip(costs, damages):
        value = e + lam * c
        best = value.min()
        tied = np.flatnonzero(value <= best + 1e-12 * (abs(best) + 1e-300))
        picks.append(int(tied[np.argmin(c[tied])]))
    return picks


def _total(costs, picks) -> float:
    return float(sum(c[j] for c, j in zip(costs, picks)))


def allocate(costs: Sequence, damages: Sequence, budget: float, *, steps: int = 200) -> list:
    """Multiple-choice knapsack: one option per layer minimising ``Σ damage`` with ``Σ cost ≤ budget``.

    Lagrangian bisection on ``λ`` (the smallest ``λ`` whose independent per-layer choices fit),
    then a greedy pass that spends the remaining budget on the upgrade with the largest damage
    decrease per extra cost, until none fits. Deterministic. Raises ``ValueError`` when even the
    cheapest option of every layer exceeds ``budget``.

    >>> allocate([np.array([1.0, 2.0, 4.0])] * 2, [np.array([1.0, 0.3, 0.0])] * 2, 5.0)
    [1, 1]
    """
    costs = [np.asarray(c, np.float64) for c in costs]
    damages = [np.asarray(e, np.float64) for e in damages]
    cheapest = sum(float(c.min()) for c in costs)
    if cheapest > budget * (1 + 1e-12):
        raise ValueError(f"the budget {budget:.6g} is below the cheapest choice of every layer "
                         f"({cheapest:.6g}); raise the budget or add smaller candidate ranks")
    picks = _lagrangian_choice(costs, damages, 0.0)
    if _total(costs, picks) > budget:
        lo, hi = 0.0, 1.0
        while _total(costs, _lagrangian_choice(costs, damages, hi)) > budget:
            lo, hi = hi, hi * 4.0
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _total(costs, _lagrangian_choice(costs, damages, mid)) > budget else (lo, mid)
        picks = _lagrangian_choice(costs, damages, hi)
    return _fill(costs, damages, picks, budget)


def _fill(costs, damages, picks, budget) -> list:
    picks = list(picks)
    while True:
        left = budget - _total(costs, picks)
        best, move = 0.0, None
        for i, (c, e) in enumerate(zip(costs, damages)):
            extra, gain = c - c[picks[i]], e[picks[i]] - e
            ok = (gain > 0) & (extra <= left + 1e-9 * max(budget, 1.0))
            for j in np.flatnonzero(ok):
                rate = np.inf if extra[j] <= 0 else gain[j] / extra[j]
                if rate > best:
                    best, move = rate, (i, int(j))
        if move is None:
            return picks
        picks[move[0]] = move[1]


# ------------------------------------------------------------------------------ sensitivity


def layer_sensitivities(model: nnx.Module, images, paths: Sequence[str], *, key: jax.Array | None = None,
                        covariances: Mapping | None = None, relative_noise: float = 0.01, repeats: int = 2,
                        batch_size: int = 256, progress: bool = True) -> dict:
    """``{path: s}``: the relative change of the logits per unit of relative output error at the layer.

    An error of relative energy ``δ = relative_noise`` is put into one layer at a time and
    ``s = E‖z̃ − z‖² / (δ·E‖z‖²)``, with ``z`` the model's output on ``images``. For small ``δ``
    ``s`` turns a layer's relative Σ-error into relative output error (errors at different layers
    add to first order). The error's shape matters (a global average pool removes spatially
    white noise but not a truncation error), so:

    * with ``covariances`` (``{path: LayerCovariance}``, what :func:`select_ranks` passes): the
      kernel is moved along the error of its SVD-Σ truncation at parameter ratio 0.5,
      ``D = (I − U_r U_rᵀ) W`` (``U`` the left singular vectors of ``W cov^{1/2}``), scaled to
      ``tr(D cov Dᵀ) = δ·tr(W cov Wᵀ)``: the kind of error a low-rank fit makes. Deterministic.
    * otherwise: Gaussian noise with ``E‖e‖² = δ·E‖y‖²`` on the layer's output ``y``, averaged
      over ``repeats`` draws from ``key``.

    >>> from flax import nnx
    >>> net = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> s = layer_sensitivities(net, jnp.ones((8, 4)), ["layers.0", "layers.1"], key=jax.random.key(0),
    ...                         progress=False)
    >>> sorted(s) == ["layers.0", "layers.1"] and all(v > 0 for v in s.values())
    True
    """
    if not 0 < relative_noise < 1:
        raise ValueError(f"relative_noise must be in (0, 1); got {relative_noise!r}")
    if covariances is None and key is None:
        raise ValueError("give covariances= (truncation-shaped errors) or key= (Gaussian noise)")
    paths = list(paths)
    images = jnp.asarray(images, input_spec(model, (1,)).dtype)  # strict promotion: the model's dtype
    chunks = [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]
    if covariances is not None:
        return _truncation_sensitivities(model, chunks, paths, covariances, relative_noise, progress)
    graphdef, state = nnx.split(model)
    forward = _noisy_forward(graphdef, tuple(paths))
    zero = jnp.zeros(len(paths), images.dtype)
    clean = [forward(state, x, zero, key) for x in chunks]
    energy = sum(_sq(z) for z in clean)
    out = {}
    for i, path in enumerate(tqdm(paths, desc="sensitivity", disable=not progress, leave=False)):
        scales = zero.at[i].set(np.sqrt(relative_noise).astype(zero.dtype))
        change = 0.0
        for r in range(repeats):
            for b, (x, z) in enumerate(zip(chunks, clean)):
                change += _sq(forward(state, x, scales, jax.random.fold_in(key, r * len(chunks) + b)), z)
        out[path] = change / (repeats * relative_noise * energy)
    return out


def _sq(a, b=None) -> float:
    a = np.asarray(a, np.float64)
    return float(np.sum((a if b is None else a - np.asarray(b, np.float64)) ** 2))


def truncation_direction(kernel, cov) -> np.ndarray:
    """``D = (I − U_r U_rᵀ) W`` as a kernel, scaled to ``tr(D cov Dᵀ) = tr(W cov Wᵀ)``: the
    (normalised) error of the SVD-Σ fit at parameter ratio 0.5 (``W`` itself if that is exact)."""
    w = np.asarray(kernel_to_matrix(np.asarray(kernel, np.float64)), np.float64)
    cov = np.asarray(cov, np.float64)
    u, _, _ = np.linalg.svd(w @ rr._cov_sqrt(cov, w.shape[1]), full_matrices=False)
    r = svd_rank_for_ratio(np.shape(kernel), 0.5)
    d = w - u[:, :r] @ (u[:, :r].T @ w)
    energy, err = np.sum((w @ cov) * w), np.sum((d @ cov) * d)
    d = w if err <= 1e-12 * energy else d * np.sqrt(energy / err)
    return np.asarray(matrix_to_kernel(d, np.shape(kernel)))


def _truncation_sensitivities(model, chunks, paths, covariances, relative_noise, progress) -> dict:
    copy = nnx.clone(model)
    graphdef, _ = nnx.split(copy)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    clean = [forward(nnx.state(copy), x) for x in chunks]
    energy = sum(_sq(z) for z in clean)
    out = {}
    for path in tqdm(paths, desc="sensitivity", disable=not progress, leave=False):
        layer = get_by_path(copy, path)
        kernel = layer.kernel[...]
        step = np.sqrt(relative_noise) * truncation_direction(kernel, covariances[path].cov)
        layer.kernel[...] = kernel + jnp.asarray(step, kernel.dtype)
        state = nnx.state(copy)
        out[path] = sum(_sq(forward(state, x), z) for x, z in zip(chunks, clean)) / (relative_noise * energy)
        layer.kernel[...] = kernel
    return out


DAMAGE_LEVELS = (0.01, 0.03, 0.07, 0.15, 0.25, 0.4, 0.6, 0.8, 1.0)


def damage_curves(model: nnx.Module, images, paths: Sequence[str], covariances: Mapping, *,
                  levels: Sequence[float] = DAMAGE_LEVELS, batch_size: int = 256,
                  progress: bool = True) -> dict:
    """``{path: (eps, damage)}``: measured relative logit change ``E‖z̃ − z‖² / E‖z‖²`` when layer
    ``path`` alone is replaced by its SVD-Σ truncation whose relative Σ-error ``eps`` is nearest
    below each of ``levels`` (``eps = 1``: the layer's output removed). Increasing in ``eps``
    (running maximum), starting at ``(0, 0)``; interpolate with ``np.interp``.

    Unlike a slope measured with a small perturbation, the curve sees what a large cut does: the
    network is not linear in a layer's error, and a deep cut removes the leading directions of the
    output, which a small perturbation along the tail does not probe.

    >>> from flax import nnx
    >>> from sigmadecomp.compress import calibrate
    >>> net = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(6, 2, rngs=nnx.Rngs(1)))
    >>> x = jax.random.normal(jax.random.key(0), (32, 4))
    >>> eps, dmg = damage_curves(net, x, ["layers.0"], calibrate(net, x, progress=False), progress=False)["layers.0"]
    >>> bool(eps[0] == 0 and dmg[0] == 0 and (np.diff(dmg) >= 0).all())
    True
    """
    images = jnp.asarray(images, input_spec(model, (1,)).dtype)
    chunks = [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]
    copy = nnx.clone(model)
    graphdef, _ = nnx.split(copy)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    clean = [forward(nnx.state(copy), x) for x in chunks]
    energy = sum(_sq(z) for z in clean)
    out = {}
    for path in tqdm(list(paths), desc="damage curves", disable=not progress, leave=False):
        layer = get_by_path(copy, path)
        kernel = layer.kernel[...]
        w = np.asarray(kernel_to_matrix(np.asarray(kernel, np.float64)), np.float64)
        cov = np.asarray(covariances[path].cov, np.float64)
        u, sv, _ = np.linalg.svd(w @ rr._cov_sqrt(cov, w.shape[1]), full_matrices=False)
        errors = rr.svd_errors(sv)
        ranks = sorted({int(np.flatnonzero(errors <= level + 1e-12)[0]) for level in levels}, reverse=True)
        eps, damage = [0.0], [0.0]
        for r in ranks:
            approx = u[:, :r] @ (u[:, :r].T @ w)
            layer.kernel[...] = jnp.asarray(matrix_to_kernel(approx, kernel.shape), kernel.dtype)
            state = nnx.state(copy)
            eps.append(float(errors[r]))
            damage.append(sum(_sq(forward(state, x), z) for x, z in zip(chunks, clean)) / energy)
        layer.kernel[...] = kernel
        out[path] = (np.array(eps), np.maximum.accumulate(np.array(damage)))
    return out


def _noisy_forward(graphdef, paths: tuple):
    @jax.jit
    def forward(state, x, scales, key):
        copy = nnx.merge(graphdef, state)

        def noise(i):
            def add(layer, inputs, y):
                rms = jnp.sqrt(jnp.mean(y * y))
                return y + scales[i] * rms * jax.random.normal(jax.random.fold_in(key, i), y.shape, y.dtype)
            return add

        with intercept([(get_by_path(copy, p), noise(i)) for i, p in enumerate(paths)]):
            return copy(x)

    return forward


# ------------------------------------------------------------------------------ per layer


@dataclasses.dataclass
class _Layer:
    """One selectable layer: its plan entry (format, shape, counts), kernel and cov (float64)."""

    entry: PlanEntry
    kernel: np.ndarray
    cov: np.ndarray
    norm: str
    _spectra: dict = dataclasses.field(default_factory=dict)
    raw_kernel: object = None  # in the model's dtype, for the registry's rank-for-ratio rules

    @property
    def whiten(self):
        return self.cov if self.norm == "sigma" else None

    def spectrum(self) -> np.ndarray:
        if "s" not in self._spectra:
            self._spectra["s"] = rr.whitened_spectrum(self.kernel, self.whiten)
        return self._spectra["s"]

    def mode_spectra(self) -> tuple:
        if "modes" not in self._spectra:
            self._spectra["modes"] = rr.tucker2_mode_spectra(self.kernel, self.whiten)
        return self._spectra["modes"]

    def svd_fit_errors(self) -> np.ndarray:
        """Relative Σ-error of the norm's SVD fit at every rank (index = rank)."""
        if "svd" not in self._spectra:
            self._spectra["svd"] = (rr.svd_errors(self.spectrum()) if self.norm == "sigma"
                                    else rr.frobenius_fit_errors(self.kernel, self.cov))
        return self._spectra["svd"]

    def predicted_error(self, ranks) -> float | None:
        """``ε`` at ``ranks`` where a spectrum gives it (SVD exact, Tucker-2 proxy), else None."""
        fmt = self.entry.format
        if fmt == "svd":
            return float(self.svd_fit_errors()[ranks[0]])
        if fmt == "tucker2":
            s_out, s_in = self.mode_spectra()
            return float(min(1.0, rr.svd_errors(s_out)[ranks[0]] + rr.svd_errors(s_in)[ranks[1]]))
        return None

    def from_svd_rank(self, rank: int) -> tuple:
        """The format's ranks at the parameter ratio of an SVD of rank ``rank``."""
        kh, kw, cin, cout = (1, 1) + self.entry.kernel_shape if len(self.entry.kernel_shape) == 2 \
            else self.entry.kernel_shape
        d = kh * kw * cin
        ratio = min(1.0, max(rank, 1) * (d + cout) / (d * cout))
        return self.rank_for_ratio(ratio)

    def rank_for_ratio(self, ratio: float) -> tuple:
        """The format's own rule (from the registry; spectral rules read the kernel)."""
        return rank_for_ratio(self.entry.format, self.entry.kernel_shape, ratio, groups=self.entry.groups,
                              kernel=self.kernel if self.raw_kernel is None else self.raw_kernel)

    def counts(self, ranks) -> tuple:
        e = self.entry
        if ranks is None:
            return e.params_before, e.flops_before
        c = count_format(e.format, e.kernel_shape, ranks, groups=e.groups, bias=e.use_bias,
                         in_spatial=e.in_spatial, out_spatial=e.out_spatial)
        return c.params, (None if e.flops_before is None else c.flops)

    def cost(self, ranks, kind: str) -> float:
        params, flops = self.counts(ranks)
        return float(params if kind == "params" else flops)


def _energy_ranks(layer: _Layer, tau: float) -> tuple:
    if layer.entry.format == "tucker2":
        s_out, s_in = layer.mode_spectra()
        return rr.energy_rank(s_out, tau), rr.energy_rank(s_in, tau)
    rank = rr.energy_rank(layer.spectrum(), tau)
    return (rank,) if layer.entry.format == "svd" else layer.from_svd_rank(rank)


def _vbmf_ranks(layer: _Layer) -> tuple:
    cout, d = layer.kernel.shape[-1], int(np.prod(layer.kernel.shape[:-1]))
    if layer.entry.format == "tucker2":
        s_out, s_in = layer.mode_spectra()
        cin = layer.kernel.shape[-2]
        return (max(1, rr.evbmf(s_out, (cout, d)).rank), max(1, rr.evbmf(s_in, (cin, cout * d // cin)).rank))
    rank = max(1, rr.evbmf(layer.spectrum(), (cout, d)).rank)
    return (rank,) if layer.entry.format == "svd" else layer.from_svd_rank(rank)


def _or_dense(layer: _Layer, ranks: tuple):
    """A rule's ranks, or ``None`` (stay dense) when they would not save parameters."""
    return None if layer.counts(ranks)[0] >= layer.entry.params_before else ranks


def _largest_fitting(make_choice, layers, budget: Budget, total_before: float, lo: float, hi: float,
                     what: str) -> list:
    """Bisect a scalar knob ``t ∈ [lo, hi]`` (cost non-decreasing in ``t``) to the largest value
    whose choices fit the budget."""
    def cost(t):
        return sum(layer.cost(r, budget.kind) for layer, r in zip(layers, make_choice(t)))

    target = budget.ratio * total_before
    if cost(hi) <= target:
        return make_choice(hi)
    if cost(lo) > target:
        raise ValueError(f"{what}: even the smallest ranks exceed the budget {budget.kind}={budget.ratio}")
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
    return make_choice(lo)


# ------------------------------------------------------------------------------ entry point


def select_ranks(
    model: nnx.Module,
    covariances: Mapping,
    *,
    format: str | Sequence[str],
    rule: str,
    budget=None,
    tau: float | None = None,
    norm: str = "sigma",
    images=None,
    key: jax.Array | None = None,
    skip=(),
    formats: Mapping | None = None,
    input_shape=None,
    proxy: str | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    sweeps: int = 3,
    relative_noise: float = 0.01,
    damage: str = "curve",
    max_error: float | None = MAX_ERROR,
    cache: dict | None = None,
    batch_size: int = 128,
    latency_table=None,
    latency_repeats: int = 5,
    progress: bool = True,
) -> RankSelection:
    """Choose every planned layer's ranks by ``rule`` (see the module docstring).

    Args:
        model: the trained model (only read).
        covariances: ``{path: LayerCovariance}`` of the original network (e.g.
            :func:`sigmadecomp.compress.calibrate`); the spectra are whitened with them.
        format, skip, formats, input_shape: as in :func:`plan` (``input_shape`` is needed for a
            FLOPs budget). ``global`` also takes several formats, e.g. ``("cp", "tucker2")``: every
            layer's candidates are then those of every format, and the knapsack picks each
            layer's format with its ranks (``selection.formats``; :func:`plan` reads them from
            ``ranks=selection``). Errors are relative Σ-errors whatever the format, so the
            candidates compare directly; to keep them measured alike, ``proxy`` defaults to
            ``"sweeps"`` for every format then (Tucker-2's spectrum proxy is a bound, not a fit).
            Params or FLOPs budgets only; no re-planning.
        rule: ``"uniform"``, ``"energy"``, ``"vbmf"`` or ``"global"``.
        budget: ``"params=R"`` / ``"flops=R"`` or a :class:`Budget`: needed by ``uniform`` and
            ``global``; optional for ``energy`` (then ``τ`` is fitted to it); ignored by ``vbmf``.
        tau: kept energy fraction for ``energy`` without a budget.
        norm: ``"sigma"`` or ``"frobenius"``: which fit will be made (and which spectrum is read);
            predicted errors are always relative Σ-errors of that fit.
        images, key: calibration inputs and PRNG key for the sensitivities (``global`` only).
        proxy: ``global`` only: ``"spectrum"`` (SVD, Tucker-2) or ``"sweeps"`` (any format; the
            default for the others): ``sweeps`` ALS sweeps at every ratio of ``grid``. The swept
            solvers' compiled programs are released after each group of layers of one shape
            (:func:`sigmadecomp.solvers.release_compiled_solvers`; every solver, yours included,
            compiles again on its next use): they would otherwise pile up, one per rank and shape.
        relative_noise: ``δ`` of :func:`layer_sensitivities`.
        damage: ``global`` only: ``"curve"`` (default; ``e_ℓ(ρ)`` = the layer's measured
            :func:`damage_curves` at ``ε_ℓ(ρ)``) or ``"linear"`` (``s_ℓ · ε_ℓ(ρ)`` with the slope
            of :func:`layer_sensitivities`; cheaper, but blind to deep cuts: measured worse).
        max_error: ``global`` only: the trust region of the damage model. Candidates whose
            predicted relative error exceeds it are not offered, unless the budget cannot be met
            without them; the cap then rises to the smallest value that fits (recorded as
            ``options["error_cap"]``). ``None``: no cap. See the module docstring.
        cache: an optional dict, reused across calls that share ``model``, ``covariances``,
            ``images`` and ``key`` (e.g. several budgets and rules in one experiment): spectra,
            sensitivities, swept candidates and latency tables are then measured once.
        batch_size, latency_repeats: latency budget only: the batch at which every layer is
            timed and the interleaved rounds per median (:func:`sigmadecomp.latency.layer_latency_table`).
        latency_table: latency budget only: a table from an earlier selection
            (``selection.latency_table``, or the path of a JSON file holding it, or a report's
            ``rank_selection`` entry) used instead of timing; it must hold every candidate.

    Returns:
        A :class:`RankSelection`; ``plan(model, format=..., ranks=sel, skip=sel.is_dense)``.

    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from sigmadecomp.compress import calibrate
    >>> net = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.relu,
    ...                      nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(1)))
    >>> images = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    >>> cov = calibrate(net, images, progress=False)
    >>> sel = select_ranks(net, cov, format="svd", rule="global", budget="params=0.5",
    ...                    images=images, key=jax.random.key(0), input_shape=(1, 8, 8, 3),
    ...                    progress=False)
    >>> sel.achieved("params") <= 0.5
    True
    """
    start = time.perf_counter()
    _check_select(rule, norm, proxy, tau)
    budget = None if budget is None else Budget.parse(budget)
    if rule in ("uniform", "global") and budget is None:
        raise ValueError(f"rule {rule!r} needs a budget (e.g. budget='params=0.5')")
    tried = _check_formats(format, rule, budget, formats)
    proxy = "sweeps" if proxy is None and len(tried) > 1 else proxy
    bases = [plan(model, format=f, ratio=1.0, skip=skip, formats=formats, input_shape=input_shape) for f in tried]
    base = bases[0]
    if budget is not None and budget.kind == "flops" and base.flops_before is None:
        raise ValueError("a FLOPs budget needs input_shape (e.g. (1, 32, 32, 3)) to count FLOPs")
    if budget is not None and budget.kind == "latency":
        _check_latency(rule, base, latency_table)
    missing = [p for p in base.paths if p not in covariances]
    if missing:
        raise ValueError(f"covariances has no entry for layer(s) {missing}; calibrate them too")
    cache = {} if cache is None else cache
    alternatives = [_alternatives(model, covariances, entries, norm, cache)
                    for entries in zip(*(b.entries for b in bases))]
    layers = [alts[0] for alts in alternatives]
    _check_groups(layers)
    options = dict(norm=norm, tau=tau, proxy=proxy, relative_noise=relative_noise)
    sensitivity, tables = None, ()
    if rule == "global":
        if images is None or key is None:
            raise ValueError("rule 'global' measures sensitivities: give images= and key=")
        if damage not in ("curve", "linear"):
            raise ValueError(f"damage must be 'curve' or 'linear'; got {damage!r}")
        if max_error is not None and not max_error > 0:
            raise ValueError(f"max_error must be positive or None; got {max_error!r}")
        if damage == "curve" and "curves" not in cache:
            cache["curves"] = damage_curves(model, images, base.paths, covariances, progress=progress)
        if ("sensitivity", relative_noise) not in cache:
            cache["sensitivity", relative_noise] = layer_sensitivities(
                model, images, base.paths, covariances=covariances, relative_noise=relative_noise,
                progress=progress)
        sensitivity = cache["sensitivity", relative_noise]
        curves = cache["curves"] if damage == "curve" else None
        timer = _latency_timer(model, base, latency_table, batch_size, latency_repeats, cache, progress)
        ranks, errors, tables, table, cap, layers = _global(alternatives, sensitivity, curves, budget, proxy,
                                                            tuple(grid), sweeps, key, progress, cache, timer,
                                                            max_error)
        options.update(grid=list(grid), sweeps=sweeps, damage=damage, max_error=max_error, error_cap=cap)
        if len(tried) > 1:
            options.update(formats=list(tried))
        if table is not None:
            options.update(latency_batch_size=table["batch_size"])
    else:
        ranks, table = _rule_ranks(rule, layers, budget, tau), None
        errors = [None if r is None else layer.predicted_error(r) for layer, r in zip(layers, ranks)]
        sensitivity = cache.get(("sensitivity", relative_noise))  # measured by an earlier global call
    curves = cache.get("curves") if damage == "curve" else None  # measured by this or an earlier global call
    choices = tuple(_choice(layer, r, err, sensitivity, curves, table) for layer, r, err in zip(layers, ranks, errors))
    return RankSelection(rule, budget, choices, options, time.perf_counter() - start, tables, table)


def _alternatives(model, covariances, entries, norm, cache) -> list:
    """One layer once per format tried (``entries``: its plan entry in each), sharing one float64
    copy of its kernel and cov and one spectra cache (spectra depend on the kernel only)."""
    path = entries[0].path
    raw = get_by_path(model, path).kernel[...]
    kernel, cov = np.asarray(raw, np.float64), np.asarray(covariances[path].cov, np.float64)
    spectra = cache.setdefault(("spectra", path, norm), {})
    return [_Layer(e, kernel, cov, norm, spectra, raw) for e in entries]


def _check_formats(format, rule, budget, formats) -> tuple:
    """``format`` as a tuple of distinct format names; several only for ``global`` on params/FLOPs."""
    tried = (format,) if isinstance(format, str) else tuple(format)
    if not tried or len(set(tried)) != len(tried) or not all(isinstance(f, str) for f in tried):
        raise ValueError(f"format must be a format name or a sequence of distinct ones; got {format!r}")
    if len(tried) > 1:
        if rule != "global":
            raise ValueError(f"several formats {tried} need rule 'global' (its knapsack picks each layer's "
                             f"format); got rule {rule!r}")
        if budget.kind == "latency":
            raise ValueError("several formats take a params or flops budget; a latency budget times one format")
        if formats:
            raise ValueError("several formats choose every layer's format: leave formats= out (skip the "
                             "layers no format should touch)")
    return tried


def _check_latency(rule, base, latency_table) -> None:
    if rule != "global":
        raise ValueError(f"a latency budget works with rule 'global' only (the costs are measured at the "
                         f"global rule's candidate ranks); got rule {rule!r}")
    if latency_table is None and any(e.in_spatial is None for e in base.entries):
        raise ValueError("a latency budget times every layer at its real input shape: give input_shape= "
                         "(e.g. (1, 32, 32, 3)) or a measured latency_table=")


def _load_latency_table(table) -> dict:
    """A table dict, a selection report holding one, or a JSON file of either."""
    if isinstance(table, (str, os.PathLike)):
        with open(table) as f:
            table = json.load(f)
    if isinstance(table, Mapping) and "rank_selection" in table:  # a compress report
        table = table["rank_selection"]
    if isinstance(table, Mapping) and "latency_table" in table:  # a selection's report
        table = table["latency_table"]
    if not isinstance(table, Mapping) or not isinstance(table.get("layers"), Mapping):
        raise ValueError("latency_table must be a table from layer_latency_table / selection.latency_table "
                         "(a dict with 'layers'), or a JSON file holding one")
    return dict(table)


def _latency_timer(model, base, latency_table, batch_size, repeats, cache, progress):
    """``options by path → table``: the given table, or one measured (once per candidate set)."""
    from sigmadecomp.latency import layer_latency_table  # latency imports surgery: import on use

    def timer(options: dict) -> dict:
        if latency_table is not None:
            return _load_latency_table(latency_table)
        tag = ("latency", batch_size, repeats, tuple((p, tuple(o)) for p, o in options.items()))
        if tag not in cache:
            cache[tag] = layer_latency_table(model, base.entries, options, batch_size=batch_size,
                                             repeats=repeats, progress=progress)
        return cache[tag]

    return timer


def _latency_costs(table: dict, path: str, options) -> np.ndarray:
    row = table["layers"].get(path)
    if row is None:
        raise ValueError(f"the latency table has no layer {path!r}; time it again (drop latency_table=)")
    lookup = {None if o is None else tuple(int(v) for v in o): float(ms) for o, ms in zip(row["options"], row["ms"])}
    missing = [o for o in options if o not in lookup]
    if missing:
        raise ValueError(f"the latency table of {path!r} lacks the candidate ranks {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}: it was measured for other candidates "
                         "(format, grid or proxy); time it again (drop latency_table=)")
    return np.array([lookup[o] for o in options])


def _check_select(rule, norm, proxy, tau) -> None:
    if rule not in RANK_RULES:
        raise ValueError(f"rule must be one of {RANK_RULES}; got {rule!r}")
    if norm not in ("sigma", "frobenius"):
        raise ValueError(f"norm must be 'sigma' or 'frobenius'; got {norm!r}")
    if proxy not in (None, "spectrum", "sweeps"):
        raise ValueError(f"proxy must be None, 'spectrum' or 'sweeps'; got {proxy!r}")
    if tau is not None and not (isinstance(tau, (int, float)) and 0 < tau <= 1):
        raise ValueError(f"tau must be in (0, 1]; got {tau!r}")


def _check_groups(layers) -> None:
    grouped = [layer.entry.path for layer in layers if layer.entry.groups != 1]
    if grouped:
        raise ValueError(f"rank rules read ungrouped layers only; skip the grouped conv(s) {grouped}")


def _choice(layer: _Layer, ranks, error, sensitivity, curves, table=None) -> LayerChoice:
    params, flops = layer.counts(ranks)
    path = layer.entry.path
    ms = (None, None)
    if table is not None:
        option = None if ranks is None else tuple(int(r) for r in ranks)
        ms = tuple(float(v) for v in _latency_costs(table, path, [option, None]))
    damage = None if curves is None or error is None else float(np.interp(error, *curves[path]))
    return LayerChoice(path, layer.entry.format, None if ranks is None else tuple(int(r) for r in ranks),
                       0.0 if ranks is None else error,
                       None if sensitivity is None else float(sensitivity[path]),
                       int(params), int(layer.entry.params_before), flops, layer.entry.flops_before,
                       0.0 if ranks is None and curves is not None else damage, *ms)


def _rule_ranks(rule: str, layers: list, budget: Budget | None, tau) -> list:
    if rule == "vbmf":
        return [_or_dense(layer, _vbmf_ranks(layer)) for layer in layers]
    total = sum(layer.cost(None, budget.kind) for layer in layers) if budget else 0.0

    def uniform(ratio):
        return [layer.rank_for_ratio(ratio) for layer in layers]

    def energy(t):
        return [_or_dense(layer, _energy_ranks(layer, t)) for layer in layers]

    if rule == "uniform":
        if budget.kind == "params":
            return uniform(budget.ratio)
        return _largest_fitting(uniform, layers, budget, total, 1e-4, budget.ratio, "uniform")
    if budget is None:
        if tau is None:
            raise ValueError("rule 'energy' needs tau= (kept energy fraction) or a budget")
        return energy(tau)
    return _largest_fitting(energy, layers, budget, total, 1e-6, 1.0, "energy")


def _global(alternatives, sensitivity, curves, budget, proxy, grid, sweeps, key, progress, cache,
            timer=None, max_error=None) -> tuple[list, list, tuple, dict | None, float | None, list]:
    """The knapsack over every layer's candidates; ``alternatives[i]`` holds layer ``i`` once per
    format tried (one format: a list of one). Returns ranks, errors, candidate tables, latency
    table, error cap and each layer's chosen alternative (its format)."""
    damages, options, owners, errors = [], [], [], []
    keys = jax.random.split(jax.random.fold_in(key, 1), len(alternatives))
    swept = _all_candidates([layer for alts in alternatives for layer in alts], proxy, grid, sweeps,
                            [k for alts, k in zip(alternatives, keys) for _ in alts], cache, progress)
    position = 0
    for alts in alternatives:
        cands = swept[position:position + len(alts)]
        position += len(alts)
        path = alts[0].entry.path
        options.append([None] + [r for c in cands for r, _ in c])
        owners.append([0] + [a for a, c in enumerate(cands) for _ in c])
        errors.append(np.array([0.0] + [e for c in cands for _, e in c]))
        damages.append(sensitivity[path] * errors[-1] if curves is None else np.interp(errors[-1], *curves[path]))
    layers = [alts[0] for alts in alternatives]
    paths = [layer.entry.path for layer in layers]
    table = None if budget.kind != "latency" else timer(dict(zip(paths, options)))
    latency = None if table is None else [_latency_costs(table, p, o) for p, o in zip(paths, options)]
    costs = latency or [np.array([alts[a].cost(r, budget.kind) for r, a in zip(o, w)])
                        for alts, o, w in zip(alternatives, options, owners)]
    total = sum(c[0] for c in costs)
    fastest = sum(float(c.min()) for c in costs) / total
    if budget.kind == "latency" and fastest > budget.ratio:
        raise ValueError(f"latency={budget.ratio}: the fastest measured option of every layer sums to {fastest:.3f} "
                         f"of the dense layers' ms at batch {table['batch_size']} (load {table['machine_load'][0]}); "
                         "small layers or batches are dispatch-bound: raise the budget or the batch size")
    cap = _error_cap(costs, errors, budget.ratio * total, max_error)
    if cap is not None:
        keep = [np.flatnonzero(e <= cap) for e in errors]
        options = [[o[j] for j in k] for o, k in zip(options, keep)]
        owners = [[w[j] for j in k] for w, k in zip(owners, keep)]
        errors = [e[k] for e, k in zip(errors, keep)]
        damages = [d[k] for d, k in zip(damages, keep)]
        costs = [c[k] for c, k in zip(costs, keep)]
        latency = None if latency is None else costs
    picks = allocate(costs, damages, budget.ratio * total)
    mixed = len(alternatives[0]) > 1
    tables = tuple(_table(alts, o, e, sensitivity, curves, j, None if latency is None else latency[i],
                          w if mixed else None)
                   for i, (alts, o, e, j, w) in enumerate(zip(alternatives, options, errors, picks, owners)))
    chosen = [alts[w[j]] for alts, w, j in zip(alternatives, owners, picks)]
    return ([o[j] for o, j in zip(options, picks)], [float(e[j]) for e, j in zip(errors, picks)], tables, table,
            cap, chosen)


def _all_candidates(layers, proxy, grid, sweeps, keys, cache, progress) -> list:
    """Every layer's ``[(ranks, ε)]`` (from ``cache`` when an earlier call measured them), fitted
    group by group of layers with one kernel shape: they share every compiled solver, which are
    released after each group (:func:`sigmadecomp.solvers.release_compiled_solvers`: one program
    per grid rank and shape would otherwise pile up; ~500 memory mappings each on XLA:CPU). Each
    layer keeps its own key, so the order does not change the result."""
    from sigmadecomp.solvers import release_compiled_solvers

    tags = [("candidates", layer.entry.path, layer.entry.format, layer.norm, proxy, grid, sweeps) for layer in layers]
    groups: dict = {}
    for i, layer in enumerate(layers):
        groups.setdefault((layer.entry.format, tuple(layer.entry.kernel_shape), layer.entry.groups, layer.norm), []).append(i)
    with tqdm(total=len(layers), desc="candidates", disable=not progress, leave=False) as bar:
        for members in groups.values():
            swept = False
            for i in members:
                if tags[i] not in cache:
                    cache[tags[i]] = _candidates(layers[i], proxy, grid, sweeps, keys[i])
                    swept = swept or _proxy_of(layers[i].entry.format, proxy) == "sweeps"
                bar.update()
            if swept:
                release_compiled_solvers()
    return [cache[tag] for tag in tags]


def _error_cap(costs, errors, budget: float, max_error: float | None) -> float | None:
    """The trust region's cap: ``max_error``, or the smallest candidate error above it at which the
    cheapest allowed option of every layer fits ``budget``; ``None`` without a cap (or when no
    cap lets the budget fit: :func:`allocate` then explains)."""
    if max_error is None:
        return None
    levels = [max_error] + sorted({float(x) for e in errors for x in e if x > max_error})
    for cap in levels:
        if sum(float(c[e <= cap].min()) for c, e in zip(costs, errors)) <= budget * (1 + 1e-12):
            return cap
    return None


def _table(alts: list, options, errors, sensitivity, curves, pick, latency=None, owners=None) -> LayerCandidates:
    """``alts``: the layer once per format tried; ``owners[j]``: which one option ``j`` belongs to
    (``None``: one format)."""
    layer = alts[0]
    path = layer.entry.path
    counts = [alts[0 if owners is None else owners[j]].counts(r) for j, r in enumerate(options)]
    flops = None if layer.entry.flops_before is None else np.array([f for _, f in counts], np.float64)
    formats = None if owners is None else tuple(None if r is None else alts[w].entry.format
                                                for r, w in zip(options, owners))
    return LayerCandidates(path, tuple(options), errors, np.array([p for p, _ in counts], np.float64), flops,
                           None if curves is None else curves[path], float(sensitivity[path]), int(pick), latency,
                           formats)


def _proxy_of(fmt: str, proxy: str | None) -> str:
    """The damage proxy a format uses: ``proxy``, or its default (closed form for SVD and Tucker-2)."""
    return proxy or ("spectrum" if fmt in ("svd", "tucker2") else "sweeps")


def _candidates(layer: _Layer, proxy, grid, sweeps, key) -> list:
    """``[(ranks, ε)]`` cheaper than the dense layer (dense itself is added by the caller)."""
    fmt = layer.entry.format
    proxy = _proxy_of(fmt, proxy)
    if proxy == "spectrum" and fmt == "svd":
        ranks = [(r,) for r in range(1, len(layer.svd_fit_errors()))]
    elif proxy == "spectrum" and fmt == "tucker2":
        kh_kw_cin_cout = layer.kernel.shape
        cin, cout = kh_kw_cin_cout[-2], kh_kw_cin_cout[-1]
        outs = sorted({max(1, min(cout, round(g * cout))) for g in grid} | {cout})
        ins = sorted({max(1, min(cin, round(g * cin))) for g in grid} | {cin})
        ranks = [(a, b) for a in outs for b in ins]
    elif proxy == "spectrum":
        raise ValueError(f"proxy 'spectrum' has no closed form for format {fmt!r}; use proxy='sweeps'")
    else:
        ranks = sorted({layer.rank_for_ratio(g) for g in grid})
    ranks = [r for r in ranks if layer.counts(r)[0] < layer.entry.params_before and _plannable(layer.entry, r)]
    if proxy == "spectrum":
        return [(r, layer.predicted_error(r)) for r in ranks]
    return [(r, _swept_error(layer, r, sweeps, jax.random.fold_in(key, i))) for i, r in enumerate(ranks)]


def _plannable(entry: PlanEntry, ranks) -> bool:
    """Whether :func:`plan` accepts ``ranks`` (e.g. Tucker-2 refuses ``r_out > r_in·kh·kw``: a
    grid pair such as (45, 2) is cheap in time, so a latency budget would pick it)."""
    try:
        _check_rank_bounds(entry.format, tuple(ranks), entry.kernel_shape, entry.groups, entry.path)
    except ValueError:
        return False
    return True


def _swept_error(layer: _Layer, ranks, sweeps: int, key) -> float:
    """Relative Σ-error after ``sweeps`` ALS sweeps (the norm's fit) at ``ranks``."""
    from sigmadecomp.compress import solver_for  # the pipeline imports surgery: import on use
    from sigmadecomp.solvers import decompose, relative_error

    entry = dataclasses.replace(layer.entry, ranks=tuple(ranks))
    kernel = jnp.asarray(layer.kernel)
    cov = jnp.asarray(layer.cov)
    solution = decompose(kernel, solver_for(entry, max_steps=sweeps), cov=cov if layer.norm == "sigma" else None,
                         key=key)
    return float(relative_error(kernel, solution.value, cov))
