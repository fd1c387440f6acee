"""Test-wide settings: x64 available, strict dtype and rank promotion, shared fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see sigmadecomp/__init__.py
import pathlib

# A persistent compilation cache shared by the xdist workers, the modules (each module ends with
# jax.clear_caches(), below) and the scripts tests start in subprocesses (they inherit the
# environment). The suite's time is mostly XLA compilation of the same solver programs at the same
# small shapes; a cache hit skips the compile, not the trace. The cache is keyed by the lowered
# program, compile options and JAX version, so it cannot return a stale program; it lives in
# .pytest_cache (ignored, empty in a fresh clone). Compile-count checks count its hits as compiles
# (tests/_compiles.py). Set JAX_COMPILATION_CACHE_DIR yourself to move it, or
# JAX_ENABLE_COMPILATION_CACHE=false to measure the suite without it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

DATA_DIR = pathlib.Path(
    os.environ.get("SIGMADECOMP_DATA", pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
).resolve()

# Tolerances that depend on dtype: (rtol for values, slack for monotone-decrease checks).
TOL = {"float32": 2e-4, "float64": 1e-9}


def pytest_addoption(parser):
    parser.addoption("--experiments", action="store_true",
                     help="also run the tests marked 'experiment' (experiment, benchmark and notebook "
                          "scripts end to end; minutes each). Or set SIGMADECOMP_EXPERIMENTS=1.")


def pytest_collection_modifyitems(config, items):
    """Experiment smokes run whole scripts in fresh processes (one to three minutes each on the
    2-core CI machine). They stay out of the default run, which must finish well under 15 minutes,
    and are reported as skipped with how to run them."""
    if config.getoption("--experiments") or os.environ.get("SIGMADECOMP_EXPERIMENTS") == "1":
        return
    skip = pytest.mark.skip(reason="experiment smoke (minutes): run with --experiments")
    for item in items:
        if "experiment" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def tol(dtype):
    return TOL[dtype]


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """``../shared/data`` (or $SIGMADECOMP_DATA); skips the test with a reason when absent."""
    if not (DATA_DIR / "README.md").exists():
        pytest.skip(f"data kit not found at {DATA_DIR} (set SIGMADECOMP_DATA or place ../shared/data)")
    return DATA_DIR


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module. A full run compiles thousands of XLA
    programs; kept alive in one process, their JIT code mappings can approach the kernel's
    ``vm.max_map_count`` (65530 by default), and a clean-clone run segfaulted inside an XLA compile
    after about 380 tests. Compile-count tests count within one test, so they are unaffected."""
    yield
    jax.clear_caches()
    import gc

    gc.collect()
