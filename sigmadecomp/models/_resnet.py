"""CIFAR ResNets of depth 6n+2 (He et al. 2015, option-A shortcuts) as Flax NNX modules.

Attribute names mirror the PyTorch reference implementation, so layer paths read
``conv1``, ``layer2.0.conv1``, ``linear`` and PyTorch ``state_dict`` names map one to one
(see :func:`sigmadecomp.models.load_state_dict`).
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
from flax import nnx

from sigmadecomp.models._pytorch_import import load_pytorch_checkpoint, load_safetensors

__all__ = ["BasicBlock", "CifarResNet", "pretrained_resnet"]

# Explicit symmetric padding: 'SAME' with stride 2 on an even size pads (0, 1), PyTorch's pad=1
# pads (1, 1), which shifts every strided window by one pixel.
_PAD = ((1, 1), (1, 1))


def _conv3x3(cin: int, cout: int, stride: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (3, 3), strides=stride, padding=_PAD, use_bias=False,
                    dtype=dtype, param_dtype=dtype, rngs=rngs)


def _batch_norm(features: int, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # PyTorch defaults: eps 1e-5, momentum 0.1 (Flax counts momentum the other way: 0.9).
    return nnx.BatchNorm(features, use_running_average=True, epsilon=1e-5, momentum=0.9,
                         dtype=dtype, param_dtype=dtype, rngs=rngs)


def _shortcut_a(x: jax.Array, planes: int) -> jax.Array:
    """Option A: subsample by 2 and zero-pad ``planes // 4`` channels on each side (no params)."""
    pad = planes // 4
    return jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))


class BasicBlock(nnx.Module):
    """conv3×3(stride)-BN-ReLU-conv3×3-BN, plus the (option-A) shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = _conv3x3(in_planes, planes, stride, dtype, rngs)
        self.bn1 = _batch_norm(planes, dtype, rngs)
        self.conv2 = _conv3x3(planes, planes, 1, dtype, rngs)
        self.bn2 = _batch_norm(planes, dtype, rngs)
        self.downsample = stride != 1 or in_planes != planes
        self.planes = planes

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = _shortcut_a(x, self.planes) if self.downsample else x
        return nnx.relu(out + shortcut)


class CifarResNet(nnx.Module):
    """ResNet-``depth`` for 32×32 images, ``depth = 6n + 2`` (20, 32, 44, 56, 110, ...).

    Input: NHWC images normalised with :func:`sigmadecomp.data.cifar10_normalize`; output: logits
    ``(N, num_classes)``. Parameters and computation are in ``dtype`` (float32 by default, also
    when x64 is enabled). BatchNorm layers are built in inference mode
    (``use_running_average=True``, running statistics); call ``model.train()`` before fine-tuning
    with batch statistics and ``model.eval()`` to come back.

    >>> model = CifarResNet(20, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 32, 32, 3), jnp.float32)).shape
    (2, 10)
    >>> [path for path, _ in find_layers(model)][:3]  # doctest: +SKIP
    ['conv1', 'layer1.0.conv1', 'layer1.0.conv2']
    """

    def __init__(self, depth: int, *, num_classes: int = 10, dtype=jnp.float32, rngs: nnx.Rngs):
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
                f"got {depth!r}"
            )
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = _conv3x3(3, 16, 1, dtype, rngs)
        self.bn1 = _batch_norm(16, dtype, rngs)
        self.layer1 = self._stage(16, 16, n, 1, dtype, rngs)
        self.layer2 = self._stage(16, 32, n, 2, dtype, rngs)
        self.layer3 = self._stage(32, 64, n, 2, dtype, rngs)
        self.linear = nnx.Linear(64, num_classes, dtype=dtype, param_dtype=dtype, rngs=rngs)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int, dtype, rngs) -> nnx.List:
        blocks = [BasicBlock(in_planes, planes, stride, dtype=dtype, rngs=rngs)]
        blocks += [BasicBlock(planes, planes, 1, dtype=dtype, rngs=rngs) for _ in range(n - 1)]
        return nnx.List(blocks)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"CifarResNet expects NHWC images (N, H, W, 3), got shape {x.shape}; "
                             "transpose NCHW inputs with x.transpose(0, 2, 3, 1)")
        out = nnx.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3):
            for block in stage:
                out = block(out)
        return self.linear(jnp.mean(out, axis=(1, 2)))


def pretrained_resnet(depth: int, weights_path: str | pathlib.Path, *, num_classes: int = 10) -> CifarResNet:
    """A float32 :class:`CifarResNet` of ``depth`` in inference mode, with weights from a PyTorch
    state_dict saved as ``.safetensors`` (or, with torch installed, ``.pt`` / ``.pth``). No random
    initialisation is run: every variable comes from the file (a missing one is an error).

    >>> model = pretrained_resnet(20, "../shared/data/weights/resnet20_cifar10.safetensors")  # doctest: +SKIP
    """
    suffix = pathlib.Path(weights_path).suffix
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"weights_path must end in .safetensors, .pt or .pth, got {str(weights_path)!r}")
    # Abstract (shape-only) construction: random init would compile one RNG kernel per weight
    # shape (~15 s for ResNet-56 on 2 CPU cores) only for the values to be overwritten.
    model = nnx.eval_shape(lambda: CifarResNet(depth, num_classes=num_classes, rngs=nnx.Rngs(0)))
    if suffix == ".safetensors":
        _check_depth(depth, weights_path)
    load = load_safetensors if suffix == ".safetensors" else load_pytorch_checkpoint
    return load(model, weights_path)


def state_dict_depth(names) -> int | None:
    """The CIFAR ResNet depth ``6n+2`` of a state_dict from its tensor names (``n`` = blocks in
    ``layer1``), or ``None`` when the names are not those of such a ResNet."""
    blocks = {int(m.group(1)) for m in map(re.compile(r"(?:module\.)?layer1\.(\d+)\.").match, names) if m}
    return 6 * len(blocks) + 2 if blocks else None


def _check_depth(depth: int, weights_path) -> None:
    """A one-line error when the file holds a ResNet of another depth (before the long list of
    mismatched tensors that :func:`load_state_dict` would give)."""
    from safetensors import safe_open

    path = pathlib.Path(weights_path)
    if not path.is_file():
        return  # load_safetensors says so
    try:
        with safe_open(path, "numpy") as f:
            found = state_dict_depth(list(f.keys()))
    except Exception:  # noqa: BLE001 - not a safetensors file: load_safetensors reports it
        return
    if found is not None and found != depth:
        raise ValueError(f"{path} holds a ResNet-{found} ({(found - 2) // 6} blocks per stage), but a "
                         f"ResNet-{depth} was asked for: use --arch resnet{found} (or the weights of a "
                         f"ResNet-{depth})")
