"""Weighted kNN: hand-computed votes (cosine and Euclidean), several k and temperatures from one
search, chunking that changes nothing, errors, and main_knn's function on a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from ivreg.config import UnreadConfigKeyWarning
from ivreg.errors import CheckpointError, ConfigError
from ivreg.eval.knn import OnlineKNN, knn_accuracy, knn_scores, nearest, run_knn

from ..eval_helpers import colour_checkpoint

# Bank: four 2-D features with labels; queries q0 (label 0) and q1 (label 1).
BANK = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
BANK_Y = torch.tensor([0, 1, 1, 2])
QUERIES = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
QUERY_Y = torch.tensor([0, 1])


def test_cosine_scores_are_exp_of_similarity_over_temperature():
    # q0's cosine similarities to the bank: 1, 0.8, 0, -1 (already unit vectors).
    scores = knn_scores(BANK, BANK_Y, QUERIES[:1], k=3, temperature=1.0, num_classes=3)
    expected = torch.tensor([[math.exp(1.0), math.exp(0.8) + math.exp(0.0), 0.0]])
    torch.testing.assert_close(scores, expected)
    # Scaling the features changes nothing: cosine normalises them.
    torch.testing.assert_close(knn_scores(3 * BANK, BANK_Y, QUERIES[:1] / 7, k=3, temperature=1.0), expected)
    # k=4 adds the opposite vector's exp(-1/T) to class 2.
    scores4 = knn_scores(BANK, BANK_Y, QUERIES[:1], k=4, temperature=0.5)
    torch.testing.assert_close(scores4[0, 2], torch.tensor(math.exp(-2.0)))


def test_several_k_and_temperatures_from_one_search():
    """q0: at k=3 two class-1 neighbours (sim 0.8 and 0) face one class-0 neighbour (sim 1).
    T=1: e^1 = 2.72 < e^0.8 + e^0 = 3.23, class 1 wins (wrong); T=0.1: e^10 > e^8 + 1, class 0 wins.
    q1 (sims 0.6, 0.96, 0.8, -0.6) is right in every setting."""
    results = knn_accuracy(BANK, BANK_Y, QUERIES, QUERY_Y, ks=[1, 3], temperatures=[0.1, 1.0])
    acc1 = {(r.k, r.temperature): r.acc1 for r in results}
    assert acc1 == {(1, 0.1): 100.0, (1, 1.0): 100.0, (3, 0.1): 100.0, (3, 1.0): 50.0}
    assert all(r.acc5 == 100.0 for r in results)  # three classes: the top 5 hold them all
    assert all(r.distance == "cosine" for r in results)


def test_top5_holds_only_classes_the_neighbours_voted_for():
    """q0 labelled 2: its nearest neighbour is class 0, the next two class 1; class 2 is
    farthest. With k < 5 the unvoted classes must not fill the top 5 (by topk's tie order:
    with three classes all of them)."""
    wrong = torch.tensor([2])
    for classes in (3, 8):
        results = knn_accuracy(BANK, BANK_Y, QUERIES[:1], wrong, ks=[1, 3, 4], temperatures=[0.1], num_classes=classes)
        assert {r.k: (r.acc1, r.acc5) for r in results} == {1: (0.0, 0.0), 3: (0.0, 0.0), 4: (0.0, 100.0)}


def test_euclidean_weights_are_inverse_distances():
    bank = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.4, 0.0]])  # distances 1.4, 1.6, sqrt(1.96 + 16)
    scores = knn_scores(bank, labels, query, k=3, distance="euclidean", num_classes=2)
    expected = torch.tensor([[1 / 1.4, 1 / 1.6 + 1 / math.sqrt(17.96)]])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    # The nearest neighbour is class 0; the two class-1 neighbours outvote it at k=3.
    results = knn_accuracy(bank, labels, query, torch.tensor([0]), ks=[1, 3], distance="euclidean")
    assert [(r.k, r.acc1) for r in results] == [(1, 100.0), (3, 0.0)]
    assert all(math.isnan(r.temperature) for r in results)  # no temperature for inverse distance


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_chunked_search_equals_one_block(distance: str):
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(53, 8, generator=gen), torch.randn(37, 8, generator=gen)
    bank_y, query_y = torch.randint(0, 4, (53,), generator=gen), torch.randint(0, 4, (37,), generator=gen)
    whole = knn_accuracy(bank, bank_y, queries, query_y, [1, 5, 20], [0.07, 0.5], distance)
    chunked = knn_accuracy(bank, bank_y, queries, query_y, [1, 5, 20], [0.07, 0.5], distance, 4, 7, 5)
    assert whole == chunked
    if distance == "cosine":
        normed_b, normed_q = torch.nn.functional.normalize(bank), torch.nn.functional.normalize(queries)
        expected = (normed_q @ normed_b.T).topk(20, dim=1)
    else:
        normed_b, normed_q = bank, queries
        expected = (-torch.cdist(queries, bank)).topk(20, dim=1)
    closeness, idx = nearest(normed_b, normed_q, 20, distance, bank_chunk_size=6)
    torch.testing.assert_close(closeness, expected.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, expected.indices)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match=r"k=5 is larger than the feature bank \(4 labelled training images\)"):
        knn_accuracy(BANK, BANK_Y, QUERIES, QUERY_Y, ks=[2, 5])
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        knn_accuracy(BANK, BANK_Y, QUERIES, QUERY_Y, ks=[2], temperatures=[0.0])
    with pytest.raises(ConfigError, match="unknown kNN distance 'manhattan'"):
        knn_accuracy(BANK, BANK_Y, QUERIES, QUERY_Y, ks=[2], distance="manhattan")
    with pytest.raises(ConfigError, match="k must be >= 1"):
        OnlineKNN(k=0)
    # main_knn's config, before any checkpoint is read
    with pytest.raises(ConfigError, match=r"k must be a whole number or a list of them, e.g. \[10,20\], got \['abc'\]"):
        run_knn({"pretrained_feature_extractor": "x", "k": "abc"})
    with pytest.raises(ConfigError, match="batch_size must be a whole number, got 12.5"):
        run_knn({"pretrained_feature_extractor": "x", "batch_size": 12.5})
    unread = pytest.warns(UnreadConfigKeyWarning, match=r"kk is not read by ivreg .*did you mean k\?")
    with unread, pytest.raises(CheckpointError):
        run_knn({"pretrained_feature_extractor": "/nonexistent.ckpt", "kk": 5})


def test_run_knn_on_a_checkpoint_finds_the_colour_classes(tmp_path, monkeypatch, capsys):
    _, _, ckpt = colour_checkpoint(tmp_path, per_class_train=12, per_class_val=4)
    out = tmp_path / "knn.csv"
    results = run_knn({"pretrained_feature_extractor": str(ckpt), "k": [1, 10], "accelerator": "cpu", "out": str(out)})
    assert [r.k for r in results] == [1, 10]
    assert all(r.acc1 == 100.0 for r in results)  # one colour per class: trivially close neighbours
    lines = out.read_text().splitlines()
    assert lines[0] == "checkpoint,dataset,features,k,temperature,distance,acc1,acc5" and len(lines) == 3
    assert "kNN (cosine)" in capsys.readouterr().out
    out.unlink()
    monkeypatch.setenv("RANK", "1")  # another process of a torchrun launch: computes, does not report
    cfg = {"pretrained_feature_extractor": str(ckpt), "k": [1], "accelerator": "cpu", "out": str(out)}
    assert run_knn(cfg)[0].acc1 == 100.0
    assert not out.exists() and capsys.readouterr().out == ""
    monkeypatch.delenv("RANK")
    with pytest.raises(ConfigError, match="k=37 is larger than the feature bank"):
        run_knn({"pretrained_feature_extractor": str(ckpt), "k": [37], "accelerator": "cpu"})


def test_online_knn_reads_device_resident_splits_like_the_dataset_path(image_data, tmp_path):
    """With data.pipeline=resident the online kNN takes both splits' tensors from the device
    (no DataLoader, no decoding); the features equal those of the evaluation transform."""
    from ivreg.config import compose
    from ivreg.data.augment import build_eval_transform
    from ivreg.data.datasets import Transformed
    from ivreg.eval.common import extract_features
    from ivreg.train import build_run

    from ..conftest import CIFAR_CONFIGS, tiny_overrides

    train, val = image_data
    knn = ["++knn.enabled=True", "++knn.k=5", "++data.pipeline=resident", "max_epochs=1", "scheduler.warmup_epochs=0"]
    run = build_run(compose(str(CIFAR_CONFIGS), "isoloss-noema.yaml", tiny_overrides(train, val, tmp_path) + knn))
    dm = run.datamodule
    calls: list[str] = []
    eval_batches = dm.eval_batches
    dm.eval_batches = lambda split, size, *shard: calls.append(split) or eval_batches(split, size, *shard)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert dm.pipeline == "resident" and calls == ["train", "val"]
    assert 0.0 <= float(run.trainer.callback_metrics["val_knn_acc1"]) <= 100.0

    backbone = run.model.backbone
    transform = build_eval_transform(dm.crop_size, dm.mean, dm.std)
    for split, raw in (("train", dm.raw_train), ("val", dm.raw_val)):
        on_device = extract_features(backbone, eval_batches(split, 7))
        from_files = extract_features(backbone, Transformed(raw, transform), batch_size=7)
        assert len(on_device[1]) == len(raw)
        torch.testing.assert_close(on_device[1], from_files[1])
        torch.testing.assert_close(on_device[0], from_files[0], rtol=1e-4, atol=1e-5)


def test_seeded_sample_is_what_limited_validation_sees() -> None:
    from ivreg.data.datamodule import FixedShuffleSampler, seeded_sample

    sample = seeded_sample(50, 12, seed=3)
    assert sample is not None and sample.tolist() == sorted(list(FixedShuffleSampler(50, 3))[:12])
    assert seeded_sample(50, 50, seed=3) is None and seeded_sample(50, None, seed=3) is None


@pytest.mark.parametrize("pipeline", ["workers", "resident"])
def test_online_knn_encodes_only_what_limited_loops_see(pipeline: str, image_data, tmp_path) -> None:
    """Under limit_train_batches / limit_val_batches the online kNN's bank is as many training
    images as an epoch trains on, and its queries are the validation images validated (all of
    both splits took longer than the limited run on ImageNet)."""
    from ivreg.config import compose
    from ivreg.eval.knn import OnlineKNN
    from ivreg.train import build_run

    from ..conftest import CIFAR_CONFIGS, tiny_overrides

    train, val = image_data
    extra = ["++knn.enabled=True", "++knn.k=5", f"++data.pipeline={pipeline}", "max_epochs=1"]
    extra += ["scheduler.warmup_epochs=0", "++limit_train_batches=2", "++limit_val_batches=1"]
    run = build_run(compose(str(CIFAR_CONFIGS), "isoloss-noema.yaml", tiny_overrides(train, val, tmp_path) + extra))
    run.trainer.fit(run.model, datamodule=run.datamodule)
    (knn,) = [cb for cb in run.trainer.callbacks if isinstance(cb, OnlineKNN)]
    assert (knn.bank_size, knn.query_size) == (2 * 8, 8)
    assert 0.0 <= float(run.trainer.callback_metrics["val_knn_acc1"]) <= 100.0


def test_knn_of_a_bare_state_dict_described_on_the_command_line(tmp_path):
    from ivreg.checkpoints import load_backbone

    train, val, ckpt = colour_checkpoint(tmp_path, per_class_train=12, per_class_val=4)
    bare = tmp_path / "resnet10.pth"
    torch.save(load_backbone(ckpt).state_dict(), bare)
    data = {"dataset": "custom", "train_path": str(train), "val_path": str(val), "crop_size": 32}
    cfg = {"pretrained_feature_extractor": str(bare), "k": [1], "accelerator": "cpu", "data": data}
    (result,) = run_knn({**cfg, "backbone": {"name": "resnet10"}})
    (own,) = run_knn({**cfg, "pretrained_feature_extractor": str(ckpt)})
    assert result.acc1 == own.acc1 == 100.0
    with pytest.raises(CheckpointError, match="bare state_dict, not a Lightning checkpoint written by ivreg"):
        run_knn(cfg)
    with pytest.raises(ConfigError, match="features=projector needs the projector's shape from an ivreg config"):
        run_knn({**cfg, "backbone": {"name": "resnet10"}, "features": "projector"})
    for empty in ({"distance": []}, {"features": []}):
        with pytest.raises(ConfigError, match="distance and features must each name at least one"):
            run_knn({**cfg, **empty})


def test_knn_on_projector_features_uses_the_trained_projector(image_data, tmp_path):
    """features=projector (solo-learn's feature_type): the kNN runs on z = projector(backbone(x))
    with the checkpoint's projector in eval mode."""
    from ivreg.checkpoints import load_backbone, load_projector
    from ivreg.config import compose
    from ivreg.eval.common import eval_view, extract_features
    from ivreg.train import pretrain

    from ..conftest import CIFAR_CONFIGS, tiny_overrides

    train, val = image_data
    overrides = tiny_overrides(train, val, tmp_path) + ["max_epochs=1", "scheduler.warmup_epochs=0"]
    run = pretrain(compose(str(CIFAR_CONFIGS), "isoloss-noema.yaml", overrides))
    ckpt = tmp_path / "tiny" / "last.ckpt"
    projector = load_projector(ckpt, run.cfg, in_dim=run.model.backbone.num_features)
    assert not projector.training and projector.num_features == 16
    for key, value in projector.state_dict().items():
        torch.testing.assert_close(value, run.model.projector.state_dict()[key], msg=key)

    out = tmp_path / "knn.csv"
    cfg = {"pretrained_feature_extractor": str(ckpt), "k": [3], "accelerator": "cpu", "features": "projector"}
    (result,) = run_knn({**cfg, "out": str(out)})
    assert "projector" in out.read_text().splitlines()[1]
    # the same accuracy from the projections computed here
    net = torch.nn.Sequential(load_backbone(ckpt), projector).eval()
    data = {**run.cfg.data, "crop_size": 32, "mean": run.datamodule.mean, "std": run.datamodule.std}
    feats = {}
    for split, raw in (("train", run.datamodule.raw_train), ("val", run.datamodule.raw_val)):
        feats[split] = extract_features(net, eval_view(raw, data), batch_size=16)
    (expected,) = knn_accuracy(*feats["train"], *feats["val"], ks=[3])
    assert result.acc1 == expected.acc1 and result.acc5 == expected.acc5
    with pytest.raises(ConfigError, match="unknown features 'logits'"):
        run_knn({**cfg, "features": "logits"})
    # lists (solo-learn's feature_type and distance_function): one encoding, every combination
    both = run_knn({**cfg, "features": ["backbone", "projector"], "distance": ["cosine", "euclidean"], "out": str(out)})
    assert [(r.features, r.distance) for r in both] == [
        ("backbone", "cosine"),
        ("backbone", "euclidean"),
        ("projector", "cosine"),
        ("projector", "euclidean"),
    ]
    assert both[2].acc1 == expected.acc1 and both[2].acc5 == expected.acc5
    (euclidean,) = knn_accuracy(*feats["train"], *feats["val"], ks=[3], distance="euclidean")
    assert both[3].acc1 == euclidean.acc1
    rows = out.read_text().splitlines()
    assert rows[0] == "checkpoint,dataset,features,k,temperature,distance,acc1,acc5" and len(rows) == 5
    assert [row.split(",")[2] for row in rows[1:]] == ["backbone", "backbone", "projector", "projector"]


def test_epochs_the_online_knn_skips_hold_no_stale_accuracy(image_data, tmp_path) -> None:
    """every_n_epochs=2 of 4: epochs 2 and 4 (and the last) hold the kNN accuracy, epochs 1 and
    3 none (Lightning's callback_metrics kept the last logged value for them)."""
    import csv
    import math

    from ivreg.config import compose
    from ivreg.train import pretrain

    from ..conftest import CIFAR_CONFIGS, tiny_overrides

    train, val = image_data
    extra = ["++knn.enabled=True", "++knn.k=5", "++knn.every_n_epochs=2", "max_epochs=4", "scheduler.warmup_epochs=0"]
    run = pretrain(compose(str(CIFAR_CONFIGS), "isoloss-noema.yaml", tiny_overrides(train, val, tmp_path) + extra))
    with open(run.run_dir / "epochs.csv", newline="") as f:
        knn = [float(r["val_knn_acc1"]) for r in csv.DictReader(f)]
    assert [math.isnan(v) for v in knn] == [True, False, True, False], knn
