"""Model surgery: plan (pure data) → apply (on a copy) → verify (on real data) → save / load.

Typical use (``factors`` maps each planned path to its factorized kernel, e.g. from a solver)::

    p = plan(model, format="tucker2", ratio=0.5, skip=["conv1", "linear"], input_shape=(1, 32, 32, 3))
    compressed = apply(model, p, factors)
    print(verify(model, compressed, batches, plan=p))
    save("resnet20-tucker2", compressed, p)
    same = load("resnet20-tucker2", CifarResNet(20, rngs=nnx.Rngs(0)))

* :func:`plan` / :class:`Plan` / :class:`PlanEntry` — which layers, format, ranks, counts;
  ranks for a target parameter ratio come from :func:`svd_rank_for_ratio`,
  :func:`tucker2_ranks_for_ratio`, :func:`cp_rank_for_ratio`, :func:`cp3_rank_for_ratio`,
  :func:`tucker3_ranks_for_ratio`, :func:`tt_ranks_for_ratio`, :func:`tr_ranks_for_ratio`
  (each format's rule is read from the format registry, :mod:`sigmadecomp.formats`).
* :func:`select_ranks` / :class:`RankSelection` — ranks by rule (``uniform``, ``energy``,
  ``vbmf``, ``global`` under one params/FLOPs :class:`Budget`): ``plan(model, format=f,
  ranks=sel, skip=sel.is_dense)``; building blocks :func:`evbmf`, :func:`energy_rank`,
  :func:`whitened_spectrum`, :func:`damage_curves`, :func:`layer_sensitivities`, :func:`allocate`;
  :class:`Replanner` (``selection.replanner()``) re-solves a ``global`` selection stage by stage
  inside ``compress_sequential(..., replan=...)``.
* :func:`apply` — a compressed copy with factorized layers (:mod:`sigmadecomp.layers`).
* :func:`verify` / :class:`Report` — per-layer relative Σ-error on real inputs, end-to-end output
  error and top-1 agreement, parameters and measured MACs.
* :func:`save` / :func:`load` — ``plan.json`` + ``params.safetensors`` in a directory.
"""

from sigmadecomp.surgery._allocate import (
    RANK_RULES, Budget, LayerChoice, RankSelection, allocate, damage_curves, layer_sensitivities, select_ranks,
)
from sigmadecomp.surgery._apply import apply
from sigmadecomp.surgery._replan import Replanner
from sigmadecomp.surgery._io import FILE_VERSION, load, save
from sigmadecomp.surgery._plan import FORMAT_NAMES, PLAN_VERSION, Plan, PlanEntry, plan
from sigmadecomp.surgery._ranks import (
    cp3_rank_for_ratio, cp_rank_for_ratio, rank_for_ratio, svd_rank_for_ratio, tr_ranks_for_ratio,
    tt_ranks_for_ratio, tucker2_ranks_for_ratio, tucker3_ranks_for_ratio,
)
from sigmadecomp.surgery._rank_rules import VBMFResult, energy_rank, evbmf, whitened_spectrum
from sigmadecomp.surgery._tt import fit_tt_embedding, to_tt
from sigmadecomp.surgery._verify import LayerReport, Report, verify

__all__ = [
    "RANK_RULES",
    "Budget",
    "LayerChoice",
    "RankSelection",
    "Replanner",
    "VBMFResult",
    "allocate",
    "damage_curves",
    "energy_rank",
    "evbmf",
    "layer_sensitivities",
    "select_ranks",
    "whitened_spectrum",
    "FILE_VERSION",
    "FORMAT_NAMES",
    "LayerReport",
    "PLAN_VERSION",
    "Plan",
    "PlanEntry",
    "Report",
    "apply",
    "cp3_rank_for_ratio",
    "cp_rank_for_ratio",
    "load",
    "plan",
    "rank_for_ratio",
    "save",
    "svd_rank_for_ratio",
    "tr_ranks_for_ratio",
    "tt_ranks_for_ratio",
    "tucker2_ranks_for_ratio",
    "tucker3_ranks_for_ratio",
    "verify",
    "fit_tt_embedding",
    "to_tt",
]
