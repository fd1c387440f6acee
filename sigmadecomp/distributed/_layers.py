"""Independent layers solved in parallel across devices.

Under parallel calibration every layer's problem (kernel, ``cov``, solver, key) is independent.
:func:`solve_layers` assigns them to devices longest-first (each to the least loaded device, with
an estimated cost ``cout·d² + d³`` per sweep) and commits each layer's inputs to its device; JAX
dispatches asynchronously and a jitted computation runs where its committed inputs live, so the
devices work at the same time, and nothing waits until the results are read. Each solve is the
same program on the same data as on one device: results are bit-identical (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from sigmadecomp.distributed._covariance import resolve_devices
from sigmadecomp.solvers import decompose

__all__ = ["assign_devices", "solve_layers"]


def _cost(kernel) -> float:
    shape = np.shape(kernel)
    cout, d = shape[-1], int(np.prod(shape[:-1]))
    return float(cout) * d * d + float(d) ** 3


def assign_devices(kernels: Sequence, n: int) -> list[int]:
    """Device index of every kernel: longest processing time first onto the least loaded device.

    >>> import numpy as np
    >>> assign_devices([np.zeros((3, 3, 8, 8)), np.zeros((3, 3, 64, 64)), np.zeros((3, 3, 8, 8))], 2)
    [1, 0, 1]
    """
    loads, out = [0.0] * n, [0] * len(kernels)
    for i in sorted(range(len(kernels)), key=lambda i: -_cost(kernels[i])):
        k = int(np.argmin(loads))
        out[i], loads[k] = k, loads[k] + _cost(kernels[i])
    return out


def solve_layers(kernels: Sequence, solvers: Sequence, covs: Sequence, keys: Sequence, *, devices=None) -> list:
    """``[decompose(kernel, solver, cov=cov, key=key), ...]``, spread over ``devices``.

    ``devices``: ``None`` or 1 (the default device, in order), ``"all"``, a count or a list of
    devices. Returns the :class:`~sigmadecomp.solvers.Solution` of every layer, in input order
    (on the device that computed it).

    >>> import jax, jax.numpy as jnp
    >>> from sigmadecomp import SVD
    >>> sols = solve_layers([jnp.ones((4, 3)), jnp.ones((6, 2))], [SVD(1), SVD(1)], [None, None],
    ...                     list(jax.random.split(jax.random.key(0), 2)), devices="all")
    >>> [s.value.rank for s in sols]
    [1, 1]
    """
    if not len(kernels) == len(solvers) == len(covs) == len(keys):
        raise ValueError(f"give one solver, cov and key per kernel; got {len(kernels)} kernels, "
                         f"{len(solvers)} solvers, {len(covs)} covs, {len(keys)} keys")
    devices = resolve_devices(devices)
    if devices is None:
        return [decompose(k, s, cov=c, key=key) for k, s, c, key in zip(kernels, solvers, covs, keys)]
    where = assign_devices(kernels, len(devices))
    out = [None] * len(kernels)
    for i in sorted(range(len(kernels)), key=lambda i: -_cost(kernels[i])):  # big ones start first
        kernel, cov, key = jax.device_put((kernels[i], covs[i], keys[i]), devices[where[i]])
        out[i] = decompose(kernel, solvers[i], cov=cov, key=key)
    return out
