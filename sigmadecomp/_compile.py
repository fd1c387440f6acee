"""``fast_compile_jit``: ``jax.jit`` with cheaper XLA:CPU compilation for compile-bound programs;
``registered_jit`` and ``release_compiled_solvers``: the solvers' compiled programs, freed on demand.

Why: a cold ``sigmadecomp compress`` on a small CPU machine spends more time compiling than
computing (issue 10). XLA:CPU runs LLVM at -O2 by default; at -O1 a Tucker-2 Σ solve compiles in
3.7 instead of 5.0 CPU s (64 channels, ranks 38) and runs as fast (0.25 s either way): its heavy
work is in library calls (matmuls, Cholesky, eigh), not in the loops LLVM optimises. Other
backends keep their defaults (GPU kernels are LLVM-built, so -O1 could slow them).

Why release: every solver configuration (format, ranks) and kernel shape compiles its own program,
and JAX keeps each one for the life of the process. On XLA:CPU one compiled CP solve holds about
500 memory mappings (JIT-compiled code), and Linux caps a process at ``vm.max_map_count`` (65 530
by default): a rank search that fits many ranks (``select_ranks``' ``proxy="sweeps"``) died with
LLVM "Cannot allocate memory" long before running out of memory. The rank search releases the
solvers it compiled after each group of layers of one shape.
"""

from __future__ import annotations

import functools

import jax

try:
    from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover - kept for JAX versions that move it
    from jax._src.core import Tracer as _Tracer

__all__ = ["CPU_COMPILE_OPTIONS", "compiled_solver_count", "fast_compile_jit", "registered_jit",
           "release_compiled_solvers"]

_REGISTERED: list = []  # the jitted entry points of the solvers (module-level: they live forever)

#: XLA compile options used on the CPU backend by :func:`fast_compile_jit`.
CPU_COMPILE_OPTIONS = {"xla_backend_optimization_level": 1}


class _BackendJit:
    """Two ``jax.jit`` wrappers of one function; each call uses the one for the default backend."""

    def __init__(self, fun, jit_kwargs):
        self._cpu = jax.jit(fun, compiler_options=CPU_COMPILE_OPTIONS, **jit_kwargs)
        self._other = jax.jit(fun, **jit_kwargs)
        functools.update_wrapper(self, fun)

    def _pick(self, args, kwargs):
        # compiler_options are allowed on a top-level jit only: inside another trace (jit, vmap,
        # make_jaxpr) this call is inlined into the outer program anyway.
        if jax.default_backend() != "cpu":
            return self._other
        traced = any(isinstance(leaf, _Tracer) for leaf in jax.tree_util.tree_leaves((args, kwargs)))
        return self._other if traced else self._cpu

    def __call__(self, *args, **kwargs):
        return self._pick(args, kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._pick(args, kwargs).lower(*args, **kwargs)

    def _cache_size(self) -> int:
        return self._cpu._cache_size() + self._other._cache_size()

    def clear_cache(self) -> None:
        self._cpu.clear_cache()
        self._other.clear_cache()


def fast_compile_jit(fun=None, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)``, compiled with :data:`CPU_COMPILE_OPTIONS` on CPU.

    Usable as ``@fast_compile_jit`` or ``@fast_compile_jit(static_argnames=...)``.

    >>> import jax.numpy as jnp
    >>> f = fast_compile_jit(lambda x: 2 * x)
    >>> float(f(jnp.float32(1.5)))
    3.0
    """
    if fun is None:
        return functools.partial(fast_compile_jit, **jit_kwargs)
    return _register(_BackendJit(fun, jit_kwargs))


def registered_jit(fun=None, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)``, counted by :func:`compiled_solver_count` and freed by
    :func:`release_compiled_solvers` (for the solvers' entry points).

    >>> import jax.numpy as jnp
    >>> f = registered_jit(lambda x: x + 1)
    >>> float(f(jnp.float32(1.0))), compiled_solver_count() >= 1
    (2.0, True)
    """
    if fun is None:
        return functools.partial(registered_jit, **jit_kwargs)
    return _register(jax.jit(fun, **jit_kwargs))


def _register(jitted):
    _REGISTERED.append(jitted)
    return jitted


def compiled_solver_count() -> int:
    """How many compiled programs the solvers' entry points hold now (one per configuration,
    shapes and dtypes that ran)."""
    return sum(f._cache_size() for f in _REGISTERED)


def release_compiled_solvers() -> int:
    """Drop every compiled program of the solvers' entry points; returns how many there were.

    The next solve of a configuration compiles again. Other JAX caches (the user's own ``jit``
    functions) are untouched, unlike :func:`jax.clear_caches`.

    >>> import jax, sigmadecomp as sd
    >>> _ = sd.decompose(jax.numpy.ones((3, 3, 4, 4)), sd.SVD(2))
    >>> release_compiled_solvers() >= 1, compiled_solver_count()
    (True, 0)
    """
    count = compiled_solver_count()
    for f in _REGISTERED:
        f.clear_cache()
    return count
