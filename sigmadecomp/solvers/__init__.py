"""Pure-JAX solvers for low-rank kernel decompositions, Frobenius and Σ-norm.

Entry point: :func:`decompose` ``(kernel, solver, *, cov=None, ...)`` → :class:`Solution`.
Solvers are frozen configurations: :class:`SVD` (closed form → ``LowRank``),
:class:`Tucker2ALS` (block ALS → ``Tucker2``) and :class:`CPALS` (block ALS → ``CP``/``CP3``).
The multilinear engine (:class:`MultilinearALS`, DESIGN.md §5) fits any format declared once
(:class:`Tucker3ALS`, :class:`TTALS`, :class:`TRALS`, the reshaped :class:`RCPALS`, :class:`RTuckerALS`,
:class:`RTTALS`, :class:`RTRALS`; :class:`Tucker2Engine` checks it). They minimise
``f(W̃) = tr((W − W̃) cov (W − W̃)ᵀ)`` (Frobenius when ``cov`` is None); :func:`relative_error`
scores any approximation. :class:`AbstractSolver` and :class:`Problem` are for writing new solvers.
Each configuration and shape compiles once and stays compiled; :func:`release_compiled_solvers`
frees them (:func:`compiled_solver_count` says how many), e.g. after fitting many different ranks.
"""

from sigmadecomp._compile import compiled_solver_count, release_compiled_solvers
from sigmadecomp.solvers._base import AbstractSolver, Problem
from sigmadecomp.solvers._cp import CPALS
from sigmadecomp.solvers._decompose import decompose, relative_error
from sigmadecomp.solvers._engine import MultilinearALS
from sigmadecomp.solvers._engine_tucker2 import Tucker2Engine
from sigmadecomp.solvers._solution import Solution, Status
from sigmadecomp.solvers._svd import SVD
from sigmadecomp.solvers._tr import TRALS
from sigmadecomp.solvers._tt import TTALS
from sigmadecomp.solvers._tucker2 import Tucker2ALS
from sigmadecomp.solvers._validation import NotPSDError
from sigmadecomp.solvers._tucker3 import Tucker3ALS
from sigmadecomp.solvers._ttmatrix import TTMatrixALS, solve_tt_diagonal
from sigmadecomp.solvers._reshaped import RCPALS, RTRALS, RTTALS, RTuckerALS, ReshapedALS

__all__ = [
    "CPALS",
    "SVD",
    "MultilinearALS",
    "TRALS",
    "TTALS",
    "Tucker2ALS",
    "Tucker2Engine",
    "Tucker3ALS",
    "TTMatrixALS",
    "RCPALS",
    "RTRALS",
    "RTTALS",
    "RTuckerALS",
    "ReshapedALS",
    "solve_tt_diagonal",
    "AbstractSolver",
    "NotPSDError",
    "Problem",
    "Solution",
    "Status",
    "compiled_solver_count",
    "decompose",
    "relative_error",
    "release_compiled_solvers",
]
