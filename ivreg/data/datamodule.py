"""The Lightning data module of pretraining: multi-view training batches, labelled validation.

Training batches reach the model as ``(views, labels)``, ``views`` a list of normalised float
tensors, one per augmentation view, whichever pipeline (``data.pipeline``) made them:

``workers``   per-image torchvision transforms in DataLoader workers (the reference path);
``hybrid``    workers decode, crop and flip per image; the colour ops run batched on the device;
``resident``  the whole split sits on the device as uint8; a batch is a slice of a per-epoch
              permutation, gathered and augmented there, with no workers at all;
``auto``      ``resident`` on a GPU when the images share one size and fit in 30% of the
              free memory, else ``hybrid`` on a GPU, and ``workers`` on the CPU.

The device-side work happens in ``on_after_batch_transfer``, so the model never sees which
pipeline ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.transforms.v2 import functional as F

from ivreg.data.augment import (
    MultiViewTransform,
    ViewSpec,
    build_eval_transform,
    build_geometric_transform,
    build_view_transform,
    eval_resize,
)
from ivreg.data.batched_aug import BatchedMultiView
from ivreg.data.datasets import (
    Transformed,
    UnlabelledImages,
    build_dataset,
    check_same_classes,
    class_names_of,
    dataset_info,
    num_classes_of,
    subset_fraction,
)
from ivreg.data.resident import DeviceBatches, fits_on_device, load_uint8
from ivreg.errors import ConfigError, DataError

PIPELINES = ("auto", "workers", "hybrid", "resident")


_MASK64 = 2**64 - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: nearby inputs give unrelated 64-bit outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


# ``sample_seed`` indices of the device augmentation's per-rank streams, past any image index
DEVICE_STREAM = 1 << 48


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch: a function of (seed, epoch, index)
    alone, so that a resumed run, any number of DataLoader workers (persistent ones keep their
    RNG across epochs, and a resumed run starts them afresh) and any DDP sharding draw the
    same views."""
    return _mix64(_mix64(_mix64(seed) ^ epoch) ^ index) >> 1


class EpochShuffleSampler(Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same order;
    ``with_seeds``: each item is ``(index, sample_seed)`` for ``Transformed``.

    ``current_epoch`` (the trainer's, when given) is read when iteration starts: a resumed
    run creates its DataLoader iterator (whose workers draw their first indices at once)
    before Lightning calls ``set_epoch``, so with workers the resumed epoch replayed epoch
    0's order and views."""

    def __init__(
        self,
        num_samples: int,
        seed: int,
        with_seeds: bool = False,
        current_epoch: Callable[[], int | None] | None = None,
    ):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.with_seeds = with_seeds
        self.current_epoch = current_epoch

    def set_epoch(self, epoch: int) -> None:  # called by Lightning before every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.epoch = _epoch_now(self.current_epoch, self.epoch)
        order = epoch_order(self.num_samples, self.seed, self.epoch)
        return iter(_with_seeds(order, self.seed, self.epoch) if self.with_seeds else order)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's permutation of the training images, on one process or many."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1_000_003 * epoch)).tolist()


class EpochDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (so Lightning does not wrap it in another) that reads the epoch
    and yields this rank's share of ``EpochShuffleSampler``'s order, every ``world_size``-th
    image: the ranks' k-th batches together hold the images of one process's k-th batch of
    ``world_size`` times the size (the images left over by an uneven split are dropped)."""

    def __init__(
        self,
        num_samples: int,
        world_size: int,
        rank: int,
        seed: int,
        with_seeds: bool = False,
        current_epoch: Callable[[], int | None] | None = None,
    ):
        super().__init__(range(num_samples), world_size, rank, shuffle=True, seed=seed, drop_last=True)
        self.with_seeds = with_seeds
        self.current_epoch = current_epoch

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.epoch = _epoch_now(self.current_epoch, self.epoch)
        order = epoch_order(len(self.dataset), self.seed, self.epoch)[self.rank : self.total_size : self.num_replicas]
        return iter(_with_seeds(order, self.seed, self.epoch) if self.with_seeds else order)


def _epoch_now(current_epoch: Callable[[], int | None] | None, fallback: int) -> int:
    epoch = current_epoch() if current_epoch is not None else None
    return fallback if epoch is None else int(epoch)


def _with_seeds(order: list[int], seed: int, epoch: int) -> Iterator[tuple[int, int]]:
    # lazily: for ImageNet's 1.28M images the whole list took 1.7 s before the first batch
    return ((i, sample_seed(seed, epoch, i)) for i in order)


def fixed_order(n: int, seed: int) -> torch.Tensor:
    """The one seeded permutation of ``n`` items that validation visits (and the online kNN
    samples from under ``limit_val_batches``)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class FixedShuffleSampler(Sampler[int]):
    """One seeded permutation, the same every epoch: validation sees the classes mixed, so that
    ``limit_val_batches`` evaluates a sample of every class and not the first classes of a
    class-sorted ImageFolder (the full split's metrics do not depend on the order)."""

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        self.order = fixed_order(num_samples, seed).tolist()[rank::world_size]  # this rank's share, without padding

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.order)


class FixedShardSampler(DistributedSampler):
    """One DDP rank's share of ``FixedShuffleSampler``'s order, without padding. Being a
    ``DistributedSampler``, Lightning keeps it; its own wrapper would pad the shares to equal
    length and so validate up to ``world_size - 1`` images twice."""

    def __init__(self, num_samples: int, seed: int, rank: int, world_size: int):
        super().__init__(range(num_samples), world_size, rank, shuffle=False)
        self.order = FixedShuffleSampler(num_samples, seed, rank, world_size).order

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.order)


def seeded_sample(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """The positions, in increasing order, of ``limit`` of ``n`` items drawn by ``seed``: the
    first ``limit`` of ``FixedShuffleSampler(n, seed)``'s order, i.e. the images validation
    sees under ``limit_val_batches``. None when ``limit`` takes everything."""
    if limit is None or limit >= n:
        return None
    return fixed_order(n, seed)[: max(int(limit), 0)].sort().values


class PretrainDataModule(L.LightningDataModule):
    """Builds datasets and loaders from the ``data`` config section and the views' specs
    (``parse_view_specs`` of the ``augmentations`` section)."""

    def __init__(
        self, data_cfg: Mapping, view_specs: Sequence[ViewSpec], batch_size: int, seed: int = 0, drop_last: bool = True
    ):
        super().__init__()
        self.data_cfg = dict(data_cfg)
        self.name: str = self.data_cfg["dataset"]
        self.info = dataset_info(self.name)
        self.view_specs = list(view_specs)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last  # of the training batches
        self.mean = tuple(self.data_cfg.get("mean") or self.info.mean)
        self.std = tuple(self.data_cfg.get("std") or self.info.std)
        self.num_workers = int(self.data_cfg.get("num_workers", 4))
        self.requested_pipeline = str(self.data_cfg.get("pipeline", "auto"))
        if self.requested_pipeline not in PIPELINES:
            raise ConfigError(f"unknown data.pipeline '{self.requested_pipeline}'; choose one of {list(PIPELINES)}")
        self.pipeline: str | None = None  # resolved in setup(), once the device is known
        self.channels_last = False  # set by the trainer builder for GPU runs
        self.compile_augmentation = False  # likewise: torch.compile the batched augmentation
        self.raw_train: Dataset | None = None
        self.raw_val: Dataset | None = None
        self._resident: dict[str, torch.Tensor] = {}
        self._batched: BatchedMultiView | None = None
        self._generator: torch.Generator | None = None
        self._generator_epoch = -1

    @property
    def crop_size(self) -> int:
        return self.view_specs[0].crop_size

    # ------------------------------------------------------------------------- datasets
    def prepare_raw(self) -> None:
        """Open (and check) the raw datasets; cheap for every supported source."""
        if self.raw_train is not None:
            return
        download = bool(self.data_cfg.get("download", False))
        train = build_dataset(self.name, self.data_cfg.get("train_path"), train=True, download=download)
        fraction, draw = float(self.data_cfg.get("fraction", 1.0)), self.data_cfg.get("fraction_draw") or "per_class"
        self.raw_train = subset_fraction(train, fraction, self.seed, draw)
        val_path = self.data_cfg.get("val_path")
        if val_path is not None or self.info.source == "embedded":
            self.raw_val = build_dataset(self.name, val_path, train=False, download=download)
            check_same_classes(train, self.raw_val, self.name)
        if isinstance(train, UnlabelledImages) and self.info.num_classes is None:  # classes only from val
            self._num_classes = num_classes_of(self.raw_val, self.name) if self.raw_val is not None else 0
        else:
            self._num_classes = num_classes_of(train, self.name)
        self._require_a_batch(world=1)  # before the trainer exists; setup checks per process

    def _require_a_batch(self, world: int) -> None:
        """A training step for every process: a whole batch when partial ones are dropped."""
        n = len(self.raw_train)  # type: ignore[arg-type]
        if n // world < (self.batch_size if self.drop_last else 1):
            per = f" for each of the {world} processes" if world > 1 else ""
            cut = ""
            if isinstance(self.raw_train, Subset):
                cut = f" (data.fraction={self.data_cfg.get('fraction')} of {len(self.raw_train.dataset)})"  # type: ignore[arg-type]
            raise DataError(
                f"the training set has {n} image{'s' if n != 1 else ''}{cut}, fewer than one batch "
                f"(optimizer.batch_size={self.batch_size}){per}; lower the batch size"
            )

    @property
    def num_classes(self) -> int:
        self.prepare_raw()
        return self._num_classes

    @property
    def num_train_images(self) -> int:
        """The images of the training split, before ``data.fraction`` draws from it (more images
        under the same fraction draw other ones, even where their number rounds the same)."""
        self.prepare_raw()
        dataset = self.raw_train
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        return len(dataset)  # type: ignore[arg-type]

    @property
    def class_names(self) -> list[str] | None:
        """The class names in label order (of the training split, or of the validation split
        when the training images are unlabelled); None without named classes."""
        self.prepare_raw()
        return class_names_of(self.raw_train) or class_names_of(self.raw_val)

    @property
    def device(self) -> torch.device:
        trainer = self._trainer_or_none()
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _trainer_or_none(self) -> L.Trainer | None:
        try:
            return self.trainer
        except RuntimeError:
            return None

    def _choose_pipeline(self) -> str:
        requested, device = self.requested_pipeline, self.device
        if requested == "resident" or (requested == "auto" and device.type == "cuda"):
            n = len(self.raw_train)  # type: ignore[arg-type]
            size = self.info.image_size
            estimate = None if size is None else n * 3 * size * size
            fits = estimate is not None and fits_on_device(estimate, device)
            if requested == "auto" and self._world_size() > 1:  # each GPU's free memory may differ:
                # all ranks must run the same pipeline (they shard validation differently)
                fits = self.trainer.strategy.reduce_boolean_decision(fits, all=True)
            if requested == "resident" or fits:
                try:
                    images, labels = load_uint8(self.raw_train, self.num_workers)  # type: ignore[arg-type]
                except ValueError as exc:
                    if requested == "resident":
                        raise DataError(f"data.pipeline=resident needs images of one size: {exc}") from exc
                else:
                    self._resident["train_images"] = images.to(device)
                    self._resident["train_labels"] = labels.to(device)
                    self._load_resident_val(device)
                    return "resident"
            return "hybrid" if device.type == "cuda" else "workers"
        if requested == "auto":
            return "workers"
        return requested

    def _load_resident_val(self, device: torch.device) -> None:
        """The validation split too, when its images already have the crop size."""
        if self.raw_val is None:
            return
        try:
            images, labels = load_uint8(self.raw_val, self.num_workers)
        except ValueError:
            return
        if tuple(images.shape[-2:]) == (self.crop_size, self.crop_size):
            self._resident["val_images"] = images.to(device)
            self._resident["val_labels"] = labels.to(device)

    def _world_size(self) -> int:
        trainer = self._trainer_or_none()
        return trainer.world_size if trainer is not None else 1

    def setup(self, stage: str | None = None) -> None:
        self.prepare_raw()
        self._require_a_batch(self._world_size())
        if self.pipeline is None:
            self.pipeline = self._choose_pipeline()
            if self.pipeline in ("hybrid", "resident"):
                self._batched = BatchedMultiView(self.view_specs, self.mean, self.std).to(self.device)
                if self.compile_augmentation:
                    self._batched.compile_ops()
            self._val_norm = (
                torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1),
                torch.tensor(self.std, device=self.device).view(1, 3, 1, 1),
            )
            trainer = self._trainer_or_none()
            if trainer is not None and trainer.is_global_zero:
                print(f"data: {self.name}, {len(self.raw_train)} training images, pipeline={self.pipeline}", flush=True)  # type: ignore[arg-type]

    # -------------------------------------------------------------------------- loaders
    def _train_sampler(self, n: int, with_seeds: bool = False) -> Sampler:
        """The epoch's order of the training images; ``with_seeds``: with each image's
        augmentation seed (for per-image transforms in workers)."""
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.world_size > 1:
            world, rank = trainer.world_size, trainer.global_rank
            return EpochDistributedSampler(n, world, rank, self.seed, with_seeds, self._current_epoch)
        return EpochShuffleSampler(n, self.seed, with_seeds, self._current_epoch)

    def _current_epoch(self) -> int | None:
        """The epoch the loader is for: what Lightning passes to ``set_epoch`` (epochs
        processed; ``current_epoch`` lags it by one on a resumed run until training starts)."""
        trainer = self._trainer_or_none()
        return trainer.fit_loop.epoch_progress.current.processed if trainer is not None else None

    def _val_sampler(self, n: int) -> Sampler:
        """Validation's fixed order; under DDP this rank's share of it, each image once overall
        (torchmetrics sums the counts over the ranks)."""
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.world_size > 1:
            if n < trainer.world_size:  # a process without an image would stop Lightning
                raise DataError(
                    f"the validation split has {n} image{'s' if n != 1 else ''}, fewer than the "
                    f"{trainer.world_size} processes; "
                    "validate on more images or train on fewer devices"
                )
            return FixedShardSampler(n, self.seed, trainer.global_rank, trainer.world_size)
        return FixedShuffleSampler(n, self.seed)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler(len(dataset), with_seeds=True) if train else self._val_sampler(len(dataset)),
            # Its own generator: making an iterator then draws no numbers from the global RNG.
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        self.setup()
        if self.pipeline == "resident":
            n = len(self._resident["train_labels"])
            return DeviceBatches(self._train_sampler(n), self.batch_size, self.drop_last, self.device, "train_index")
        if self.pipeline == "hybrid":
            transforms = [build_geometric_transform(s) for s in self.view_specs]
        else:
            transforms = [build_view_transform(s, self.mean, self.std) for s in self.view_specs]
        return self._loader(Transformed(self.raw_train, MultiViewTransform(transforms)), train=True)

    def val_dataloader(self) -> DataLoader | DeviceBatches | list:
        self.setup()
        if "val_labels" in self._resident:
            n = len(self._resident["val_labels"])
            return DeviceBatches(self._val_sampler(n), self.batch_size, False, self.device, "val_index")
        if self.raw_val is None:
            return []
        transform = build_eval_transform(self.crop_size, self.mean, self.std)
        return self._loader(Transformed(self.raw_val, transform), train=False)

    # ------------------------------------------------------------------ device-side work
    def _epoch_generator(self) -> torch.Generator:
        """A device RNG reseeded from (seed, epoch, rank): resumed epochs draw the same views."""
        trainer = self._trainer_or_none()
        epoch = trainer.current_epoch if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        if self._generator is None:
            self._generator = torch.Generator(device=self.device)
        if epoch != self._generator_epoch:
            # mixed apart from the global RNG's (seed + 1_000_003 epoch + 7919 rank, which
            # seed_everything gives CUDA too): equal seeds made the views' parameters and any
            # global draws of the step (a timm model's drop-path) the same stream
            self._generator.manual_seed(sample_seed(self.seed, epoch, DEVICE_STREAM + rank))
            self._generator_epoch = epoch
        return self._generator

    def _eval_view(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images that have the crop size through the evaluation transform, batched: for
        CIFAR-sized crops only the normalisation; for ImageNet-sized ones also the resize to
        8/7 and the centre crop back (torchvision's functions, as the per-image transform)."""
        resize = eval_resize(self.crop_size)
        if resize != self.crop_size:
            images = F.center_crop(F.resize(images, [resize], antialias=True), [self.crop_size])
        mean, std = self._val_norm
        return self._memory_format([(images.float().div_(255) - mean) / std])[0]

    def eval_batches(
        self, split: str, batch_size: int, rank: int = 0, world_size: int = 1, limit: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
        """The labelled images of a device-resident split (``train`` or ``val``) through the
        evaluation transform, in order and in batches, without DataLoader workers (for the
        online kNN; under DDP ``rank``'s share, every ``world_size``-th image; with ``limit``,
        the ``seeded_sample`` of that many); None when that split is not on the device at the
        crop size."""
        images, labels = self._resident.get(f"{split}_images"), self._resident.get(f"{split}_labels")
        if images is None or labels is None or tuple(images.shape[-2:]) != (self.crop_size, self.crop_size):
            return None
        labelled = torch.nonzero(labels >= 0).flatten()  # STL-10's unlabelled: label -1
        sample = seeded_sample(len(labelled), limit, self.seed)
        if sample is not None:
            labelled = labelled[sample.to(labelled.device)]
        labelled = labelled[rank::world_size]
        return ((self._eval_view(images[index]), labels[index]) for index in labelled.split(max(int(batch_size), 1)))

    def _memory_format(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.channels_last:
            return views
        return [v.contiguous(memory_format=torch.channels_last) for v in views]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "train_index" in batch:
            index = batch["train_index"]
            images = self._resident["train_images"][index]
            views = self._batched(images, generator=self._epoch_generator())  # type: ignore[misc]
            return self._memory_format(views), self._resident["train_labels"][index]
        if isinstance(batch, dict) and "val_index" in batch:
            index = batch["val_index"]
            return self._eval_view(self._resident["val_images"][index]), self._resident["val_labels"][index]
        if self.pipeline == "hybrid" and isinstance(batch, (list, tuple)) and isinstance(batch[0], list):
            crops, labels = batch
            gen = self._epoch_generator()
            views = [aug(v, generator=gen, geometric=False) for aug, v in zip(self._batched.views, crops)]  # type: ignore[union-attr]
            return self._memory_format(views), labels
        if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], list):
            return self._memory_format(batch[0]), batch[1]
        return batch
