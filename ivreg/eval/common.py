"""What the evaluations (linear, kNN, UMAP) share: which data to evaluate on, and features.

The evaluation data default to those of the pretraining run, read from the checkpoint's
config, so that ``pretrained_feature_extractor=<ckpt>`` alone is enough; every non-null
``data.*`` key given on the command line replaces the inherited one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ivreg.config import check_data_format
from ivreg.data.augment import build_eval_transform
from ivreg.data.datasets import (
    Transformed,
    build_dataset,
    check_normalisation,
    check_same_classes,
    dataset_info,
    labels_of,
    num_classes_of,
    subset_fraction,
)
from ivreg.errors import ConfigError, DataError

# Keys of the pretraining run's ``data`` section an evaluation inherits. ``fraction`` is not
# among them: a pretraining subset says nothing about how many labels the probe may use.
INHERITED_DATA_KEYS = ("dataset", "train_path", "val_path", "format", "download", "num_workers", "mean", "std")

# The ``data`` section of an evaluation config: None means "as in the pretraining run"
# (crop_size: the first pretraining view's; fraction: all labelled training images).
EVAL_DATA_DEFAULTS: dict[str, Any] = {
    key: None
    for key in (
        "dataset",
        "train_path",
        "val_path",
        "format",
        "download",
        "num_workers",
        "crop_size",
        "mean",
        "std",
        "fraction",
        "fraction_draw",
    )
}


def foreign_description(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """What describes a checkpoint another library wrote (it holds no ivreg config, see
    ``ivreg.checkpoints.load_backbone_and_config``): an evaluation config's ``backbone``
    section and ``data.dataset``, when both are given."""
    backbone = cfg.get("backbone")
    dataset = (cfg.get("data") or {}).get("dataset")
    if not isinstance(backbone, Mapping) or not backbone.get("name") or not dataset:
        return None
    plain = OmegaConf.to_object(backbone) if isinstance(backbone, DictConfig) else dict(backbone)
    return {"backbone": plain, "data": {"dataset": dataset}}


def pretrain_crop_size(pretrain_cfg: Mapping[str, Any]) -> int:
    """The crop size of the first pretraining view (what the backbone saw); 224 if unknown."""
    augs = pretrain_cfg.get("augmentations") or []
    if augs and isinstance(augs[0], Mapping) and augs[0].get("crop_size"):
        return int(augs[0]["crop_size"])
    size = dataset_info(str(pretrain_cfg["data"]["dataset"])).image_size
    return int(size or 224)


def eval_data_config(pretrain_cfg: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``data`` settings of an evaluation: inherited from pretraining, then overridden.

    Returns dataset, train_path, val_path, format, download, num_workers, crop_size, mean, std and
    fraction, all resolved (mean/std from the dataset when neither config sets them).
    """
    base = pretrain_cfg.get("data") or {}
    data: dict[str, Any] = {k: base.get(k) for k in INHERITED_DATA_KEYS}
    data.update({"crop_size": pretrain_crop_size(pretrain_cfg), "fraction": 1.0, "fraction_draw": "per_class"})
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    data.update(given)
    if not data.get("dataset"):
        raise ConfigError("no dataset to evaluate on: the checkpoint's config names none; set data.dataset")
    paths = [key for key in ("train_path", "val_path") if data.get(key) is not None and key not in given]
    if base.get("dataset") and data["dataset"] != base["dataset"] and paths:
        # the pretraining run's folders hold its own dataset: read as another, they give wrong figures
        raise ConfigError(
            f"data.dataset={data['dataset']} differs from the pretraining run's {base['dataset']}, whose "
            f"{' and '.join(f'data.{k}={data[k]}' for k in paths)} this evaluation would read; set "
            f"{' and '.join(f'data.{k}' for k in paths)} to the {data['dataset']} folders"
        )
    info = dataset_info(str(data["dataset"]))
    data["format"] = data.get("format") or "image_folder"
    check_data_format(data)
    check_normalisation(data.get("mean"), data.get("std"))
    data["mean"] = [float(x) for x in (data.get("mean") or info.mean)]
    data["std"] = [float(x) for x in (data.get("std") or info.std)]
    data["crop_size"] = int(data["crop_size"])
    data["num_workers"] = int(data.get("num_workers") or 0)
    if data["num_workers"] < 0:
        raise ConfigError(f"data.num_workers must be >= 0 (0: load in the main process), got {data['num_workers']}")
    data["download"] = bool(data.get("download") or False)
    data["fraction"] = float(data["fraction"])
    if data["crop_size"] < 1:
        raise ConfigError(f"data.crop_size must be positive, got {data['crop_size']}")
    return data


def labelled_only(dataset: Dataset) -> Dataset:
    """``dataset`` without its unlabelled items (label < 0, e.g. STL-10's unlabelled split)."""
    labels = labels_of(dataset)
    keep = np.flatnonzero(labels >= 0)
    if len(keep) == 0:
        raise DataError(f"{type(dataset).__name__} has no labelled images to evaluate with")
    return dataset if len(keep) == len(labels) else Subset(dataset, keep.tolist())


def eval_datasets(data: Mapping[str, Any], seed: int = 0) -> tuple[Dataset, Dataset, int]:
    """Raw labelled train split (a ``data.fraction`` of it), raw test split, number of classes."""
    name = str(data["dataset"])
    full_train = _full_train(data)
    num_classes = num_classes_of(full_train, name)
    train = _labelled_fraction(full_train, data, seed)
    raw_val = _raw_val(data)
    check_same_classes(full_train, raw_val, name)
    return train, labelled_only(raw_val), num_classes


def eval_split(data: Mapping[str, Any], split: str, seed: int = 0) -> Dataset:
    """One labelled split of :func:`eval_datasets` (``train``: its ``data.fraction``; ``val``),
    reading only that split's folder: a map of the test images needs no training folder, and
    a look at training batches no test folder."""
    if split == "train":
        return _labelled_fraction(_full_train(data), data, seed)
    return labelled_only(_raw_val(data))


def _full_train(data: Mapping[str, Any]) -> Dataset:
    download = bool(data.get("download", False))
    return build_dataset(str(data["dataset"]), data.get("train_path"), train=True, download=download, labelled=True)


def _labelled_fraction(full_train: Dataset, data: Mapping[str, Any], seed: int) -> Dataset:
    fraction, draw = float(data.get("fraction", 1.0)), data.get("fraction_draw") or "per_class"
    return subset_fraction(labelled_only(full_train), fraction, seed, draw)


def _raw_val(data: Mapping[str, Any]) -> Dataset:
    name = str(data["dataset"])
    if data.get("val_path") is None and dataset_info(name).source != "embedded":
        raise DataError(f"evaluation needs a test split: set data.val_path for dataset '{name}'")
    return build_dataset(name, data.get("val_path"), train=False, download=bool(data.get("download", False)))


def eval_view(dataset: Dataset, data: Mapping[str, Any]) -> Dataset:
    """``dataset`` through the deterministic evaluation transform (resize, centre crop, normalise)."""
    return Transformed(dataset, build_eval_transform(int(data["crop_size"]), data["mean"], data["std"]))


def default_device(accelerator: str = "auto") -> torch.device:
    """cuda when asked for (and present) or when ``auto`` finds a GPU; the CPU otherwise."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"accelerator={accelerator} but no CUDA GPU is visible; use accelerator=cpu")
        return torch.device("cuda")
    if accelerator == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ConfigError(f"accelerator must be auto, cpu or gpu, got '{accelerator}'")
    return torch.device("cpu")


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset | Iterable[tuple[torch.Tensor, Any]],
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 features and labels of every item, in order, on ``device`` (default: the
    backbone's). ``dataset`` is a Dataset of transformed images (read by a DataLoader) or
    already an iterable of ``(images, labels)`` batches (such as a device-resident split's,
    ``PretrainDataModule.eval_batches``). The backbone runs in eval mode; its mode is restored."""
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    if isinstance(dataset, Dataset):
        batches: Iterable[tuple[torch.Tensor, Any]] = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )
    else:
        batches = dataset
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for images, y in batches:
            # A copy, not the output itself: a backbone compiled with CUDA graphs
            # (performance.compile_mode=reduce-overhead) reuses its output memory on the next call.
            feats.append(backbone(images.to(device, non_blocking=True)).to(torch.float32, copy=True))
            labels.append(torch.as_tensor(y).to(device))
    finally:
        backbone.train(was_training)
    if not feats:
        raise DataError("cannot extract features of an empty dataset")
    return torch.cat(feats), torch.cat(labels)
