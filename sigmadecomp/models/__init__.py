"""CIFAR ResNets in Flax NNX, PyTorch weight import and evaluation.

* :class:`CifarResNet` — ResNet-(6n+2) with option-A shortcuts; layer paths mirror PyTorch names;
* :func:`load_state_dict`, :func:`load_safetensors`, :func:`load_pytorch_checkpoint` — the only
  place where PyTorch layouts (OIHW conv, ``(out, in)`` linear) become Flax layouts;
* :func:`pretrained_resnet` — a ready model from a weights file;
* :class:`SmallCNN` — a small CNN for 8×8 digits (``sigmadecomp demo``);
* :func:`evaluate` — top-1 accuracy with one jitted forward pass.
"""

from sigmadecomp.models._evaluate import Accuracy, evaluate
from sigmadecomp.models._pytorch_import import load_pytorch_checkpoint, load_safetensors, load_state_dict
from sigmadecomp.models._resnet import BasicBlock, CifarResNet, pretrained_resnet
from sigmadecomp.models._small_cnn import SmallCNN

__all__ = [
    "Accuracy",
    "BasicBlock",
    "CifarResNet",
    "SmallCNN",
    "evaluate",
    "load_pytorch_checkpoint",
    "load_safetensors",
    "load_state_dict",
    "pretrained_resnet",
]
