"""Surgery plans: which layer gets which format and ranks, as pure, JSON-serialisable data.

A :class:`Plan` is made by :func:`plan` from a model, consumed by
:func:`sigmadecomp.surgery.apply`, and stored next to the weights by
:func:`sigmadecomp.surgery.save`. It holds one :class:`PlanEntry` per layer to replace, with the
layer's configuration, the ranks and the parameter / FLOP counts before and after.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Optional, Union

import jax
from flax import nnx

from sigmadecomp._paths import find_layers, get_by_path, path_to_str
from sigmadecomp.formats._registry import format_names, get as get_format
from sigmadecomp.layers._common import FactorizedLayer
from sigmadecomp.layers._config import ConvConfig
from sigmadecomp.layers._counts import count_format
from sigmadecomp.surgery._ranks import rank_for_ratio
from sigmadecomp.surgery._tap import input_spec, intercept

__all__ = ["FORMAT_NAMES", "PLAN_VERSION", "Plan", "PlanEntry", "plan"]

PLAN_VERSION = 1
# The formats registered when this module was imported; the registry (sigmadecomp.formats) is the
# source of truth and also holds formats registered later.
FORMAT_NAMES = format_names()


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One layer to replace. ``kernel_shape`` is the layer's Flax kernel; ``ranks`` are per
    feature group, in the order of the format's ``rank_names`` (``(r,)`` for svd/cp/cp3,
    ``(r_out, r_in)`` for tucker2, ``(r1, r2, r3)`` for tt, ...). Conv-only fields are
    ``None`` for dense layers. ``flops_*`` are MACs per example (``None`` without an input shape)."""

    path: str
    kind: str  # "conv" or "dense"
    kernel_shape: tuple
    format: str
    ranks: tuple
    use_bias: bool
    strides: Optional[tuple] = None
    padding: Union[str, tuple, None] = None
    kernel_dilation: Optional[tuple] = None
    groups: int = 1
    in_spatial: Optional[tuple] = None
    out_spatial: Optional[tuple] = None
    params_before: int = 0
    params_after: int = 0
    flops_before: Optional[int] = None
    flops_after: Optional[int] = None
    implementation: str = "factorized"  # or "dense": see sigmadecomp.latency.choose_implementations
    reason: str = ""  # why that implementation (measured latencies), when it was chosen

    @property
    def config(self) -> Optional[ConvConfig]:
        if self.kind != "conv":
            return None
        return ConvConfig(self.strides, self.padding, self.kernel_dilation, self.groups)

    @property
    def group_kernel_shape(self) -> tuple:
        """Kernel shape of one group's factorized kernel: ``(kh, kw, cin // g, cout // g)``."""
        return self.kernel_shape[:-1] + (self.kernel_shape[-1] // self.groups,)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return {k: _listify(v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> PlanEntry:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown plan entry fields {sorted(unknown)}; expected {sorted(names)}")
        data = {k: (v if k == "padding" and isinstance(v, str) else _tuplify(v)) for k, v in data.items()}
        return cls(**data)


def _listify(value):
    return [_listify(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class Plan:
    """An ordered collection of :class:`PlanEntry`; ``input_shape`` is what FLOPs were traced with.
    ``left_dense`` holds ``(path, reason)`` for layers a latency-aware choice left uncompressed."""

    entries: tuple
    input_shape: Optional[tuple] = None
    version: int = PLAN_VERSION
    left_dense: tuple = ()

    @property
    def paths(self) -> tuple:
        return tuple(e.path for e in self.entries)

    def __getitem__(self, path: str) -> PlanEntry:
        for entry in self.entries:
            if entry.path == path:
                return entry
        raise KeyError(f"no plan entry for {path!r}; planned layers: {', '.join(self.paths)}")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def params_before(self) -> int:
        return sum(e.params_before for e in self.entries)

    @property
    def params_after(self) -> int:
        return sum(e.params_after for e in self.entries)

    @property
    def flops_before(self) -> Optional[int]:
        return _sum_or_none(e.flops_before for e in self.entries)

    @property
    def flops_after(self) -> Optional[int]:
        return _sum_or_none(e.flops_after for e in self.entries)

    def to_dict(self) -> dict:
        return dict(version=self.version, input_shape=_listify(self.input_shape),
                    entries=[e.to_dict() for e in self.entries], left_dense=_listify(self.left_dense))

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan format version {data.get('version')!r} is not supported "
                             f"(this sigmadecomp reads version {PLAN_VERSION})")
        shape = data.get("input_shape")
        entries = tuple(PlanEntry.from_dict(e) for e in data["entries"])
        left = tuple(tuple(pair) for pair in data.get("left_dense", ()))
        return cls(entries, None if shape is None else tuple(shape), data["version"], left)

    def table(self) -> str:
        """One row per layer: format, ranks, parameters and MACs before → after."""
        rows = [(e.path, e.format, "x".join(map(str, e.ranks)), _arrow(e.params_before, e.params_after),
                 _arrow(e.flops_before, e.flops_after)) for e in self.entries]
        rows.append(("total", "", "", _arrow(self.params_before, self.params_after),
                     _arrow(self.flops_before, self.flops_after)))
        table = format_table(("layer", "format", "ranks", "params", "MACs"), rows)
        return "\n".join([table] + [f"left dense: {path}: {why}" for path, why in self.left_dense])

    def __str__(self) -> str:
        return self.table()


def _sum_or_none(values):
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _arrow(before, after) -> str:
    if before is None or after is None:
        return "n/a"
    return f"{before:,} → {after:,} ({after / before:.3f})" if before else f"{before} → {after}"


def format_table(header: tuple, rows: list) -> str:
    """Left-aligned plain-text table."""
    rows = [tuple(str(c) for c in r) for r in [header, *rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- plan()


def eligible_layers(model: nnx.Module) -> dict:
    """Path → ``nnx.Conv``/``nnx.Linear``, leaving out the sub-layers of factorized layers."""
    inside = [path_to_str(p) + "." for p, node in nnx.iter_graph(model)
              if isinstance(node, FactorizedLayer) and p]
    return {p: layer for p, layer in find_layers(model) if not any(p.startswith(q) for q in inside)}


def _check_paths(paths: Iterable[str], layers: dict, what: str) -> None:
    unknown = [p for p in paths if p not in layers]
    if unknown:
        raise ValueError(f"{what} names unknown layer path(s) {unknown}; decomposable layers are: "
                         f"{', '.join(layers)}")


def _skip_predicate(skip, layers: dict) -> Callable[[str], bool]:
    if callable(skip):
        return skip
    if isinstance(skip, str):
        raise ValueError(f"skip must be an iterable of paths or a callable; got the string {skip!r} "
                         f"(write skip=[{skip!r}])")
    skip = set(skip)
    _check_paths(sorted(skip), layers, "skip")
    return skip.__contains__


def _normalize_ranks(fmt: str, value, path: str) -> tuple:
    try:
        return get_format(fmt).normalize_ranks(value)
    except ValueError as err:
        raise ValueError(f"ranks[{path!r}]: {err}") from None


def _check_rank_bounds(fmt: str, ranks: tuple, kernel_shape: tuple, groups: int, path: str) -> None:
    group_shape = kernel_shape[:-1] + (kernel_shape[-1] // groups,)
    try:
        get_format(fmt).check_ranks(group_shape, ranks)
    except ValueError as err:
        raise ValueError(f"ranks for {path!r}: {err}") from None


def _layer_info(path: str, layer) -> dict:
    """Kind, kernel shape, bias and (for convs) configuration of an eligible layer."""
    info = dict(kernel_shape=tuple(layer.kernel.shape), use_bias=layer.bias is not None)
    if isinstance(layer, nnx.Linear):
        return dict(info, kind="dense")
    try:
        config = ConvConfig.from_conv(layer)
    except ValueError as err:
        raise ValueError(f"layer {path!r} cannot be factorized: {err}") from None
    return dict(info, kind="conv", strides=config.strides, padding=config.padding,
                kernel_dilation=config.kernel_dilation, groups=config.groups)


def _choose_format(path: str, kind: str, format: str, formats: Mapping) -> str:
    fmt = formats.get(path, format)
    if fmt not in format_names():
        raise ValueError(f"unknown format {fmt!r} for {path!r}; expected one of {format_names()}")
    if kind == "dense" and get_format(fmt).dense_layer is None:
        raise ValueError(
            f"layer {path!r} is dense (nnx.Linear): format {fmt!r} needs a conv kernel; use 'svd' for it "
            f"(formats={{{path!r}: 'svd'}}) or leave it out (skip=[{path!r}])"
        )
    return fmt


def _check_arguments(format, ratio, ranks, formats) -> None:
    if format not in format_names():
        raise ValueError(f"format must be one of {format_names()}; got {format!r}")
    if (ratio is None) == (ranks is None):
        raise ValueError(
            "give exactly one of ratio= (a target parameter ratio for every layer) and ranks= "
            f"(a dict path → rank(s)); got ratio={ratio!r}, ranks={'None' if ranks is None else 'a dict'}"
        )
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1] (factorized / dense kernel parameters); got {ratio!r}")
    if ranks is not None and not isinstance(ranks, Mapping):
        raise ValueError(f"ranks must be a dict path → rank(s); got {type(ranks).__name__}")
    if not isinstance(formats, Mapping):
        raise ValueError(f"formats must be a dict path → format; got {type(formats).__name__}")


def plan(model: nnx.Module, *, format: str, ratio: Optional[float] = None, ranks: Optional[Mapping] = None,
         skip: Union[Iterable[str], Callable[[str], bool]] = (), formats: Optional[Mapping] = None,
         input_shape=None) -> Plan:
    """Plan the replacement of every ``nnx.Conv`` / ``nnx.Linear`` of ``model`` not in ``skip``.

    Args:
      model: the uncompressed model (not modified; only read).
      format: a registered format (:func:`sigmadecomp.formats.format_names`: ``"svd"``,
        ``"tucker2"``, ``"cp"``, ``"cp3"``, ``"tucker3"``, ``"tt"``, ``"tr"``, ...); dense layers
        need one with a dense layer (``"svd"``).
      ratio: target parameter ratio per layer, in (0, 1]; ranks from
        :func:`~sigmadecomp.surgery.rank_for_ratio` (one rule per format, see there).
      ranks: instead of ``ratio``: dict path → rank (``int``) or the format's rank tuple;
        it must name every planned layer (skip the others, e.g. ``skip=lambda p: p not in ranks``).
        A :class:`~sigmadecomp.surgery.RankSelection` also gives each layer's format.
      skip: paths to leave untouched, or a predicate on the path. Skipping the first conv and the
        classifier, as is customary, is one line: ``skip=["conv1", "linear"]``.
      formats: optional per-layer override of ``format``, e.g. ``{"linear": "svd"}``.
      input_shape: e.g. ``(1, 32, 32, 3)``; the model is traced with ``jax.eval_shape`` (no compute)
        to find each layer's spatial sizes, hence FLOPs. Without it the FLOPs are ``None``.

    Returns:
      A :class:`Plan`. Every argument is validated before any work.

    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    ...         self.linear = nnx.Linear(8, 4, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.linear(self.conv(x).mean(axis=(1, 2)))
    >>> p = plan(Net(nnx.Rngs(0)), format="tucker2", formats={"linear": "svd"}, ratio=0.5,
    ...          input_shape=(1, 8, 8, 3))
    >>> [(e.path, e.format, e.ranks) for e in p.entries]
    [('conv', 'tucker2', (4, 1)), ('linear', 'svd', (1,))]
    """
    formats = {} if formats is None else formats
    _check_arguments(format, ratio, ranks, formats)
    # a rank selection knows each layer's format (several when global chose per layer); explicit
    # formats= still wins
    formats = {**getattr(ranks, "formats", {}), **formats}
    layers = eligible_layers(model)
    _check_paths(list(formats), layers, "formats")
    is_skipped = _skip_predicate(skip, layers)
    chosen = [p for p in layers if not is_skipped(p)]
    if ranks is not None:
        _check_ranks_cover(ranks, chosen, layers)
    specs = [_entry_spec(p, layers[p], format, formats, ratio, ranks) for p in chosen]
    shapes = trace_shapes(model, input_shape, chosen) if input_shape is not None else {}
    entries = tuple(_finish_entry(spec, shapes.get(spec["path"])) for spec in specs)
    return Plan(entries, None if input_shape is None else tuple(input_spec(model, input_shape).shape))


def _check_ranks_cover(ranks: Mapping, chosen: list, layers: dict) -> None:
    _check_paths(list(ranks), layers, "ranks")
    skipped = [p for p in ranks if p not in chosen]
    if skipped:
        raise ValueError(f"ranks names layer(s) {skipped} that skip leaves out; "
                         "remove them from one of the two")
    missing = [p for p in chosen if p not in ranks]
    if missing:
        raise ValueError(f"ranks has no entry for layer(s) {missing}; give their ranks or leave them out "
                         "with skip=... (e.g. skip=lambda path: path not in ranks)")


def _entry_spec(path, layer, format, formats, ratio, ranks) -> dict:
    info = _layer_info(path, layer)
    fmt = _choose_format(path, info["kind"], format, formats)
    groups = info.get("groups", 1)
    if ranks is not None:
        chosen = _normalize_ranks(fmt, ranks[path], path)
        _check_rank_bounds(fmt, chosen, info["kernel_shape"], groups, path)
    else:
        kernel = layer.kernel[...][..., : info["kernel_shape"][-1] // groups]  # group 0's weights
        chosen = rank_for_ratio(fmt, info["kernel_shape"], ratio, groups=groups, kernel=kernel)
    return dict(info, path=path, format=fmt, ranks=chosen)


def _finish_entry(spec: dict, io_shapes) -> PlanEntry:
    in_spatial = out_spatial = None
    if io_shapes is not None:
        in_spatial, out_spatial = (tuple(shape[1:-1]) for shape in io_shapes)
    kw = dict(groups=spec.get("groups", 1), bias=spec["use_bias"],
              in_spatial=in_spatial, out_spatial=out_spatial)
    before = count_format("dense", spec["kernel_shape"], **kw)
    after = count_format(spec["format"], spec["kernel_shape"], spec["ranks"], **kw)
    if io_shapes is None:  # a dense layer's count would assume one vector per example: say unknown
        before, after = (dataclasses.replace(c, flops=None) for c in (before, after))
    fields = {f.name for f in dataclasses.fields(PlanEntry)}
    return PlanEntry(**{k: v for k, v in spec.items() if k in fields}, in_spatial=in_spatial,
                     out_spatial=out_spatial, params_before=before.params, params_after=after.params,
                     flops_before=before.flops, flops_after=after.flops)


def trace_shapes(model: nnx.Module, input_shape, paths: list) -> dict:
    """Path → (input shape, output shape) of each layer in ``paths`` for one forward pass of
    ``model`` on ``input_shape``, traced with ``jax.eval_shape`` on a merged copy (no compute,
    nothing in ``model`` changes)."""
    spec = input_spec(model, input_shape)
    graphdef, state = nnx.split(model)
    shapes: dict = {}

    def forward(state, x):
        copy = nnx.merge(graphdef, state)
        taps = [(get_by_path(copy, p), _recorder(shapes, p)) for p in paths]
        with intercept(taps):
            return copy(x)

    try:
        jax.eval_shape(forward, state, spec)
    except Exception as err:  # the model's own error, with the context of what we were doing
        raise ValueError(f"tracing the model on input_shape {spec.shape} ({spec.dtype}) to count FLOPs "
                         f"failed: {err}") from err
    not_called = [p for p in paths if p not in shapes]
    if not_called:
        raise ValueError(f"layer(s) {not_called} were not called in a forward pass on {spec.shape}; "
                         "skip them or check input_shape")
    return shapes


def _recorder(shapes: dict, path: str):
    def record(layer, x, y):
        if path in shapes and shapes[path] != (tuple(x.shape), tuple(y.shape)):
            raise ValueError(f"layer {path!r} is called several times with different shapes; "
                             "FLOPs per call are ambiguous: plan without input_shape")
        shapes[path] = (tuple(x.shape), tuple(y.shape))

    return record
