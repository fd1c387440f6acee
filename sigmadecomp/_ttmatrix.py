"""TT-matrix format (DESIGN.md §6): a dense ``(in, out)`` kernel as a chain of small 4-way cores.

With ``in = m₁⋯m_K`` and ``out = n₁⋯n_K`` (row-major: ``i₁`` is the slowest input digit),

    W[(i₁…i_K), (j₁…j_K)] = G₁[:, i₁, j₁, :] · G₂[:, i₂, j₂, :] ⋯ G_K[:, i_K, j_K, :]

with core ``G_k`` of shape ``(r_{k−1}, m_k, n_k, r_k)`` and ``r₀ = r_K = 1``. Parameters
``Σ_k r_{k−1} m_k n_k r_k`` instead of ``in·out``. This module holds the pytree, its dense form,
counts, mode factorisations, rank caps, rank-for-ratio, and the Frobenius TT-SVD (fixed ranks, or
rank-adaptive to a tolerance ``eps`` as in Oseledets 2011: every unfolding is truncated at
``δ = eps·‖W‖/√(K−1)`` so that ``‖W − W̃‖ ≤ eps·‖W‖``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "TTMatrix",
    "balanced_modes",
    "max_tt_ranks",
    "padded_modes",
    "tt_num_params",
    "tt_rank_for_ratio",
    "tt_ranks_for_tolerance",
    "tt_svd",
    "tt_to_dense",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def core_attribute(factorized, name: str):
    """``core_k`` is ``cores[k]`` for pytrees that hold a tuple ``cores`` (the format registry
    checks factors by field name). Used as ``__getattr__`` by the TT-matrix and reshaped formats."""
    if name.startswith("core_") and name[5:].isdigit():
        cores = object.__getattribute__(factorized, "cores")
        if int(name[5:]) < len(cores):
            return cores[int(name[5:])]
    raise AttributeError(name)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["cores"], meta_fields=["in_modes", "out_modes"]
)
@dataclasses.dataclass(frozen=True)
class TTMatrix:
    """A TT-matrix kernel: ``cores[k]`` has shape ``(r_{k−1}, m_k, n_k, r_k)``.

    ``kernel_shape`` is ``(prod(in_modes), prod(out_modes))``, the Flax ``nnx.Linear`` layout.

    >>> import jax.numpy as jnp
    >>> t = TTMatrix((jnp.ones((1, 2, 3, 2)), jnp.ones((2, 4, 5, 1))), in_modes=(2, 4), out_modes=(3, 5))
    >>> t.kernel_shape, t.ranks, tt_to_dense(t).shape
    ((8, 15), (2,), (8, 15))
    """

    cores: tuple
    in_modes: tuple
    out_modes: tuple

    @property
    def kernel_shape(self) -> tuple[int, int]:
        return math.prod(self.in_modes), math.prod(self.out_modes)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The inner ranks ``(r₁, …, r_{K−1})``."""
        return tuple(int(c.shape[-1]) for c in self.cores[:-1])

    @property
    def dtype(self):
        return self.cores[0].dtype

    def __getattr__(self, name: str):
        return core_attribute(self, name)


def tt_to_dense(tt: TTMatrix) -> jax.Array:
    """The dense ``(in, out)`` kernel (for tests and error evaluation; layers never form it)."""
    acc = tt.cores[0][0]  # (m1, n1, r1)
    for core in tt.cores[1:]:
        m, n = acc.shape[0] * core.shape[1], acc.shape[1] * core.shape[2]
        acc = jnp.einsum("MNa,amnb->MmNnb", acc, core, precision=_HIGHEST).reshape(m, n, -1)
    return acc[..., 0]


def tt_num_params(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """``Σ_k r_{k−1}·m_k·n_k·r_k`` (no bias).

    >>> tt_num_params((4, 7, 4, 7), (4, 8, 4, 8), (8, 8, 8))
    5184
    """
    full = (1, *ranks, 1)
    return sum(full[k] * m * n * full[k + 1] for k, (m, n) in enumerate(zip(in_modes, out_modes)))


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def balanced_modes(n: int, num_modes: int) -> tuple[int, ...]:
    """Factor ``n`` into ``num_modes`` factors as equal as possible (largest primes first, each to
    the currently smallest factor); factors in ascending order. Raises if ``n`` has a prime factor
    so large that a factor would exceed twice ``n`` ** (1/num_modes) — pad the dimension instead.

    >>> balanced_modes(784, 4), balanced_modes(1024, 4), balanced_modes(3072, 3)
    ((4, 4, 7, 7), (4, 4, 8, 8), (12, 16, 16))
    """
    if n < 1 or num_modes < 1:
        raise ValueError(f"balanced_modes needs n >= 1 and num_modes >= 1; got n={n}, num_modes={num_modes}")
    modes = [1] * num_modes
    for p in sorted(_prime_factors(n), reverse=True):
        modes[modes.index(min(modes))] *= p
    if num_modes > 1 and max(modes) > max(4, 2 * n ** (1.0 / num_modes)):
        raise ValueError(
            f"{n} = {'·'.join(map(str, sorted(modes)))} has no balanced factorisation into "
            f"{num_modes} modes (a prime factor is too large); pass the modes explicitly or pad the "
            f"dimension to a nearby number such as {_padded(n, num_modes)}."
        )
    return tuple(sorted(modes))


def _padded(n: int, num_modes: int) -> int:
    """The smallest ``n' ≥ n`` that is a product of ``num_modes`` factors ≤ ceil(n^{1/K}) + 1."""
    base = math.ceil(n ** (1.0 / num_modes))
    return min(math.prod(c) for c in _candidates(base, num_modes) if math.prod(c) >= n)


def _candidates(base: int, num_modes: int):
    for extra in range(num_modes + 1):
        yield (base - 1,) * (num_modes - extra) + (base,) * extra
        yield (base,) * (num_modes - extra) + (base + 1,) * extra


def padded_modes(n: int, num_modes: int) -> tuple[int, ...]:
    """Near-equal modes whose product is the smallest such number ``≥ n`` (for embedding
    vocabularies, which are padded with unused rows).

    >>> padded_modes(5000, 3)
    (17, 17, 18)
    """
    base = math.ceil(n ** (1.0 / num_modes))
    best = min((c for c in _candidates(base, num_modes) if math.prod(c) >= n), key=math.prod)
    return tuple(sorted(best))


def max_tt_ranks(in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[int, ...]:
    """The largest useful ranks: ``r_k ≤ min(Π_{l≤k} m_l n_l, Π_{l>k} m_l n_l)`` (exact TT-SVD)."""
    sizes = [m * n for m, n in zip(in_modes, out_modes)]
    return tuple(min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1))


def tt_rank_for_ratio(in_modes: Sequence[int], out_modes: Sequence[int], ratio: float) -> tuple[int, ...]:
    """The largest uniform rank ``r`` (capped per bond by :func:`max_tt_ranks`) whose parameter
    count is at most ``ratio · in · out``; at least rank 1.

    >>> tt_rank_for_ratio((4, 4, 7, 7), (4, 4, 8, 8), 1 / 50)
    (14, 14, 14)
    """
    if not 0 < ratio:
        raise ValueError(f"ratio must be > 0 (compressed / dense parameters); got {ratio}")
    caps, budget = max_tt_ranks(in_modes, out_modes), ratio * math.prod(in_modes) * math.prod(out_modes)
    best = tuple(1 for _ in caps)
    for r in range(1, max(caps, default=1) + 1):
        ranks = tuple(min(r, c) for c in caps)
        if tt_num_params(in_modes, out_modes, ranks) > budget:
            break
        best = ranks
    return best


def _merged_tensor(matrix, in_modes, out_modes):
    """``(in, out)`` → order-K tensor with merged modes ``(m_k n_k)``."""
    k = len(in_modes)
    t = matrix.reshape(*in_modes, *out_modes)
    perm = [a for pair in zip(range(k), range(k, 2 * k)) for a in pair]
    return t.transpose(perm).reshape([m * n for m, n in zip(in_modes, out_modes)])


def tt_ranks_for_tolerance(matrix, in_modes, out_modes, eps: float, *, max_ranks=None) -> tuple[int, ...]:
    """Ranks of the rank-adaptive TT-SVD of ``matrix`` (host float64): the smallest ranks with
    ``‖W − W̃‖_F ≤ eps·‖W‖_F`` (each of the K−1 truncations discards at most
    ``eps²‖W‖²/(K−1)``), capped by ``max_ranks``."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (relative Frobenius tolerance); got {eps}")
    t = np.asarray(_merged_tensor(np.asarray(matrix, np.float64), tuple(in_modes), tuple(out_modes)))
    k, sizes = len(in_modes), t.shape
    budget = eps**2 * float(np.sum(t * t)) / max(k - 1, 1)
    ranks, c, r_prev = [], t, 1
    for j in range(k - 1):
        u, s, vt = np.linalg.svd(c.reshape(r_prev * sizes[j], -1), full_matrices=False)
        tail = np.cumsum((s * s)[::-1])[::-1]  # tail[i] = Σ_{l≥i} s_l²
        r = int(np.sum(tail > budget)) or 1
        if max_ranks is not None:
            r = min(r, int(max_ranks[j]))
        ranks.append(r)
        c, r_prev = s[:r, None] * vt[:r], r
    return tuple(ranks)


@functools.partial(jax.jit, static_argnames=("in_modes", "out_modes", "ranks"))
def tt_svd(matrix, *, in_modes: tuple, out_modes: tuple, ranks: tuple) -> TTMatrix:
    """Frobenius TT-SVD of an ``(in, out)`` kernel at fixed ``ranks`` (quasi-optimal:
    ``‖W − W̃‖² ≤ Σ_k (tail of unfolding k)²``). Cores 1..K−1 are left-orthonormal.

    >>> import jax
    >>> w = jax.random.normal(jax.random.key(0), (12, 20))
    >>> tt = tt_svd(w, in_modes=(3, 4), out_modes=(4, 5), ranks=(12,))
    >>> bool(jax.numpy.allclose(tt_to_dense(tt), w, atol=1e-4))
    True
    """
    t = _merged_tensor(matrix, in_modes, out_modes)
    sizes, cores, c, r_prev = t.shape, [], t, 1
    for j, r in enumerate(ranks):
        u, s, vt = jnp.linalg.svd(c.reshape(r_prev * sizes[j], -1), full_matrices=False)
        cores.append(u[:, :r].reshape(r_prev, in_modes[j], out_modes[j], r))
        c, r_prev = s[:r, None] * vt[:r], r
    cores.append(c.reshape(r_prev, in_modes[-1], out_modes[-1], 1))
    return TTMatrix(tuple(cores), tuple(in_modes), tuple(out_modes))


def check_tt_config(name: str, kernel_shape: tuple, in_modes, out_modes, ranks: Optional[tuple]) -> None:
    """Clear errors for modes that do not multiply to the kernel and ranks outside their caps."""
    if len(kernel_shape) != 2:
        raise ValueError(f"{name}: a TT-matrix approximates a dense (in, out) kernel; got kernel shape {kernel_shape}")
    if len(in_modes) != len(out_modes) or len(in_modes) < 2:
        raise ValueError(f"{name}: in_modes {in_modes} and out_modes {out_modes} must have the same length >= 2")
    if math.prod(in_modes) != kernel_shape[0] or math.prod(out_modes) != kernel_shape[1]:
        raise ValueError(
            f"{name}: prod(in_modes)={math.prod(in_modes)} and prod(out_modes)={math.prod(out_modes)} "
            f"must equal the kernel's (in, out) = {tuple(kernel_shape)}; fix the modes or omit them "
            f"(balanced modes are chosen automatically)."
        )
    if ranks is None:
        return
    caps = max_tt_ranks(in_modes, out_modes)
    if len(ranks) != len(caps) or any(int(r) < 1 for r in ranks):
        raise ValueError(f"{name}: ranks must be {len(caps)} positive ints (one per bond); got {ranks}")
    if any(r > c for r, c in zip(ranks, caps)):
        raise ValueError(f"{name}: ranks {tuple(ranks)} exceed the exact TT ranks {caps} for modes {in_modes}×{out_modes}; lower them.")
    full = (1, *ranks, 1)
    for k, (m, n) in enumerate(zip(in_modes, out_modes)):
        if full[k + 1] > full[k] * m * n or full[k] > m * n * full[k + 1]:
            raise ValueError(
                f"{name}: ranks {tuple(ranks)} are unbalanced at core {k} (r_{k}={full[k]}, "
                f"m·n={m * n}, r_{k + 1}={full[k + 1]}): each rank must be at most its neighbour "
                f"times m_k·n_k; lower the larger one."
            )
