"""The one place that fixes the patch order shared by the solvers and the covariance.

A conv layer with Flax kernel ``(kh, kw, cin, cout)`` acts on input patches ``x ∈ R^d`` with
``d = cin·kh·kw``. Throughout sigmadecomp the patch vector is ordered **channel-major**:

    x[(c, i, j)] = input[c, row + i·dh, col + j·dw],   flat index = c·(kh·kw) + i·kw + j

which is the order of :func:`jax.lax.conv_general_dilated_patches`. The kernel matrix
``W ∈ R^{cout×d}`` uses the same column order, so a conv output equals ``W @ x`` per position.
A dense kernel ``(in_features, out_features)`` is the case ``kh = kw = 1``.

Everything that turns a kernel into a matrix, or an input into patches, calls these helpers.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jax import lax

__all__ = [
    "as_conv_kernel",
    "extract_patches",
    "kernel_to_matrix",
    "matrix_to_kernel",
]


def as_conv_kernel(kernel):
    """View a dense ``(in, out)`` kernel as a ``(1, 1, in, out)`` conv kernel; convs pass through."""
    if kernel.ndim == 2:
        return kernel[None, None]
    if kernel.ndim == 4:
        return kernel
    raise ValueError(
        f"kernel must be a Flax conv kernel (kh, kw, cin, cout) or a dense kernel (in, out); "
        f"got shape {tuple(kernel.shape)}. Reshape it to one of those layouts."
    )


def kernel_to_matrix(kernel):
    """Flax kernel ``(kh, kw, cin, cout)`` or ``(in, out)`` → ``W`` of shape ``(cout, cin·kh·kw)``.

    >>> import jax.numpy as jnp
    >>> kernel_to_matrix(jnp.zeros((3, 3, 16, 32))).shape
    (32, 144)
    """
    kernel = as_conv_kernel(kernel)
    kh, kw, cin, cout = kernel.shape
    return jnp.transpose(kernel, (3, 2, 0, 1)).reshape(cout, cin * kh * kw)


def matrix_to_kernel(matrix, kernel_shape: Sequence[int]):
    """Inverse of :func:`kernel_to_matrix`: ``(cout, d)`` back to ``kernel_shape``."""
    kernel_shape = tuple(int(s) for s in kernel_shape)
    if len(kernel_shape) == 2:
        return matrix.T.reshape(kernel_shape)
    kh, kw, cin, cout = kernel_shape
    return jnp.transpose(matrix.reshape(cout, cin, kh, kw), (2, 3, 1, 0))


def extract_patches(
    x,
    kernel_size: Sequence[int],
    *,
    strides: Sequence[int] = (1, 1),
    padding="VALID",
    dilation: Sequence[int] = (1, 1),
):
    """Patches of an NHWC input in the package's patch order: ``(N, H', W', cin·kh·kw)``.

    ``padding`` is ``"SAME"``, ``"VALID"`` or explicit ``((top, bottom), (left, right))``,
    with the same meaning as in :class:`flax.nnx.Conv`. Uses HIGHEST precision, so patches are
    exact copies of the input values.
    """
    return lax.conv_general_dilated_patches(
        x,
        filter_shape=tuple(kernel_size),
        window_strides=tuple(strides),
        padding=padding,
        rhs_dilation=tuple(dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
