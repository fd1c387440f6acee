"""The public entry point: validate, build the :class:`Problem`, hand it to the solver."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sigmadecomp._compile import registered_jit
from sigmadecomp._factorized import _TYPES as _FACTORIZED, to_dense
from sigmadecomp._patches import kernel_to_matrix
from sigmadecomp.solvers._base import AbstractSolver, Problem
from sigmadecomp.solvers._numerics import add_ridge, metric_is_psd, mm, ridge_scale
from sigmadecomp.solvers._solution import Solution, Status
from sigmadecomp.solvers._validation import (
    _concrete,
    check_kernel,
    check_second_moments,
)

__all__ = ["decompose", "make_problem", "relative_error"]


@registered_jit
def make_problem(kernel, cov, cross_cov, target_cov, ridge, target_energy=None) -> Problem:
    """The :class:`Problem` for ``kernel`` (validated inputs; ``ridge`` a traced scalar).

    Frobenius when ``cov`` is None; Σ with ``M = cov + ridge·(tr cov/d)·I`` and ``T = W M``;
    cross-covariance form with ``T = W·cross_cov`` and energy ``tr(W target_cov Wᵀ)``, or
    ``target_energy`` when given instead of ``target_cov``.
    """
    w = kernel_to_matrix(kernel)
    shape = tuple(kernel.shape)
    if cov is None:
        return Problem(w, w, None, jnp.sum(w * w), direct=True, kernel_shape=shape)
    metric = add_ridge(cov, ridge)
    added = ridge * ridge_scale(cov)
    if cross_cov is None:
        target = mm(w, metric)
        return Problem(w, target, metric, jnp.sum(target * w), direct=True, kernel_shape=shape,
                       ridge=added)
    target = mm(w, cross_cov)
    energy = jnp.sum(mm(w, target_cov) * w) if target_energy is None else target_energy.astype(w.dtype)
    return Problem(w, target, metric, energy, direct=False, kernel_shape=shape, ridge=added)


def decompose(
    kernel,
    solver: AbstractSolver,
    *,
    cov=None,
    cross_cov=None,
    target_cov=None,
    target_energy=None,
    key=None,
    init=None,
) -> Solution:
    """Approximate ``kernel`` in ``solver``'s format, minimising the Σ-error (Frobenius if no cov).

    Args:
        kernel: Flax conv kernel ``(kh, kw, cin, cout)`` or dense kernel ``(in, out)``,
            float32 or float64; the result keeps its dtype.
        solver: a configuration, e.g. ``SVD(rank)``, ``Tucker2ALS((r_out, r_in))``, ``CPALS(rank)``.
        cov: ``E[x xᵀ]`` of the layer's input patches, ``(d, d)`` with ``d = kh·kw·cin`` in the
            package patch order (channel-major ``(cin, kh, kw)``, see
            :func:`sigmadecomp.extract_patches`). ``None`` = Frobenius. Cast to the kernel's dtype
            (so a float64-accumulated cov is fine for a float32 kernel). A singular cov is fine:
            the solver adds its ``ridge·(tr cov / d)·I`` (reported in ``Solution.stats``). It
            must be positive semi-definite up to rounding: its smallest eigenvalue must be
            ``>= −10·d·eps·tr(cov)/d`` (``eps`` of the kernel's dtype; see
            :func:`~sigmadecomp.solvers._numerics.psd_tolerance`). Outside ``jit`` a cov that
            fails raises ``ValueError``; under ``jit`` the result has status ``NOT_PSD`` and no
            NaN in ``value``.
        cross_cov, target_cov: sequential calibration (earlier layers already compressed, the
            layer sees ``x̂``): pass ``cov = E[x̂ x̂ᵀ]``, ``cross_cov = E[x x̂ᵀ]`` and
            ``target_cov = E[x xᵀ]`` (used only for the error's normaliser) together.
        target_energy: ``E‖W x‖²`` (a positive scalar), the normaliser itself, instead of
            ``target_cov``: sequential calibration accumulates it from the layer's outputs and
            so skips the ``x xᵀ`` gram.
        key: PRNG key for the solver's random choices. Required (``ValueError`` otherwise) when
            the solver draws random numbers for its start: ``init="random"``, or a CP rank above
            an input mode (see the solver's ``needs_key``); ignored otherwise (closed forms and
            deterministic starts), so ``None`` is fine there. There is no hidden default key.
        init: a factorized kernel of the solver's format to warm-start from.

    Returns:
        A :class:`Solution` (factorized ``value``, ``status``, relative-error history).

    >>> import jax, jax.numpy as jnp
    >>> import sigmadecomp as sd
    >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
    >>> sol = sd.decompose(kernel, sd.SVD(4))
    >>> sol.value.in_kernel.shape, sol.value.out_factor.shape
    ((3, 3, 8, 4), (4, 16))
    >>> x = jax.random.normal(jax.random.key(1), (256, 72))
    >>> sol = sd.decompose(kernel, sd.Tucker2ALS((8, 4)), cov=x.T @ x / 256)
    >>> sol.value.core.shape, bool(sol.final_error < 1.0)
    ((3, 3, 4, 8), True)
    """
    if not isinstance(solver, AbstractSolver):
        raise ValueError(
            f"solver must be a solver configuration such as sigmadecomp.SVD(rank) or "
            f"sigmadecomp.Tucker2ALS((r_out, r_in)); got {type(solver).__name__}."
        )
    kernel = check_kernel(kernel)
    if target_energy is not None:
        if target_cov is not None or cross_cov is None:
            raise ValueError("target_energy replaces target_cov in the cross-covariance form: pass it "
                             "with cov and cross_cov, and without target_cov")
        target_energy = jnp.asarray(target_energy, kernel.dtype)
        if target_energy.shape != ():
            raise ValueError(f"target_energy must be a scalar E‖W x‖²; got shape {target_energy.shape}")
        cov, cross_cov, _ = check_second_moments(kernel, cov, cross_cov, cov)
    else:
        cov, cross_cov, target_cov = check_second_moments(kernel, cov, cross_cov, target_cov)
    solver.check(tuple(kernel.shape))
    init = solver.check_init(init, tuple(kernel.shape), kernel.dtype)
    key = _resolve_key(solver, key, init, tuple(kernel.shape))
    ridge = jnp.asarray(getattr(solver, "ridge", 1e-6), kernel.dtype)
    problem = make_problem(kernel, cov, cross_cov, target_cov, ridge, target_energy)
    if _concrete(problem.energy) and not float(problem.energy) > 0:
        raise ValueError(
            f"the kernel's output energy tr(W target_cov Wᵀ) is {float(problem.energy):.3g} <= 0: "
            f"the layer's output is zero on the calibration data, so there is nothing to fit. "
            f"Check target_cov (it must be E[x xᵀ] of the original input)."
        )
    solution = solver.solve(problem, key=key, init=init)
    if cov is not None and not _concrete(cov):  # a concrete cov was checked above (ValueError)
        solution = _flag_not_psd(solution, metric_is_psd(cov))
    return solution


def _resolve_key(solver: AbstractSolver, key, init, kernel_shape: tuple):
    """``key``, or a placeholder when the solver draws nothing random; ``ValueError`` when it
    would (one rule for every solver: no silent default key)."""
    if key is not None:
        return key
    if init is None and solver.needs_key(kernel_shape):
        raise ValueError(
            f"{type(solver).__name__} draws a random start for kernel shape {kernel_shape} "
            f"(init={getattr(solver, 'init', None)!r}); pass key=jax.random.key(0) (any key) to "
            f"make that choice explicit."
        )
    return jax.random.key(0)  # never used for randomness on this path


def _flag_not_psd(solution: Solution, psd) -> Solution:
    """Status ``NOT_PSD`` and non-finite entries of ``value`` zeroed when ``psd`` is False."""
    status = jnp.where(psd, solution.status, Status.NOT_PSD).astype(jnp.int32)
    value = jax.tree_util.tree_map(
        lambda x: jnp.where(psd | jnp.isfinite(x), x, jnp.zeros((), x.dtype)), solution.value)
    return dataclasses.replace(solution, value=value, status=status)


@registered_jit
def _relative_error(kernel, approx, cov):
    w, delta = kernel_to_matrix(kernel), kernel_to_matrix(kernel - approx)
    if cov is None:
        return jnp.sum(delta * delta) / jnp.sum(w * w)
    return jnp.sum(mm(delta, cov) * delta) / jnp.sum(mm(w, cov) * w)


def relative_error(kernel, approx_kernel, cov=None) -> jax.Array:
    """``tr(Δ cov Δᵀ) / tr(W cov Wᵀ)`` with ``Δ = W − W̃`` and the *unridged* ``cov``
    (Frobenius ``‖Δ‖²/‖W‖²`` when ``cov`` is None).

    ``approx_kernel`` is a dense kernel of ``kernel``'s shape or a factorized kernel.

    >>> import jax.numpy as jnp
    >>> float(relative_error(jnp.ones((2, 3)), jnp.zeros((2, 3))))
    1.0
    """
    kernel = check_kernel(kernel)
    if isinstance(approx_kernel, _FACTORIZED) or hasattr(approx_kernel, "dense"):
        approx_kernel = to_dense(approx_kernel)
    approx_kernel = jnp.asarray(approx_kernel)
    if approx_kernel.shape != kernel.shape:
        raise ValueError(
            f"approx_kernel has shape {tuple(approx_kernel.shape)}, kernel {tuple(kernel.shape)}; "
            f"they must match (pass to_dense(solution.value) or the factorized kernel itself)."
        )
    cov, _, _ = check_second_moments(kernel, cov, None, None)
    return _relative_error(kernel, approx_kernel.astype(kernel.dtype), cov)
