"""Counting XLA compilations in a test (the compile-once checks of the solvers and calibration)."""

from __future__ import annotations

import jax


def count_compiles(fn):
    """(result, number of XLA backend compilations while running ``fn``)."""
    count = [0]

    def listener(event, duration, **_):
        count[0] += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return out, count[0]
