"""Backbones: the CIFAR stem, the feature width and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ivreg.backbones import build_backbone
from ivreg.errors import ConfigError


def layer1_map_size(net: nn.Module, size: int) -> tuple[int, int]:
    """Height and width of layer1's output for a ``size`` x ``size`` input."""
    shapes: list[torch.Size] = []
    handle = net.layer1.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    net(torch.randn(2, 3, size, size))
    handle.remove()
    return tuple(shapes[0][-2:])


def test_cifar_stem_keeps_the_resolution_and_pads_by_two_as_the_reference():
    net = build_backbone("resnet18", cifar_stem=True)
    assert isinstance(net.maxpool, nn.Identity)
    assert (net.conv1.kernel_size, net.conv1.stride, net.conv1.padding) == ((3, 3), (1, 1), (2, 2))
    assert layer1_map_size(net, 32) == (34, 34)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, net.num_features) == (2, 512)


def test_stem_padding_one_gives_32_pixel_maps():
    net = build_backbone("resnet10", cifar_stem=True, stem_padding=1)
    assert layer1_map_size(net, 32) == (32, 32)


def test_cifar_stem_has_the_default_conv_initialisation():
    # kaiming_uniform(a=sqrt(5)): uniform on +-1/sqrt(fan_in), std 1/sqrt(3 fan_in), fan_in 27.
    torch.manual_seed(0)
    w = build_backbone("resnet18", cifar_stem=True).conv1.weight.detach()
    bound = 1 / math.sqrt(27)
    assert w.abs().max() <= bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_imagenet_stem_is_torchvisions():
    net = build_backbone("resnet18")
    assert net.conv1.kernel_size == (7, 7) and isinstance(net.maxpool, nn.MaxPool2d)
    assert build_backbone("resnet50").num_features == 2048


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ConfigError, match="unknown backbone.name 'vit'.*resnet18"):
        build_backbone("vit")
