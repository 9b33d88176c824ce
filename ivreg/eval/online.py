"""What the online evaluations during pretraining share (the kNN of ``ivreg.eval.knn`` and the
2-D map of ``ivreg.analysis.online_umap``): when they are due, and the features of the data
module's non-augmented splits, extracted on every DDP rank and gathered."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch.utils.data import Subset

from ivreg.data.augment import build_eval_transform
from ivreg.data.datamodule import seeded_sample
from ivreg.data.datasets import Transformed
from ivreg.errors import DataError
from ivreg.eval.common import extract_features, labelled_only


def due_after_validation(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """Whether an every-``every_n_epochs`` online evaluation runs after this validation: at
    epochs n, 2n, ... and the last one, never in the sanity check."""
    done = trainer.current_epoch + 1
    return not trainer.sanity_checking and (done % every_n_epochs == 0 or done == trainer.max_epochs)


def split_features(
    trainer: L.Trainer, pl_module: L.LightningModule, split: str, limit: int | None, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of the labelled images of the data module's raw ``train``
    or ``val`` split (all, or the ``seeded_sample`` of ``limit``: the same images every epoch)
    through the evaluation transform, gathered from every DDP rank (each extracts its share).

    Reads the split's tensors on the device where the pipeline keeps them there
    (``eval_batches``), else the images through DataLoader workers. Every rank must call it
    (it is a collective under DDP)."""
    dm = trainer.datamodule
    rank, world = trainer.global_rank, trainer.world_size
    raw = getattr(dm, f"raw_{split}", None) if dm is not None else None
    if raw is None:
        raise DataError(f"online evaluation needs a data module with raw_{split} (the non-augmented {split} split)")
    with trainer.precision_plugin.forward_context():
        resident = dm.eval_batches(split, batch_size, rank, world, limit) if hasattr(dm, "eval_batches") else None
        if resident is not None:
            source: Any = resident
        else:
            labelled = Transformed(labelled_only(raw), build_eval_transform(dm.crop_size, dm.mean, dm.std))
            sample = seeded_sample(len(labelled), limit, int(getattr(dm, "seed", 0)))
            positions = range(len(labelled)) if sample is None else sample.tolist()
            source = Subset(labelled, positions[rank::world]) if world > 1 or sample is not None else labelled
        x, y = extract_features(pl_module.backbone, source, batch_size, int(getattr(dm, "num_workers", 0)))
    if world > 1:
        x, y = gather_rows(x), gather_rows(y)
    return x, y


def images_seen(limit: float | int, batches: float | int, dm: Any, world: int, at_least: int) -> int | None:
    """How many images of a split the online kNN encodes: under ``limit_train_batches`` /
    ``limit_val_batches`` as many as that loop sees per epoch (a seeded sample, the same every
    epoch; for validation the very images it evaluated), else all (None). solo-learn's kNN,
    built from the batches of the epoch, is limited likewise; encoding all of ImageNet after a
    quick limited run cost more than the run."""
    if (isinstance(limit, float) and limit == 1.0) or not math.isfinite(batches):
        return None
    return max(int(batches) * int(getattr(dm, "batch_size", 1)) * world, at_least)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` from every DDP rank, concatenated in rank order (the ranks may hold
    different numbers of rows: torchmetrics' gather pads and trims them)."""
    from torchmetrics.utilities.distributed import gather_all_tensors

    return torch.cat(gather_all_tensors(x))
