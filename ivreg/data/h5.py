"""Datasets stored in one HDF5 file, in solo-learn's ``data.format: h5`` layout.

One group per class, holding one uint8 dataset per image with the image file's encoded bytes
(JPEG, PNG, ...): ImageNet's 1.3 million files become one file, which shared cluster file
systems read far faster than many small ones. solo-learn's ``convert_imgfolder_to_h5.py``
writes this layout, and so does this module's command line::

    python -m ivreg.data.h5 <ImageFolder root> <out.h5>

Classes are the sorted group names (labels are their positions, as ImageFolder numbers its
class folders); each class's images (sub-groups too) are listed in ImageFolder's order, so an
index names the same image as in the folder the file came from, in every process and launch.
Reading needs ``h5py`` (``pip install -e ".[h5]"``).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ivreg.errors import DataError

H5_SUFFIXES = (".h5", ".hdf5")


def is_h5_file(path: Path) -> bool:
    return path.suffix.lower() in H5_SUFFIXES


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise DataError('reading an HDF5 dataset needs h5py: pip install -e ".[h5]" (or pip install h5py)') from exc
    return h5py


def _image_names(group: Any, h5py: Any, prefix: str = "") -> list[str]:
    """The image entries under ``group`` (sub-groups too, as ImageFolder walks sub-folders), by
    their paths relative to it. Judged by name, which costs nothing per entry (opening each
    to ask its type took 3 s per 50,000): a name with an image suffix is an image, one with
    another suffix (``.DS_Store``, ``Thumbs.db``, ``*.txt``, copied by converters that take every
    file) is skipped, and only a name without any suffix is looked at (a sub-group, or an
    image stored without its file's suffix)."""
    from ivreg.data.datasets import _hidden, _is_image_file

    names = []
    for name in group:
        if _is_image_file(name):
            names.append(prefix + name)
        elif not Path(name).suffix and not _hidden(name):
            kind = group.get(name, getclass=True)
            if kind is h5py.Group:
                names += _image_names(group[name], h5py, f"{prefix}{name}/")
            elif kind is h5py.Dataset:
                names.append(prefix + name)
    return names


def _walk_order(path: str) -> tuple[str, str]:
    """ImageFolder's order of a class folder's files (``sorted(os.walk)``, then the sorted file
    names of each folder): by the folder's path, then the name."""
    folder, _, name = path.rpartition("/")
    return folder, name


class H5Images(Dataset):
    """The labelled images of an HDF5 file (``<class>/<image>`` datasets of encoded bytes).

    ``samples`` holds ``("<file>:<class>/<image>", label)``, the names errors give. The file
    is opened in each process on its first read: an h5py handle does not survive a fork into
    DataLoader workers."""

    def __init__(self, path: Path, what: str = "train_path"):
        h5py = _h5py()
        self.root = str(path)
        if not path.is_file():
            raise DataError(f"{what} {path} does not exist; set data.{what} to an HDF5 file of <class>/<image> bytes")
        try:
            with h5py.File(path, "r") as f:
                groups = sorted(k for k in f if f.get(k, getclass=True) is h5py.Group)
                members = {c: sorted(_image_names(f[c], h5py), key=_walk_order) for c in groups}
        except OSError as exc:
            raise DataError(f"cannot read {what} {path} as an HDF5 file: {exc}") from exc
        if not groups:
            raise DataError(
                f"{what} {path} holds no class groups; expected <class>/<image> datasets of encoded image bytes "
                "(solo-learn's h5 layout, written by python -m ivreg.data.h5)"
            )
        empty = [c for c in groups if not members[c]]
        if empty:
            raise DataError(f"{what} {path}: the class group(s) {', '.join(empty)} hold no images; remove them")
        self.classes = groups
        self.class_to_idx = {c: i for i, c in enumerate(groups)}
        self._keys = [f"{c}/{name}" for c in groups for name in members[c]]
        self.targets = [self.class_to_idx[c] for c in groups for _ in members[c]]
        self.samples = [(f"{self.root}:{key}", label) for key, label in zip(self._keys, self.targets)]
        self._file: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def _encoded(self, i: int) -> bytes:
        """Item ``i``'s bytes: a uint8 array (solo-learn's converter, this one) or an opaque
        ``np.void`` scalar (h5py's documented way to store binary data). The arrays are read
        through h5py's low-level calls: its ``File[...][()]`` took 117 us per CIFAR-10 image
        here, these 42 us (the JPEG decode after it: 78 us)."""
        h5py = _h5py()
        try:
            if self._file is None or self._pid != os.getpid():
                self._file, self._pid = h5py.File(self.root, "r"), os.getpid()
            entry = h5py.h5d.open(self._file.id, self._keys[i].encode())
            if entry.dtype == np.uint8 and entry.shape is not None and len(entry.shape) == 1:
                data = np.empty(entry.shape, dtype=np.uint8)
                entry.read(h5py.h5s.ALL, h5py.h5s.ALL, data)
            else:
                data = self._file[self._keys[i]][()]
        except (OSError, KeyError) as exc:
            raise DataError(f"cannot read image {self.samples[i][0]}: {exc}") from exc
        if isinstance(data, (bytes, np.void)):
            return bytes(data)
        if isinstance(data, np.ndarray) and data.dtype == np.uint8:
            return data.tobytes()
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"cannot read image {self.samples[i][0]}: it holds {kind} values, not an image file's bytes")

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        from ivreg.data.datasets import decode_image

        return decode_image(io.BytesIO(self._encoded(i)), self.samples[i][0]), self.targets[i]

    def __getstate__(self) -> dict[str, Any]:
        """Without the open file: pickled into spawned workers, each opens its own."""
        return {**self.__dict__, "_file": None, "_pid": None}


def _source_images(source: Path) -> Any:
    """The labelled images of a converter's source folder: an ImageFolder tree, or Tiny
    ImageNet's validation split as distributed (``images/`` + ``val_annotations.txt``)."""
    from ivreg.data.datasets import SPLIT_NAMES, AnnotatedImages, _class_folders, image_folder, is_image_folder

    if not source.is_dir():
        raise DataError(f"the source {source} is not a folder; give an ImageFolder root (<class>/<image>)")
    if AnnotatedImages.holds(source):
        return AnnotatedImages(source)
    splits = [p.name for p in _class_folders(source) if p.name.lower() in SPLIT_NAMES]
    if len(splits) >= 2:
        raise DataError(
            f"the source {source} holds the splits {', '.join(s + '/' for s in splits)}, not class folders; convert "
            f"each split to its own file (python -m ivreg.data.h5 {source / splits[0]} {splits[0]}.h5)"
        )
    if not is_image_folder(source):
        raise DataError(f"the source {source} is not an ImageFolder root (expected <class>/<image> sub-folders)")
    return image_folder(source, "train_path")


def _entry_name(path: Path, class_folder: Path) -> str:
    """An image's name in its class group: its path in the class folder, or (Tiny ImageNet's
    ``val/images/``, a folder of all classes) its file name."""
    try:
        return path.relative_to(class_folder).as_posix()
    except ValueError:
        return path.name


def write_h5(source: Path, out: Path) -> tuple[int, int]:
    """Every image of the ImageFolder tree ``source`` (or of Tiny ImageNet's ``val/``) into the
    HDF5 file ``out``, its bytes as they are on disk (not decoded): one group per class, each
    image under its path in the class folder (sub-folders become sub-groups, so the file lists
    the images in the folder's order). Written to a temporary file and renamed, so a killed
    conversion leaves no partial ``out``. Returns (images, classes)."""
    h5py = _h5py()
    images = _source_images(source)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            groups = {c: f.create_group(c) for c in images.classes}
            for path, label in images.samples:
                name = _entry_name(Path(path), source / images.classes[label])
                groups[images.classes[label]].create_dataset(
                    name, data=np.frombuffer(Path(path).read_bytes(), np.uint8)
                )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(images.samples), len(images.classes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ivreg.data.h5",
        description="Pack an ImageFolder tree (<class>/<image>) into one HDF5 file for data.format=h5.",
    )
    parser.add_argument("source", type=Path, help="ImageFolder root: one sub-folder per class")
    parser.add_argument("out", type=Path, help="the HDF5 file to write (.h5)")
    args = parser.parse_args(argv)
    out = args.out.expanduser()
    problem = None
    if not is_h5_file(out):
        problem = f"{out} should end in .h5 or .hdf5 (the suffix tells ivreg the format)"
    elif out.is_dir():
        problem = f"{out} is a folder; give the path of the file to write"
    elif not out.parent.is_dir():
        problem = f"the folder {out.parent} of {out} does not exist; create it first"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        images, classes = write_h5(args.source.expanduser().resolve(), out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # (a full disk, no permission)
        print(f"error: cannot write {out}: {exc}", file=sys.stderr)
        return 2
    size, seconds = out.stat().st_size / 2**20, time.perf_counter() - start
    print(f"wrote {images} images of {classes} classes to {out} ({size:.1f} MiB) in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
