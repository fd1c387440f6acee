"""Factorized NNX layers, equivalent (to float tolerance) to the dense layer built from the same
factors, and their parameter / FLOP counts.

=================  ==========  ==========================================================================
layer              from        structure (bias on the last sub-layer)
=================  ==========  ==========================================================================
``LowRankDense``   LowRank     dense ``in → r``, dense ``r → out``
``LowRankConv``    LowRank     ``kh×kw`` conv ``cin → r`` (original strides/padding/dilation), 1×1 ``r → cout``
``Tucker2Conv``    Tucker2     1×1 ``cin → r_in``, ``kh×kw`` core ``r_in → r_out``, 1×1 ``r_out → cout``
``CPConv``         CP          1×1 ``cin → R``, depthwise ``kh×1``, depthwise ``1×kw``, 1×1 ``R → cout``
``CP3Conv``        CP3         1×1 ``cin → R``, depthwise ``kh×kw``, 1×1 ``R → cout``
``Tucker3Conv``    Tucker3     1×1 ``cin → r_in``, ``r_space`` ``kh×kw`` basis filters per channel, 1×1 mix, 1×1 ``→ cout``
``TTConv``         TT          1×1 ``cin → r1``, ``kh×1`` ``r1 → r2``, ``1×kw`` ``r2 → r3``, 1×1 ``r3 → cout``
``TRConv``         TR          1×1 ``cin → r0·r1``, ``kh×1``, ``1×kw`` (shared over ``r0``), 1×1 ``r0·r3 → cout``
``RCPConv`` …      RCP, …      reshaped r-CP / r-Tucker / r-TT / r-TR: channel einsum on ``(N, H, W, s₁…s_m)`` + one ``kh×kw`` conv
=================  ==========  ==========================================================================

Build one with ``Layer.from_layer(original, factorized)`` (copies bias, strides, padding,
dilation, groups, dtype and precision) or :func:`factorize_layer`. A grouped conv
(``feature_group_count = g``) takes a list of ``g`` factorized kernels, one per group, each of
kernel shape ``(kh, kw, cin // g, cout // g)`` and the same ranks; the sub-convs are grouped.
Every layer takes ``implementation="factorized"`` (the chain above, lowered the fast way for the
backend: on CPU shift-and-add depthwise convs, ``dot_general`` 1×1 convs and CP's two depthwise
convs merged into one ``kh×kw`` pass) or ``"dense"`` (one conv with the kernel rebuilt from the
factors); both equal the dense conv to float tolerance, :meth:`FactorizedLayer.reference` is the
literal chain of ``nnx.Conv`` sub-layers.
Counts come from one function per format: :func:`count_dense`, :func:`count_lowrank`,
:func:`count_tucker2`, :func:`count_cp`, :func:`count_cp3`, :func:`count_tucker3`, :func:`count_tt`,
:func:`count_tr`; :func:`count_format` dispatches through the format registry.
"""

from sigmadecomp.layers._common import FactorizedLayer
from sigmadecomp.layers._config import ConvConfig, canonical_convs
from sigmadecomp.layers._counts import (
    Counts, count_cp, count_cp3, count_dense, count_format, count_lowrank, count_tucker2,
)
from sigmadecomp.layers._cp import CP3Conv, CPConv
from sigmadecomp.layers._lowrank import LowRankConv, LowRankDense
from sigmadecomp.layers._registry import FACTORIZED_LAYERS, factorize_layer
from sigmadecomp.layers._shapes import factor_shapes, placeholder
from sigmadecomp.layers._tr import TRConv, count_tr
from sigmadecomp.layers._tt import TTConv, count_tt
from sigmadecomp.layers._tucker2 import Tucker2Conv
from sigmadecomp.layers._tucker3 import Tucker3Conv, count_tucker3
from sigmadecomp.layers._reshaped import RCPConv, RTRConv, RTTConv, RTuckerConv, ReshapedConv, count_reshaped
from sigmadecomp.layers._ttmatrix import (
    GRU, TTEmbed, TTGRU, TTLinear, count_tt_embed, count_tt_matrix, kept_ranks, prune_ranks, rank_penalty,
    tt_init_cores, tt_matmul,
)

__all__ = [
    "CP3Conv",
    "CPConv",
    "ConvConfig",
    "Counts",
    "FACTORIZED_LAYERS",
    "FactorizedLayer",
    "LowRankConv",
    "LowRankDense",
    "TRConv",
    "TTConv",
    "Tucker2Conv",
    "canonical_convs",
    "Tucker3Conv",
    "RCPConv",
    "RTRConv",
    "RTTConv",
    "RTuckerConv",
    "ReshapedConv",
    "count_reshaped",
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
    "count_cp",
    "count_cp3",
    "count_dense",
    "count_format",
    "count_lowrank",
    "count_tr",
    "count_tt",
    "count_tucker2",
    "count_tucker3",
    "factor_shapes",
    "factorize_layer",
    "placeholder",
]
