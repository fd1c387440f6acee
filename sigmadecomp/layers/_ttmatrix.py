"""Tensor-train NNX layers (DESIGN.md §6): ``TTLinear``, ``TTEmbed``, ``TTGRU``.

* :class:`TTLinear` — ``y = x W + b`` with ``W`` a :class:`~sigmadecomp.TTMatrix`; the input is
  reshaped to ``(B, m₁, …, m_K)`` and contracted with one core at a time (never the dense ``W``),
  in the direction (left-to-right or right-to-left) with fewer multiply-accumulates.
* :class:`TTEmbed` — an embedding table ``(v₁⋯v_K, n₁⋯n_K)`` in TT-matrix form (the vocabulary
  padded to ``v₁⋯v_K``); a lookup splits the token id into digits and multiplies one slice
  ``G_k[:, i_k, :, :]`` per core.
* :class:`GRU` — a GRU over a sequence whose three input maps are ONE module ``in → 3·hidden``
  (gates stacked ``[r, z, n]``, applied to all time steps at once), scanned over time with
  ``lax.scan``; :class:`TTGRU` is the GRU whose input map is a :class:`TTLinear`.

Training from scratch: ``init="tt"`` draws every core from ``N(0, σ²)`` with
``σ = (var / Π_k r_k)^{1/(2K)}`` so that every entry of ``W`` has variance ``var`` (the seed's
variance rule; ``var = 1/in`` like ``nnx.Linear``'s LeCun default, or ``"glorot"``/``"he"``);
``init="naive"`` applies the framework's LeCun initializer to each 4-way core as if it were a
dense kernel, which gives ``Var(W) = 1/(in·out)`` — a signal that vanishes layer after layer.
``orthogonal=True`` stores free matrices and uses the Q factor (positive-diagonal QR) of cores
``1..K−1`` (left-orthonormal), so only the last core carries the scale.

Rank selection while training: :func:`rank_penalty` is a group lasso over the slices
``(G_k[..., a], G_{k+1}[a, ...])`` of every bond ``a``; :func:`kept_ranks` reports the bonds whose
group norm stays above a threshold and :func:`prune_ranks` removes the others.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sigmadecomp._ttmatrix import TTMatrix, balanced_modes, check_tt_config, padded_modes, tt_num_params
from sigmadecomp.layers._common import FactorizedLayer
from sigmadecomp.layers._counts import Counts

__all__ = [
    "GRU",
    "TTEmbed",
    "TTGRU",
    "TTLinear",
    "count_tt_embed",
    "count_tt_matrix",
    "kept_ranks",
    "prune_ranks",
    "rank_penalty",
    "tt_init_cores",
    "tt_matmul",
]

_HIGHEST = jax.lax.Precision.HIGHEST
_VARIANCE = {"lecun": lambda i, o: 1.0 / i, "glorot": lambda i, o: 2.0 / (i + o), "he": lambda i, o: 2.0 / i}


def _flops_one_way(in_modes, out_modes, ranks) -> int:
    """MACs per example contracting left to right: core k costs n_{<k}·r_{k−1}·m_k·n_k·r_k·m_{>k}."""
    full, total = (1, *ranks, 1), 0
    for k, (m, n) in enumerate(zip(in_modes, out_modes)):
        total += math.prod(out_modes[:k]) * full[k] * m * n * full[k + 1] * math.prod(in_modes[k + 1 :])
    return total


def _reverse_is_cheaper(in_modes, out_modes, ranks) -> bool:
    fwd = _flops_one_way(in_modes, out_modes, ranks)
    return _flops_one_way(in_modes[::-1], out_modes[::-1], ranks[::-1]) < fwd


def count_tt_matrix(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], *,
                    bias: bool = True, tokens: int = 1) -> Counts:
    """Parameters and MACs per example (``tokens`` inputs) of :class:`TTLinear` in the
    contraction order it uses (the cheaper of left-to-right and right-to-left).

    >>> count_tt_matrix((4, 4, 7, 7), (4, 4, 8, 8), (8, 8, 8), bias=False)
    Counts(params=5184, flops=684544)
    """
    in_modes, out_modes, ranks = tuple(in_modes), tuple(out_modes), tuple(ranks)
    flops = min(_flops_one_way(in_modes, out_modes, ranks), _flops_one_way(in_modes[::-1], out_modes[::-1], ranks[::-1]))
    params = tt_num_params(in_modes, out_modes, ranks) + (math.prod(out_modes) if bias else 0)
    return Counts(params, flops * tokens)


def count_tt_embed(vocab_modes: Sequence[int], feature_modes: Sequence[int], ranks: Sequence[int]) -> Counts:
    """Parameters and MACs per looked-up token of :class:`TTEmbed` (chain of gathered slices)."""
    full = (1, *ranks, 1)
    flops = sum(math.prod(feature_modes[:k]) * full[k] * n * full[k + 1] for k, n in enumerate(feature_modes) if k > 0)
    return Counts(tt_num_params(vocab_modes, feature_modes, ranks), flops)


def tt_init_cores(key, in_modes, out_modes, ranks, *, init: str = "tt", variance: str = "lecun",
                  dtype=jnp.float32) -> tuple:
    """Random cores for training from scratch (see the module docstring for the two rules).

    >>> import jax
    >>> cores = tt_init_cores(jax.random.key(0), (4, 4), (8, 8), (16,))
    >>> [c.shape for c in cores]
    [(1, 4, 8, 16), (16, 4, 8, 1)]
    """
    if init not in ("tt", "naive") or variance not in _VARIANCE:
        raise ValueError(f"init must be 'tt' or 'naive' and variance one of {sorted(_VARIANCE)}; got {init!r}, {variance!r}")
    full, num = (1, *ranks, 1), len(in_modes)
    shapes = [(full[k], m, n, full[k + 1]) for k, (m, n) in enumerate(zip(in_modes, out_modes))]
    if init == "naive":
        lecun = nnx.initializers.lecun_normal()
        return tuple(lecun(k, s, dtype) for k, s in zip(jax.random.split(key, num), shapes))
    var = _VARIANCE[variance](math.prod(in_modes), math.prod(out_modes))
    std = (var / math.prod(ranks)) ** (1.0 / (2 * num))
    # one draw for all cores, cut into pieces: eager jax.random.normal compiles once per shape
    # (about a second each on CPU), so a layer is built with one compilation instead of one per core
    sizes = [math.prod(s) for s in shapes]
    flat = std * jax.random.normal(key, (sum(sizes),), dtype)
    ends = itertools.accumulate(sizes)
    return tuple(flat[end - size:end].reshape(s) for end, size, s in zip(ends, sizes, shapes))


def _orthonormal(raw):
    """Left-orthonormal core from a free one: Q of the QR of ``(a·m·n, b)`` with diag(R) > 0, so
    that an already left-orthonormal ``raw`` maps to itself."""
    a, m, n, b = raw.shape
    q, r = jnp.linalg.qr(raw.reshape(a * m * n, b))
    sign = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(raw.dtype)
    return (q * sign[None, :]).reshape(a, m, n, b)


def _left_orthonormalize(cores):
    cores = list(cores)
    for k in range(len(cores) - 1):
        a, m, n, b = cores[k].shape
        q, r = jnp.linalg.qr(cores[k].reshape(a * m * n, b))
        sign = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(r.dtype)
        cores[k] = (q * sign[None, :]).reshape(a, m, n, -1)
        cores[k + 1] = jnp.einsum("cb,bmnd->cmnd", sign[:, None] * r, cores[k + 1], precision=_HIGHEST)
    return cores


def _contract(x, cores, in_modes, out_modes, precision):
    """``x (B, in) → (B, out)``, one core at a time, left to right."""
    batch = x.shape[0]
    t = x.reshape(batch, 1, 1, -1)  # (B, n_done, r, m_rest)
    for core in cores:
        a, m, n, c = core.shape
        t = t.reshape(batch, t.shape[1], a, m, -1)
        t = jnp.einsum("bNamM,amnc->bNncM", t, core, precision=precision)
        t = t.reshape(batch, t.shape[1] * n, c, -1)
    return t.reshape(batch, -1)


def tt_matmul(x, tt: TTMatrix, *, precision=None):
    """``x @ W`` for ``x (..., in)`` and a TT-matrix ``W``, by core contractions in the cheaper
    direction; the dense ``W`` is never formed."""
    lead, cores = x.shape[:-1], tt.cores
    x2 = x.reshape(-1, x.shape[-1])
    if _reverse_is_cheaper(tt.in_modes, tt.out_modes, tt.ranks):
        k = len(cores)
        xr = x2.reshape(-1, *tt.in_modes).transpose(0, *range(k, 0, -1)).reshape(x2.shape[0], -1)
        rev = [c.transpose(3, 1, 2, 0) for c in reversed(cores)]
        y = _contract(xr, rev, tt.in_modes[::-1], tt.out_modes[::-1], precision)
        y = y.reshape(-1, *tt.out_modes[::-1]).transpose(0, *range(k, 0, -1)).reshape(x2.shape[0], -1)
    else:
        y = _contract(x2, cores, tt.in_modes, tt.out_modes, precision)
    return y.reshape(*lead, y.shape[-1])


class _TTCores(nnx.Module):
    """Cores stored as ``core_0 … core_{K−1}`` parameters (optionally orthogonal-parametrised)."""

    def _set_cores(self, cores, in_modes, out_modes, orthogonal):
        self.in_modes, self.out_modes, self.orthogonal = tuple(in_modes), tuple(out_modes), bool(orthogonal)
        self.num_cores = len(cores)
        if orthogonal:
            cores = _left_orthonormalize(cores)
        for k, core in enumerate(cores):
            setattr(self, f"core_{k}", nnx.Param(jnp.asarray(core)))

    @property
    def cores(self) -> tuple:
        """The effective cores (after the orthogonal parametrisation if enabled)."""
        raw = [getattr(self, f"core_{k}")[...] for k in range(self.num_cores)]
        if self.orthogonal:
            raw = [_orthonormal(c) for c in raw[:-1]] + raw[-1:]
        return tuple(raw)

    @property
    def tt(self) -> TTMatrix:
        return TTMatrix(self.cores, self.in_modes, self.out_modes)

    @property
    def ranks(self) -> tuple:
        return tuple(int(getattr(self, f"core_{k}").shape[-1]) for k in range(self.num_cores - 1))


def _resolve_modes(in_features, out_features, in_modes, out_modes, num_cores):
    k = len(in_modes or out_modes or ()) or num_cores
    return tuple(in_modes or balanced_modes(in_features, k)), tuple(out_modes or balanced_modes(out_features, k))


class TTLinear(_TTCores, FactorizedLayer):
    """Dense layer ``y = x W + b`` with a TT-matrix ``W`` (equal to ``nnx.Linear`` holding
    ``tt_to_dense(layer.tt)``), for training from scratch or built from a fit by :meth:`from_tt`.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = TTLinear(784, 1024, ranks=(8, 8, 8), num_cores=4, rngs=nnx.Rngs(0))
    >>> layer.in_modes, layer.out_modes, layer(jnp.ones((2, 784))).shape
    ((4, 4, 7, 7), (4, 4, 8, 8), (2, 1024))
    """

    def __init__(self, in_features: int, out_features: int, *, ranks: Sequence[int], in_modes=None,
                 out_modes=None, num_cores: int = 3, use_bias: bool = True, init: str = "tt",
                 variance: str = "lecun", orthogonal: bool = False, param_dtype=jnp.float32,
                 precision=None, rngs: nnx.Rngs):
        in_modes, out_modes = _resolve_modes(in_features, out_features, in_modes, out_modes, num_cores)
        ranks = tuple(int(r) for r in ranks)
        check_tt_config("TTLinear", (in_features, out_features), in_modes, out_modes, ranks)
        cores = tt_init_cores(rngs.params(), in_modes, out_modes, ranks, init=init, variance=variance, dtype=param_dtype)
        if orthogonal:  # orthonormal cores carry no scale: the last one gets all of Var(W)
            cores = _left_orthonormalize(cores)
            var = _VARIANCE[variance](in_features, out_features) * in_features * out_features
            last = cores[-1] / jnp.sqrt(jnp.mean(cores[-1] ** 2))
            cores[-1] = last * jnp.sqrt(var / last.size).astype(param_dtype)
        self._set_cores(cores, in_modes, out_modes, orthogonal)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.precision = precision

    @classmethod
    def from_tt(cls, tt: TTMatrix, *, bias=None, orthogonal: bool = False, precision=None) -> "TTLinear":
        """The layer holding exactly ``tt`` (and ``bias``, shape ``(out,)``, or none)."""
        layer = cls(*tt.kernel_shape, ranks=tt.ranks, in_modes=tt.in_modes, out_modes=tt.out_modes,
                    use_bias=bias is not None, param_dtype=tt.dtype, precision=precision, rngs=nnx.Rngs(0))
        layer._set_cores(list(tt.cores), tt.in_modes, tt.out_modes, orthogonal)
        if bias is not None:
            layer.bias = nnx.Param(jnp.asarray(bias, tt.dtype))
        return layer

    @classmethod
    def from_layer(cls, layer: nnx.Linear, tt: TTMatrix, **kwargs) -> "TTLinear":
        """Replacement for ``layer`` (its bias copied) with the fitted kernel ``tt``."""
        if tuple(layer.kernel.shape) != tt.kernel_shape:
            raise ValueError(f"TTLinear.from_layer: the layer's kernel is {tuple(layer.kernel.shape)}, the TT-matrix approximates {tt.kernel_shape}")
        bias = None if layer.bias is None else layer.bias[...]
        return cls.from_tt(tt, bias=bias, precision=layer.precision, **kwargs)

    format = "tt-matrix"  # the registry's name (surgery plans, save / load)
    groups = 1

    @property
    def kernel_shape(self) -> tuple:
        return self.tt.kernel_shape

    @property
    def use_bias(self) -> bool:
        return self.bias is not None

    def to_factorized(self) -> TTMatrix:
        return self.tt

    def dense_kernel(self):
        from sigmadecomp._ttmatrix import tt_to_dense

        return tt_to_dense(self.tt)

    def counts(self, in_spatial=None, out_spatial=None, *, tokens: int = 1) -> Counts:
        """Parameters and MACs for ``tokens`` inputs (or ``prod(out_spatial)``)."""
        del in_spatial
        tokens = math.prod(out_spatial) if out_spatial else tokens
        return count_tt_matrix(self.in_modes, self.out_modes, self.ranks, bias=self.bias is not None, tokens=tokens)

    def __call__(self, x):
        y = tt_matmul(x, self.tt, precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...].reshape((1,) * (y.ndim - 1) + (-1,))
        return y


class TTEmbed(_TTCores):
    """Embedding ``(num_embeddings, features)`` as a TT-matrix over a vocabulary padded to
    ``v₁⋯v_K`` (the padded rows are never looked up); equal to the dense table lookup.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> emb = TTEmbed(5000, 64, ranks=(8, 8), rngs=nnx.Rngs(0))
    >>> emb.in_modes, emb.out_modes, emb(jnp.array([[0, 4999]])).shape
    ((17, 17, 18), (4, 4, 4), (1, 2, 64))
    """

    def __init__(self, num_embeddings: int, features: int, *, ranks: Sequence[int], vocab_modes=None,
                 feature_modes=None, num_cores: int = 3, init: str = "tt", param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        k = len(vocab_modes or feature_modes or ()) or num_cores
        vocab_modes = tuple(vocab_modes or padded_modes(num_embeddings, k))
        feature_modes = tuple(feature_modes or balanced_modes(features, k))
        if math.prod(vocab_modes) < num_embeddings:
            raise ValueError(f"TTEmbed: vocab_modes {vocab_modes} hold {math.prod(vocab_modes)} rows < num_embeddings={num_embeddings}")
        ranks = tuple(int(r) for r in ranks)
        check_tt_config("TTEmbed", (math.prod(vocab_modes), features), vocab_modes, feature_modes, ranks)
        # Flax's nnx.Embed draws N(0, 1) rows: the rule targets unit variance per entry.
        std = (1.0 / math.prod(ranks)) ** (1.0 / (2 * k)) if init == "tt" else None
        cores = tt_init_cores(rngs.params(), vocab_modes, feature_modes, ranks, init="naive" if init == "naive" else "tt", dtype=param_dtype)
        if std is not None:
            cores = [c / jnp.std(c) * std for c in cores]
        self._set_cores(cores, vocab_modes, feature_modes, False)
        self.num_embeddings = int(num_embeddings)

    @classmethod
    def from_tt(cls, tt: TTMatrix, num_embeddings: int) -> "TTEmbed":
        """The embedding holding ``tt`` (kernel ``(padded vocab, features)``) for ``num_embeddings`` ids."""
        if tt.kernel_shape[0] < num_embeddings:
            raise ValueError(f"TTEmbed.from_tt: the TT-matrix has {tt.kernel_shape[0]} rows < num_embeddings={num_embeddings}")
        layer = cls(num_embeddings, tt.kernel_shape[1], ranks=tt.ranks, vocab_modes=tt.in_modes,
                    feature_modes=tt.out_modes, param_dtype=tt.dtype, rngs=nnx.Rngs(0))
        layer._set_cores(list(tt.cores), tt.in_modes, tt.out_modes, False)
        return layer

    def counts(self) -> Counts:
        return count_tt_embed(self.in_modes, self.out_modes, self.ranks)

    def __call__(self, ids):
        ids = jnp.asarray(ids)
        stride, acc = math.prod(self.in_modes), None
        for core, v in zip(self.cores, self.in_modes):
            stride //= v
            piece = jnp.take(core, (ids // stride) % v, axis=1)  # (a, ..., n, b)
            piece = jnp.moveaxis(piece, 0, -3)  # (..., a, n, b)
            if acc is None:
                acc = piece[..., 0, :, :]
            else:
                acc = jnp.einsum("...Na,...anb->...Nnb", acc, piece, precision=_HIGHEST)
                acc = acc.reshape(*acc.shape[:-3], -1, acc.shape[-1])
        return acc[..., 0]


class GRU(nnx.Module):
    """A GRU over ``(B, T, in)`` sequences whose input maps are one module ``in → 3·hidden``
    (``[r, z, n]`` stacked), applied to all steps at once; the recurrence is a ``lax.scan``:

        r = σ(x_r + h W_hr),  z = σ(x_z + h W_hz),  n = tanh(x_n + r·(h W_hn)),
        h' = (1 − z)·n + z·h          (``nnx.GRUCell``'s formula: the biases are in ``input_map``)

    ``mask`` ``(B, T)`` keeps ``h`` unchanged at padded steps. Returns ``(final h, all h)``.
    """

    def __init__(self, input_map: nnx.Module, hidden_features: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.input_map, self.hidden_features = input_map, int(hidden_features)
        h = self.hidden_features
        self.hidden_kernel = nnx.Param(nnx.initializers.orthogonal()(rngs.params(), (h, 3 * h), param_dtype))

    def __call__(self, x, mask=None):
        batch, steps = x.shape[:2]
        gates_x = self.input_map(x.reshape(batch * steps, -1)).reshape(batch, steps, -1)
        mask = jnp.ones((batch, steps), bool) if mask is None else jnp.asarray(mask, bool)
        wh = self.hidden_kernel[...]
        h0 = jnp.zeros((batch, self.hidden_features), gates_x.dtype)

        def step(h, inputs):
            gx, keep = inputs
            xr, xz, xn = jnp.split(gx, 3, axis=-1)
            hr, hz, hn = jnp.split(h @ wh, 3, axis=-1)
            r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
            n = jnp.tanh(xn + r * hn)
            new = (1.0 - z) * n + z * h
            new = jnp.where(keep[:, None], new, h)
            return new, new

        h, hs = jax.lax.scan(step, h0, (gates_x.transpose(1, 0, 2), mask.T))
        return h, hs.transpose(1, 0, 2)


def TTGRU(in_features: int, hidden_features: int, *, ranks: Sequence[int], in_modes=None, out_modes=None,
          num_cores: int = 3, init: str = "tt", orthogonal: bool = False, param_dtype=jnp.float32,
          rngs: nnx.Rngs) -> GRU:
    """A :class:`GRU` whose stacked input map ``in → 3·hidden`` is a :class:`TTLinear`.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> gru = TTGRU(784, 64, ranks=(4, 4), rngs=nnx.Rngs(0))
    >>> h, hs = gru(jnp.ones((2, 5, 784)))
    >>> h.shape, hs.shape, gru.input_map.out_modes
    ((2, 64), (2, 5, 64), (4, 6, 8))
    """
    input_map = TTLinear(in_features, 3 * hidden_features, ranks=ranks, in_modes=in_modes, out_modes=out_modes,
                         num_cores=num_cores, init=init, variance="glorot", orthogonal=orthogonal,
                         param_dtype=param_dtype, rngs=rngs)
    return GRU(input_map, hidden_features, param_dtype=param_dtype, rngs=rngs)


def _bond_norms(layer: _TTCores) -> list:
    """Per bond k (between cores k and k+1): the group norm of each rank index's two slices."""
    cores = [getattr(layer, f"core_{k}")[...] for k in range(layer.num_cores)]
    return [jnp.sqrt(jnp.sum(cores[k] ** 2, axis=(0, 1, 2)) + jnp.sum(cores[k + 1] ** 2, axis=(1, 2, 3)))
            for k in range(layer.num_cores - 1)]


def rank_penalty(layer: _TTCores):
    """Group lasso ``Σ_bonds Σ_a ‖(G_k[..., a], G_{k+1}[a, ...])‖₂``: add ``λ·rank_penalty`` to
    the loss to drive whole rank indices to zero (then :func:`prune_ranks`)."""
    if layer.orthogonal:
        raise ValueError("rank_penalty: orthogonal cores cannot shrink; use orthogonal=False")
    return sum(jnp.sum(g) for g in _bond_norms(layer))


def kept_ranks(layer: _TTCores, *, rtol: float = 1e-2) -> tuple:
    """Per bond, how many rank indices have a group norm above ``rtol ×`` that bond's largest."""
    return tuple(int(jnp.sum(g > rtol * jnp.max(g))) for g in _bond_norms(layer))


def prune_ranks(layer: _TTCores, *, rtol: float = 1e-2):
    """A copy of ``layer`` without the rank indices :func:`kept_ranks` drops (exact when the
    dropped slices are zero)."""
    keep = [g > rtol * jnp.max(g) for g in _bond_norms(layer)]
    cores = [getattr(layer, f"core_{k}")[...] for k in range(layer.num_cores)]
    for k, mask in enumerate(keep):
        idx = jnp.nonzero(mask)[0]
        cores[k], cores[k + 1] = cores[k][..., idx], cores[k + 1][idx]
    tt = TTMatrix(tuple(cores), layer.in_modes, layer.out_modes)
    if isinstance(layer, TTEmbed):
        return TTEmbed.from_tt(tt, layer.num_embeddings)
    bias = None if layer.bias is None else layer.bias[...]
    return TTLinear.from_tt(tt, bias=bias, precision=layer.precision)
