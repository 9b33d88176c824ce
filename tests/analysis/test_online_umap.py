"""The online 2-D map: one picture per due epoch, of the same validation images each time, in
TensorBoard too; settings refused at launch, not after training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ivreg.analysis.online_umap import OnlineUMAP
from ivreg.config import compose
from ivreg.errors import ConfigError
from ivreg.train import build_run

from ..conftest import CIFAR_CONFIGS, tiny_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(image_data, tmp_path: Path, *extra: str):
    train, val = image_data
    overrides = tiny_overrides(train, val, tmp_path) + ["scheduler.warmup_epochs=0", *extra]
    return build_run(compose(str(CIFAR_CONFIGS), "isoloss-noema.yaml", overrides))


def test_a_picture_per_due_epoch_of_the_same_images(image_data, tmp_path, monkeypatch) -> None:
    """every_n_epochs=2 of 3 epochs: after epoch 2 and after the last; max_samples draws the
    same validation images each time; TensorBoard receives the figure."""
    import ivreg.analysis.online_umap as online

    seen: list[torch.Tensor] = []
    real = online.split_features

    def recording(*args, **kwargs):
        feats, labels = real(*args, **kwargs)
        seen.append(labels.clone())
        return feats, labels

    monkeypatch.setattr(online, "split_features", recording)
    extra = ["max_epochs=3", "++umap.enabled=True", "++umap.method=pca", "++umap.every_n_epochs=2"]
    run = _run(image_data, tmp_path, *extra, "++umap.max_samples=10", "++logger.tensorboard=True")
    run.trainer.fit(run.model, datamodule=run.datamodule)

    (callback,) = [cb for cb in run.trainer.callbacks if isinstance(cb, OnlineUMAP)]
    folder = run.run_dir / "umap"
    assert callback.written == [folder / "pca_epoch0002.png", folder / "pca_epoch0003.png"]
    assert sorted(p.name for p in folder.iterdir()) == ["pca_epoch0002.png", "pca_epoch0003.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in callback.written)
    assert len(seen) == 2 and len(seen[0]) == 10 and torch.equal(seen[0], seen[1])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run.run_dir / "tensorboard").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0, "histograms": 0})
    accumulator.Reload()
    assert "val_pca" in accumulator.Tags()["images"]
    assert len(accumulator.Images("val_pca")) == 2
    # and the spectrum of C after every epoch, as a histogram of log10 eigenvalues (16 of them)
    histograms = accumulator.Histograms("C/log10_eigenvalues")
    assert [h.step for h in histograms] == [0, 1, 2] and all(h.histogram_value.num == 16 for h in histograms)


def test_bad_settings_are_refused_at_launch(image_data, tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="umap.method must be one of"):
        _run(image_data, tmp_path, "++umap.enabled=True", "++umap.method=isomap")
    with pytest.raises(ConfigError, match="umap.every_n_epochs must be at least 1"):
        _run(image_data, tmp_path, "++umap.enabled=True", "++umap.method=pca", "++umap.every_n_epochs=0")
    with pytest.raises(ConfigError, match="umap.max_samples must be 0"):
        _run(image_data, tmp_path, "++umap.enabled=True", "++umap.method=pca", "++umap.max_samples=2")
    monkeypatch.setitem(sys.modules, "umap", None)  # umap-learn missing: said before training
    with pytest.raises(ConfigError, match=r"umap.method=umap needs .*pip install 'ivreg\[umap\]'"):
        _run(image_data, tmp_path, "++umap.enabled=True")
    assert not (tmp_path / "tiny" / "config.yaml").exists()  # nothing was launched


def test_online_knn_on_unlabelled_training_images_is_refused_at_launch(image_data, tmp_path) -> None:
    import shutil

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, image in enumerate(sorted(image_data[0].rglob("*.png"))):
        shutil.copy(image, flat / f"{i:03d}.png")
    with pytest.raises(ConfigError, match=r"knn.enabled=True needs labelled training images .* unlabelled images only"):
        _run(image_data, tmp_path, f"data.train_path={flat}", "++knn.enabled=True")


@pytest.mark.parametrize("online", [["++knn.enabled=True"], ["++umap.enabled=True", "++umap.method=pca"]])
def test_online_evaluation_without_a_validation_split_is_refused_at_launch(image_data, tmp_path, online) -> None:
    with pytest.raises(ConfigError, match=r"needs a validation split, but data.val_path is null"):
        _run(image_data, tmp_path, "data.val_path=null", *online)


def test_too_few_validation_images_skip_the_map_and_training_goes_on(image_data, tmp_path) -> None:
    """limit_val_batches=1 of batch 2: two images, no 2-D map; a warning, not a lost epoch."""
    extra = ["max_epochs=1", "++umap.enabled=True", "++umap.method=pca", "++umap.every_n_epochs=1"]
    run = _run(
        image_data, tmp_path, *extra, "optimizer.batch_size=2", "++limit_val_batches=1", "++limit_train_batches=2"
    )
    with pytest.warns(UserWarning, match="no pca map after epoch 1: only 2 validation images"):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert (run.run_dir / "last.ckpt").is_file() and not (run.run_dir / "umap").exists()


def test_umap_of_a_handful_of_points_starts_at_random(monkeypatch) -> None:
    """UMAP's spectral start fails below about as many points as neighbours: tiny samples start at random."""
    import types

    import numpy as np

    from ivreg.analysis.umap_plot import embed_2d

    calls: list[dict] = []

    class FakeUMAP:
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def fit_transform(self, x):
            return x[:, :2]

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    embed_2d(np.ones((4, 3), dtype=np.float32), "umap")
    embed_2d(np.ones((100, 3), dtype=np.float32), "umap")
    assert [c["init"] for c in calls] == ["random", "spectral"] and calls[0]["n_neighbors"] == 3
