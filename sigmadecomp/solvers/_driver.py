"""The one loop owner: runs a solver's sweep in ``lax.while_loop`` with a fixed-length history.

A solver supplies ``sweep(state) -> (state, inner_converged)`` (or ``(state, inner_converged,
inner_steps)`` when it runs inner CG solves) and ``error(state) -> scalar``; this driver counts sweeps, records the relative error after each, stops on convergence
(``|e_{k-1} − e_k| <= rtol · e_{k-1}``), on ``max_steps`` or on a non-finite error, and keeps the
last finite state. Everything is traceable, so it lives inside the caller's ``jit``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from sigmadecomp.solvers._numerics import logged_jitter, record_jitter
from sigmadecomp.solvers._solution import Status

__all__ = ["closed_form_status", "iterate"]


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def iterate(
    sweep: Callable,
    error: Callable,
    state,
    *,
    max_steps: int,
    rtol,
    with_jitter: bool = False,
):
    """Run ``sweep`` until converged; returns ``(state, status, errors, num_steps, inner_steps)``,
    and the largest Cholesky jitter any sweep needed as a sixth element when ``with_jitter``.

    ``errors`` has length ``max_steps + 1`` (index 0 = initial state), NaN-padded;
    ``inner_steps`` (int32, length ``max_steps``) the inner CG iterations of each sweep, 0 where
    none. "Inner converged" means the inner solve met its own (possibly loose, forcing-term)
    tolerance, so a run with truncated inner solves can stop CONVERGED.
    ``status`` is CONVERGED / MAX_STEPS / INNER_NOT_CONVERGED (the last sweep's inner solve did
    not reach its tolerance) / NONFINITE (the returned state is the last finite one; also when
    the initial state is not finite). The jitter is relative to the factored matrix's mean
    diagonal (see :func:`~sigmadecomp.solvers._numerics.safe_cholesky`).
    """
    e0 = error(state)
    dtype = e0.dtype
    errors = jnp.full((max_steps + 1,), jnp.nan, dtype).at[0].set(e0)
    rtol = jnp.asarray(rtol, dtype)
    start_ok = jnp.isfinite(e0) & _all_finite(state)
    inner = jnp.zeros((max(max_steps, 1),), jnp.int32)  # traced .at[k] needs a non-empty array
    init = (state, jnp.int32(0), errors, ~start_ok,
            jnp.where(start_ok, Status.MAX_STEPS, Status.NONFINITE).astype(jnp.int32),
            inner, jnp.zeros((), dtype))

    def cond(carry):
        _, k, _, done, _, _, _ = carry
        return (k < max_steps) & ~done

    def body(carry):
        state, k, errors, _, _, inner, jitter = carry
        with record_jitter() as log:
            new_state, inner_ok, *steps = sweep(state)
        jitter = jnp.maximum(jitter, logged_jitter(log, dtype))
        inner = inner.at[k].set(jnp.asarray(steps[0] if steps else 0, jnp.int32))
        e_new = error(new_state)
        finite = jnp.isfinite(e_new) & _all_finite(new_state)
        e_prev = errors[k]
        settled = jnp.abs(e_prev - e_new) <= rtol * jnp.maximum(e_prev, jnp.finfo(dtype).tiny)
        status = jnp.where(
            ~finite,
            Status.NONFINITE,
            jnp.where(
                ~inner_ok,
                Status.INNER_NOT_CONVERGED,
                jnp.where(settled, Status.CONVERGED, Status.MAX_STEPS),
            ),
        ).astype(jnp.int32)
        state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state, state)
        errors = errors.at[k + 1].set(jnp.where(finite, e_new, jnp.nan))
        done = ~finite | (settled & inner_ok)
        return (state, k + 1 + jnp.where(finite, 0, -1).astype(jnp.int32), errors, done, status, inner,
                jitter)

    state, k, errors, _, status, inner, jitter = lax.while_loop(cond, body, init)
    inner = inner[:max_steps]
    return (state, status, errors, k, inner, jitter) if with_jitter else (state, status, errors, k, inner)


def closed_form_status(value, error) -> jax.Array:
    """The status of a solver without iterations: CONVERGED when ``value`` and ``error`` are
    finite, else NONFINITE (same finiteness rule as :func:`iterate`)."""
    finite = jnp.all(jnp.isfinite(error)) & _all_finite(value)
    return jnp.where(finite, Status.CONVERGED, Status.NONFINITE).astype(jnp.int32)
