"""HDF5 datasets (solo-learn's data.format=h5): the converter, reading, training, errors."""

from __future__ import annotations

import csv
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
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.h5"]  # nothing half-written


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
    with pytest.raises(
        ConfigError, match=r"data.format 'lmdb' is not supported; choose one of \['image_folder', 'h5'\]"
    ):
        prepare_config(compose(str(CIFAR_CONFIGS), "isoloss.yaml", [*base, "data.format=lmdb"]))


def test_reading_without_h5py_names_the_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py raises ImportError
    with pytest.raises(DataError, match=r'needs h5py: pip install -e "\.\[h5\]"'):
        H5Images(tmp_path / "train.h5")
