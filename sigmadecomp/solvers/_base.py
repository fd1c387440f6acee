"""The contract between :func:`sigmadecomp.decompose` and each solver.

``decompose`` validates the user's input and turns it into a :class:`Problem`: the kernel as a
matrix ``W`` (``cout × d``, package patch order), the *target product* ``T`` and the *metric* ``M``:

    f(W̃) = tr(W̃ M W̃ᵀ) − 2 tr(T W̃ᵀ) + energy,         relative error = f / energy

* Frobenius (``cov=None``):   ``M = None`` (identity, never formed), ``T = W``, ``energy = ‖W‖²``.
* Σ (``cov`` given):          ``M = cov + ridge``,  ``T = W M``,  ``energy = tr(W M Wᵀ)``.
* cross-covariance form (sequential calibration, DESIGN.md §1): ``M = E[x̂x̂ᵀ] + ridge``,
  ``T = W E[x x̂ᵀ]``, ``energy = tr(W E[xxᵀ] Wᵀ)``.

So every Σ-solver reads only ``T`` and ``M`` and the cross form costs nothing extra. A solver is a
frozen, hashable configuration whose ``solve`` runs under ``jit`` with the config static and the
arrays traced: new data of the same shapes never recompiles.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from sigmadecomp.solvers._numerics import mm
from sigmadecomp.solvers._validation import check_factorized_shapes

__all__ = ["AbstractSolver", "Problem", "problem_error", "solution_stats"]


@dataclasses.dataclass(frozen=True)
class Problem:
    matrix: jax.Array  # W, (cout, d)
    target: jax.Array  # T, (cout, d)
    metric: Optional[jax.Array]  # M, (d, d) ridged; None = identity (Frobenius)
    energy: jax.Array  # scalar > 0
    direct: bool  # static: T == W M exactly, so f = tr(Δ M Δᵀ) can be used (no cancellation)
    kernel_shape: tuple  # static: (kh, kw, cin, cout) or (in, out)
    ridge: Optional[jax.Array] = None  # the ridge added to M, absolute (ridge·tr cov/d); None = 0

    @property
    def conv_shape(self) -> tuple[int, int, int, int]:
        s = self.kernel_shape
        return (1, 1, s[0], s[1]) if len(s) == 2 else tuple(s)


jax.tree_util.register_dataclass(
    Problem,
    data_fields=["matrix", "target", "metric", "energy", "ridge"],
    meta_fields=["direct", "kernel_shape"],
)


def solution_stats(problem: Problem, jitter=None, tikhonov=None) -> dict:
    """``Solution.stats`` of a solve of ``problem``: ``ridge`` (absolute), ``jitter`` (relative,
    largest used), ``tikhonov`` (absolute ``τ``), each a scalar of the problem's dtype."""
    zero = jnp.zeros((), problem.matrix.dtype)
    as_scalar = lambda x: zero if x is None else jnp.asarray(x, zero.dtype)  # noqa: E731
    return {"ridge": as_scalar(problem.ridge), "jitter": as_scalar(jitter),
            "tikhonov": as_scalar(tikhonov)}


def problem_error(problem: Problem, approx):
    """Relative error ``f(W̃) / energy`` of an approximation ``approx`` (``cout × d``).

    Uses the direct form ``tr(Δ M Δᵀ)`` with ``Δ = W − W̃`` whenever ``T = W M`` (Frobenius and
    plain Σ), which stays accurate when the error is tiny; the expanded form only for the
    cross-covariance problem, where no ``Δ`` exists.
    """
    if problem.metric is None:
        delta = problem.matrix - approx
        f = jnp.sum(delta * delta)
    elif problem.direct:
        delta = problem.matrix - approx
        f = jnp.sum(mm(delta, problem.metric) * delta)
    else:
        quad = jnp.sum(mm(approx, problem.metric) * approx)
        f = quad - 2.0 * jnp.sum(problem.target * approx) + problem.energy
        f = jnp.maximum(f, 0.0)
    return f / problem.energy


class AbstractSolver(abc.ABC):
    """Base of the solver configurations (frozen dataclasses: hashable, usable as jit statics).

    Subclasses define ``max_steps`` and ``ridge`` (read by :func:`sigmadecomp.decompose` to build
    ``M = cov + ridge·(tr cov / d)·I``), implement :meth:`check` and :meth:`solve`, and, to accept
    a warm start, :meth:`init_shapes`.
    """

    def needs_key(self, kernel_shape: tuple) -> bool:
        """Whether the default start draws random numbers (then ``decompose`` requires ``key``)."""
        return False

    def init_shapes(self, kernel_shape: tuple):
        """The solver's format with shape tuples in place of arrays (e.g.
        ``Tucker2(core=(kh, kw, r_in, r_out), ...)``); ``None`` (default) = no warm start."""
        return None

    def check_init(self, init, kernel_shape: tuple, dtype):
        """Validate a warm start against :meth:`init_shapes`; returns it cast to ``dtype``."""
        if init is None:
            return None
        expected = self.init_shapes(tuple(kernel_shape))
        if expected is None:
            raise ValueError(f"{type(self).__name__} does not take a warm start; pass init=None.")
        return check_factorized_shapes(init, expected, dtype)

    @abc.abstractmethod
    def check(self, kernel_shape: tuple) -> None:
        """Raise ``ValueError`` (showing what was received and how to fix it) if this
        configuration cannot decompose a kernel of ``kernel_shape`` (e.g. a rank above a mode)."""

    @abc.abstractmethod
    def solve(self, problem: Problem, *, key: jax.Array, init=None):
        """Return a :class:`~sigmadecomp.solvers.Solution` for ``problem``.

        ``init`` is ``None`` (the solver's documented default start) or a factorized kernel of the
        solver's format to warm-start from. Must be jit-compiled with the configuration static.
        """
