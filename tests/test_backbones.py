"""Backbones: the CIFAR stem, the feature width and the errors."""

from __future__ import annotations

import math
import sys

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


# ------------------------------------------------------------------------------ timm models
def test_timm_resnet_gets_per_view_batchnorms_with_timms_weights_and_keys():
    timm = pytest.importorskip("timm")
    from ivreg.norms import BatchNorm2d

    torch.manual_seed(0)
    net = build_backbone("timm:resnet18")
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=0)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(type(m) is BatchNorm2d for m in bns)
    assert net.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), plain.eval()(x))
    assert net(x).shape == (4, net.num_features) == (4, 512)


def test_timm_vit_takes_its_own_arguments():
    pytest.importorskip("timm")
    net = build_backbone("timm:vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, net.num_features) == (2, 192)


def test_timm_errors_name_the_problem(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match="timm has no model 'resnet181'.*did you mean timm:resnet18"):
        build_backbone("timm:resnet181")
    with pytest.raises(ConfigError, match="cifar_stem applies to the torchvision ResNets, not to timm:resnet18"):
        build_backbone("timm:resnet18", cifar_stem=True)
    with pytest.raises(ConfigError, match="cannot build timm:resnet18 with backbone.kwargs.*bogus"):
        build_backbone("timm:resnet18", bogus=1)
    with pytest.raises(ConfigError, match=r"\['img_size'\] are not options of the torchvision resnet18"):
        build_backbone("resnet18", img_size=32)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"timm:resnet18 needs timm: pip install 'ivreg\[timm\]'"):
        build_backbone("timm:resnet18")
