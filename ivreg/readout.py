"""Online linear readout: a classifier on detached backbone features, trained alongside SSL.

It never sends gradients into the backbone, so it measures the representation without
shaping it. Samples labelled -1 (STL-10's unlabelled split) are ignored.

With ``batchnorm`` (the default) the features are standardised by a BatchNorm without
affine parameters before the linear layer, as in MAE's linear probing; the readout stays a
linear map of the features. The reference feeds raw features to the linear layer, but the
cosine-type losses let feature norms grow by orders of magnitude during training (on
CIFAR-10, IsoLoss without EMA reached ||z||^2 ~ 4e5 within 9 epochs), and a raw readout at
lr 0.1 then diverges (cross-entropy ~30) and reports chance accuracy for a representation
that is not at chance. ``readout.batchnorm=False`` restores the reference's readout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from ivreg.norms import BatchNorm1d

IGNORE_LABEL = -1


class OnlineReadout(nn.Module):
    """Linear(num_features, num_classes) trained with cross-entropy on detached features."""

    def __init__(self, num_features: int, num_classes: int, batchnorm: bool = True):
        super().__init__()
        self.norm = BatchNorm1d(num_features, affine=False) if batchnorm else nn.Identity()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(feats.detach()))

    def loss_and_hits(
        self, feats: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy over labelled samples, top-1 hits and the labelled count (all tensors,
        so nothing syncs with the host)."""
        logits = self(feats).float()
        labelled = labels != IGNORE_LABEL
        count = labelled.sum()
        # Sum then divide, so that an all-unlabelled batch gives 0 instead of NaN.
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, reduction="sum") / count.clamp_min(1)
        return loss, top_k_hits(logits, labels, 1).sum(), count


def top_k_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, whether the label is among the ``k`` largest logits (never for label -1)."""
    return (logits.topk(min(k, logits.shape[1]), dim=1).indices == labels[:, None]).any(dim=1)


class LabelledMean(Metric):
    """The mean of per-image values over the labelled images (label >= 0) of an epoch, summed
    over the DDP ranks' uneven shares at ``compute`` (NaN without labelled images).

    Hand-written, a sum and a count, so that a validation step never waits for the device:
    torchmetrics' ``MulticlassAccuracy`` checks the labels (``unique``) and ``MeanMetric``
    checks for NaNs (``any``) at every update, and their ways to skip unlabelled images index
    with a boolean mask, each a host-device synchronisation."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        labelled = labels != IGNORE_LABEL
        self.total += torch.where(labelled, values.float(), 0.0).sum()
        self.count += labelled.sum()

    def compute(self) -> torch.Tensor:
        return self.total / self.count
