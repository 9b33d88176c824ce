"""The three data pipelines, and the resident one with compiled augmentation, train the same
model to the same accuracy (CPU, digits)."""

import math
from pathlib import Path

import pytest
import torch

from ivreg.config import compose
from ivreg.train import build_run, pretrain

from ..conftest import CIFAR_CONFIGS, ROOT, tiny_overrides


def _final_acc(pipeline: str, root: Path, compile_augmentation: bool = False) -> tuple[float, str]:
    overrides = [
        f"++data.pipeline={pipeline}",
        f"++performance.compile_augmentation={compile_augmentation}",
        "max_epochs=3",
        "scheduler.warmup_epochs=1",
        "backbone.name=resnet10",
        "data.num_workers=0",
        "report.compare_random_init=False",
        f"checkpoint.dir={root}",
        f"name={pipeline}-{compile_augmentation}",
        "++enable_model_summary=False",
    ]
    run = pretrain(compose(str(ROOT / "scripts" / "pretrain" / "digits"), "demo.yaml", overrides))
    batched = run.datamodule._batched
    if compile_augmentation:  # the compiled ops really ran (no silent fallback to eager)
        assert batched is not None and all(view.compiled for view in batched.views)
    return float(run.trainer.callback_metrics["val_acc1"]), run.datamodule.pipeline


def test_resident_and_hybrid_pipelines_match_the_worker_pipeline(tmp_path: Path) -> None:
    results = {p: _final_acc(p, tmp_path) for p in ("workers", "resident", "hybrid")}
    assert {p: used for p, (_, used) in results.items()} == {p: p for p in results}
    results["resident-compiled"] = _final_acc("resident", tmp_path, compile_augmentation=True)
    acc = {p: a for p, (a, _) in results.items()}
    assert acc["workers"] > 80, acc  # all of them learn, so the comparison means something
    # 360 validation images at ~90%: the standard error of a difference of two runs is about
    # 2.2 points; allow three of them.
    for pipeline in ("resident", "hybrid", "resident-compiled"):
        assert abs(acc[pipeline] - acc["workers"]) <= 7.0, acc


def _val_labels(datamodule) -> list[torch.Tensor]:
    batches = list(datamodule.val_dataloader())
    if datamodule.pipeline == "resident":
        return [datamodule._resident["val_labels"][b["val_index"]].cpu() for b in batches]
    return [labels for _, labels in batches]


@pytest.mark.parametrize("pipeline", ["workers", "resident"])
def test_validation_mixes_the_classes_in_one_fixed_order(pipeline: str, image_data, tmp_path: Path) -> None:
    """With limit_val_batches a class-sorted ImageFolder must not yield a single class."""
    train, val = image_data
    overrides = [*tiny_overrides(train, val, tmp_path), f"++data.pipeline={pipeline}"]
    run = build_run(compose(str(CIFAR_CONFIGS), "isoloss-noema.yaml", overrides))
    first, again = _val_labels(run.datamodule), _val_labels(run.datamodule)
    assert [t.tolist() for t in first] == [t.tolist() for t in again]  # the same order every epoch
    assert len(set(first[0].tolist())) == 3  # sorted, the first batch of 8 would hold classes 0 and 1 only
    assert sorted(torch.cat(first).tolist()) == sorted([0] * 6 + [1] * 6 + [2] * 6)  # each image once


def test_a_batch_per_process_is_required(image_data) -> None:
    """48 images on 4 processes leave 12 each: no batch of 16 (Lightning would train nothing)."""
    from types import SimpleNamespace

    from ivreg.data.augment import parse_view_specs
    from ivreg.data.datamodule import PretrainDataModule
    from ivreg.errors import DataError

    train, val = image_data
    data = {"dataset": "custom", "train_path": str(train), "val_path": str(val), "pipeline": "workers"}
    views = parse_view_specs([{"crop_size": 32, "num_crops": 2}])
    with pytest.raises(DataError, match=r"has 48 images, fewer than one batch \(optimizer.batch_size=64\); lower"):
        PretrainDataModule(data, views, batch_size=64).prepare_raw()  # one process, before any trainer
    with pytest.raises(DataError, match=r"has 24 images \(data.fraction=0.5 of 48\), fewer than one batch"):
        PretrainDataModule({**data, "fraction": 0.5}, views, batch_size=32).prepare_raw()
    dm = PretrainDataModule(data, views, batch_size=16)
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = SimpleNamespace(world_size=4, global_rank=0, is_global_zero=True, strategy=cpu)
    with pytest.raises(DataError, match="fewer than one batch .* for each of the 4 processes"):
        dm.setup()
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0, is_global_zero=True, strategy=cpu)
    dm.setup()  # 16 each
    # validation: each of the 3 processes gets its share of the 18 images, once overall;
    # 18 images on 20 processes would leave some without any (Lightning stops on an empty loader)
    shares = []
    for rank in range(3):
        dm.trainer = SimpleNamespace(world_size=3, global_rank=rank, is_global_zero=rank == 0, strategy=cpu)
        shares.append(list(dm.val_dataloader().sampler))
    assert sorted(sum(shares, [])) == list(range(18)) and [len(s) for s in shares] == [6, 6, 6]
    dm = PretrainDataModule(data, views, batch_size=2)
    dm.trainer = SimpleNamespace(world_size=20, global_rank=0, is_global_zero=True, strategy=cpu)
    with pytest.raises(DataError, match="the validation split has 18 images, fewer than the 20 processes"):
        dm.val_dataloader()


def test_resident_loading_decodes_only_the_subset_and_names_an_odd_image(tmp_path: Path) -> None:
    """data.fraction: only the kept images are decoded (a 10% Tiny ImageNet run decoded all
    100k); an image of another size is named by its file, also when workers decode."""
    from PIL import Image

    from ivreg.data.datasets import build_dataset, subset_fraction
    from ivreg.data.resident import load_uint8

    from ..conftest import make_image_folder

    root = make_image_folder(tmp_path / "train", classes=2, per_class=10)
    data = build_dataset("custom", str(root), train=True)
    decoded: list[int] = []
    loader = data.loader
    data.loader = lambda path: decoded.append(1) or loader(path)
    subset = subset_fraction(data, 0.2, seed=1)
    images, labels = load_uint8(subset)
    assert images.shape == (4, 3, 32, 32) and len(decoded) == 4
    assert labels.tolist() == [data.targets[i] for i in subset.indices]
    for i, index in enumerate(subset.indices):  # the same pixels as decoding that image alone
        assert torch.equal(images[i], load_uint8(torch.utils.data.Subset(data, [index]))[0][0])
    Image.new("RGB", (40, 30)).save(root / "class_1" / "999.png")
    data = build_dataset("custom", str(root), train=True)
    for workers in (0, 2):
        with pytest.raises(ValueError, match=r"class_1/999.png is \(3, 30, 40\), .*class_0/000.png \(3, 32, 32\)"):
            load_uint8(data, num_workers=workers)


@pytest.mark.parametrize("pipeline", ["workers", "resident"])
def test_pretraining_on_a_flat_folder_of_unlabelled_images(pipeline: str, image_data, tmp_path: Path) -> None:
    """One's own images, no class folders (as STL-10's unlabelled split): the SSL loss trains,
    the readout has nothing to learn from; a labelled val_path still gives it classes."""
    import csv
    import shutil

    train, val = image_data
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, image in enumerate(sorted(train.rglob("*.png"))):
        shutil.copy(image, flat / f"{i:03d}.png")
    for val_path, name in ((None, "noval"), (val, "withval")):
        overrides = [*tiny_overrides(flat, val, tmp_path, name), "max_epochs=1", "scheduler.warmup_epochs=0"]
        overrides += [f"++data.pipeline={pipeline}", f"data.val_path={val_path or 'null'}"]
        run = pretrain(compose(str(CIFAR_CONFIGS), "isoloss-noema.yaml", overrides))
        assert len(run.datamodule.raw_train) == 48 and set(run.datamodule.raw_train.targets) == {-1}
        with open(tmp_path / name / "epochs.csv", newline="") as f:
            (row,) = list(csv.DictReader(f))
        assert math.isfinite(float(row["train_neg_cos_sim"])) and math.isnan(float(row["train_acc1"]))
        assert run.cfg.data.num_classes == (3 if val_path else 0)
        if val_path:
            assert 0.0 <= float(row["val_acc1"]) <= 100.0


def test_ranks_batches_together_are_one_process_batch_of_the_total_size() -> None:
    """2 processes at batch 8 see, step by step, the images 1 process sees at batch 16 (every
    epoch, not only the first); an uneven split drops the left-over images."""
    from ivreg.data.datamodule import EpochDistributedSampler, EpochShuffleSampler

    for epoch in (0, 1, 5):
        single = EpochShuffleSampler(50, seed=3)
        single.set_epoch(epoch)
        whole = list(single)
        shares = []
        for rank in range(2):
            sampler = EpochDistributedSampler(50, world_size=2, rank=rank, seed=3)
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
        assert [len(s) for s in shares] == [25, 25]
        for k in range(3):  # batches of 8 per rank, 16 in one process
            together = sorted(shares[0][8 * k : 8 * k + 8] + shares[1][8 * k : 8 * k + 8])
            assert together == sorted(whole[16 * k : 16 * k + 16]), (epoch, k)


def test_resident_validation_resizes_and_centre_crops_imagenet_sized_crops(tmp_path: Path) -> None:
    """For crops of 128 and more the evaluation transform resizes to 8/7 and centre-crops
    back: images stored at the crop size must go through it on the device too (the resident
    path once only normalised them, a different picture from the worker path's)."""
    from ivreg.data.augment import build_eval_transform

    from ..conftest import make_image_folder

    train = make_image_folder(tmp_path / "train", classes=2, per_class=4, size=128)
    val = make_image_folder(tmp_path / "val", classes=2, per_class=2, size=128, seed=1)
    cfg = compose(
        str(CIFAR_CONFIGS), "isoloss-noema.yaml", [*tiny_overrides(train, val, tmp_path), "++data.pipeline=resident"]
    )
    for view in cfg.augmentations:
        view.crop_size = 128
    dm = build_run(cfg).datamodule
    dm.setup("fit")
    assert dm.pipeline == "resident" and "val_images" in dm._resident
    on_device = dm._eval_view(dm._resident["val_images"])
    transform = build_eval_transform(128, dm.mean, dm.std)
    per_image = torch.stack([transform(image) for image, _ in dm.raw_val])
    assert on_device.shape == per_image.shape == (4, 3, 128, 128)
    level = 1.5 / 255 / min(dm.std)  # uint8 rounding of the resize, in normalised units
    torch.testing.assert_close(on_device, per_image, rtol=0, atol=level)
