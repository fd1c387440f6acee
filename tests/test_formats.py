"""The format registry: every consumer (plan, counts, layers, save/load, compress, CLI) reads it,
so a format registered once is usable everywhere. No solves here: these tests are cheap."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest

import sigmadecomp as sd
from sigmadecomp import formats
from sigmadecomp.cli import build_parser
from sigmadecomp.compress import solver_for
from sigmadecomp.layers import count_format
from sigmadecomp.surgery import plan, rank_for_ratio

from _surgery_models import TinyNet


def test_builtin_formats_and_their_entries():
    conv_formats = ("svd", "tucker2", "cp", "cp3", "tucker3", "tt", "tr")
    assert formats.format_names()[:7] == conv_formats  # later entries: other issues' formats
    for name in conv_formats:  # tt-matrix (dense layers only) is tested in test_tt.py
        spec = formats.get(name)
        ranks = rank_for_ratio(name, (3, 3, 16, 32), 0.3)
        assert len(ranks) == len(spec.rank_names)
        shapes = spec.factor_shapes((3, 3, 16, 32), ranks)
        placeholder = spec.placeholder((3, 3, 16, 32), ranks, jnp.float32)
        assert formats.spec_of(placeholder) is spec and spec.ranks_of(placeholder) == ranks
        assert {k: tuple(getattr(placeholder, k).shape) for k in shapes} == shapes
        counted = count_format(name, (3, 3, 16, 32), ranks).params
        assert counted == sum(int(jnp.size(getattr(placeholder, k))) for k in shapes)
        assert counted <= 0.3 * 9 * 16 * 32  # the rules round down
        spec.check_ranks((3, 3, 16, 32), ranks)  # the rule's ranks are valid for the solver too
    with pytest.raises(ValueError, match="unknown format 'tt4'; expected one of"):
        formats.get("tt4")


def test_plan_solver_and_cli_follow_the_registry():
    p = plan(TinyNet(), format="tt", ratio=0.5, formats={"linear": "svd"}, input_shape=(1, 9, 9, 3))
    entry = p.entries[0]
    assert entry.format == "tt" and len(entry.ranks) == 3
    assert isinstance(solver_for(entry, max_steps=3), sd.TTALS)
    assert build_parser().parse_args(["compress", "--arch", "resnet20", "--weights", "w", "--data", "d", "--format", "tr"]).format == "tr"


def test_a_format_registered_once_is_planned_applied_and_counted():
    """A new name for the TT format (as another engineer would register a new one)."""
    spec = dataclasses.replace(formats.get("tt"), name="tt_copy", description="test copy")
    formats.register(spec)
    try:
        with pytest.raises(ValueError, match="already registered"):
            formats.register(dataclasses.replace(spec, description="other"))
        model = TinyNet()
        p = plan(model, format="tt_copy", ratio=0.5, formats={"linear": "svd"}, skip=["blocks.1"],
                 input_shape=(1, 9, 9, 3))
        assert p.entries[0].format == "tt_copy" and p.params_after < p.params_before
        assert isinstance(solver_for(p.entries[0]), sd.TTALS)
        assert count_format("tt_copy", (3, 3, 8, 8), (2, 3, 2)) == count_format("tt", (3, 3, 8, 8), (2, 3, 2))
        argv = ["compress", "--arch", "resnet20", "--weights", "w", "--data", "d", "--format", "tt_copy"]
        assert build_parser().parse_args(argv).format == "tt_copy"
    finally:
        formats._registry._REGISTRY.pop("tt_copy")
