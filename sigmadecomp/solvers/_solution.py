"""What every solver returns: a factorized kernel plus why it stopped and how the error went."""

from __future__ import annotations

import dataclasses
import enum

import jax
import numpy as np

__all__ = ["Solution", "Status"]


class Status(enum.IntEnum):
    """Why a solver stopped. Stored as an int32 array in :class:`Solution` so it survives ``jit``."""

    CONVERGED = 0
    MAX_STEPS = 1
    INNER_NOT_CONVERGED = 2
    NONFINITE = 3
    NOT_PSD = 4

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.CONVERGED: "converged: the relative Σ-error changed by less than rtol in the last sweep.",
    Status.MAX_STEPS: (
        "stopped at max_steps before the error settled: raise max_steps, or loosen rtol."
    ),
    Status.INNER_NOT_CONVERGED: (
        "an inner conjugate-gradient solve stopped at cg_max_steps above its tolerance in the last sweep: "
        "raise cg_max_steps, loosen cg_tol, or raise ridge (cov may be badly conditioned)."
    ),
    Status.NONFINITE: (
        "a sweep produced NaN/Inf; the last finite iterate is returned. Check the kernel and cov "
        "for huge values, raise ridge, or run in float64."
    ),
    Status.NOT_PSD: (
        "cov (the metric) is not positive semi-definite: its smallest eigenvalue is below "
        "-psd_tol·tr(cov)/d (see sigmadecomp.solvers.check_psd), so the Σ-error is unbounded below "
        "and the result means nothing (non-finite entries of value are zeroed). Pass a second "
        "moment E[x xᵀ] (not a centred, differenced or rounded-off matrix), or repair it, e.g. by "
        "clipping negative eigenvalues."
    ),
}


@dataclasses.dataclass(frozen=True)
class Solution:
    """The result of :func:`sigmadecomp.decompose`.

    Attributes:
        value: the factorized kernel (``LowRank``, ``Tucker2``, ``CP`` or ``CP3``).
        status: int32 scalar array holding a :class:`Status` code.
        errors: relative Σ-error (Frobenius when ``cov=None``) of the initial point (index 0) and
            after every sweep (index k); fixed length ``max_steps + 1``, NaN after ``num_steps``.
        num_steps: number of sweeps run (int32 scalar array).
        stats: what a user needs to judge the run, as scalar arrays: ``"ridge"`` (the ridge
            actually added to ``cov``, absolute: ``ridge·tr(cov)/d``; 0 for Frobenius),
            ``"jitter"`` (the largest extra diagonal jitter that a Cholesky fallback had to add,
            relative to the mean diagonal of the matrix it factored; 0 when none was needed; see
            :func:`sigmadecomp.solvers._numerics.safe_cholesky`), ``"tikhonov"`` (the absolute
            Tikhonov weight ``τ`` used; 0 unless a CP solver was asked for one); solvers with inner
            conjugate-gradient solves add ``"inner_iterations"`` (int32, length ``max_steps``: CG
            iterations per sweep, 0 where none).
    """

    value: object
    status: jax.Array
    errors: jax.Array
    num_steps: jax.Array
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def message(self) -> str:
        """Human-readable status, saying what to change (call outside ``jit``)."""
        return Status(int(self.status)).message

    @property
    def converged(self) -> bool:
        return int(self.status) == Status.CONVERGED

    @property
    def final_error(self) -> float:
        """The relative error of ``value`` (host float; call outside ``jit``)."""
        return float(np.asarray(self.errors)[int(self.num_steps)])


jax.tree_util.register_dataclass(
    Solution, data_fields=["value", "status", "errors", "num_steps", "stats"], meta_fields=[]
)
