"""Weighted k-nearest-neighbour classification of frozen backbone features.

The bank is the features of the non-augmented (labelled) training set; each test image
votes for the classes of its k nearest bank features, weighted by closeness:

* ``cosine`` (default): features are L2-normalised, closeness is the cosine similarity s,
  and a neighbour's weight is ``exp(s / T)`` (Wu et al. 2018, InstDisc; also solo-learn's).
* ``euclidean``: closeness is the Euclidean distance d between raw features, and the weight
  is ``1 / (d + 1e-8)``. Inverse distance is scale-free, so no temperature is needed for
  features whose norm depends on the method; ``temperature`` is ignored here.

Several k (and temperatures) are evaluated from one search for the largest k, since the
k nearest neighbours are the first k of the max(k) nearest. The search runs over blocks of
test rows against blocks of the bank, keeping a running top-k, so memory stays at
``test_chunk_size x (bank_chunk_size + max(k))`` whatever the dataset size.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ivreg.config import check_value_types, launch_config, merged_with_defaults, warn_unread_keys
from ivreg.errors import ConfigError, DataError
from ivreg.eval.common import (
    EVAL_DATA_DEFAULTS,
    default_device,
    eval_data_config,
    eval_datasets,
    eval_view,
    extract_features,
    foreign_description,
)
from ivreg.eval.online import due_after_validation, images_seen, split_features

DISTANCES = ("cosine", "euclidean")
EUCLIDEAN_EPS = 1e-8


@dataclass(frozen=True)
class KNNResult:
    """Accuracies (%) of one (k, temperature) setting of one distance (and kind of features)."""

    k: int
    temperature: float
    distance: str
    acc1: float
    acc5: float
    features: str = "backbone"  # (main_knn.py) backbone features or the projections z


def check_knn_args(ks: Sequence[int], temperatures: Sequence[float], distance: str, bank_size: int) -> None:
    """Raise ConfigError for settings that cannot work, before any feature is computed."""
    if distance not in DISTANCES:
        raise ConfigError(f"unknown kNN distance '{distance}'; choose one of {list(DISTANCES)}")
    if not ks:
        raise ConfigError("k must name at least one number of neighbours")
    for k in ks:
        if int(k) < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        if int(k) > bank_size:
            raise ConfigError(
                f"k={k} is larger than the feature bank ({bank_size} labelled training images); choose k <= {bank_size}"
            )
    if distance == "cosine":
        if not temperatures:
            raise ConfigError("temperature must name at least one value")
        for t in temperatures:
            if not float(t) > 0:
                raise ConfigError(f"temperature must be > 0, got {t}")


def nearest(
    bank: torch.Tensor, queries: torch.Tensor, k: int, distance: str, bank_chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closeness (cosine similarity, or minus the Euclidean distance) and bank indices of the
    ``k`` nearest bank rows of every query, nearest first. ``bank`` and ``queries`` must already
    be L2-normalised for cosine."""
    best_c = queries.new_empty((len(queries), 0))
    best_i = torch.empty((len(queries), 0), dtype=torch.long, device=queries.device)
    for start in range(0, len(bank), bank_chunk_size):
        block = bank[start : start + bank_chunk_size]
        if distance == "cosine":
            closeness = queries @ block.T
        else:
            closeness = -torch.cdist(queries, block).clamp_min(0)
        c, i = closeness.topk(min(k, block.shape[0]), dim=1)
        merged_c, merged_i = torch.cat([best_c, c], dim=1), torch.cat([best_i, i + start], dim=1)
        best_c, pos = merged_c.topk(min(k, merged_c.shape[1]), dim=1)
        best_i = merged_i.gather(1, pos)
    return best_c, best_i


def neighbour_weights(closeness: torch.Tensor, temperature: float, distance: str) -> torch.Tensor:
    """Vote weights: ``exp(s / T)`` for cosine similarity s, ``1 / (d + eps)`` for distance d."""
    if distance == "cosine":
        return (closeness / temperature).exp()
    return 1.0 / ((-closeness).clamp_min(0) + EUCLIDEAN_EPS)


def vote(
    closeness: torch.Tensor,
    neighbour_labels: torch.Tensor,
    k: int,
    temperature: float,
    distance: str,
    num_classes: int,
) -> torch.Tensor:
    """Class scores ``(queries, num_classes)``: the summed weights of the first k neighbours per class."""
    weights = neighbour_weights(closeness[:, :k], temperature, distance)
    scores = torch.zeros(len(closeness), num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels[:, :k], weights)


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int,
    temperature: float = 0.07,
    distance: str = "cosine",
    num_classes: int | None = None,
) -> torch.Tensor:
    """Class scores of every test row (no chunking over the test set: for small sets and tests)."""
    check_knn_args([k], [temperature], distance, len(train_feats))
    num_classes = num_classes or int(train_labels.max()) + 1
    bank, queries = _prepare(train_feats, test_feats, distance)
    closeness, idx = nearest(bank, queries, k, distance)
    return vote(closeness, train_labels[idx], k, temperature, distance, num_classes)


def _prepare(train_feats: torch.Tensor, test_feats: torch.Tensor, distance: str) -> tuple[torch.Tensor, torch.Tensor]:
    train_feats, test_feats = train_feats.float(), test_feats.float()
    if distance == "cosine":
        return F.normalize(train_feats, dim=1), F.normalize(test_feats, dim=1)
    return train_feats, test_feats


@torch.no_grad()
def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (20,),
    temperatures: Sequence[float] = (0.07,),
    distance: str = "cosine",
    num_classes: int | None = None,
    test_chunk_size: int = 1024,
    bank_chunk_size: int = 65536,
) -> list[KNNResult]:
    """Top-1/top-5 accuracy (%) for every (k, temperature), from one search for max(k). The
    top 5 are the (at most 5) classes with the largest votes among those the k neighbours
    hold: with fewer than 5 such classes, e.g. k < 5, unvoted classes do not fill it up."""
    ks = list(dict.fromkeys(int(k) for k in ks))
    temps = list(dict.fromkeys(float(t) for t in temperatures)) if distance == "cosine" else [math.nan]
    check_knn_args(ks, temps if distance == "cosine" else [], distance, len(train_feats))
    if len(test_feats) == 0:
        raise DataError("the test set is empty")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    top = min(5, num_classes)
    bank, queries = _prepare(train_feats, test_feats, distance)
    train_labels = train_labels.to(bank.device)
    settings = [(k, t) for k in ks for t in temps]
    hits1, hits5 = [0] * len(settings), [0] * len(settings)
    for start in range(0, len(queries), test_chunk_size):
        chunk = queries[start : start + test_chunk_size]
        y = test_labels[start : start + test_chunk_size].to(chunk.device)
        closeness, idx = nearest(bank, chunk, max(ks), distance, bank_chunk_size)
        neighbour_labels = train_labels[idx]
        for j, (k, t) in enumerate(settings):
            votes, ranked = vote(closeness, neighbour_labels, k, t, distance, num_classes).topk(top, dim=1)
            hits1[j] += int((ranked[:, 0] == y).sum())
            # a class no neighbour voted for is not among the top 5, whatever topk's tie order
            hits5[j] += int(((ranked == y[:, None]) & (votes > 0)).any(dim=1).sum())
    n = len(queries)
    return [KNNResult(k, t, distance, 100.0 * h1 / n, 100.0 * h5 / n) for (k, t), h1, h5 in zip(settings, hits1, hits5)]


# --------------------------------------------------------------------------------- main_knn
KNN_DEFAULTS: dict[str, Any] = {
    "pretrained_feature_extractor": None,
    "k": [10, 20, 100, 200],
    "temperature": 0.07,
    "distance": "cosine",
    "features": "backbone",  # or projector: the projections z the loss saw (solo-learn's feature_type)
    "batch_size": 256,
    "test_chunk_size": 1024,
    "bank_chunk_size": 65536,
    "accelerator": "auto",
    "seed": 5,
    "out": None,
    # for a checkpoint another library wrote (no ivreg config inside): backbone.name (and
    # kwargs), with data.dataset and its paths
    "backbone": None,
    "data": EVAL_DATA_DEFAULTS,
}


FEATURES = ("backbone", "projector")


def _as_list(value: Any) -> list:
    if OmegaConf.is_list(value):
        return list(OmegaConf.to_object(value))  # type: ignore[arg-type]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def format_results(results: Sequence[KNNResult]) -> str:
    """A small fixed-width table, one row per (k, temperature)."""
    lines = [f"{'k':>6} {'T':>7} {'acc1':>7} {'acc5':>7}"]
    for r in results:
        t = "-" if math.isnan(r.temperature) else f"{r.temperature:g}"
        lines.append(f"{r.k:>6} {t:>7} {r.acc1:7.2f} {r.acc5:7.2f}")
    return "\n".join(lines)


def write_results(path: Path, results: Sequence[KNNResult], extra: Mapping[str, Any]) -> None:
    """The results as a CSV file, written atomically (a reader never sees half a table)."""
    from ivreg.callbacks import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**extra, "features": r.features, **asdict(r)} for r in results]

    def write(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write)


def run_knn(cfg: DictConfig | Mapping[str, Any]) -> list[KNNResult]:
    """``main_knn.py``: features of a checkpoint's backbone on the train (bank) and test splits,
    then weighted kNN for every k and temperature, for every distance and kind of features
    (``distance`` and ``features`` may be lists, as solo-learn's ``distance_function`` and
    ``feature_type``: the images are encoded once). Prints a table per distance and kind of
    features; writes ``out`` (CSV) if set."""
    from ivreg.checkpoints import load_backbone_and_config, load_projector

    user = launch_config(cfg)
    warn_unread_keys(user, defaults=KNN_DEFAULTS, closed=("data",), top_level={*KNN_DEFAULTS, "defaults"})
    cfg = merged_with_defaults(user, KNN_DEFAULTS)
    check_value_types(cfg, KNN_DEFAULTS, flexible=("temperature",))
    ckpt = cfg.pretrained_feature_extractor
    if not ckpt:
        raise ConfigError("set pretrained_feature_extractor=<path to a pretraining checkpoint or run folder>")
    ks, temps = _as_list(cfg.k), _as_list(cfg.temperature)
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise ConfigError(f"k must be a whole number or a list of them, e.g. [10,20], got {ks}")
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in temps):
        raise ConfigError(f"temperature must be a number or a list of them, got {temps}")
    distances = list(dict.fromkeys(str(d) for d in _as_list(cfg.distance)))
    kinds = list(dict.fromkeys(str(f) for f in _as_list(cfg.features)))
    if not distances or not kinds:
        raise ConfigError("distance and features must each name at least one, e.g. distance=cosine features=backbone")
    for distance in distances:  # names and signs; the bank comes below
        check_knn_args(ks, temps, distance, bank_size=max(ks, default=1))
    for kind in kinds:
        if kind not in FEATURES:
            raise ConfigError(f"unknown features '{kind}'; choose one of {list(FEATURES)} (or a list of them)")
    device = default_device(str(cfg.accelerator))

    foreign = foreign_description(cfg)
    backbone, pretrain_cfg = load_backbone_and_config(str(ckpt), map_location=device, pretraining=True, foreign=foreign)
    projector = None  # (read before any image is encoded: a checkpoint without one fails at once)
    if "projector" in kinds and pretrain_cfg.get("foreign_checkpoint"):
        raise ConfigError(
            f"features=projector needs the projector's shape from an ivreg config, which {ckpt} (another "
            "library's checkpoint) lacks; use features=backbone"
        )
    if "projector" in kinds:
        projector = load_projector(str(ckpt), pretrain_cfg, int(backbone.num_features), map_location=device)
    data = eval_data_config(pretrain_cfg, OmegaConf.to_object(cfg.data))  # type: ignore[arg-type]
    train, val, num_classes = eval_datasets(data, int(cfg.seed))
    for distance in distances:
        check_knn_args(ks, temps, distance, bank_size=len(train))  # type: ignore[arg-type]

    batch, workers = int(cfg.batch_size), int(data["num_workers"])
    train_x, train_y = extract_features(backbone, eval_view(train, data), batch, workers, device)
    test_x, test_y = extract_features(backbone, eval_view(val, data), batch, workers, device)
    banks = {"backbone": (train_x, test_x)}
    if projector is not None:  # z = projector(backbone(x)), from the features already encoded
        banks["projector"] = (_projected(projector, train_x, batch), _projected(projector, test_x, batch))
    results: list[KNNResult] = []
    report = int(os.environ.get("RANK", "0")) == 0  # launched by torchrun: every process computes, one reports
    for kind in kinds:
        bank, queries = banks[kind]
        for distance in distances:
            found = knn_accuracy(
                bank,
                train_y,
                queries,
                test_y,
                ks,
                temps,
                distance,
                num_classes,
                int(cfg.test_chunk_size),
                int(cfg.bank_chunk_size),
            )
            found = [replace(r, features=kind) for r in found]
            results += found
            if report:
                print(
                    f"kNN ({distance}) on {data['dataset']}: {len(bank)} train / {len(queries)} test images, "
                    f"{kind} features of {ckpt}\n{format_results(found)}",
                    flush=True,
                )
    if report and cfg.out:
        write_results(Path(str(cfg.out)).expanduser(), results, {"checkpoint": str(ckpt), "dataset": data["dataset"]})
    return results


@torch.no_grad()
def _projected(projector: torch.nn.Module, feats: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``projector`` (in eval mode) on rows of backbone features, ``batch_size`` at a time."""
    projector.eval()
    return torch.cat([projector(chunk).float() for chunk in feats.split(batch_size)])


# ------------------------------------------------------------------------------ online kNN
class OnlineKNN(L.Callback):
    """kNN accuracy of the backbone during pretraining, logged as ``val_knn_acc1`` (and
    ``val_knn_acc5``) after validation every ``every_n_epochs`` epochs and after the last one.

    Uses the data module's raw (non-augmented) train and validation sets
    (``raw_train``, ``raw_val``, ``crop_size``, ``mean``, ``std``) through the evaluation
    transform, read by DataLoader workers, or, where the pipeline keeps a split on the device
    (``data.pipeline=resident``), that split's tensors there (``eval_batches``): on a GPU this
    avoids decoding both splits again every epoch. Under DDP each rank extracts the features
    of its share of both splits and all ranks gather them (each holds the whole bank, as
    rank 0 alone did before: 2.6 GB of float32 for ImageNet's 1.28M images), so the cost
    shrinks with the number of GPUs and no rank waits alone in a collective.
    """

    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        every_n_epochs: int = 1,
        distance: str = "cosine",
        batch_size: int = 256,
    ):
        check_knn_args([int(k)], [float(temperature)], distance, bank_size=int(k))
        self.k = int(k)
        self.temperature = float(temperature)
        self.every_n_epochs = max(int(every_n_epochs), 1)
        self.distance = distance
        self.batch_size = int(batch_size)
        self.bank_size = 0  # images in the last feature bank (all ranks')
        self.query_size = 0  # validation images it classified

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning keeps a metric in callback_metrics until it is logged again: an epoch the
        # kNN skips would show (in epochs.csv) the accuracy of the last epoch it ran
        for key in ("val_knn_acc1", "val_knn_acc5"):
            trainer.callback_metrics.pop(key, None)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not due_after_validation(trainer, self.every_n_epochs):
            return
        dm = trainer.datamodule  # (split_features names a data module without raw splits)
        world = trainer.world_size
        limits = {
            "train": images_seen(trainer.limit_train_batches, trainer.num_training_batches, dm, world, self.k),
            "val": images_seen(trainer.limit_val_batches, sum(trainer.num_val_batches), dm, world, 1),
        }
        train_x, train_y = split_features(trainer, pl_module, "train", limits["train"], self.batch_size)
        test_x, test_y = split_features(trainer, pl_module, "val", limits["val"], self.batch_size)
        self.bank_size, self.query_size = len(train_x), len(test_x)
        num_classes = getattr(dm, "num_classes", None)
        (result,) = knn_accuracy(
            train_x, train_y, test_x, test_y, [self.k], [self.temperature], self.distance, num_classes
        )
        # the same gathered features, so the same value, on every rank
        pl_module.log("val_knn_acc1", result.acc1)
        pl_module.log("val_knn_acc5", result.acc5)
