"""Every docstring example of the package runs and prints what it shows.

The examples are written for a user's default JAX settings (no x64, standard promotion), so they
run with those settings here, not with the strict ones of ``conftest.py``.
"""

from __future__ import annotations

import doctest
import importlib
import pathlib

import jax
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "sigmadecomp"
MODULES = sorted(
    ".".join(("sigmadecomp", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
    if ">>> " in path.read_text()
)


@pytest.fixture
def user_defaults():
    names = ("jax_enable_x64", "jax_numpy_dtype_promotion", "jax_numpy_rank_promotion")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_enable_x64", False)
    jax.config.update("jax_numpy_dtype_promotion", "standard")
    jax.config.update("jax_numpy_rank_promotion", "allow")
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_every_module_with_examples_is_collected():
    assert len(MODULES) >= 20 and "sigmadecomp.solvers._decompose" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, user_defaults, capsys):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False, report=True)
    assert result.failed == 0, capsys.readouterr().out[-4000:]
