"""Backbones: torchvision ResNets with the classifier removed, optionally with the CIFAR stem,
and any timm model (``timm:<model>``, with ``pip install 'ivreg[timm]'``)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from torch import nn
from torchvision.models import resnet

from ivreg.errors import ConfigError
from ivreg.norms import BatchNorm2d, uncount_batchnorms


def _resnet10(weights: None = None, **kwargs: object) -> resnet.ResNet:
    """One BasicBlock per stage: a cheap ResNet for CPU demos and tests (no weights exist)."""
    return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], **kwargs)  # type: ignore[arg-type]


BACKBONES: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet10": _resnet10,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
}


TIMM_PREFIX = "timm:"
# backbone.kwargs of the torchvision ResNets, with the values that leave them unused
RESNET_OPTIONS: dict[str, tuple[Any, ...]] = {
    "cifar_stem": (None, False),
    "stem_padding": (2,),
    "zero_init_residual": (False,),
}


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def _import_timm(name: str) -> ModuleType:
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(f"backbone.name={name} needs timm: pip install 'ivreg[timm]'") from exc
    return timm


def check_backbone_name(name: str) -> None:
    """Raise ConfigError unless ``name`` is a torchvision ResNet here or a model timm has."""
    if is_timm(name):
        model = name.removeprefix(TIMM_PREFIX)
        timm = _import_timm(name)
        if not timm.is_model(model):
            # names that start with it (vit_small -> vit_small_patch16_224, ...), else similar ones
            close = timm.list_models(f"{model}*")[:3] or difflib.get_close_matches(model, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
            raise ConfigError(f"timm has no model '{model}' (backbone.name={name}){hint}")
    elif name not in BACKBONES:
        raise ConfigError(
            f"unknown backbone.name '{name}'; choose one of {sorted(BACKBONES)} or timm:<model> (any timm model)"
        )


def build_backbone(
    name: str, cifar_stem: bool = False, stem_padding: int = 2, zero_init_residual: bool = False, **model_kwargs: Any
) -> nn.Module:
    """A randomly initialised backbone whose forward returns pooled features (``num_features``).

    The torchvision ResNets (``BACKBONES``) get ``ivreg.norms.BatchNorm2d`` layers (one kernel
    launch fewer per layer and training call; same statistics, same state_dict keys).
    ``cifar_stem`` replaces their 7x7 stride-2 convolution and max-pool by a 3x3 stride-1
    convolution for 32x32 inputs. The paper's reference pads that convolution by 2 (34x34
    feature maps); ``stem_padding=1`` keeps 32x32 and saves about 13% of the compute.

    ``timm:<model>`` is that timm model without its classifier (``num_classes=0``), built with
    ``model_kwargs`` (e.g. ``img_size=32, patch_size=4`` for a ViT on CIFAR), its plain
    BatchNorm layers swapped for ``ivreg.norms``' as well; the ResNet options keep their
    defaults there.
    """
    check_backbone_name(name)
    resnet_options = {"cifar_stem": cifar_stem, "stem_padding": stem_padding, "zero_init_residual": zero_init_residual}
    if is_timm(name):
        return _timm_backbone(name, resnet_options, model_kwargs)
    if model_kwargs:
        raise ConfigError(
            f"backbone.kwargs {sorted(model_kwargs)} are not options of the torchvision {name}; "
            f"it takes {sorted(RESNET_OPTIONS)}"
        )
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


def _timm_backbone(name: str, resnet_options: dict[str, Any], model_kwargs: dict[str, Any]) -> nn.Module:
    """timm's model, its plain BatchNorm layers swapped for ``ivreg.norms``' (per-view
    statistics when all views share one pass; the same state_dict keys)."""
    for key, value in resnet_options.items():
        if value not in RESNET_OPTIONS[key]:
            raise ConfigError(
                f"backbone.kwargs.{key} applies to the torchvision ResNets, not to {name}; a timm model "
                "takes its own arguments in backbone.kwargs (e.g. img_size and patch_size for a ViT)"
            )
    timm = _import_timm(name)
    try:
        net = timm.create_model(name.removeprefix(TIMM_PREFIX), pretrained=False, num_classes=0, **model_kwargs)
    except TypeError as exc:  # an argument the model does not take
        raise ConfigError(f"cannot build {name} with backbone.kwargs {model_kwargs}: {exc}") from exc
    return uncount_batchnorms(net)
