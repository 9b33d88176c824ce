"""HDF5 datasets (solo-learn's data.format=h5): the converter, reading, training, errors."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ivreg.config import compose, prepare_config
from ivreg.data.datasets import build_dataset, image_folder
from ivreg.data.h5 import H5Images, main, write_h5
from ivreg.errors import ConfigError, DataError
from ivreg.train import pretrain

from ..conftest import CIFAR_CONFIGS, tiny_overrides

h5py = pytest.importorskip("h5py", reason="h5py is not installed (pip install -e '.[h5]')")


@pytest.fixture(scope="module")
def h5_data(image_data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("h5")
    train, val = base / "train.h5", base / "val.h5"
    assert write_h5(image_data[0], train) == (48, 3)
    assert write_h5(image_data[1], val) == (18, 3)
    return train, val


def test_an_h5_file_holds_the_image_folder_image_for_image(image_data, h5_data) -> None:
    folder, h5 = image_folder(image_data[0], "train_path"), build_dataset("custom", str(h5_data[0]), train=True)
    assert isinstance(h5, H5Images)
    assert h5.classes == folder.classes and h5.targets == folder.targets and len(h5) == len(folder) == 48
    for i in (0, 17, 47):  # the same image at the same index: the same augmentation seeds, the same run
        assert np.array_equal(np.asarray(h5[i][0]), np.asarray(folder[i][0]))
        assert h5[i][1] == folder[i][1]
        assert h5.samples[i][0] == f"{h5_data[0]}:{folder.classes[folder[i][1]]}/{Path(folder.samples[i][0]).name}"


def test_files_written_as_solo_learns_converter_does_are_read(image_data, tmp_path) -> None:
    """Its convert_imgfolder_to_h5.py stores each file's bytes gzip-compressed (level 9)."""
    folder = image_folder(image_data[1], "val_path")
    with h5py.File(tmp_path / "solo.h5", "w") as f:
        for path, label in folder.samples:
            data = np.frombuffer(Path(path).read_bytes(), dtype="uint8")
            group = f.require_group(folder.classes[label])
            group.create_dataset(Path(path).name, data=data, shape=data.shape, compression="gzip", compression_opts=9)
    h5 = H5Images(tmp_path / "solo.h5")
    assert h5.classes == folder.classes and len(h5) == 18
    assert np.array_equal(np.asarray(h5[5][0]), np.asarray(folder[5][0]))


def test_nested_class_folders_keep_their_order_and_odd_entries_are_skipped_or_named(tmp_path) -> None:
    """Sub-folders become sub-groups, listed in ImageFolder's order (folder path, then name:
    files beside the sub-folders first), so index i is the same image in both. Entries that
    are no images (.DS_Store, Thumbs.db, notes.txt, which solo-learn's converter copies) are
    skipped as the folder reader skips them; h5py's np.void bytes are read; other values and
    a file moved away are named."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for path in ("c1/b/1.png", "c1/a/2.png", "c1/a-b/0.png", "c1/0.png", "c2/images/9.png", "c2/images/deeper/1.png"):
        (tmp_path / "nest" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "nest" / path)
    assert write_h5(tmp_path / "nest", tmp_path / "nest.h5") == (6, 2)
    folder, h5 = image_folder(tmp_path / "nest", "train_path"), H5Images(tmp_path / "nest.h5")
    names = [s[0].split(":", 1)[1] for s in h5.samples]
    assert names == [str(Path(p).relative_to(tmp_path / "nest")) for p, _ in folder.samples]
    assert all(np.array_equal(np.asarray(h5[i][0]), np.asarray(folder[i][0])) for i in range(6))
    png = (tmp_path / "nest" / "c1" / "0.png").read_bytes()
    with h5py.File(tmp_path / "odd.h5", "w") as f:
        group = f.create_group("c")
        for junk in (".DS_Store", "Thumbs.db", "notes.txt"):
            group.create_dataset(junk, data=np.frombuffer(b"junk", dtype=np.uint8))
        group.create_dataset("void.png", data=np.void(png))
        group.create_dataset("floats.png", data=np.zeros(4))
    odd = H5Images(tmp_path / "odd.h5")
    assert [s[0].rsplit("/", 1)[1] for s in odd.samples] == ["floats.png", "void.png"]
    assert np.array_equal(np.asarray(odd[1][0]), np.asarray(folder[0][0]))
    with pytest.raises(DataError, match=r"odd.h5:c/floats.png: it holds float64 values, not an image file's bytes"):
        odd[0]
    with h5py.File(tmp_path / "junk.h5", "w") as f:
        f.create_group("c").create_dataset("x.png", data=np.frombuffer(b"junk", dtype=np.uint8))
    with pytest.raises(DataError, match=r"junk.h5:c/x.png: not an image file Pillow can read \(or a corrupt one\)$"):
        H5Images(tmp_path / "junk.h5")[0]
    moved = H5Images(tmp_path / "nest.h5")
    (tmp_path / "nest.h5").rename(tmp_path / "elsewhere.h5")
    with pytest.raises(DataError, match=r"cannot read image .*nest.h5:c1/0.png: "):
        moved[0]


def test_the_converter_takes_tiny_imagenets_validation_split(tmp_path) -> None:
    from PIL import Image

    val = tmp_path / "val"
    (val / "images").mkdir(parents=True)
    wnids = ["n02", "n01", "n02"]
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(val / "images" / f"val_{i}.JPEG")
    (val / "val_annotations.txt").write_text("".join(f"val_{i}.JPEG\t{w}\t0\t0\t8\t8\n" for i, w in enumerate(wnids)))
    assert write_h5(val, tmp_path / "val.h5") == (3, 2)
    h5 = H5Images(tmp_path / "val.h5")
    assert h5.classes == ["n01", "n02"] and h5.targets == [0, 1, 1]


def test_workers_open_the_file_themselves(h5_data) -> None:
    """The parent has read (and so opened) the file before the workers fork."""
    dataset = H5Images(h5_data[0])
    first = np.asarray(dataset[0][0])
    loader = DataLoader(dataset, batch_size=16, num_workers=2, collate_fn=list)
    images = [np.asarray(image) for batch in loader for image, _ in batch]
    assert len(images) == 48 and np.array_equal(images[0], first)


@pytest.mark.parametrize("pipeline", ["workers", "resident"])
def test_pretraining_on_the_h5_file_equals_pretraining_on_the_folder(pipeline, image_data, h5_data, tmp_path) -> None:
    runs = {}
    for name, (train, val) in (("folder", image_data), ("h5", h5_data)):
        extra = ["max_epochs=1", "scheduler.warmup_epochs=0", f"++data.pipeline={pipeline}"]
        extra += ["data.format=h5"] if name == "h5" else []
        runs[name] = pretrain(
            compose(str(CIFAR_CONFIGS), "isoloss.yaml", tiny_overrides(train, val, tmp_path, name) + extra)
        )
    a, b = runs["folder"].model.state_dict(), runs["h5"].model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    rows = {}
    for name in runs:
        with open(tmp_path / name / "epochs.csv", newline="") as f:
            rows[name] = next(csv.DictReader(f))
    assert rows["h5"]["val_acc1"] == rows["folder"]["val_acc1"]


def test_the_command_line_writes_a_file_and_refuses_another_suffix(image_data, tmp_path, capsys) -> None:
    assert main([str(image_data[1]), str(tmp_path / "val.h5")]) == 0
    assert "wrote 18 images of 3 classes to" in capsys.readouterr().out
    assert len(H5Images(tmp_path / "val.h5")) == 18
    assert main([str(image_data[1]), str(tmp_path / "val.zip")]) == 2
    assert "should end in .h5 or .hdf5" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "x.h5")]) == 2
    assert f"the source {tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err
    assert main([str(tmp_path / "val.h5"), str(tmp_path / "x.h5")]) == 2
    assert "is not a folder; give an ImageFolder root" in capsys.readouterr().err
    splits = tmp_path / "splits"
    for split in ("train", "val"):
        shutil.copytree(image_data[1], splits / split)
    assert main([str(splits), str(tmp_path / "x.h5")]) == 2
    assert "holds the splits train/, val/, not class folders; convert each split to its own file" in (
        capsys.readouterr().err
    )
    assert main([str(image_data[1]), str(tmp_path / "nowhere" / "x.h5")]) == 2
    assert f"the folder {tmp_path / 'nowhere'} of" in capsys.readouterr().err
    (tmp_path / "dir.h5").mkdir()
    assert main([str(image_data[1]), str(tmp_path / "dir.h5")]) == 2
    assert "dir.h5 is a folder; give the path of the file to write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.h5", "splits", "val.h5"]  # nothing half-written


def test_bad_files_are_named(tmp_path) -> None:
    with pytest.raises(DataError, match=r"train_path .*missing.h5 does not exist"):
        build_dataset("custom", str(tmp_path / "missing.h5"), train=True)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DataError, match=r"cannot read train_path .*text.h5 as an HDF5 file"):
        build_dataset("custom", str(tmp_path / "text.h5"), train=True)
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f.create_dataset("img.png", data=np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match=r"holds no class groups; expected <class>/<image>"):
        build_dataset("custom", str(tmp_path / "flat.h5"), train=False)
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_group("cat")
        f.create_group("dog").create_dataset("1.png", data=np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match=r"the class group\(s\) cat hold no images"):
        build_dataset("custom", str(tmp_path / "empty.h5"), train=True)
    with h5py.File(tmp_path / "corrupt.h5", "w") as f:
        f.create_group("dog").create_dataset("1.jpg", data=np.frombuffer(b"\xff\xd8\xff garbage", dtype=np.uint8))
    with pytest.raises(DataError, match=r"cannot read image .*corrupt.h5:dog/1.jpg"):
        H5Images(tmp_path / "corrupt.h5")[0]


def test_the_format_key_is_checked(image_data, tmp_path) -> None:
    train, val = image_data
    base = tiny_overrides(train, val, tmp_path)
    with pytest.raises(ConfigError, match=r"data.format=h5 needs HDF5 files, but data.train_path=.* is not a .h5"):
        prepare_config(compose(str(CIFAR_CONFIGS), "isoloss.yaml", [*base, "data.format=h5"]))
    with pytest.raises(ConfigError, match=r"data.format=dali is not supported: ivreg augments on the GPU itself"):
        prepare_config(compose(str(CIFAR_CONFIGS), "isoloss.yaml", [*base, "data.format=dali"]))


def test_reading_without_h5py_names_the_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py raises ImportError
    with pytest.raises(DataError, match=r'needs h5py: pip install -e "\.\[h5\]"'):
        H5Images(tmp_path / "train.h5")
