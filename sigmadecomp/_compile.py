"""``fast_compile_jit``: ``jax.jit`` with cheaper XLA:CPU compilation for compile-bound programs.

Why: a cold ``sigmadecomp compress`` on a small CPU machine spends more time compiling than
computing (issue 10). XLA:CPU runs LLVM at -O2 by default; at -O1 a Tucker-2 Σ solve compiles in
3.7 instead of 5.0 CPU s (64 channels, ranks 38) and runs as fast (0.25 s either way): its heavy
work is in library calls (matmuls, Cholesky, eigh), not in the loops LLVM optimises. Other
backends keep their defaults (GPU kernels are LLVM-built, so -O1 could slow them).
"""

from __future__ import annotations

import functools

import jax

try:
    from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover - kept for JAX versions that move it
    from jax._src.core import Tracer as _Tracer

__all__ = ["CPU_COMPILE_OPTIONS", "fast_compile_jit"]

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
    return _BackendJit(fun, jit_kwargs)
