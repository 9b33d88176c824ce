"""2-D feature maps: the message when umap-learn is missing, the UMAP call, and PCA/t-SNE end to end."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ivreg.analysis import umap_plot
from ivreg.analysis.umap_plot import checkpoint_features, embed_2d, main, plot_embedding, require_umap
from ivreg.errors import ConfigError

from ..eval_helpers import colour_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def colour_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_checkpoint(tmp_path_factory.mktemp("umap"), per_class_train=8, per_class_val=8)[2]


def test_missing_umap_learn_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "umap", None)  # makes `import umap` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'ivreg\[umap\]'"):
        require_umap()
    with pytest.raises(ConfigError, match="umap-learn"):
        embed_2d(np.random.default_rng(0).normal(size=(10, 4)), "umap")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "not-even-read.ckpt")])  # checked before the checkpoint is opened
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {umap_plot.UMAP_MISSING}"


def test_umap_is_called_with_two_components_and_the_seed(monkeypatch):
    calls: dict = {}

    class FakeUMAP:
        def __init__(self, **kwargs):
            calls.update(kwargs)

        def fit_transform(self, x):
            return x[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    np.testing.assert_allclose(embed_2d(x, "umap", seed=3), x[:, :2] * 2)
    assert calls == {
        "n_components": 2,
        "n_neighbors": 5,
        "metric": "cosine",
        "random_state": 3,
        "n_jobs": 1,
        "init": "random",
    }


def test_pca_and_tsne_maps_of_a_checkpoint(colour_ckpt, tmp_path, capsys):
    feats, labels, names, dataset = checkpoint_features(colour_ckpt, "val", accelerator="cpu")
    assert feats.shape == (24, 512) and dataset == "custom"
    assert names == ["class_0", "class_1", "class_2"] and sorted(set(labels.tolist())) == [0, 1, 2]
    xy = embed_2d(feats, "pca")
    centroids = np.stack([xy[labels == c].mean(0) for c in range(3)])
    spread = max(np.linalg.norm(xy[labels == c] - centroids[c], axis=1).max() for c in range(3))
    gaps = [np.linalg.norm(centroids[i] - centroids[j]) for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > spread  # the colour classes form separate clusters

    out = tmp_path / "maps" / "pca.png"
    assert main([str(colour_ckpt), "--method", "pca", "--out", str(out), "--accelerator", "cpu"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert main([str(colour_ckpt.parent), "--method", "tsne", "--max-samples", "12", "--accelerator", "cpu"]) == 0
    assert (colour_ckpt.parent / "tsne.png").read_bytes()[:8] == PNG_MAGIC
    assert capsys.readouterr().out.splitlines() == [str(out), str(colour_ckpt.parent / "tsne.png")]


def test_many_classes_get_a_colour_bar(tmp_path):
    rng = np.random.default_rng(0)
    out = plot_embedding(rng.normal(size=(100, 2)), np.arange(100) % 25, tmp_path / "many.png", title="25 classes")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ConfigError, match="unknown method 'mds'"):
        embed_2d(rng.normal(size=(10, 3)), "mds")


def test_errors_name_this_tools_flags_not_config_keys(colour_ckpt, capsys):
    """Another dataset without its folders is refused, in the words of main_umap.py's options."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(colour_ckpt), "--method", "pca", "--dataset", "cifar100", "--accelerator", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--dataset=cifar100 differs from the pretraining run's custom" in err
    assert "set --train-path and --val-path to the cifar100 folders" in err and "data." not in err


def test_a_map_of_the_validation_split_reads_no_training_folder(colour_ckpt, tmp_path, capsys):
    """After the training folder moved away, --split val still works; --split train names the
    flag that sets the training folder."""
    val = tmp_path / "val"
    shutil.copytree(colour_ckpt.parent.parent / "val", val)
    gone = ["--train-path", str(tmp_path / "moved"), "--val-path", str(val), "--accelerator", "cpu"]
    out = tmp_path / "pca.png"
    assert main([str(colour_ckpt), "--method", "pca", "--out", str(out), *gone]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(SystemExit) as exit_info:
        main([str(colour_ckpt), "--method", "pca", "--split", "train", "--out", str(out), *gone])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "does not exist; set --train-path" in err and "data." not in err
