"""Resumable result files shared by the experiment scripts (one JSON per experiment).

A results file is ``{"runs": [record, ...], "sessions": [...], ...}``; a record is one measured
run, identified by a key the experiment computes from its settings. Writes are atomic (write a
temporary file, then rename), so a run killed mid-write leaves the previous file intact, and every
finished run is on disk before the next one starts.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
from typing import Callable


def load_results(path: pathlib.Path) -> dict:
    """The results in ``path``, or an empty results dict when the file does not exist yet."""
    path = pathlib.Path(path)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("runs", [])
    results.setdefault("sessions", [])
    return results


def save_results(results: dict, path: pathlib.Path) -> None:
    """Write ``results`` to ``path`` atomically (a reader never sees half a file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    os.replace(tmp, path)


def add_run(results: dict, record: dict, key: Callable[[dict], object]) -> None:
    """Put ``record`` into ``results["runs"]``, replacing a run with the same ``key``."""
    results["runs"] = [r for r in results["runs"] if key(r) != key(record)] + [record]


def merge(results: dict, other: dict, key: Callable[[dict], object]) -> None:
    """Fold ``other``'s runs (they win on equal keys), sessions and other fields into ``results``."""
    results.update({k: v for k, v in other.items() if k not in ("runs", "sessions") and k not in results})
    results.setdefault("sessions", []).extend(other.get("sessions", []))
    for record in other.get("runs", []):
        add_run(results, record, key)


def machine() -> str:
    """``"<cores>-core CPU, <model name>"`` of this machine (cores it may run on)."""
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores}-core CPU, {models[0] if models else platform.processor()}"


def now() -> str:
    """The current UTC time, ISO format, seconds."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
