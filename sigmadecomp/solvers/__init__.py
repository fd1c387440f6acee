"""Pure-JAX solvers for low-rank kernel decompositions, Frobenius and Σ-norm.

Entry point: :func:`decompose` ``(kernel, solver, *, cov=None, ...)`` → :class:`Solution`.
Solvers are frozen configurations: :class:`SVD` (closed form → ``LowRank``),
:class:`Tucker2ALS` (block ALS → ``Tucker2``) and :class:`CPALS` (block ALS → ``CP``/``CP3``).
They minimise
``f(W̃) = tr((W − W̃) cov (W − W̃)ᵀ)`` (Frobenius when ``cov`` is None); :func:`relative_error`
scores any approximation. :class:`AbstractSolver` and :class:`Problem` are for writing new solvers.
"""

from sigmadecomp.solvers._base import AbstractSolver, Problem
from sigmadecomp.solvers._cp import CPALS
from sigmadecomp.solvers._decompose import decompose, relative_error
from sigmadecomp.solvers._solution import Solution, Status
from sigmadecomp.solvers._svd import SVD
from sigmadecomp.solvers._tucker2 import Tucker2ALS
from sigmadecomp.solvers._validation import NotPSDError

__all__ = [
    "CPALS",
    "SVD",
    "Tucker2ALS",
    "AbstractSolver",
    "NotPSDError",
    "Problem",
    "Solution",
    "Status",
    "decompose",
    "relative_error",
]
