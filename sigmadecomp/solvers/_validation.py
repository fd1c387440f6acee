"""Input checks shared by every solver: bad input gets a ValueError that says what was received
and how to fix it, before anything is compiled.

Value checks (finiteness, symmetry) need concrete arrays; under an outer ``jit`` the inputs are
tracers and only the shape/dtype checks run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

__all__ = [
    "NotPSDError",
    "check_factorized_shapes",
    "check_kernel",
    "check_positive",
    "check_positive_int",
    "check_rank_fits",
    "check_second_moments",
    "conv_shape",
]

_FLOATS = (jnp.float32, jnp.float64)


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def conv_shape(kernel_shape) -> tuple[int, int, int, int]:
    """``(kh, kw, cin, cout)``; a dense ``(in, out)`` kernel is ``(1, 1, in, out)``."""
    s = tuple(int(n) for n in kernel_shape)
    return (1, 1, *s) if len(s) == 2 else s


def check_kernel(kernel) -> jax.Array:
    """A float32/float64 Flax kernel ``(kh, kw, cin, cout)`` or ``(in, out)`` with finite values."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim not in (2, 4):
        raise ValueError(
            f"kernel must be a Flax conv kernel (kh, kw, cin, cout) or a dense kernel (in, out); "
            f"got shape {tuple(kernel.shape)}. Reshape it to one of those layouts (a PyTorch conv "
            f"weight (out, in, kh, kw) becomes kernel = weight.transpose(2, 3, 1, 0))."
        )
    if kernel.dtype not in _FLOATS:
        raise ValueError(
            f"kernel dtype must be float32 or float64; got {kernel.dtype}. "
            f"Cast it first, e.g. kernel.astype(jnp.float32)."
        )
    if _concrete(kernel):
        if not bool(jnp.all(jnp.isfinite(kernel))):
            bad = int(jnp.sum(~jnp.isfinite(kernel)))
            raise ValueError(f"kernel has {bad} non-finite (NaN/Inf) entries; fix the weights first.")
        if not bool(jnp.any(kernel != 0)):
            raise ValueError("kernel is all zeros: there is nothing to decompose.")
    return kernel


def _check_square(name, mat, d, kernel_shape, dtype) -> jax.Array:
    mat = jnp.asarray(mat)
    if mat.shape != (d, d):
        kh, kw, cin, _ = conv_shape(kernel_shape)
        raise ValueError(
            f"{name} must have shape (d, d) = ({d}, {d}) for kernel shape {tuple(kernel_shape)} "
            f"(d = cin·kh·kw = {cin}·{kh}·{kw}, patch order channel-major (cin, kh, kw) as in "
            f"sigmadecomp.extract_patches); got {tuple(mat.shape)}. Compute it from patches of "
            f"this layer's input with the layer's own kernel size, strides and padding."
        )
    if mat.dtype not in _FLOATS:
        raise ValueError(f"{name} dtype must be float32 or float64; got {mat.dtype}.")
    if _concrete(mat) and not bool(jnp.all(jnp.isfinite(mat))):
        raise ValueError(
            f"{name} has {int(jnp.sum(~jnp.isfinite(mat)))} non-finite (NaN/Inf) entries; "
            f"recompute it (accumulate in float64 over many patches)."
        )
    # Documented choice: the second moments take the kernel's dtype (often cov is accumulated
    # in float64 for a float32 kernel); the solver then runs entirely in the kernel's dtype.
    return mat.astype(dtype)


def _check_symmetric(name, mat) -> None:
    if not _concrete(mat):
        return
    scale = float(jnp.max(jnp.abs(mat)))
    asym = float(jnp.max(jnp.abs(mat - mat.T)))
    tol = float(np.sqrt(jnp.finfo(mat.dtype).eps)) * max(scale, np.finfo(np.float64).tiny)
    if asym > tol:
        raise ValueError(
            f"{name} must be symmetric: max |{name} − {name}ᵀ| = {asym:.3g} exceeds {tol:.3g} "
            f"(relative to max |{name}| = {scale:.3g}). Pass the second moment E[x xᵀ], "
            f"e.g. symmetrised as ({name} + {name}.T) / 2."
        )
    if bool(jnp.any(jnp.diagonal(mat) < 0)):
        raise ValueError(
            f"{name} must be positive semi-definite but has negative diagonal entries "
            f"(min {float(jnp.min(jnp.diagonal(mat))):.3g}); pass E[x xᵀ], not a centred or "
            f"differenced matrix."
        )
    if scale == 0.0:
        raise ValueError(f"{name} is all zeros: the layer's input carries no signal to fit.")


class NotPSDError(ValueError):
    """A second moment that is not positive semi-definite (beyond rounding): see ``decompose``."""


def _check_psd(name, mat) -> None:
    """``ValueError`` unless ``λ_min(mat) >= −psd_tolerance·tr(mat)/d`` (float64 Cholesky test)."""
    if not _concrete(mat):
        return  # under jit: the solution gets status NOT_PSD instead (see decompose)
    from sigmadecomp.solvers._numerics import psd_tolerance

    m = np.asarray(mat, np.float64)
    d = m.shape[0]
    scale = max(np.trace(m) / d, np.finfo(np.float64).tiny)
    tol = psd_tolerance(d, mat.dtype)
    try:
        np.linalg.cholesky(m + (tol * scale) * np.eye(d))
        return
    except np.linalg.LinAlgError:
        pass
    lowest = float(scipy.linalg.eigh(m, eigvals_only=True, subset_by_index=[0, 0])[0])
    raise NotPSDError(
        f"{name} is not positive semi-definite: its smallest eigenvalue is {lowest:.3g} = "
        f"{lowest / scale:.3g}·tr({name})/d, below the rounding tolerance −{tol:.2g}·tr({name})/d "
        f"(10·d·eps of {mat.dtype}). A second moment E[x xᵀ] is PSD; pass that (not a centred, "
        f"differenced or noisy estimate), or repair it by clipping negative eigenvalues."
    )


def check_second_moments(kernel, cov, cross_cov, target_cov):
    """Validate ``cov`` / ``cross_cov`` / ``target_cov`` against ``kernel``; return them cast to
    the kernel's dtype and symmetrised (``cov``, ``target_cov``)."""
    if (cross_cov is None) != (target_cov is None):
        given, missing = ("cross_cov", "target_cov") if target_cov is None else ("target_cov", "cross_cov")
        raise ValueError(
            f"{given} was given without {missing}: the cross-covariance form needs cov = E[x̂x̂ᵀ], "
            f"cross_cov = E[x x̂ᵀ] and target_cov = E[x xᵀ] together (x: the original layer "
            f"input, x̂: the input seen after earlier layers were compressed)."
        )
    if cov is None:
        if cross_cov is not None:
            raise ValueError(
                "cross_cov/target_cov need cov = E[x̂x̂ᵀ] as well (the metric); pass cov=..., or "
                "drop all three for the Frobenius problem."
            )
        return None, None, None
    kh, kw, cin, _ = conv_shape(kernel.shape)
    d, dtype = kh * kw * cin, kernel.dtype
    cov = _check_square("cov", cov, d, kernel.shape, dtype)
    _check_symmetric("cov", cov)
    cov = 0.5 * (cov + cov.T)
    _check_psd("cov", cov)
    if cross_cov is None:
        return cov, None, None
    cross_cov = _check_square("cross_cov", cross_cov, d, kernel.shape, dtype)
    target_cov = _check_square("target_cov", target_cov, d, kernel.shape, dtype)
    _check_symmetric("target_cov", target_cov)
    target_cov = 0.5 * (target_cov + target_cov.T)
    _check_psd("target_cov", target_cov)
    return cov, cross_cov, target_cov


def check_positive_int(owner: str, name: str, value, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}; got {value!r}.")


def check_positive(owner: str, name: str, value) -> None:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive finite number; got {value!r}.")


def check_rank_fits(owner: str, name: str, rank: int, mode: str, size: int, kernel_shape) -> None:
    """``rank <= size`` of the named mode, or a ValueError saying which mode and how to fix it."""
    if rank > size:
        raise ValueError(
            f"{owner}: {name} = {rank} exceeds the {mode} mode of size {size} "
            f"(kernel shape {tuple(kernel_shape)}); use a rank <= {size}."
        )


def check_factorized_shapes(init, expected, dtype):
    """Check a warm start against ``expected`` (same format, fields holding shape tuples);
    return it with its arrays cast to ``dtype``."""
    if type(init) is not type(expected):
        raise ValueError(
            f"init must be a {type(expected).__name__} (the solver's format); "
            f"got {type(init).__name__}."
        )
    if tuple(init.kernel_shape) != tuple(expected.kernel_shape):
        raise ValueError(
            f"init approximates a kernel of shape {tuple(init.kernel_shape)}, "
            f"but the kernel has shape {tuple(expected.kernel_shape)}."
        )
    cast = {}
    for field in dataclasses.fields(expected):
        if field.name == "kernel_shape":
            continue
        leaf, want = jnp.asarray(getattr(init, field.name)), tuple(getattr(expected, field.name))
        if leaf.shape != want:
            raise ValueError(
                f"init.{field.name} must have shape {want} for this kernel and rank; "
                f"got {tuple(leaf.shape)}."
            )
        if _concrete(leaf) and not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(f"init.{field.name} has non-finite entries.")
        cast[field.name] = leaf.astype(dtype)
    return dataclasses.replace(init, **cast)
