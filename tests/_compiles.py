"""Counting XLA compilations in a test (the compile-once checks of the solvers and calibration)."""

from __future__ import annotations

import jax


def count_compiles(fn):
    """(result, number of programs JAX had to compile while running ``fn``).

    A program fetched from the persistent compilation cache (tests/conftest.py) counts too: it
    missed the in-memory cache, so without the persistent one it would have been compiled."""
    count = [0]

    def on_duration(event, duration, **_):
        count[0] += event == "/jax/core/compile/backend_compile_duration"

    def on_event(event, **_):
        count[0] += event == "/jax/compilation_cache/cache_hits"

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        out = fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
    return out, count[0]
