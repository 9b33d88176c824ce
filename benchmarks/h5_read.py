"""Read speed of an ImageFolder against the HDF5 file packed from it (``data.format=h5``): the
time to pack it, the file's size, and decoded images per second for each, in one process, in
a seeded random order (as training reads) after one warm-up pass over both (so both come from
the page cache: on a network file system the folder's per-file opens cost far more).

    python benchmarks/h5_read.py <ImageFolder root> [--images 5000] [--out <file.h5>]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ivreg.data.datasets import image_folder
from ivreg.data.h5 import H5Images, write_h5


def _images_per_second(dataset, order: np.ndarray) -> float:
    start = time.perf_counter()
    for i in order:
        dataset[int(i)]
    return len(order) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--images", type=int, default=5000, help="images read from each, in random order")
    parser.add_argument("--out", type=Path, default=None, help="where to pack the file (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "images.h5"
        start = time.perf_counter()
        images, classes = write_h5(args.folder, out)
        pack = time.perf_counter() - start
        folder, h5 = image_folder(args.folder, "train_path"), H5Images(out)
        order = np.random.default_rng(0).permutation(len(folder))[: args.images]
        for dataset in (folder, h5):  # warm-up: the same page cache for both
            _images_per_second(dataset, order)
        figures = {
            "pack_s": pack,
            "size_mib": out.stat().st_size / 2**20,
            "folder_images_per_s": _images_per_second(folder, order),
            "h5_images_per_s": _images_per_second(h5, order),
        }
    print(
        f"{args.folder}: {images} images of {classes} classes packed in {figures['pack_s']:.1f} s into "
        f"{figures['size_mib']:.1f} MiB; {len(order)} random reads (decoded): folder "
        f"{figures['folder_images_per_s']:.0f} images/s, h5 {figures['h5_images_per_s']:.0f} images/s"
    )
    return figures


if __name__ == "__main__":
    main()
