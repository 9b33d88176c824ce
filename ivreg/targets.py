"""Target networks: where the (stop-gradient) targets z' of the loss come from.

``EMATarget`` keeps a copy of the online backbone and projector that follows the online
weights by an exponential moving average with the cosine tau schedule of BYOL.
``StopGradTarget`` is the tau = 0 case (SimSiam-like, the ``*-noema`` configs): the target
*is* the online network under stop-gradient, so it reuses the online projections of the
same views instead of keeping, updating and running a second copy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from ivreg.norms import ViewGroups, run_views


def cosine_tau(step: int, total_steps: int, base_tau: float, final_tau: float) -> float:
    """tau(k) = final - (final - base) (cos(pi k / K) + 1) / 2: base at k=0, final at k=K."""
    if total_steps <= 0:
        return final_tau
    k = min(max(step, 0), total_steps)
    return final_tau - (final_tau - base_tau) * (math.cos(math.pi * k / total_steps) + 1) / 2


class StopGradTarget(nn.Module):
    """Targets are the detached online projections of the same views (tau = 0)."""

    has_copy = False

    def forward(
        self,
        views: torch.Tensor | Sequence[torch.Tensor],
        online_z: torch.Tensor,
        n_views: int,
        groups: ViewGroups | None = None,
    ) -> torch.Tensor:
        """``online_z``: the online projections of all views, concatenated in view order."""
        return online_z.detach()

    def update(self, online_params: Sequence[torch.Tensor], tau: float) -> None:
        """Nothing to update: the target is the online network."""


class EMATarget(nn.Module):
    """A frozen copy of ``online`` (backbone + projector) updated by EMA after each optimizer step.

    The copy runs in the same train/eval mode as the online network, so its BatchNorm layers
    use batch statistics during training, as in BYOL. Only parameters are averaged; the
    copy's BatchNorm running statistics come from its own forward passes.
    """

    has_copy = True

    def __init__(self, online: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(online)
        self.net.requires_grad_(False)

    @torch.no_grad()
    def forward(
        self,
        views: torch.Tensor | Sequence[torch.Tensor],
        online_z: torch.Tensor,
        n_views: int,
        groups: ViewGroups | None = None,
    ) -> torch.Tensor:
        """The copy's projections of all views, concatenated in view order, with per-view
        BatchNorm statistics as the online network had them (see ``ivreg.norms.run_views``)."""
        return run_views(self.net, views, n_views, groups)

    @torch.no_grad()
    def features_and_projections(
        self, views: torch.Tensor | Sequence[torch.Tensor], n_views: int, groups: ViewGroups | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The copy's backbone features and projections of all views, for a readout of the
        copy's features (``net`` must be ``Sequential(backbone, projector)``)."""
        backbone, projector = self.net
        feats = run_views(backbone, views, n_views, groups)
        return feats, run_views(projector, feats, n_views, groups)

    @torch.no_grad()
    def update(self, online_params: Sequence[torch.Tensor], tau: float) -> None:
        """target <- tau * target + (1 - tau) * online, as one fused foreach op.

        ``online_params`` must list the online parameters in the order of ``self.net``'s.
        """
        target_params = list(self.net.parameters())
        if len(target_params) != len(online_params):
            raise RuntimeError("EMA target and online network have different parameter lists")
        torch._foreach_lerp_(target_params, [p.detach() for p in online_params], 1.0 - tau)
