"""Streaming second-moment statistics of patch vectors: pure JAX, no Flax.

A :class:`MomentState` holds running sums over patches ``x`` (and, for sequential calibration, a
second stream ``y`` of the same shape — the compressed model's input ``x̂``):

    count,  Σ x,  Σ x xᵀ              (always)
    Σ y,  Σ x yᵀ,  Σ y yᵀ             (when ``cross=True``)

:func:`update` adds a batch, :func:`merge` adds two states (so batches or devices reduce in any
order), :func:`finalize` divides by the count and returns a :class:`LayerCovariance`.

**Precision.** With x64 enabled the sums are float64. Without it (the JAX default) they are
float32 with Neumaier compensation: each sum carries an error term that collects the rounding of
every addition, so accumulating many batches loses nothing beyond the rounding of one chunk's
``xᵀx``. Rows are added in chunks of :func:`chunk_rows` rows (one HIGHEST-precision matmul per
chunk, then a compensated add), so the float32 error does not grow with the batch size either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["LayerCovariance", "MomentState", "chunk_rows", "finalize", "init", "merge", "update"]

# Patch values per chunk (4 MiB in float32): the chunk stays in cache while its gram is computed.
CHUNK_ELEMENTS = 2**20


def chunk_rows(d: int) -> int:
    """Rows per HIGHEST-precision matmul for patches of total length ``d``.

    Why: enough rows for an efficient matmul (at least 512), few enough that the chunk stays in
    cache (``CHUNK_ELEMENTS``; on a 2-core CPU 8192 rows of d = 576 ran ~1.5× slower than 2048)
    and that float32 rounding inside one matmul stays ~1e-6 relative (at most 8192 rows).
    """
    return int(min(8192, max(512, CHUNK_ELEMENTS // max(int(d), 1))))

_CROSS_KEYS = ("y", "xy", "yy")


def _pytree(cls, meta=()):
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = [f.name for f in dataclasses.fields(cls) if f.name not in meta]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=list(meta))


@_pytree
class MomentState:
    """Running sums of patch statistics; build with :func:`init`, never by hand.

    ``sums`` maps ``"count"`` (scalar), ``"x"`` (``(g, d)``), ``"xx"`` (``(g, d, d)``; absent when
    built with ``gram=False``) and, for a cross state, ``"y"``, ``"xy"`` (``Σ x yᵀ``), ``"yy"``;
    ``"ww"`` (``(g,)``, ``Σ ‖W x‖²``) when built with ``energy=True``. ``errs`` holds the Neumaier error terms
    of the same sums (float32 accumulation) or is ``None`` (float64, no compensation needed).
    ``g`` is the number of feature groups (1 for dense layers and ordinary convs).
    """

    sums: dict
    errs: dict | None

    @property
    def groups(self) -> int:
        return self.sums["x"].shape[0]

    @property
    def dim(self) -> int:
        """Patch length per group, ``d``."""
        return self.sums["x"].shape[-1]

    @property
    def cross(self) -> bool:
        return "xy" in self.sums

    @property
    def dtype(self):
        return self.sums["x"].dtype


@_pytree
class LayerCovariance:
    """Finalised statistics of one layer's input patches ``x`` (and second stream ``y = x̂``).

    Shapes are ``(d, d)`` / ``(d,)`` for one group, ``(groups, d, d)`` / ``(groups, d)`` for a
    grouped conv (one block per group). All moments are uncentred expectations over patches:

    * ``cov = E[x xᵀ]`` (symmetrised), ``mean = E[x]``, ``count`` = number of patches (a float
      scalar of the statistics' dtype, exact for any realistic count thanks to the compensation);
    * ``cross_cov = E[x yᵀ]`` — the target side of sequential calibration, ``E[x x̂ᵀ]``;
    * ``cov_hat = E[y yᵀ]`` — the metric of sequential calibration, ``E[x̂ x̂ᵀ]``; ``mean_hat = E[y]``;
    * ``energy = E‖W x‖²`` per group — the output energy of a layer with matrix ``W``.

    The cross fields are ``None`` unless the state was built with ``cross=True``; ``cov`` is
    ``None`` for a state built with ``gram=False``, ``energy`` unless built with ``energy=True``.
    """

    cov: jax.Array | None
    mean: jax.Array
    count: jax.Array
    cross_cov: jax.Array | None = None
    cov_hat: jax.Array | None = None
    mean_hat: jax.Array | None = None
    energy: jax.Array | None = None


def _default_dtype():
    return jnp.dtype(jnp.result_type(float))


def init(d: int, *, groups: int = 1, cross: bool = False, dtype=None, gram: bool = True,
         energy: bool = False) -> MomentState:
    """Empty statistics for patches of length ``d`` (per group).

    ``dtype`` defaults to float64 when x64 is enabled, else float32; float32 sums are compensated.
    ``gram=False`` skips ``Σ x xᵀ`` (a cross state's ``cov``: a third of its matmul work) and
    ``energy=True`` accumulates ``Σ ‖W x‖²`` instead (pass ``weight=W`` to
    :func:`accumulate_chunks`): sequential calibration needs ``E[x xᵀ]`` only for that energy.

    >>> state = init(3)
    >>> state = update(state, jnp.ones((5, 3)))
    >>> finalize(state).cov.shape
    (3, 3)
    """
    dtype = _check_dtype(_default_dtype() if dtype is None else jnp.dtype(dtype))
    if int(d) < 1 or int(groups) < 1:
        raise ValueError(f"init needs d >= 1 and groups >= 1; got d={d}, groups={groups}.")
    g, d = int(groups), int(d)
    shapes = {"count": (), "x": (g, d)}
    if gram:
        shapes["xx"] = (g, d, d)
    if energy:
        shapes["ww"] = (g,)
    if cross:
        shapes.update({"y": (g, d), "xy": (g, d, d), "yy": (g, d, d)})
    sums = {k: jnp.zeros(s, dtype) for k, s in shapes.items()}
    errs = {k: jnp.zeros(s, dtype) for k, s in shapes.items()} if _compensated(dtype) else None
    return MomentState(sums=sums, errs=errs)


def _check_dtype(dtype):
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 4:
        raise ValueError(f"statistics dtype must be float32 or float64; got {dtype}.")
    if jnp.dtype(jnp.zeros((), dtype).dtype) != dtype:
        raise ValueError(
            f"dtype {dtype} requested but JAX would store {jnp.zeros((), dtype).dtype}: enable x64 "
            "(jax.config.update('jax_enable_x64', True)) or use float32 (compensated)."
        )
    return dtype


def _compensated(dtype) -> bool:
    return jnp.dtype(dtype).itemsize < 8


def _neumaier(s, e, v):
    """Add ``v`` to the compensated sum ``(s, e)``; ``e`` collects the rounding error of ``s + v``."""
    t = s + v
    err = jnp.where(jnp.abs(s) >= jnp.abs(v), (s - t) + v, (v - t) + s)
    return t, e + err


def _add(state: MomentState, terms: dict) -> MomentState:
    """Add batch sums for some of the keys of ``state.sums``; the other sums are kept as they are."""
    sums, errs = dict(state.sums), None if state.errs is None else dict(state.errs)
    for k, v in terms.items():
        if errs is None:
            sums[k] = sums[k] + v
        else:
            sums[k], errs[k] = _neumaier(sums[k], errs[k], v)
    return MomentState(sums, errs)


def _gram(a, b):
    """``a bᵀ`` per group for row-last blocks ``(g, d, m)``: ``(g, d, d)`` at HIGHEST precision."""
    return lax.dot_general(a, b, (((2,), (2,)), ((0,), (0,))), precision=lax.Precision.HIGHEST)


def _chunk_terms(xt, yt, keys, weight=None) -> dict:
    """The sums ``keys`` of one chunk, given row-last patches ``xt`` (and ``yt``) of shape ``(g, d, m)``
    and, for ``"ww"``, the layer matrix ``weight`` ``(g, cout_g, d)``."""
    terms = {"x": jnp.sum(xt, axis=2)}
    if "xx" in keys:
        terms["xx"] = _gram(xt, xt)
    if "ww" in keys:
        out = jnp.einsum("god,gdm->gom", weight.astype(xt.dtype), xt, precision=lax.Precision.HIGHEST)
        terms["ww"] = jnp.sum(out * out, axis=(1, 2))
    if yt is not None:
        terms.update({"y": jnp.sum(yt, axis=2), "xy": _gram(xt, yt), "yy": _gram(yt, yt)})
    return terms


def accumulate_chunks(state: MomentState, chunk: Callable, num_chunks: int, count, *,
                      weight=None) -> MomentState:
    """Add ``num_chunks`` chunks produced by ``chunk(k) -> (xt, yt_or_None)`` plus ``count`` rows.

    Chunks are row-last ``(g, d, m)`` arrays in the state's dtype; zero rows (padding) add nothing.
    A ``lax.scan`` builds each chunk just before its matmul, so only one chunk is alive at a time.
    Used by :func:`update` and by the model tap, which builds conv patches chunk by chunk.
    """

    if ("ww" in state.sums) != (weight is not None):
        raise ValueError("pass weight= exactly when the state was built with energy=True")

    def body(st, k):
        xt, yt = chunk(k)
        terms = _chunk_terms(xt, yt, st.sums, weight)
        return _add(st, terms), None

    if num_chunks == 1:  # the common small case: no loop to compile
        state, _ = body(state, 0)
    else:
        state, _ = lax.scan(body, state, jnp.arange(num_chunks))
    return _add(state, {"count": jnp.asarray(count, state.dtype)})


def _as_grouped(x, state: MomentState, name: str):
    """``(n, d)`` or ``(n, g, d)`` → ``(n, g, d)`` in the state's dtype, with a clear error."""
    g, d = state.groups, state.dim
    if x.ndim == 2 and g == 1:
        x = x[:, None, :]
    if x.ndim != 3 or x.shape[1:] != (g, d):
        want = f"(n, {d}) or (n, 1, {d})" if g == 1 else f"(n, {g}, {d})"
        raise ValueError(f"{name} must have shape {want} for this state; got {tuple(x.shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating) and not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be a real array; got dtype {x.dtype}.")
    return x.astype(state.dtype)


def _row_chunks(x, chunk_rows: int):
    """``(n, g, d)`` → row-last chunks ``(k, g, d, m)`` zero-padded to ``k·m`` rows."""
    n = x.shape[0]
    m = max(1, min(chunk_rows, n))
    k = -(-n // m)
    x = jnp.pad(x, ((0, k * m - n), (0, 0), (0, 0)))
    return jnp.transpose(x.reshape(k, m, *x.shape[1:]), (0, 2, 3, 1))


@jax.jit
def update(state: MomentState, x, y=None) -> MomentState:
    """Add a batch of patches ``x`` of shape ``(n, d)`` or ``(n, groups, d)``.

    For a cross state (``init(..., cross=True)``) pass the second stream ``y`` (same shape as
    ``x``, e.g. the compressed model's patches ``x̂`` at the same positions); otherwise leave it out.
    Jit-compatible; shapes are checked when traced.

    >>> state = update(init(2, cross=True), jnp.eye(2), 2 * jnp.eye(2))
    >>> finalize(state).cross_cov.tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    if (y is None) == state.cross:
        raise ValueError(
            "y must be given exactly when the state was built with cross=True "
            f"(state.cross={state.cross}, y given: {y is not None})."
        )
    x = _as_grouped(jnp.asarray(x), state, "x")
    rows = chunk_rows(state.groups * state.dim)
    xs = _row_chunks(x, rows)
    ys = None
    if y is not None:
        y = _as_grouped(jnp.asarray(y), state, "y")
        if y.shape != x.shape:
            raise ValueError(f"y must have the shape of x {tuple(x.shape)}; got {tuple(y.shape)}.")
        ys = _row_chunks(y, rows)
    chunk = lambda k: (xs[k], None if ys is None else ys[k])  # noqa: E731
    return accumulate_chunks(state, chunk, xs.shape[0], x.shape[0])


@jax.jit
def merge(a: MomentState, b: MomentState) -> MomentState:
    """Statistics of the union of the batches behind ``a`` and ``b``.

    Exactly commutative, and associative up to rounding (compensated in float32), so batches or
    devices can be reduced in any order or tree.

    >>> xs = jnp.arange(12.0).reshape(6, 2)
    >>> both = merge(update(init(2), xs[:2]), update(init(2), xs[2:]))
    >>> bool(jnp.allclose(finalize(both).cov, finalize(update(init(2), xs)).cov))
    True
    """
    sa = jax.tree.map(lambda v: (v.shape, v.dtype), a.sums)
    sb = jax.tree.map(lambda v: (v.shape, v.dtype), b.sums)
    if sa != sb or (a.errs is None) != (b.errs is None):
        raise ValueError(
            f"cannot merge states of different layout: {sa} (compensated={a.errs is not None}) "
            f"vs {sb} (compensated={b.errs is not None}); build both with the same init arguments."
        )
    if a.errs is None:
        return MomentState({k: a.sums[k] + b.sums[k] for k in a.sums}, None)
    out = {k: _neumaier(a.sums[k], a.errs[k] + b.errs[k], b.sums[k]) for k in a.sums}
    return MomentState({k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()})


def _total(state: MomentState, key: str):
    s = state.sums[key]
    return s if state.errs is None else s + state.errs[key]


def _symmetrise(m):
    return 0.5 * (m + jnp.swapaxes(m, -1, -2))


def finalize(state: MomentState) -> LayerCovariance:
    """Divide by the count; squeeze the group axis when there is one group.

    Raises ``ValueError`` when nothing was accumulated (count 0), instead of returning NaNs.

    >>> finalize(update(init(2), jnp.array([[1.0, 2.0], [3.0, 4.0]]))).mean.tolist()
    [2.0, 3.0]
    """
    count = _total(state, "count")
    if not isinstance(count, jax.core.Tracer) and float(count) <= 0:
        raise ValueError("finalize got a state with no samples: call update with at least one row.")
    squeeze = (lambda v: v[0]) if state.groups == 1 else (lambda v: v)
    moment = lambda key: squeeze(_total(state, key) / count)  # noqa: E731
    out = {"cov": _symmetrise(moment("xx")) if "xx" in state.sums else None, "mean": moment("x"),
           "count": count}
    if "ww" in state.sums:
        out["energy"] = moment("ww")
    if state.cross:
        out.update(cross_cov=moment("xy"), cov_hat=_symmetrise(moment("yy")), mean_hat=moment("y"))
    return LayerCovariance(**out)
