"""Block outputs for the feature-matching term: the default for the package's CIFAR ResNets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sigmadecomp.models import CifarResNet

__all__ = ["default_features", "resnet_block_outputs"]


def resnet_block_outputs(model: CifarResNet, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """``(logits, [output of every residual block])`` of a :class:`CifarResNet`, computed exactly
    as its ``__call__`` does (same layers, same order)."""
    out = nnx.relu(model.bn1(model.conv1(x)))
    outputs = []
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            out = block(out)
            outputs.append(out)
    return model.linear(jnp.mean(out, axis=(1, 2))), outputs


def default_features(student: nnx.Module, teacher: nnx.Module, feature_weight: float):
    """The feature function used when the caller gives none: ``None`` when the feature term is
    off, :func:`resnet_block_outputs` for two CIFAR ResNets, otherwise an error that says what to
    pass."""
    if not feature_weight:
        return None
    if isinstance(student, CifarResNet) and isinstance(teacher, CifarResNet):
        return resnet_block_outputs
    raise ValueError(f"feature_weight > 0 needs features=(model, x) -> (logits, [block outputs]) for "
                     f"{type(student).__name__}/{type(teacher).__name__} (built in only for CifarResNet)")
