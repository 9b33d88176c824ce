"""BatchNorm layers for two-view training: no ``num_batches_tracked`` count, per-view statistics.

``nn.BatchNorm*`` adds 1 to ``num_batches_tracked`` in every training forward: one more
kernel launch per layer and call, 43 per IsoLoss step and 87 per BYOL step with ResNet-18
(about 3% and 6% of a step's launches, which bound the step on a fast GPU). The counter is
read only with ``momentum=None`` (a cumulative average of the batch statistics); with a
momentum, as everywhere here, nothing reads it. These subclasses leave it at its value (the
buffer stays, so checkpoints keep torchvision's keys) and update the running statistics
exactly as the parent does. With ``momentum=None`` they are the parent.

They also let one network call carry all views of a step. The reference runs each view
through the network on its own, so every BatchNorm normalises each view with that view's
statistics and updates its running statistics once per view. When a layer's ``view_groups``
(a ``ViewGroups`` shared by the layers of a model) says a training batch holds n views
concatenated in view order, the layer normalises each of the n chunks on its own, in view
order: the same outputs and running statistics as n calls, while the convolutions, ReLUs
and residual additions around it run once on the whole batch, and the gradients of the
weights come out summed instead of being added up view by view.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ViewGroups:
    """How many views of equal size the batches of the next training calls hold (1: one view).

    ``SSLMethod`` sets ``count`` around the calls that carry all views and resets it to 1."""

    def __init__(self) -> None:
        self.count = 1


class _UncountedBatchNorm(nn.modules.batchnorm._BatchNorm):
    view_groups: ViewGroups | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.view_groups.count if self.view_groups is not None else 1
        if groups > 1 and self.training:
            return torch.cat([self._forward_one(chunk) for chunk in x.chunk(groups)])
        return self._forward_one(x)

    def _forward_one(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self.momentum is not None):
            return super().forward(x)
        self._check_input_dim(x)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum, self.eps
        )


class BatchNorm1d(_UncountedBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` without the training-time ``num_batches_tracked`` increment."""


class BatchNorm2d(_UncountedBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` without the training-time ``num_batches_tracked`` increment."""


def share_view_groups(modules: list[nn.Module], groups: ViewGroups) -> None:
    """Point every BatchNorm of ``modules`` at ``groups``."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, _UncountedBatchNorm):
                layer.view_groups = groups


def follows_view_groups(modules: list[nn.Module], groups: ViewGroups) -> bool:
    """Whether every BatchNorm of ``modules`` keeps per-view statistics through ``groups``
    (not so after Lightning swaps them for ``SyncBatchNorm``, for example)."""
    return all(
        isinstance(layer, _UncountedBatchNorm) and layer.view_groups is groups
        for module in modules
        for layer in module.modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm)
    )


def run_views(
    module: nn.Module, views: torch.Tensor | Sequence[torch.Tensor], n_views: int, groups: ViewGroups | None
) -> torch.Tensor:
    """``module`` on every view, outputs concatenated in view order.

    ``views`` is the views concatenated in view order (or a list of views, when their sizes
    differ). With ``groups`` (shared by ``module``'s BatchNorm layers) and concatenated views
    this is one call, each BatchNorm keeping per-view statistics; otherwise one call per view.
    """
    if isinstance(views, torch.Tensor) and groups is not None:
        groups.count = n_views
        out = module(views)
        groups.count = 1
        return out
    chunks = views.chunk(n_views) if isinstance(views, torch.Tensor) else views
    return torch.cat([module(chunk) for chunk in chunks])


_UNCOUNTED = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d}


def uncount_batchnorms(module: nn.Module) -> nn.Module:
    """Swap every plain ``nn.BatchNorm1d``/``2d`` inside ``module`` for this module's version,
    with the same weights, buffers and state_dict keys (for networks built elsewhere, such as
    timm's). Subclasses (timm's ``BatchNormAct2d`` adds an activation) are left as they are:
    with those a step runs view by view, as ``follows_view_groups`` then says."""
    for name, child in module.named_children():
        swap = _UNCOUNTED.get(type(child))
        if swap is None:
            uncount_batchnorms(child)
            continue
        like = next(itertools.chain(child.parameters(), child.buffers()), None)
        factory = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        twin = swap(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats, **factory)
        twin.load_state_dict(child.state_dict())
        twin.train(child.training)
        setattr(module, name, twin)
    return module
