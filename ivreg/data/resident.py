"""GPU-resident datasets: the whole split as one uint8 tensor on the device.

CIFAR-10/100 (150 MB), STL-10 (2.9 GB with the unlabelled split) and Tiny ImageNet
(1.2 GB) fit in a modern GPU's memory as uint8. Keeping them there removes the per-image
decode, augmentation and host-to-device copy that bound a worker pipeline: a training
batch is a slice of a permutation made once per epoch, gathered and augmented on the GPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import datasets as tvd
from torchvision.transforms import v2

from ivreg.data.datasets import DigitsDataset, labels_of


class _DecodeUint8(Dataset):
    """Wraps a dataset so that workers return uint8 CHW tensors."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.uint8, scale=True)])

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.to_tensor(self.dataset[i][0]).as_subclass(torch.Tensor)


def _image_name(dataset: Dataset, i: int) -> str:
    """The file of item ``i`` where the dataset knows it (ImageFolder), else its index."""
    if isinstance(dataset, Subset):
        return _image_name(dataset.dataset, int(dataset.indices[i]))
    samples = getattr(dataset, "samples", None)
    return str(samples[i][0]) if samples is not None else f"image {i}"


def _in_memory(dataset: Dataset) -> bool:
    """Datasets that hold their images as arrays (sliced, not decoded)."""
    return isinstance(dataset, (tvd.CIFAR10, tvd.CIFAR100, tvd.STL10, DigitsDataset)) or isinstance(
        getattr(dataset, "images", None), torch.Tensor
    )


def load_uint8(dataset: Dataset, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of ``dataset`` as one uint8 (N, 3, H, W) tensor, and the labels.

    Reads the arrays torchvision keeps in memory (CIFAR, STL-10) directly; decodes other
    datasets (ImageFolder, or the subset of one that ``data.fraction`` keeps, and only that)
    once with ``num_workers`` processes. Raises ValueError naming the files when the images
    do not all have the same size.
    """
    if isinstance(dataset, Subset) and _in_memory(dataset.dataset):
        images, labels = load_uint8(dataset.dataset, num_workers)
        index = torch.as_tensor(np.asarray(dataset.indices))
        return images[index], labels[index]
    labels = torch.as_tensor(labels_of(dataset), dtype=torch.long)
    if isinstance(dataset, (tvd.CIFAR10, tvd.CIFAR100)):
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), labels
    if isinstance(dataset, tvd.STL10):
        return torch.from_numpy(dataset.data).contiguous(), labels
    if _in_memory(dataset):
        return dataset.images, labels  # datasets that already hold a uint8 (N, 3, H, W) tensor
    # Workers decode; the batches are lists, copied into one tensor allocated for the first
    # image's size, so that an odd image is named here (not lost in a worker's traceback).
    loader = DataLoader(_DecodeUint8(dataset), batch_size=512, num_workers=num_workers, collate_fn=list)
    images: torch.Tensor | None = None
    i = 0
    for batch in loader:
        for image in batch:
            if images is None:
                images = torch.empty((len(labels), *image.shape), dtype=torch.uint8)
            if image.shape != images.shape[1:]:
                raise ValueError(
                    f"images of different sizes: {_image_name(dataset, i)} is {tuple(image.shape)}, "
                    f"{_image_name(dataset, 0)} {tuple(images.shape[1:])} (C, H, W)"
                )
            images[i] = image
            i += 1
    if images is None:
        raise ValueError("no images to load")
    return images, labels


class DeviceBatches:
    """Batches of indices into a device-resident split, one permutation copied per epoch.

    Lightning calls ``sampler.set_epoch`` before every epoch, as for a DataLoader, so the
    order depends only on (seed, epoch) and a resumed run draws the same batches.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, device: torch.device, key: str) -> None:
        self.sampler = sampler
        self.batch_sampler = None  # Lightning inspects loaders as if they were DataLoaders
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.device = device
        self.key = key

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long).to(self.device, non_blocking=True)
        for b in range(len(self)):
            yield {self.key: order[b * self.batch_size : (b + 1) * self.batch_size]}


def fits_on_device(nbytes: int, device: torch.device, fraction: float = 0.3) -> bool:
    """True when ``nbytes`` is at most ``fraction`` of the device's free memory (CUDA only)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free
