"""Datasets stored in one HDF5 file, in solo-learn's ``data.format: h5`` layout.

One group per class, holding one uint8 dataset per image with the image file's encoded bytes
(JPEG, PNG, ...): ImageNet's 1.3 million files become one file, which shared cluster file
systems read far faster than many small ones. solo-learn's ``convert_imgfolder_to_h5.py``
writes this layout, and so does this module's command line::

    python -m ivreg.data.h5 <ImageFolder root> <out.h5>

Classes are the sorted group names (labels are their positions, as ImageFolder numbers its
class folders); each class's images are sorted by name, so an index names the same image in
every process and every launch. Reading needs ``h5py`` (``pip install -e ".[h5]"``).
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
                groups = sorted(k for k in f if isinstance(f[k], h5py.Group))
                members = {c: sorted(k for k in f[c] if isinstance(f[c][k], h5py.Dataset)) for c in groups}
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
        self._keys = [(c, name) for c in groups for name in members[c]]
        self.targets = [self.class_to_idx[c] for c, _ in self._keys]
        self.samples = [(f"{self.root}:{c}/{name}", label) for (c, name), label in zip(self._keys, self.targets)]
        self._file: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        from ivreg.data.datasets import decode_image

        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = _h5py().File(self.root, "r"), os.getpid()
        group, name = self._keys[i]
        try:
            data = self._file[group][name][()]
        except (OSError, KeyError) as exc:
            raise DataError(f"cannot read image {self.samples[i][0]}: {exc}") from exc
        return decode_image(io.BytesIO(np.asarray(data, dtype=np.uint8).tobytes()), self.samples[i][0]), self.targets[i]

    def __getstate__(self) -> dict[str, Any]:
        """Without the open file: pickled into spawned workers, each opens its own."""
        return {**self.__dict__, "_file": None, "_pid": None}


def write_h5(source: Path, out: Path) -> tuple[int, int]:
    """Every image of the ImageFolder tree ``source`` into the HDF5 file ``out``, its bytes as
    they are on disk (not decoded), one group per class folder. Written to a temporary file and
    renamed, so a killed conversion leaves no partial ``out``. Returns (images, classes)."""
    from ivreg.data.datasets import image_folder

    h5py = _h5py()
    folder = image_folder(source, "source")
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            groups = {c: f.create_group(c) for c in folder.classes}
            for path, label in folder.samples:
                group, name = groups[folder.classes[label]], Path(path).name
                if name in group:  # (Tiny ImageNet's <wnid>/images/ layout keeps names unique)
                    raise DataError(f"two images named {name} in class {folder.classes[label]} of {source}")
                group.create_dataset(name, data=np.frombuffer(Path(path).read_bytes(), dtype=np.uint8))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(folder.samples), len(folder.classes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ivreg.data.h5",
        description="Pack an ImageFolder tree (<class>/<image>) into one HDF5 file for data.format=h5.",
    )
    parser.add_argument("source", type=Path, help="ImageFolder root: one sub-folder per class")
    parser.add_argument("out", type=Path, help="the HDF5 file to write (.h5)")
    args = parser.parse_args(argv)
    if not is_h5_file(args.out):
        print(f"error: {args.out} should end in .h5 or .hdf5 (the suffix tells ivreg the format)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        images, classes = write_h5(args.source.expanduser().resolve(), args.out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size, seconds = args.out.stat().st_size / 2**20, time.perf_counter() - start
    print(f"wrote {images} images of {classes} classes to {args.out} ({size:.1f} MiB) in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
