import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ivreg.data.datasets import (
    DigitsDataset,
    build_dataset,
    dataset_info,
    is_image_folder,
    subset_fraction,
)
from ivreg.errors import DataError

from ..conftest import ROOT, make_image_folder

SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


def test_unknown_dataset_is_named() -> None:
    with pytest.raises(DataError, match="unknown data.dataset 'mnist'"):
        dataset_info("mnist")


def test_missing_image_folder_names_the_path_and_the_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train_path folder .*nowhere does not exist"):
        build_dataset("custom", str(tmp_path / "nowhere"), train=True)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="not an ImageFolder root"):
        build_dataset("tinyimagenet", str(tmp_path / "flat"), train=False)


def test_missing_cifar_without_download_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*data.train_path"):
        build_dataset("cifar10", str(tmp_path), train=True, download=False)


def test_a_failed_download_leaves_no_folder_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Else the next launch would report 'not an ImageFolder root' instead of a missing folder."""
    from urllib.error import URLError

    from ivreg.data import datasets

    def offline(root: str, **kwargs: object) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)  # as torchvision does before fetching
        raise URLError("no network")

    monkeypatch.setattr(datasets.tvd, "CIFAR10", offline)
    with pytest.raises(DataError, match=r"nope does not exist, and cifar10 could not be downloaded"):
        build_dataset("cifar10", str(tmp_path / "nope"), train=True, download=True)
    assert not (tmp_path / "nope").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # other processes may be downloading there: keep it
    with pytest.raises(DataError, match="could not be downloaded"):
        build_dataset("cifar10", str(tmp_path / "shared"), train=True, download=True)
    assert (tmp_path / "shared").is_dir()
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / "mine").mkdir()  # a folder that was there before is the user's: kept
    with pytest.raises(DataError, match=r"cifar10 is not under \S+mine and could not be downloaded"):
        build_dataset("cifar10", str(tmp_path / "mine"), train=True, download=True)
    assert (tmp_path / "mine").is_dir()


def test_other_processes_wait_for_the_first_one_to_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun every process starts at once: only LOCAL_RANK 0 may download."""
    from ivreg.data import datasets

    calls: list[bool] = []

    def cifar(root: str, train: bool, download: bool) -> str:
        calls.append(download)
        if len(calls) < 3:  # the first process is still downloading
            raise RuntimeError("Dataset not found or corrupted")
        return "opened"

    monkeypatch.setattr(datasets.tvd, "CIFAR10", cifar)
    monkeypatch.setattr(datasets, "DOWNLOAD_POLL_S", 0.0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert build_dataset("cifar10", str(tmp_path / "c"), train=True, download=True) == "opened"
    assert calls == [False, False, False]  # never downloaded itself
    calls.clear()
    monkeypatch.setattr(datasets, "DOWNLOAD_WAIT_S", 0.0)
    with pytest.raises(DataError, match="waited 0 s for the process with LOCAL_RANK=0 to download cifar10"):
        build_dataset("cifar10", str(tmp_path / "c"), train=True, download=True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    calls.clear()
    with pytest.raises(DataError, match="could not be downloaded"):
        build_dataset("cifar10", str(tmp_path / "c"), train=True, download=True)
    assert calls == [True]  # the first process downloads


def test_cifar_as_image_folders_is_accepted(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train", classes=10, per_class=2)
    make_image_folder(tmp_path / "test", classes=10, per_class=1)
    assert len(build_dataset("cifar10", str(tmp_path / "train"), train=True)) == 20
    # the root holding train/ and test/ also works, as torchvision's root does (or train/ and val/)
    assert len(build_dataset("cifar10", str(tmp_path), train=False)) == 10
    (tmp_path / "test").rename(tmp_path / "val")
    assert len(build_dataset("cifar10", str(tmp_path), train=False)) == 10
    # one class's folder is named as such, not taken for a place to download CIFAR-10 into
    with pytest.raises(DataError, match=r"data.val_path=.*class_3 holds images but no class folders"):
        build_dataset("cifar10", str(tmp_path / "val" / "class_3"), train=False, download=True)
    assert sorted(p.name for p in (tmp_path / "val" / "class_3").iterdir()) == ["000.png"]
    with pytest.raises(DataError, match=r"for unlabelled pretraining images, set data.dataset=custom"):
        build_dataset("cifar10", str(tmp_path / "val" / "class_3"), train=True)


def test_stl10_unlabelled_images_as_a_flat_folder_are_pretraining_data(tmp_path: Path) -> None:
    make_image_folder(tmp_path, classes=1, per_class=5, size=96)
    unlabelled = build_dataset("stl10", str(tmp_path / "class_0"), train=True)
    assert len(unlabelled) == 5 and all(label < 0 for _, label in (unlabelled[i] for i in range(5)))
    with pytest.raises(DataError, match="holds images but no class folders"):  # evaluation needs labels
        build_dataset("stl10", str(tmp_path / "class_0"), train=False)


def test_corrupt_image_error_names_the_file(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data", classes=2, per_class=2)
    bad = tmp_path / "data" / "class_0" / "broken.png"
    bad.write_bytes(b"this is not a png")
    dataset = build_dataset("custom", str(tmp_path / "data"), train=True)
    index = [Path(p).name for p, _ in dataset.samples].index("broken.png")
    with pytest.raises(DataError, match="broken.png"):
        dataset[index]


def test_digits_is_embedded_and_split() -> None:
    train, val = DigitsDataset(train=True), DigitsDataset(train=False)
    assert len(train) == 1437 and len(val) == 360
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and 0 <= label < 10
    assert torch.bincount(val.targets).min() >= 35  # stratified
    assert len(build_dataset("digits", None, train=True)) == 1437


def test_subset_fraction_is_fixed_by_seed() -> None:
    data = DigitsDataset(train=False)
    a, b = subset_fraction(data, 0.25, seed=1), subset_fraction(data, 0.25, seed=1)
    assert len(a) == 90 and a.indices == b.indices
    assert subset_fraction(data, 1.0, seed=1) is data
    assert subset_fraction(data, 0.25, seed=2).indices != a.indices
    # drawn per class: every class keeps its share, at least one image (a 1% label split)
    counts = torch.bincount(data.targets[a.indices], minlength=10)
    assert counts.min() >= 8 and counts.max() <= 10
    tiny = subset_fraction(DigitsDataset(train=True), 0.01, seed=1)
    assert torch.bincount(tiny.dataset.targets[tiny.indices], minlength=10).tolist() == [1] * 10
    with pytest.raises(DataError, match="fraction"):
        subset_fraction(data, 0.0, seed=1)


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason=f"{SHARED_CIFAR} is absent (a clone without ../shared)")
def test_real_cifar10_jpegs(tmp_path: Path) -> None:
    """A slice of the real CIFAR-10 JPEG folders goes through the ImageFolder path."""
    with tarfile.open(SHARED_CIFAR, "r:xz") as tar:
        picked = []
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and "test" in parts and parts[-1].startswith("000"):
                picked.append(member)
            if len(picked) >= 50:
                break
        tar.extractall(tmp_path, members=picked, filter="data")
    test_root = next(p for p in tmp_path.rglob("test") if p.is_dir())
    assert is_image_folder(test_root)
    dataset = build_dataset("cifar10", str(test_root), train=False)
    image, label = dataset[0]
    assert image.size == (32, 32) and image.mode == "RGB"


def _fake_stl10(root: Path, n_train: int, n_unlabelled: int, n_test: int) -> None:
    """STL-10's binary layout (uint8 images, 1-based labels) with a few random images."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for stem, n in (("train", n_train), ("unlabeled", n_unlabelled), ("test", n_test)):
        images = torch.randint(0, 256, (n, 3, 96, 96), dtype=torch.uint8, generator=gen)
        (folder / f"{stem}_X.bin").write_bytes(images.numpy().tobytes())
        if stem != "unlabeled":
            (folder / f"{stem}_y.bin").write_bytes((torch.arange(n) % 10 + 1).to(torch.uint8).numpy().tobytes())
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))


def test_stl10_pretraining_reads_unlabelled_images_evaluation_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import STL10

    _fake_stl10(tmp_path, n_train=4, n_unlabelled=6, n_test=3)
    monkeypatch.setattr(STL10, "_check_integrity", lambda self: True)  # no md5 of the real files
    pretrain = build_dataset("stl10", str(tmp_path), train=True)
    assert len(pretrain) == 10 and sorted(set(pretrain.labels.tolist())) == [-1, 0, 1, 2, 3]
    labelled = build_dataset("stl10", str(tmp_path), train=True, labelled=True)
    assert len(labelled) == 4 and (labelled.labels >= 0).all()
    assert len(build_dataset("stl10", str(tmp_path), train=False, labelled=True)) == 3


def _tiny_imagenet(root: Path) -> tuple[Path, Path]:
    """Tiny ImageNet's own layout: train/<wnid>/images/*.JPEG, val/images + val_annotations.txt."""
    from PIL import Image

    wnids = ["n02", "n01", "n03"]
    for c, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (80 * c, 0, 0)).save(folder / f"{wnid}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        Image.new("RGB", (8, 8), (0, 0, 0)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root / "train", root / "val"


def test_tiny_imagenet_validation_split_as_distributed(tmp_path: Path) -> None:
    from ivreg.data.datasets import check_same_classes, labels_of

    train_root, val_root = _tiny_imagenet(tmp_path)
    train = build_dataset("tinyimagenet", str(train_root), train=True)
    val = build_dataset("tinyimagenet", str(val_root), train=False)
    assert train.classes == val.classes == ["n01", "n02", "n03"]
    assert labels_of(val).tolist() == [2, 0, 1, 0]  # by wnid, as ImageFolder numbers train's folders
    image, label = val[0]
    assert image.size == (8, 8) and label == 2
    check_same_classes(train, val, "tinyimagenet")  # no error


def test_splits_with_different_class_folders_are_refused(tmp_path: Path) -> None:
    from ivreg.data.augment import parse_view_specs
    from ivreg.data.datamodule import PretrainDataModule

    make_image_folder(tmp_path / "train", classes=3, per_class=4)
    make_image_folder(tmp_path / "val", classes=2, per_class=2)
    views = parse_view_specs([{"crop_size": 32, "num_crops": 2}])
    data = {"dataset": "custom", "train_path": str(tmp_path / "train"), "val_path": str(tmp_path / "val")}
    with pytest.raises(DataError, match=r"different classes \(3 against 2; only in training: \['class_2'\]"):
        PretrainDataModule(data, views, batch_size=4).prepare_raw()


def test_seeded_items_draw_their_augmentation_from_their_seed_alone() -> None:
    """``(index, seed)`` items: the same seed gives the same views whatever ran before, other
    seeds (images, epochs) give other views, and the caller's RNG is left as it was."""
    from torchvision.transforms import v2

    from ivreg.data.datamodule import EpochShuffleSampler, sample_seed
    from ivreg.data.datasets import Transformed

    images = [(torch.rand(3, 16, 16), 0) for _ in range(4)]
    crop = Transformed(images, v2.RandomResizedCrop(8, scale=(0.1, 1.0)))
    first = crop[(1, sample_seed(0, 3, 1))][0]
    torch.rand(100)  # what ran before does not matter
    state = torch.get_rng_state()
    assert torch.equal(crop[(1, sample_seed(0, 3, 1))][0], first)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(crop[(1, sample_seed(0, 4, 1))][0], first)  # next epoch
    seeds = {sample_seed(0, epoch, index) for epoch in range(50) for index in range(1000)}
    assert len(seeds) == 50_000 and max(seeds) < 2**63

    sampler = EpochShuffleSampler(4, seed=0, with_seeds=True, current_epoch=lambda: 3)
    sampler.set_epoch(0)  # the trainer's epoch, read when iteration starts, wins
    assert sorted(iter(sampler)) == [(i, sample_seed(0, 3, i)) for i in range(4)]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """Pillow's convert("RGB") clips 16-bit pixels: every one above 255 became white."""
    folder = tmp_path / "data" / "cls"
    folder.mkdir(parents=True)
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(folder / "deep.png")  # a 16-bit greyscale PNG
    Image.fromarray(np.zeros((8, 8), dtype=np.float32), mode="F").save(folder / "float.tif")
    dataset = build_dataset("custom", str(tmp_path / "data"), train=True)
    names = [Path(p).name for p, _ in dataset.samples]
    image = np.asarray(dataset[names.index("deep.png")][0])
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], (ramp.astype(np.int64) // 257).astype(np.uint8))
    with pytest.raises(DataError, match=r"float.tif: its pixels are floats \(mode F\)"):
        dataset[names.index("float.tif")]


def test_folders_and_files_tools_leave_behind_are_not_data(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    for hidden in (".ipynb_checkpoints", "@eaDir", "__MACOSX"):
        (root / hidden).mkdir()
        Image.new("RGB", (32, 32)).save(root / hidden / "x.png")
    (root / "aaa_empty").mkdir()
    (root / "class_0" / "._000.png").write_bytes(b"AppleDouble")  # macOS metadata, not an image
    with pytest.raises(DataError, match="the class folder.s. aaa_empty hold no images; add images or remove them"):
        build_dataset("custom", str(root), train=True)
    (root / "aaa_empty").rmdir()
    dataset = build_dataset("custom", str(root), train=True)
    assert dataset.classes == ["class_0", "class_1"] and len(dataset) == 4


def test_a_folder_of_splits_is_not_taken_for_classes(tmp_path: Path) -> None:
    """Tiny ImageNet's root (train/, val/, test/images/): its splits passed as three classes."""
    root = tmp_path / "tiny-imagenet-200"
    make_image_folder(root / "train", classes=2, per_class=2)
    (root / "test" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "test" / "images" / "test_0.JPEG")
    (root / "val").mkdir()
    with pytest.raises(DataError, match=r"holds the splits test/, train/, val/, .*data.train_path=\S*/train\)"):
        build_dataset("custom", str(root), train=True)
    with pytest.raises(DataError, match=r"holds the splits test/, train/, val/, .*data.val_path=\S*/val\)"):
        build_dataset("custom", str(root), train=False)
    (root / "train").rename(root / "Unlabeled")  # (STL-10's) and any case
    with pytest.raises(DataError, match=r"holds the splits Unlabeled/, test/, val/, .*train_path=\S*/Unlabeled\)"):
        build_dataset("custom", str(root), train=True)
    only_evaluation = tmp_path / "eval-splits"  # no training split: no example rather than a wrong one
    (only_evaluation / "val").mkdir(parents=True)
    (only_evaluation / "Test").mkdir()
    with pytest.raises(DataError, match=r"holds the splits Test/, val/, not class folders; .* split folders$"):
        build_dataset("custom", str(only_evaluation), train=True)


def test_class_names_that_differ_only_in_unicode_normalisation_are_named(tmp_path: Path) -> None:
    import unicodedata

    from ivreg.data.datasets import check_same_classes

    make_image_folder(tmp_path / "train", classes=1, per_class=1)
    make_image_folder(tmp_path / "val", classes=1, per_class=1)
    (tmp_path / "train" / "class_0").rename(tmp_path / "train" / unicodedata.normalize("NFD", "café"))
    (tmp_path / "val" / "class_0").rename(tmp_path / "val" / unicodedata.normalize("NFC", "café"))
    train, val = (build_dataset("custom", str(tmp_path / split), train=split == "train") for split in ("train", "val"))
    with pytest.raises(DataError, match="with different Unicode normalisation"):
        check_same_classes(train, val, "custom")
