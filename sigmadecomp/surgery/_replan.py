"""Re-planning the ``global`` rank selection stage by stage during sequential calibration.

The up-front :func:`select_ranks` (rule ``global``) predicts each layer's error ``ε_ℓ(ρ)`` from
the *original* network's statistics. Sequential calibration
(:func:`sigmadecomp.calibration.compress_sequential`) then fits each layer to the inputs ``x̂``
it sees in the partially compressed network, where the errors differ. A :class:`Replanner`
revises the choice when the pass reaches layer ``ℓ``:

1. **Measure** ``ℓ``'s candidates under its cross statistics: the sequential relative output
   error ``E‖W x − W̃ x̂‖² / E‖W x‖²`` after ``sweeps`` ALS sweeps (SVD: closed form), minus
   the floor under every fit, the error of the best unconstrained linear map
   ``W* = W E[x x̂ᵀ] E[x̂ x̂ᵀ]⁺`` (what the drift of ``ℓ``'s input alone costs, already paid for
   by the upstream choices): by Pythagoras the remainder is ``E‖(W* − W̃) x̂‖² / E‖W x‖² ≥ 0``,
   the error ``ℓ``'s own rank cut makes. (Subtracting the error of the dense ``W`` instead was
   measured and rejected: the fit absorbs part of the drift, the difference is 0 at most ranks,
   and the re-solve then cut layer after layer to rank 1 — ResNet-20, Tucker-2, params 0.33:
   18.8% accuracy.) To keep the cost bounded only
   a *window* of candidates is fitted: the up-front pick and its ``window`` neighbours on each
   side along the lower convex hull of (cost, up-front damage) — the only candidates a
   Lagrangian choice can pick. The other candidates' ``ε`` are the up-front ones scaled by the
   measured / predicted ratio interpolated in cost between the fitted ones (constant beyond),
   and never below (above) the cheapest (costliest) fitted candidate's when cheaper (costlier).
2. **Re-solve** the multiple-choice knapsack (:func:`allocate`) over ``ℓ`` and every layer not
   yet compressed, with the budget left (the whole-model budget minus what the layers already
   compressed actually cost), mapping errors to damage as the up-front selection did (damage
   curves, or the slope for ``damage="linear"``).
3. ``ℓ`` gets the ranks of that solution (``None``: it stays dense).

When nothing upstream changed and the measured errors equal the predicted ones (the first layer
under SVD-Σ), the re-solve is the up-front knapsack and returns the up-front choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

__all__ = ["LayerCandidates", "Replanner"]


@dataclasses.dataclass(frozen=True)
class LayerCandidates:
    """One layer's options in the up-front ``global`` selection: ``options[0]`` is ``None``
    (dense), ``errors`` the predicted ``ε`` (0 for dense), ``params`` / ``flops`` the counts of
    each option (``flops`` ``None`` without an input shape), ``curve`` the damage curve
    ``(eps, damage)`` or ``None`` for the linear damage ``slope · ε``, and ``pick`` the index the
    up-front knapsack chose."""

    path: str
    options: tuple
    errors: np.ndarray
    params: np.ndarray
    flops: np.ndarray | None
    curve: tuple | None
    slope: float
    pick: int
    latency: np.ndarray | None = None  # measured ms per option (latency budget), else None
    formats: tuple | None = None  # each option's format when global tried several (None: dense), else None

    def damage(self, errors) -> np.ndarray:
        errors = np.asarray(errors, np.float64)
        return self.slope * errors if self.curve is None else np.interp(errors, *self.curve)

    def costs(self, kind: str) -> np.ndarray:
        return {"params": self.params, "flops": self.flops, "latency": self.latency}[kind]

    def hull(self, kind: str) -> list:
        """Indices on the lower convex hull of (cost, up-front damage), cost increasing and
        damage strictly decreasing: the options ``argmin damage + λ cost`` picks for some ``λ ≥ 0``."""
        cost, dmg = self.costs(kind), self.damage(self.errors)
        order = sorted(range(len(cost)), key=lambda j: (cost[j], dmg[j]))
        hull: list = []
        for j in order:
            if hull and dmg[j] >= dmg[hull[-1]]:
                continue  # dominated: costs as much or more and damages as much or more
            while len(hull) >= 2 and _cross(cost, dmg, hull[-2], hull[-1], j) <= 0:
                hull.pop()  # hull[-1] lies on or above the segment hull[-2] → j
            hull.append(j)
        return hull


def _cross(cost, dmg, a, b, c) -> float:
    return float((cost[b] - cost[a]) * (dmg[c] - dmg[a]) - (dmg[b] - dmg[a]) * (cost[c] - cost[a]))


class Replanner:
    """Stage-by-stage re-planning of a ``global`` :class:`RankSelection` (module docstring).

    Made by :meth:`RankSelection.replanner`; pass it as ``compress_sequential(...,
    replan=replanner)``. The pass calls :meth:`ranks_for` when it reaches a layer and
    :meth:`settle` with the ranks it actually used; :meth:`report` then lists, per layer, the
    ranks chosen up front and on re-planning, and the achieved budget. One replanner serves one
    pass (make a new one for another).

    Args:
        selection: a ``global`` :class:`RankSelection`.
        window: hull neighbours fitted on each side of the up-front pick (≥ 0).
        sweeps: ALS sweeps of each measuring fit (ignored by closed-form formats).

    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from sigmadecomp.compress import calibrate
    >>> from sigmadecomp.surgery import select_ranks
    >>> from sigmadecomp.calibration import compress_sequential
    >>> net = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.relu,
    ...                      nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(1)))
    >>> images = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    >>> sel = select_ranks(net, calibrate(net, images, progress=False), format="svd", rule="global",
    ...                    budget="params=0.5", images=images, key=jax.random.key(0),
    ...                    input_shape=(1, 8, 8, 3), progress=False)
    >>> out = compress_sequential(net, images, format="svd", key=jax.random.key(0),
    ...                           replan=sel.replanner(), progress=False)
    >>> out.replan["achieved_params"] <= 0.5
    True
    """

    def __init__(self, selection, *, window: int = 2, sweeps: int = 3):
        if selection.rule != "global" or not selection.candidates:
            raise ValueError(f"re-planning needs a rule='global' selection (it re-solves its knapsack); "
                             f"got rule {selection.rule!r}")
        if selection.options.get("formats"):
            raise ValueError(f"re-planning re-solves one format's candidates; this selection tried several "
                             f"({', '.join(selection.options['formats'])}): compress with its up-front choice")
        if not (isinstance(window, int) and window >= 0):
            raise ValueError(f"window must be an int >= 0; got {window!r}")
        if not (isinstance(sweeps, int) and sweeps >= 1):
            raise ValueError(f"sweeps must be an int >= 1; got {sweeps!r}")
        self.format = selection.layers[0].format if selection.layers else None
        self.budget = selection.budget
        self.window, self.sweeps = window, sweeps
        self.layers = {c.path: c for c in selection.candidates}
        if self.budget.kind == "flops" and any(c.flops is None for c in self.layers.values()):
            raise ValueError("a FLOPs budget needs FLOP counts: select with input_shape=...")
        self.total = {k: float(sum(c.costs(k)[0] for c in self.layers.values()))
                      for k in ("params", "flops", "latency") if all(c.costs(k) is not None for c in self.layers.values())}
        self.settled: dict = {}  # path -> index of the option actually used
        self.records: dict = {}

    @property
    def paths(self) -> tuple:
        """The layers the selection covers (dense ones included: re-planning may compress them)."""
        return tuple(self.layers)

    def upfront(self, path: str):
        c = self.layers[path]
        return c.options[c.pick]

    def ranks_for(self, path: str, stats, fit: Callable) -> tuple | None:
        """The ranks for ``path`` (``None``: keep it dense). ``fit(ranks, sweeps)`` returns the
        relative output error of ``path`` fitted at ``ranks`` with ``sweeps`` ALS sweeps to the
        cross statistics ``stats``; ``fit(None, 0)`` the floor (the best unconstrained linear
        map's error). ``stats`` itself is not read here (the caller's ``fit`` closes over it)."""
        if path not in self.layers:
            raise KeyError(f"{path!r} is not a layer of the selection; it covers {list(self.layers)}")
        if path in self.settled:
            raise ValueError(f"{path!r} was already settled: make a new replanner for another pass")
        c = self.layers[path]
        floor = float(fit(None, 0))  # what the drift of the input alone costs
        measured = {}
        for j in self._to_measure(c):
            error = float(fit(c.options[j], self.sweeps))
            if np.isfinite(error):
                measured[j] = max(error - floor, 0.0)
        # each window rank compiled its own solver: a deep network would pile up hundreds
        # (sigmadecomp/_compile.py says why that ends in "Cannot allocate memory")
        from sigmadecomp.solvers import release_compiled_solvers

        release_compiled_solvers()
        errors = self._corrected(c, measured)
        pick, feasible = self._resolve(c, errors)
        self.records[path] = dict(path=path, upfront=_listed(c.options[c.pick]), replanned=_listed(c.options[pick]),
                                  floor=floor, feasible=feasible,
                                  measured={str(_listed(c.options[j])): e for j, e in measured.items()},
                                  predicted_error=float(c.errors[c.pick]), replanned_error=float(errors[pick]))
        return c.options[pick]

    def settle(self, path: str, ranks) -> None:
        """Record the ranks ``path`` was actually compressed at (``None``: left dense)."""
        c = self.layers[path]
        matches = [j for j, o in enumerate(c.options) if (o is None and ranks is None)
                   or (o is not None and ranks is not None and tuple(o) == tuple(ranks))]
        if not matches:
            raise ValueError(f"{path!r}: ranks {ranks!r} are not among the selection's candidates")
        self.settled[path] = matches[0]
        self.records.setdefault(path, dict(path=path, upfront=_listed(c.options[c.pick])))["used"] = _listed(ranks)

    def _to_measure(self, c: LayerCandidates) -> list:
        hull = c.hull(self.budget.kind)
        at = hull.index(c.pick) if c.pick in hull else int(np.argmin([abs(c.costs(self.budget.kind)[j]
                                                                           - c.costs(self.budget.kind)[c.pick])
                                                                       for j in hull]))
        window = hull[max(0, at - self.window) : at + self.window + 1]
        return sorted({j for j in window + [c.pick] if c.options[j] is not None})

    def _corrected(self, c: LayerCandidates, measured: dict) -> np.ndarray:
        """Measured ``ε`` where fitted; elsewhere the prediction times the interpolated ratio."""
        errors = np.array(c.errors, np.float64)
        usable = sorted((float(c.params[j]), e / c.errors[j]) for j, e in measured.items() if c.errors[j] > 0)
        if usable:
            xs, ratios = zip(*usable)
            errors = errors * np.interp(np.asarray(c.params, np.float64), xs, ratios)
        if measured:  # outside the fitted window, never better (worse) than the nearest fitted end
            params = np.asarray(c.params, np.float64)
            lo, hi = min(measured, key=lambda j: params[j]), max(measured, key=lambda j: params[j])
            errors = np.where(params < params[lo], np.maximum(errors, measured[lo]), errors)
            errors = np.where(params > params[hi], np.minimum(errors, measured[hi]), errors)
        for j, e in measured.items():
            errors[j] = e
        errors[0] = 0.0  # dense adds no error of its own
        return errors

    def _resolve(self, c: LayerCandidates, errors) -> tuple[int, bool]:
        from sigmadecomp.surgery._allocate import allocate  # _allocate imports this module

        kind = self.budget.kind
        rest = [o for p, o in self.layers.items() if p != c.path and p not in self.settled]
        spent = sum(float(self.layers[p].costs(kind)[j]) for p, j in self.settled.items())
        left = self.budget.ratio * self.total[kind] - spent
        costs = [c.costs(kind)] + [o.costs(kind) for o in rest]
        damages = [c.damage(errors)] + [o.damage(o.errors) for o in rest]
        try:
            return allocate(costs, damages, left)[0], True
        except ValueError:  # earlier layers cost more than planned (e.g. a failed fit kept dense)
            return int(np.argmin(c.costs(kind))), False

    def achieved(self, kind: str) -> float | None:
        """Total ``kind`` of the settled layers (unsettled ones dense) over their dense total."""
        if kind not in self.total or not self.total[kind]:
            return None
        used = sum(float(c.costs(kind)[self.settled.get(p, 0)]) for p, c in self.layers.items())
        return used / self.total[kind]

    def report(self) -> dict:
        """JSON-ready: budget, achieved params / FLOPs, and per layer (in selection order) the
        ranks chosen up front, on re-planning and actually used, with the measured errors."""
        return dict(budget=dataclasses.asdict(self.budget), window=self.window, sweeps=self.sweeps,
                    achieved_params=self.achieved("params"), achieved_flops=self.achieved("flops"),
                    layers=[self.records.get(p, dict(path=p, upfront=_listed(self.upfront(p))))
                            for p in self.layers])


def _listed(ranks):
    return None if ranks is None else [int(r) for r in ranks]
