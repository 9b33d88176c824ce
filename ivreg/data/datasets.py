"""Datasets: torchvision's CIFAR/STL-10, ImageFolder trees, HDF5 files of them, and the embedded digits set.

Every dataset yields ``(image, label)`` with a PIL image or a uint8 CHW tensor; the
transforms (per-view augmentation or evaluation) are applied by the caller, so the same
dataset can feed a per-image worker pipeline or a batched one.
"""

from __future__ import annotations

import os
import shutil
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tvd

from ivreg.data.h5 import H5Images, is_h5_file
from ivreg.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a known dataset. ``num_classes`` None: read from the ImageFolder."""

    num_classes: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int | None  # native side length where all images share it
    source: str  # "torchvision", "image_folder" or "embedded"


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, "torchvision"),
    "cifar100": DatasetInfo(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, "torchvision"),
    "stl10": DatasetInfo(10, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), 96, "torchvision"),
    "tinyimagenet": DatasetInfo(200, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), 64, "image_folder"),
    "imagenet100": DatasetInfo(100, IMAGENET_MEAN, IMAGENET_STD, None, "image_folder"),
    "imagenet": DatasetInfo(1000, IMAGENET_MEAN, IMAGENET_STD, None, "image_folder"),
    "custom": DatasetInfo(None, IMAGENET_MEAN, IMAGENET_STD, None, "image_folder"),
    "digits": DatasetInfo(10, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32, "embedded"),
}

_TORCHVISION_FILES = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def check_normalisation(mean: object, std: object) -> None:
    """Raise ConfigError unless ``mean`` and ``std`` (each None or three numbers) are on the 0-1
    scale the images are normalised on: ImageNet's 0-255 values ([123.675, ...]) made every
    input nearly constant, a zero std NaN."""
    for key, values, low in (("mean", mean, 0.0), ("std", std, None)):
        if values is None:
            continue
        numbers = list(values) if isinstance(values, (list, tuple)) else [values]
        good = len(numbers) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)
        if not good or not all((0.0 <= v <= 1.0) if low is not None else (0.0 < v <= 1.0) for v in numbers):
            scale = "in [0, 1]" if low is not None else "in (0, 1]"
            raise ConfigError(
                f"data.{key} must be three numbers {scale} (per RGB channel, on the 0-1 scale of the images, e.g. "
                f"{list(IMAGENET_MEAN if low is not None else IMAGENET_STD)}), got {numbers}"
            )


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown data.dataset '{name}'; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


# Names of split folders: a root holding several of them is a folder of splits, not of classes.
# By kind, in the order one is suggested for data.train_path or data.val_path.
SPLITS_BY_KIND = {
    "train_path": ("train", "unlabeled", "unlabelled"),
    "val_path": ("val", "valid", "validation", "test"),
}
SPLIT_NAMES = {name for names in SPLITS_BY_KIND.values() for name in names}


def _hidden(name: str) -> bool:
    """Folders and files that tools leave behind (.ipynb_checkpoints, macOS's ._x.jpg and
    __MACOSX, Synology's @eaDir): never classes, never images."""
    return name.startswith((".", "@")) or name == "__MACOSX"


def _class_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not _hidden(p.name))


def is_image_folder(path: Path) -> bool:
    """True when ``path`` has class sub-folders holding image files, also in Tiny ImageNet's
    ``<wnid>/images/`` layout (ImageFolder walks class folders recursively). Deeper trees are
    not accepted: a folder of splits (``train/``, ``val/``) would pass as one of classes."""
    if not path.is_dir():
        return False
    return any(_holds_images(sub) or _holds_images(sub / "images") for sub in _class_folders(path))


def _holds_images(folder: Path) -> bool:
    return folder.is_dir() and any(_is_image_file(f.name) for f in folder.iterdir())


def _is_image_file(name: str) -> bool:
    return Path(name).suffix.lower() in _IMAGE_SUFFIXES and not _hidden(Path(name).name)


def _to_8_bits(img: Image.Image, path: str) -> Image.Image:
    """16-bit (and 32-bit integer) grey images scaled to 8 bits: Pillow's convert("RGB")
    clips them, and every pixel above 255 became white. Float images have no fixed range."""
    if img.mode.startswith("I;16") or img.mode == "I":
        pixels = np.asarray(img, dtype=np.int64)
        top = int(pixels.max(initial=0))
        if pixels.min(initial=0) < 0 or top > 65535:
            raise DataError(f"cannot read image {path}: integer pixels outside 0-65535 (mode {img.mode})")
        if img.mode.startswith("I;16") or top > 255:  # 16 bits: 65535 -> 255
            pixels = pixels // 257
        return Image.fromarray(pixels.astype(np.uint8), mode="L")
    if img.mode == "F":
        raise DataError(
            f"cannot read image {path}: its pixels are floats (mode F), which have no fixed range; "
            "convert the images to 8 or 16 bits"
        )
    return img


def decode_image(source: str | IO[bytes], name: str) -> Image.Image:
    """An RGB image from a file or its bytes; a corrupt one becomes an error naming it (``name``),
    and 16-bit images are scaled to 8 bits instead of clipped."""
    try:
        return _to_8_bits(Image.open(source), name).convert("RGB")
    except UnidentifiedImageError as exc:  # (its message names the file object, not the image)
        raise DataError(f"cannot read image {name}: not an image file Pillow can read (or a corrupt one)") from exc
    except (OSError, SyntaxError) as exc:
        raise DataError(f"cannot read image {name}: {exc}") from exc


def _checked_loader(path: str) -> Image.Image:
    """ImageFolder's loader, through ``decode_image``."""
    try:
        with open(path, "rb") as f:
            return decode_image(f, path)
    except OSError as exc:  # (the file could not be opened)
        raise DataError(f"cannot read image {path}: {exc}") from exc


UNLABELLED = -1  # the label of an unlabelled image (STL-10's convention; the readout skips it)


class UnlabelledImages(Dataset):
    """The images directly in a folder, without classes (label -1, as STL-10's unlabelled
    split): pretraining on one's own images needs no class folders. The online readout then
    trains on nothing; a labelled ``data.val_path`` still gives it classes to validate on."""

    def __init__(self, root: Path):
        self.root = str(root)
        files = sorted(p for p in Path(root).iterdir() if p.is_file() and _is_image_file(p.name))
        self.samples = [(str(p), UNLABELLED) for p in files]
        self.targets = [UNLABELLED] * len(files)
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return _checked_loader(self.samples[i][0]), UNLABELLED


class _ImageFolder(tvd.ImageFolder):
    """ImageFolder without the folders and files that tools leave behind (``_hidden``)."""

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = [p.name for p in _class_folders(Path(directory))]
        return classes, {c: i for i, c in enumerate(classes)}


def image_folder(path: Path, what: str) -> tvd.ImageFolder:
    if not path.exists():
        raise DataError(f"{what} folder {path} does not exist; set data.{what} to an ImageFolder root")
    splits = sorted(p.name for p in _class_folders(path) if p.name.lower() in SPLIT_NAMES)
    if len(splits) >= 2:
        # an example of the kind asked for: train/ for train_path, val/ (else test/...) for val_path
        kind = SPLITS_BY_KIND[what]
        fitting = sorted((s for s in splits if s.lower() in kind), key=lambda s: kind.index(s.lower()))
        example = f" (e.g. data.{what}={path / fitting[0]})" if fitting else ""
        raise DataError(
            f"{what} {path} holds the splits {', '.join(s + '/' for s in splits)}, not class folders; set "
            f"data.train_path and data.val_path to the split folders{example}"
        )
    if not is_image_folder(path):
        raise DataError(
            f"{what} {path} is not an ImageFolder root (expected <class>/<image> sub-folders); "
            f"set data.{what} to such a folder"
        )
    try:
        return _ImageFolder(str(path), loader=_checked_loader, is_valid_file=_is_image_file)
    except FileNotFoundError as exc:  # a class folder without any image
        empty = [p.name for p in _class_folders(path) if not any(_is_image_file(f.name) for f in p.rglob("*"))]
        raise DataError(
            f"{what} {path}: the class folder(s) {', '.join(empty)} hold no images; add images or remove them"
        ) from exc


class AnnotatedImages(Dataset):
    """Tiny ImageNet's validation split as distributed: ``images/*.JPEG`` with the class of each
    file in ``val_annotations.txt`` (file, wnid, box). ImageFolder would see one class,
    ``images``, and every label would be 0. Classes are the sorted wnids, which is how
    ImageFolder numbers the training split's ``<wnid>/`` folders."""

    ANNOTATIONS = "val_annotations.txt"

    def __init__(self, root: Path):
        rows = [line.split("\t") for line in (root / self.ANNOTATIONS).read_text().splitlines() if line.strip()]
        if not rows or any(len(r) < 2 for r in rows):
            raise DataError(f"{root / self.ANNOTATIONS} is not a Tiny ImageNet annotation file (file<TAB>wnid...)")
        self.classes = sorted({r[1] for r in rows})
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(str(root / "images" / r[0]), self.class_to_idx[r[1]]) for r in rows]
        self.targets = [label for _, label in self.samples]

    @staticmethod
    def holds(root: Path) -> bool:
        return (root / AnnotatedImages.ANNOTATIONS).is_file() and (root / "images").is_dir()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return _checked_loader(path), label


def class_names_of(dataset: Any) -> list[str] | None:
    """The class names of a dataset (through ``Subset`` and ``Transformed`` wrappers), whose
    positions are its labels; None for one without classes."""
    while hasattr(dataset, "dataset") and not hasattr(dataset, "classes"):
        dataset = dataset.dataset
    names = getattr(dataset, "classes", None)
    return [str(n) for n in names] if names else None


def check_same_classes(train: Dataset, val: Dataset, name: str) -> None:
    """Raise DataError when the two splits name different classes: labels are indices into
    each split's own sorted class list, so any difference makes val_acc1 silently wrong."""
    a, b = getattr(train, "classes", None), getattr(val, "classes", None)
    if not a or not b or list(a) == list(b):  # (unlabelled training images have no classes)
        return
    only_train, only_val = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    nfc = [unicodedata.normalize("NFC", c) for c in only_train]
    if sorted(nfc) == sorted(unicodedata.normalize("NFC", c) for c in only_val):
        raise DataError(
            f"the {name} training and validation splits spell the class names {nfc[:3]} with different Unicode "
            "normalisation (NFD and NFC, e.g. one copied from macOS): they look alike but differ; rename the "
            "folders of one split"
        )
    raise DataError(
        f"the {name} training and validation splits name different classes ({len(a)} against {len(b)}; "
        f"only in training: {only_train[:3]}{'...' if len(only_train) > 3 else ''}, only in validation: "
        f"{only_val[:3]}{'...' if len(only_val) > 3 else ''}); labels are positions in each split's sorted "
        "class list, so both need the same class folders"
    )


def _torchvision_dataset(name: str, root: Path, train: bool, download: bool, labelled: bool = False) -> Dataset:
    files = root / _TORCHVISION_FILES[name]
    if not files.exists() and not download:
        raise DataError(
            f"{name} not found: expected {files}. Set data.train_path/data.val_path to the folder that "
            f"holds {_TORCHVISION_FILES[name]}/, point them at ImageFolder trees, or allow data.download=True"
        )
    existed = root.exists()

    def open_split(fetch: bool) -> Dataset:
        if name == "cifar10":
            return tvd.CIFAR10(str(root), train=train, download=fetch)
        if name == "cifar100":
            return tvd.CIFAR100(str(root), train=train, download=fetch)
        split = ("train" if labelled else "train+unlabeled") if train else "test"
        return tvd.STL10(str(root), split=split, download=fetch)

    fetch = download and not files.exists()
    if fetch and int(os.environ.get("LOCAL_RANK", "0")) != 0:
        # torchrun/SLURM start every process at once: the first on each machine downloads,
        # the others wait for its files instead of writing into the same folder
        return _wait_for_download(open_split, name, root)
    try:
        return open_split(fetch)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a failed check a RuntimeError
        # torchvision made the folder for the download: leave no empty trace, unless other
        # processes of a torchrun/SLURM launch (WORLD_SIZE set) may be downloading into it too
        if not existed and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            shutil.rmtree(root, ignore_errors=True)
        where = f"{name} is not under {root} and" if existed else f"{root} does not exist, and {name}"
        raise DataError(
            f"{where} could not be downloaded ({exc}). Without network access, "
            f"put {_TORCHVISION_FILES[name]}/ (or an ImageFolder tree) there by hand and set "
            f"data.train_path/data.val_path to it"
        ) from exc


DOWNLOAD_WAIT_S = 3600.0  # how long the other processes of a launch wait for the download
DOWNLOAD_POLL_S = 10.0


def _wait_for_download(open_split: Callable[[bool], Dataset], name: str, root: Path) -> Dataset:
    """Open the split without downloading as soon as another process has finished fetching it
    (torchvision checks the files), or raise DataError after ``DOWNLOAD_WAIT_S``."""
    deadline = time.monotonic() + DOWNLOAD_WAIT_S
    while True:
        try:
            return open_split(False)
        except (OSError, RuntimeError) as exc:
            if time.monotonic() >= deadline:
                raise DataError(
                    f"waited {DOWNLOAD_WAIT_S:.0f} s for the process with LOCAL_RANK=0 to download {name} into "
                    f"{root} ({exc}); put it there by hand and set data.download=False"
                ) from exc
        time.sleep(DOWNLOAD_POLL_S)


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside the package),
    upscaled to ``size`` px RGB: a real dataset for offline demos and tests.

    A fixed stratified split keeps 360 images (20%) for validation.
    """

    def __init__(self, train: bool, size: int = 32):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        idx = np.arange(len(images))
        tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=digits.target)
        keep = torch.as_tensor(tr if train else te)
        self.images = images[keep]
        self.targets = torch.as_tensor(digits.target)[keep]
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


def build_dataset(name: str, path: str | None, train: bool, download: bool = False, labelled: bool = False) -> Dataset:
    """The raw (untransformed) train or validation split of ``name``.

    ``labelled`` leaves out splits that carry no labels at all (STL-10's 100,000 unlabelled
    images, which pretraining uses and evaluation would only load to skip)."""
    info = dataset_info(name)
    what = "train_path" if train else "val_path"
    if info.source == "embedded":
        return DigitsDataset(train=train)
    if path is None:
        raise DataError(f"data.{what} is not set for dataset '{name}'")
    root = Path(path).expanduser().resolve()
    if is_h5_file(root):  # solo-learn's data.format=h5: one file of <class>/<image> bytes
        return H5Images(root, what)
    if info.source == "torchvision":
        # e.g. CIFAR-10 exported as JPEG folders, given as the split or as the folder of splits
        for folder in (root, *(root / split for split in (("train",) if train else ("test", "val")))):
            if is_image_folder(folder):
                return image_folder(folder, what)
        if _holds_images(root):
            if train and name == "stl10":  # its unlabelled split exported as image files
                return UnlabelledImages(root)
            # else most likely one class's folder: torchvision would try to download into it
            raise DataError(
                f"data.{what}={root} holds images but no class folders; set it to the folder above "
                "the class folders (<class>/<image>), or, for unlabelled pretraining images, set data.dataset=custom"
            )
        return _torchvision_dataset(name, root, train, download, labelled)
    if not train and AnnotatedImages.holds(root):
        return AnnotatedImages(root)
    if train and root.is_dir() and not is_image_folder(root) and _holds_images(root):
        return UnlabelledImages(root)  # a flat folder of images: unlabelled pretraining data
    return image_folder(root, what)


def num_classes_of(dataset: Dataset, name: str) -> int:
    """The number of classes: the named dataset's, which its files must have (an ImageFolder
    of CIFAR-10 under ``data.dataset=cifar100`` trained a 100-way readout on 10 classes, and
    the results filed under the wrong dataset, without a word), or the folder's."""
    info = dataset_info(name)
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    if info.num_classes is not None:
        if classes and len(classes) != info.num_classes:
            root = getattr(dataset, "root", "the data folder")
            raise DataError(
                f"data.dataset={name} has {info.num_classes} classes but {root} holds {len(classes)}; point "
                f"data.train_path/val_path at {name}, or set data.dataset=custom for another dataset"
            )
        return info.num_classes
    if not classes:
        raise DataError(f"cannot tell the number of classes of dataset '{name}'")
    return len(classes)


def labels_of(dataset: Dataset) -> np.ndarray:
    """All labels without loading images (torchvision and ImageFolder datasets keep them)."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[np.asarray(dataset.indices)]
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr))
    raise DataError(f"{type(dataset).__name__} does not expose its labels")


FRACTION_DRAWS = ("per_class", "random")


def _labels_or_none(dataset: Dataset) -> np.ndarray | None:
    try:
        return labels_of(dataset)
    except DataError:  # labels only by loading every image
        return None


def subset_fraction(dataset: Dataset, fraction: float, seed: int, draw: str = "per_class") -> Dataset:
    """A fixed random ``fraction`` of ``dataset`` (all of it when fraction is 1). ``per_class``
    draws each class's share (stratified, as solo-learn's ``data_fraction``): every class keeps
    at least one image, so a 1% label split has no empty class. ``random`` draws from the
    whole set (ivreg before 2026-11-28; a resumed run keeps the draw it began with). Datasets
    whose labels cannot be read without loading the images are drawn as a whole."""
    if not 0 < fraction <= 1:
        raise DataError(f"data.fraction must be in (0, 1], got {fraction}")
    if draw not in FRACTION_DRAWS:
        raise DataError(f"data.fraction_draw must be one of {list(FRACTION_DRAWS)}, got {draw!r}")
    if fraction == 1:
        return dataset
    rng = np.random.default_rng(seed)
    labels = _labels_or_none(dataset) if draw == "per_class" else None
    if labels is None:
        n = len(dataset)  # type: ignore[arg-type]
        return Subset(dataset, np.sort(rng.permutation(n)[: max(1, int(round(n * fraction)))]).tolist())
    keep = []
    for c in np.unique(labels):  # in label order, so the draw depends on the seed alone
        members = np.flatnonzero(labels == c)
        keep.append(rng.permutation(members)[: max(1, int(round(len(members) * fraction)))])
    return Subset(dataset, np.sort(np.concatenate(keep)).tolist())


class Transformed(Dataset):
    """Applies ``transform`` to the images of ``dataset`` and keeps the labels.

    An item ``(index, seed)`` (``EpochShuffleSampler(with_seeds=True)``) transforms image
    ``index`` with torch's CPU generator seeded by ``seed`` and restored afterwards: the
    random transform then depends on that seed alone, not on which worker runs it or what it
    ran before."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[object, int]:
        if isinstance(item, tuple):
            index, seed = item
            image, label = self.dataset[index]
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(seed)
                return self.transform(image), label
        image, label = self.dataset[item]
        return self.transform(image), label
