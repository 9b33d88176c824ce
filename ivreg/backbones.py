"""Backbones: torchvision ResNets with the classifier removed, optionally with the CIFAR stem."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import resnet

from ivreg.errors import ConfigError
from ivreg.norms import BatchNorm2d


def _resnet10(weights: None = None, **kwargs: object) -> resnet.ResNet:
    """One BasicBlock per stage: a cheap ResNet for CPU demos and tests (no weights exist)."""
    return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], **kwargs)  # type: ignore[arg-type]


BACKBONES: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet10": _resnet10,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
}


def build_backbone(
    name: str, cifar_stem: bool = False, stem_padding: int = 2, zero_init_residual: bool = False
) -> nn.Module:
    """A randomly initialised ResNet whose forward returns pooled features (``num_features``).

    Its BatchNorm layers are ``ivreg.norms.BatchNorm2d`` (one kernel launch fewer per layer and
    training call; same statistics, same state_dict keys).

    ``cifar_stem`` replaces the 7x7 stride-2 convolution and max-pool by a 3x3 stride-1
    convolution for 32x32 inputs. The paper's reference pads that convolution by 2 (34x34
    feature maps); ``stem_padding=1`` keeps 32x32 and saves about 13% of the compute.
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone.name '{name}'; choose one of {sorted(BACKBONES)}")
    net = BACKBONES[name](weights=None, zero_init_residual=zero_init_residual, norm_layer=BatchNorm2d)
    net.num_features = net.fc.in_features
    net.fc = nn.Identity()
    if cifar_stem:
        # PyTorch's default Conv2d initialisation, as in the reference (solo-learn swaps the
        # stem in after torchvision's init). The scale matters even before a BatchNorm: it
        # sets the stem's effective learning rate.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=stem_padding, bias=False)
        net.maxpool = nn.Identity()
    return net
