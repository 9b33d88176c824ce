"""Linear evaluation: frozen backbone (BatchNorm included), accuracy on separable data,
fine-tuning, and the whole chain pretraining -> main_linear -> main_knn on the command line."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ivreg.analysis.projections import load_method
from ivreg.checkpoints import load_backbone
from ivreg.config import compose
from ivreg.errors import CheckpointError, ConfigError
from ivreg.eval.common import eval_data_config, eval_datasets, eval_view, extract_features
from ivreg.eval.knn import OnlineKNN
from ivreg.eval.linear import build_linear_run, linear_eval, linear_optimizer, prepare_linear_config
from ivreg.train import build_run, pretrain

from ..conftest import CIFAR_CONFIGS, ROOT, KillAtEpoch, tiny_overrides
from ..eval_helpers import colour_checkpoint, linear_probe_accuracy


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def colour_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_checkpoint(tmp_path_factory.mktemp("colour"))[2]


def _linear_cfg(ckpt: Path, run_root: Path, *, finetune: bool = False, epochs: int = 6, name: str = "lin") -> dict:
    return {
        "pretrained_feature_extractor": str(ckpt),
        "name": name,
        "finetune": finetune,
        "max_epochs": epochs,
        "accelerator": "cpu",
        "precision": 32,
        "optimizer": {"batch_size": 16, "lr": 0.1 * 256 / 16},  # an effective lr of 0.1
        "checkpoint": {"dir": str(run_root)},
        "logger": {"csv": False, "tensorboard": False},
        "num_sanity_val_steps": 0,
        "enable_model_summary": False,
    }


class _BackboneModeProbe(L.Callback):
    """Switches the module to training mode at every epoch start, as Lightning versions before
    2.2 did after validation (and as user code may), then records the backbone's mode (and its
    BatchNorm layers') at every training step."""

    def __init__(self) -> None:
        self.modes: list[bool] = []
        self.batch_shapes: list[tuple[int, ...]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        pl_module.train()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_shapes.append(tuple(batch[0].shape))
        self.modes.append(pl_module.backbone.training)
        self.modes.extend(m.training for m in pl_module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("pipeline", ["workers", "hybrid", "resident"])
def test_linear_probe_on_separable_features_is_accurate_and_leaves_the_backbone_alone(
    pipeline: str, colour_ckpt, tmp_path
):
    """With each pipeline: per-image crops in DataLoader workers, crops in workers and the
    normalisation batched, or (as on a GPU) the training split held as one uint8 tensor and
    cropped in batches."""
    before = {k: v.clone() for k, v in load_backbone(colour_ckpt).state_dict().items()}
    assert any("running_mean" in k and v.abs().sum() > 0 for k, v in before.items())  # calibrated, not 0/1

    # Precondition: the classes are linearly separable in these features (closed-form probe).
    net = load_backbone(colour_ckpt)
    from ivreg.checkpoints import load_config

    data = eval_data_config(load_config(colour_ckpt))
    train, val, num_classes = eval_datasets(data)
    assert num_classes == 3 and len(train) == 120 and len(val) == 30
    tx, ty = extract_features(net, eval_view(train, data))
    vx, vy = extract_features(net, eval_view(val, data))
    assert linear_probe_accuracy(tx, ty, vx, vy) >= 95.0

    run = build_linear_run({**_linear_cfg(colour_ckpt, tmp_path, epochs=4), "data": {"pipeline": pipeline}})
    probe = _BackboneModeProbe()
    run.trainer.callbacks.append(probe)
    run.trainer.fit(run.model, datamodule=run.datamodule)

    assert probe.modes and not any(probe.modes), "the frozen backbone (or a BatchNorm) was in training mode"
    assert run.datamodule.pipeline == pipeline
    assert probe.batch_shapes and all(shape[1:] == (3, 32, 32) for shape in probe.batch_shapes)  # one view
    rows = _rows(tmp_path / "lin" / "epochs.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(4))
    final = float(rows[-1]["val_acc1"])
    print(f"linear probe on colour classes: val_acc1 per epoch {[round(float(r['val_acc1']), 2) for r in rows]}")
    assert final > 90.0
    assert float(rows[-1]["val_acc5"]) == 100.0  # 3 classes: top-5 holds them all
    after = run.model.backbone.state_dict()
    saved = load_backbone(tmp_path / "lin" / "last.ckpt").state_dict()  # the linear checkpoint loads too
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=key)
    # the rate each epoch began with: cosine from 0.1 to 0 over the 4 epochs
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])


def test_finetune_trains_backbone_weights_and_batchnorm_statistics(colour_ckpt, tmp_path):
    before = load_backbone(colour_ckpt).state_dict()
    run = linear_eval(_linear_cfg(colour_ckpt, tmp_path, finetune=True, epochs=1, name="ft"))
    after = run.model.backbone.state_dict()
    assert run.cfg.name == "ft" and (tmp_path / "ft" / "last.ckpt").is_file()
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])
    assert not torch.equal(after["layer4.0.bn2.running_var"], before["layer4.0.bn2.running_var"])
    # the stem's statistics move too (ivreg.norms leaves num_batches_tracked alone)
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])


def test_finetune_backbone_lr_scale_sets_the_backbone_step(colour_ckpt, tmp_path):
    """A scale of 0 freezes the pretrained weights (BatchNorm statistics still follow the data)
    while the head trains at the full rate."""
    cfg = _linear_cfg(colour_ckpt, tmp_path, finetune=True, epochs=1, name="ft-frozen")
    cfg["optimizer"]["backbone_lr_scale"] = 0.0
    before = load_backbone(colour_ckpt).state_dict()
    run = linear_eval(cfg)
    after = run.model.backbone.state_dict()
    torch.testing.assert_close(after["conv1.weight"], before["conv1.weight"], rtol=0, atol=0)
    assert not torch.equal(after["layer4.0.bn2.running_var"], before["layer4.0.bn2.running_var"])
    head, backbone = run.trainer.optimizers[0].param_groups
    assert head["initial_lr"] == pytest.approx(0.1) and backbone["initial_lr"] == 0.0


def test_linear_run_refuses_a_missing_checkpoint_and_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="pretrained_feature_extractor"):
        build_linear_run({"checkpoint": {"dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match="crop_min_scale"):
        build_linear_run({"pretrained_feature_extractor": "x.ckpt", "augmentations": {"crop_min_scale": 0}})
    with pytest.raises(ConfigError, match="the linear configs have no logger groups"):
        build_linear_run({"pretrained_feature_extractor": "x.ckpt", "logger": "csv"})
    with pytest.raises(ConfigError, match="backbone_lr_scale must be >= 0"):
        build_linear_run({"pretrained_feature_extractor": "x.ckpt", "optimizer": {"backbone_lr_scale": -1}})
    # optimizer options are checked with the config, before the checkpoint is read or a folder made
    bad_options = [
        ({"name": "sgd", "kwargs": {"betas": [0.9, 0.99]}}, "betas"),
        ({"kwargs": {"momentum": 0.0, "nesterov": True}}, "Nesterov"),
        ({"name": "adamw"}, "momentum.*~optimizer.kwargs"),
    ]
    for optimizer, message in bad_options:
        with pytest.raises(ConfigError, match=message):
            build_linear_run(
                {"pretrained_feature_extractor": "x.ckpt", "optimizer": optimizer, "checkpoint": {"dir": str(tmp_path)}}
            )
    assert not list(tmp_path.iterdir())
    adamw = {"name": "adamw", "weight_decay": 0.0, "kwargs": {"amsgrad": True}}  # what torch takes passes
    assert linear_optimizer(adamw, [{"params": [torch.zeros(1, requires_grad=True)]}], 0.1).defaults["amsgrad"]


def _tool(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """One of the command lines (``main_linear.py``, ``main_knn.py``...), as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_pretrain_with_online_knn_then_linear_and_knn_on_the_command_line(image_data, tmp_path):
    """Tiny pretraining (with the online kNN callback), then main_linear and main_knn on its checkpoint."""
    train, val = image_data
    knn = ["++knn.enabled=True", "++knn.k=5", "++knn.temperature=0.1"]
    cfg = compose(str(CIFAR_CONFIGS), "isoloss-noema.yaml", tiny_overrides(train, val, tmp_path, "tiny") + knn)
    run = build_run(cfg)
    assert any(isinstance(cb, OnlineKNN) for cb in run.trainer.callbacks)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    online = float(run.trainer.callback_metrics["val_knn_acc1"])
    assert 0.0 <= online <= 100.0
    logged = [r for r in _rows(next((tmp_path / "tiny" / "logs").glob("version_*/metrics.csv"))) if r["val_knn_acc1"]]
    assert len(logged) == 2  # once per epoch
    rows = _rows(tmp_path / "tiny" / "epochs.csv")
    knn_column = [float(r["val_knn_acc1"]) for r in rows]
    assert len(knn_column) == 2 and all(0.0 <= v <= 100.0 for v in knn_column)
    assert all(float(r["val_knn_acc1"]) <= float(r["val_knn_acc5"]) <= 100.0 for r in rows)
    ckpt = tmp_path / "tiny" / "last.ckpt"

    common = ["accelerator=cpu", "data.num_workers=0"]
    linear = _tool(
        "main_linear.py",
        tmp_path,
        f"pretrained_feature_extractor={ckpt}",
        "max_epochs=2",
        "optimizer.batch_size=16",
        f"checkpoint.dir={tmp_path}",
        "precision=32",
        "++enable_model_summary=False",
        *common,
    )
    assert linear.returncode == 0, linear.stderr[-3000:]
    run_dir = tmp_path / "tiny-linear"
    rows = _rows(run_dir / "epochs.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(0.0 <= float(r["val_acc1"]) <= 100.0 for r in rows)
    assert "tiny-linear: final val_acc1" in linear.stdout
    assert (run_dir / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.pretrain_cfg.name == "tiny" and saved.data.dataset == "custom" and saved.data.num_classes == 3

    out = tmp_path / "knn.csv"
    knn = _tool(
        "main_knn.py",
        tmp_path,
        f"pretrained_feature_extractor={tmp_path / 'tiny'}",
        "k=[5,10]",
        "temperature=0.1",
        f"out={out}",
        *common,
    )
    assert knn.returncode == 0, knn.stderr[-3000:]
    results = {int(r["k"]): r for r in _rows(out)}
    assert set(results) == {5, 10}
    # Same weights (last.ckpt is written after the last validation), same data, same k and T.
    assert float(results[5]["acc1"]) == pytest.approx(online, abs=1e-4)

    too_many = _tool("main_knn.py", tmp_path, f"pretrained_feature_extractor={ckpt}", "k=[10,49]", *common)
    assert too_many.returncode == 2
    assert too_many.stderr.strip().splitlines() == [
        "error: k=49 is larger than the feature bank (48 labelled training images); choose k <= 48"
    ]

    # The linear run's checkpoint holds a backbone too, but not a pretraining run: every tool
    # that needs the pretraining config names the mistake (the backbone alone still loads).
    linear_ckpt = run_dir / "last.ckpt"
    assert load_backbone(linear_ckpt).num_features == load_backbone(ckpt).num_features
    mistaken = _tool("main_knn.py", tmp_path, f"pretrained_feature_extractor={run_dir}", *common)
    assert mistaken.returncode == 2
    assert mistaken.stderr.strip().splitlines() == [
        f"error: {run_dir} is a linear-evaluation checkpoint (main_linear.py); pass the pretraining run's "
        f"checkpoint instead (this one was trained on {ckpt})"
    ]
    with pytest.raises(CheckpointError, match="is a linear-evaluation checkpoint"):
        build_linear_run({**_linear_cfg(linear_ckpt, tmp_path), "name": "lin-of-lin"})
    with pytest.raises(CheckpointError, match="is a linear-evaluation checkpoint"):
        load_method(linear_ckpt)


def test_eval_data_inherits_from_pretraining_and_overrides_win():
    pretrain = {
        "data": {"dataset": "cifar10", "train_path": "/data", "val_path": "/data", "fraction": 0.1, "num_workers": 3},
        "augmentations": [{"crop_size": 28}],
    }
    data = eval_data_config(pretrain, {"val_path": "/other", "train_path": None})
    assert (data["train_path"], data["val_path"], data["num_workers"]) == ("/data", "/other", 3)
    assert data["crop_size"] == 28 and data["fraction"] == 1.0  # the pretraining subset is not inherited
    assert data["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])  # the dataset's statistics
    stl = eval_data_config(pretrain, {"dataset": "stl10", "crop_size": 96, "train_path": "/s", "val_path": "/s"})
    assert stl["crop_size"] == 96 and stl["mean"] == pytest.approx([0.4467, 0.4398, 0.4066])
    # another dataset read from the pretraining run's folders would be evaluated on the wrong images
    with pytest.raises(
        ConfigError,
        match=r"data.dataset=stl10 differs from the pretraining run's cifar10, whose "
        r"data.val_path=/data this evaluation would read; set data.val_path to the stl10 folders",
    ):
        eval_data_config(pretrain, {"dataset": "stl10", "train_path": "/s"})
    with pytest.raises(ConfigError, match=r"data.num_workers must be >= 0 \(0: load in the main process\), got -1"):
        eval_data_config(pretrain, {"num_workers": -1})


def test_a_second_launch_resumes_and_a_different_evaluation_is_refused(colour_ckpt, tmp_path, capsys):
    linear_eval(_linear_cfg(colour_ckpt, tmp_path, epochs=1, name="again"))
    with pytest.warns(UserWarning, match="max_epochs=1; resumed with max_epochs=2, .* recomputed over 2 epochs"):
        resumed = linear_eval(_linear_cfg(colour_ckpt, tmp_path, epochs=2, name="again"))
    assert resumed.resume_from == tmp_path / "again" / "last.ckpt"
    assert "resuming" in capsys.readouterr().out
    rows = _rows(tmp_path / "again" / "epochs.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1] and int(rows[1]["step"]) == 2 * int(rows[0]["step"])
    # the resumed epoch begins at the 2-epoch schedule's rate (half-way: 0.05), not at the 1-epoch one's end (0)
    assert float(rows[1]["lr"]) == pytest.approx(0.05)
    versions = sorted(p.name for p in (tmp_path / "again").glob("*/version_*"))
    linear_eval(_linear_cfg(colour_ckpt, tmp_path, epochs=2, name="again"))  # finished: trains nothing
    assert "final val_acc1" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "again").glob("*/version_*")) == versions
    assert len(_rows(tmp_path / "again" / "epochs.csv")) == 2
    with pytest.raises(ConfigError, match=r"differs from this config in \['finetune'\]"):
        build_linear_run(_linear_cfg(colour_ckpt, tmp_path, finetune=True, name="again"))
    with pytest.raises(ConfigError, match=r"differs from this config in \['data.crop_size'\]"):
        build_linear_run({**_linear_cfg(colour_ckpt, tmp_path, epochs=3, name="again"), "data": {"crop_size": 24}})
    with pytest.raises(ConfigError, match=r"\['optimizer.kwargs.nesterov'\]"):  # an option the run did not have
        cfg = _linear_cfg(colour_ckpt, tmp_path, epochs=3, name="again")
        build_linear_run({**cfg, "optimizer": {**cfg["optimizer"], "kwargs": {"nesterov": True}}})


def test_a_changed_pretraining_checkpoint_is_not_resumed_and_the_backbone_is_its_own(colour_ckpt, tmp_path):
    """A pretraining run goes on writing to the same last.ckpt: a linear run begun on its
    earlier weights must not continue (and report) as if it evaluated the later ones."""
    ckpt = tmp_path / "pretrain.ckpt"
    state = torch.load(colour_ckpt, weights_only=True)
    torch.save(state, ckpt)
    linear_eval(_linear_cfg(ckpt, tmp_path, epochs=1, name="lin"))
    key = next(k for k in state["state_dict"] if k.startswith("backbone.") and k.endswith("weight"))
    state["state_dict"][key] = state["state_dict"][key] + 1e-3  # pretraining went on
    torch.save(state, ckpt)
    with pytest.raises(
        ConfigError, match=r"differs from this config in \['pretrained_backbone_sha256'\]\. The pretrained weights it"
    ) as refused:
        build_linear_run(_linear_cfg(ckpt, tmp_path, epochs=2, name="lin"))
    assert "in a sweep" not in str(refused.value)  # (the digest is recorded, not a key to interpolate)
    # a linear run from before the digest was recorded resumes as it did then (nothing to compare)
    linear_ckpt = torch.load(tmp_path / "lin" / "last.ckpt", weights_only=True)
    del linear_ckpt["hyper_parameters"]["cfg"]["pretrained_backbone_sha256"]
    torch.save(linear_ckpt, tmp_path / "lin" / "last.ckpt")
    assert build_linear_run(_linear_cfg(ckpt, tmp_path, epochs=2, name="lin")).resume_from is not None
    saved = torch.load(tmp_path / "lin" / "last.ckpt", weights_only=True)["hyper_parameters"]["cfg"]
    with pytest.raises(ConfigError, match=r"backbone.name='resnet50' differs from the pretrained backbone"):
        build_linear_run({**_linear_cfg(ckpt, tmp_path, name="other"), "backbone": {"name": "resnet50"}})
    run = build_linear_run({**_linear_cfg(colour_ckpt, tmp_path, name="same"), "backbone": saved["backbone"]})
    assert run.cfg.backbone == saved["backbone"]
    # a part of the section, or null (the checkpoint's value), is the checkpoint's too
    partial = {"name": saved["backbone"]["name"], "kwargs": {"cifar_stem": None}}
    run = build_linear_run({**_linear_cfg(colour_ckpt, tmp_path, name="part"), "backbone": partial})
    assert run.cfg.backbone == saved["backbone"]


@pytest.fixture(scope="module")
def square_ckpt(image_data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretraining checkpoint on images whose crops and flips differ (a uniform colour
    image is the same under every crop)."""
    train, val = image_data
    root = tmp_path_factory.mktemp("square")
    overrides = tiny_overrides(train, val, root, "pre") + ["max_epochs=1", "scheduler.warmup_epochs=0"]
    pretrain(compose(str(CIFAR_CONFIGS), "isoloss-noema.yaml", overrides))
    return root / "pre" / "last.ckpt"


@pytest.mark.parametrize(("workers", "mixing"), [(0, False), (2, False), (0, True)])
def test_killed_linear_evaluation_resumes_to_the_same_weights(workers: int, mixing: bool, square_ckpt, tmp_path):
    """2 epochs straight == 1 epoch, a kill, and a resumed second one: each image's crop and
    flip come from (seed, epoch, index), in the main process or in persistent workers (the
    resumed epoch drew other views before), and MixUp/CutMix draw from the generator seeded
    at each epoch's start."""

    def cfg(name: str) -> dict:
        mix = {"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1} if mixing else {}
        return {**_linear_cfg(square_ckpt, tmp_path, epochs=2, name=name), "data": {"num_workers": workers}, **mix}

    straight = linear_eval(cfg("straight"))
    killed = build_linear_run(cfg("killed"))
    killed.trainer.callbacks.insert(0, KillAtEpoch(1))
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        killed.trainer.fit(killed.model, datamodule=killed.datamodule)
    resumed = linear_eval(cfg("killed"))
    assert resumed.resume_from is not None and resumed.trainer.global_step == straight.trainer.global_step
    a, b = straight.model.classifier.state_dict(), resumed.model.classifier.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_label_split_smaller_than_one_batch_trains(colour_ckpt, tmp_path):
    """1% of STL-10's labels is 50 images, fewer than a batch of 256: the probe trains on the
    partial batch (the pretraining data module refuses such a split: it drops partial batches)."""
    cfg = _linear_cfg(colour_ckpt, tmp_path, epochs=1, name="few")
    cfg["data"] = {"fraction": 0.1}  # 4 of each colour class's 40 images
    cfg["optimizer"] = {**cfg["optimizer"], "batch_size": 64}
    run = linear_eval(cfg)
    assert run.trainer.global_step == 1 and 0 < len(run.datamodule.raw_train) < 64


def test_step_schedule_from_the_config_decays_at_its_epochs(colour_ckpt, tmp_path):
    cfg = _linear_cfg(colour_ckpt, tmp_path, epochs=3, name="step")
    cfg["scheduler"] = {"name": "step", "lr_decay_steps": [1, 2], "gamma": 0.5}
    linear_eval(cfg)
    assert [float(r["lr"]) for r in _rows(tmp_path / "step" / "epochs.csv")] == pytest.approx([0.1, 0.05, 0.025])
    with pytest.raises(ConfigError, match="end before max_epochs"):
        build_linear_run({**cfg, "name": "step2", "scheduler": {"name": "step", "lr_decay_steps": [3]}})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"finetune": "no"}, "finetune must be True or False, got 'no'"),
        ({"max_epochs": 2.5}, "max_epochs must be a whole number, got 2.5"),
        ({"optimizer": {"lr": "abc"}}, "optimizer.lr must be a number, got 'abc'"),
        ({"finetune": True, "optimizer": {"batch_size": 1}}, "optimizer.batch_size must be >= 2, got 1"),
    ],
)
def test_linear_values_of_the_wrong_kind_are_named(override: dict, message: str, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        prepare_linear_config({"pretrained_feature_extractor": "x", **override})


def test_linear_keys_nothing_reads_are_named_in_a_warning() -> None:
    from ivreg.config import UnreadConfigKeyWarning

    with pytest.warns(UnreadConfigKeyWarning, match=r"max_epoch is not read .*did you mean max_epochs\?"):
        prepare_linear_config({"pretrained_feature_extractor": "x", "max_epoch": 1})
    with pytest.warns(UnreadConfigKeyWarning, match=r"optimizer.lrr is not read .*did you mean optimizer.lr\?"):
        prepare_linear_config({"pretrained_feature_extractor": "x", "optimizer": {"lrr": 3}})


def test_linear_lr_scaling_is_read_and_checked(colour_ckpt, tmp_path) -> None:
    """optimizer.lr_scaling=none trains at optimizer.lr as written (it once warned "not read"
    while the pretraining rule still scaled the rate by batch/256)."""
    import warnings

    from ivreg.config import UnreadConfigKeyWarning

    cfg = _linear_cfg(colour_ckpt, tmp_path, epochs=1, name="unscaled")
    cfg["optimizer"] = {"batch_size": 16, "lr": 0.1, "lr_scaling": "none"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadConfigKeyWarning)
        run = linear_eval(cfg)
    assert run.trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"optimizer.lr_scaling 'sqrt' is not supported"):
        prepare_linear_config({"pretrained_feature_extractor": "x", "optimizer": {"lr_scaling": "sqrt"}})


def test_the_seeds_wandb_section_is_the_linear_runs_logger() -> None:
    cfg = prepare_linear_config({"pretrained_feature_extractor": "x", "wandb": {"enabled": True, "project": "p"}})
    assert cfg.logger.wandb.enabled is True and cfg.logger.wandb.project == "p" and "wandb" not in cfg


def test_linear_evaluation_of_another_librarys_checkpoint(colour_ckpt, tmp_path) -> None:
    """A solo-learn checkpoint (backbone.* beside its heads, no ivreg config), described by
    backbone.name and data.*: the backbone evaluated is its weights; without the description
    the refusal says what to give."""
    pretrained = load_backbone(colour_ckpt)
    solo = tmp_path / "solo" / "byol-colour-ep=999.ckpt"
    solo.parent.mkdir()
    state = {f"backbone.{k}": v for k, v in pretrained.state_dict().items()}
    torch.save({"state_dict": state | {"classifier.weight": torch.zeros(3, 512)}, "epoch": 999}, solo)
    data_root = colour_ckpt.parent.parent
    data = {"dataset": "custom", "train_path": str(data_root / "train"), "val_path": str(data_root / "val")}
    cfg = _linear_cfg(solo, tmp_path, epochs=2, name=None) | {"backbone": {"name": "resnet10"}}
    cfg["data"] = data | {"crop_size": 32}
    run = linear_eval(cfg)
    assert run.run_dir == tmp_path / "byol-colour-ep=999-linear"
    for key, value in pretrained.state_dict().items():
        torch.testing.assert_close(run.model.backbone.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert run.cfg.pretrain_cfg.foreign_checkpoint is True
    assert float(_rows(run.run_dir / "epochs.csv")[-1]["val_acc1"]) > 50  # colour classes: far above 33
    with pytest.raises(CheckpointError, match=r"not written by ivreg.*backbone.name=resnet18 data.dataset=cifar10"):
        linear_eval({**cfg, "backbone": None, "name": "again"})


def test_epochs_without_validation_hold_no_stale_accuracy(colour_ckpt, tmp_path, capsys):
    """check_val_every_n_epoch=2 of 3: epoch 2's row is not filled with epoch 1's figures, and
    the final line names the epoch it comes from."""
    linear_eval({**_linear_cfg(colour_ckpt, tmp_path, epochs=3, name="every2"), "check_val_every_n_epoch": 2})
    rows = _rows(tmp_path / "every2" / "epochs.csv")
    for column in ("val_loss", "val_acc1", "val_acc5"):
        assert [math.isnan(float(r[column])) for r in rows] == [True, False, True], (column, rows)
    acc = float(rows[1]["val_acc1"])
    assert f"every2: final val_acc1 {acc:.2f} (epoch 1, the last validated of 3), best {acc:.2f} (epoch 1)" in (
        capsys.readouterr().out
    )


def _mixing_lams(mix, draws: int, size: int = 32) -> tuple[list[float], list[bool]]:
    """Per draw: the first image's own-class share of its target, and whether the images were
    blended (MixUp) rather than a box pasted (CutMix). Two images of classes 0 and 1, all 0s
    and all 1s: a pasted box leaves only 0s and 1s."""
    x = torch.stack([torch.zeros(1, size, size), torch.ones(1, size, size)])
    lams, blended = [], []
    for _ in range(draws):
        images, targets = mix(x.clone(), torch.tensor([0, 1]))
        lams.append(float(targets[0, 0]))
        blended.append(not bool(((images[0] == 0) | (images[0] == 1)).all()))
    return lams, blended


def _even_box_cutmix_lams(alpha: float, size: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """CutMix's target shares from the paper's rule: lam ~ Beta(alpha, alpha), a box of sides
    sqrt(1 - lam) x size (rounded down to an even number of pixels), centred uniformly,
    clipped to the image, lam corrected to the clipped area."""
    lam = rng.beta(alpha, alpha, draws)
    half = (0.5 * np.sqrt(1 - lam) * size).astype(int)
    centre = rng.integers(0, size, (2, draws))
    sides = np.clip(centre + half, 0, size) - np.clip(centre - half, 0, size)
    return 1 - sides.prod(axis=0) / size**2


def test_mixup_and_cutmix_draw_the_distributions_of_solo_learns_timm_mixup() -> None:
    """MixUp's lam ~ Beta(alpha, alpha); CutMix's clipped-box share follows the paper's rule and
    is within 0.02 in the mean of timm's (solo-learn's Mixup), whose box keeps odd sides; with
    both, each kind for about half the batches. The mixed images hold the targets' shares."""
    from scipy import stats

    from ivreg.eval.linear import batch_mixing

    timm_mixup = pytest.importorskip("timm.data.mixup")
    torch.manual_seed(0)
    np.random.seed(0)  # timm draws from numpy's generator
    assert batch_mixing(0.0, 0.0, 10) is None
    lams, _ = _mixing_lams(batch_mixing(0.8, 0.0, 2), 3000)
    assert stats.kstest(lams, "beta", args=(0.8, 0.8)).pvalue > 1e-3
    x = torch.randn(6, 3, 8, 8)
    images, targets = batch_mixing(0.8, 0.0, 6)(x, torch.arange(6))
    lam = targets.diagonal()  # each image's own share; the rest is its batch neighbour's
    torch.testing.assert_close(images, lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x.roll(1, 0))

    ours, blended = _mixing_lams(batch_mixing(0.0, 1.0, 2), 3000)
    assert not any(blended)
    assert stats.ks_2samp(ours, _even_box_cutmix_lams(1.0, 32, 3000, np.random.default_rng(0))).pvalue > 1e-3
    reference = timm_mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=2)
    theirs = [float(reference(torch.zeros(2, 1, 32, 32), torch.tensor([0, 1]))[1][0, 0]) for _ in range(3000)]
    assert abs(np.mean(ours) - np.mean(theirs)) < 0.02
    images, targets = batch_mixing(0.0, 1.0, 6)(x, torch.arange(6))
    own = (images == x).all(dim=1).float().mean(dim=(1, 2))  # the share of each image's own pixels
    torch.testing.assert_close(own, targets.diagonal())

    _, blended = _mixing_lams(batch_mixing(0.8, 1.0, 2), 2000)
    assert abs(sum(blended) / 2000 - 0.5) < 4 * 0.5 / math.sqrt(2000)


def test_label_smoothing_on_mixed_targets_is_timms_soft_target_loss() -> None:
    """cross_entropy(logits, mixed targets, label_smoothing=s) == timm's SoftTargetCrossEntropy
    on mixup_target(lam, smoothing=s), the loss of solo-learn's probe with mixup and smoothing."""
    import torch.nn.functional as F

    timm_mixup = pytest.importorskip("timm.data.mixup")
    from timm.loss import SoftTargetCrossEntropy

    torch.manual_seed(1)
    logits, labels, lam, s = torch.randn(8, 10), torch.randint(0, 10, (8,)), 0.7, 0.1
    mixed = lam * F.one_hot(labels, 10).float() + (1 - lam) * F.one_hot(labels.flip(0), 10).float()
    expected = SoftTargetCrossEntropy()(logits, timm_mixup.mixup_target(labels, 10, lam=lam, smoothing=s))
    torch.testing.assert_close(F.cross_entropy(logits, mixed, label_smoothing=s), expected)


def test_linear_probe_with_label_smoothing_mixup_and_cutmix(colour_ckpt, tmp_path) -> None:
    """The regularisers train the probe (soft targets through the loss, the larger share as
    train_acc1's label), and settings outside their ranges are refused by name."""
    cfg = {**_linear_cfg(colour_ckpt, tmp_path, epochs=2, name="mixed"), "label_smoothing": 0.1}
    run = linear_eval({**cfg, "mixup": 0.8, "cutmix": 1.0})
    rows = _rows(tmp_path / "mixed" / "epochs.csv")
    assert len(rows) == 2 and all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert run.model.mixing is not None and run.model.label_smoothing == 0.1
    assert float(rows[-1]["val_acc1"]) > 60.0  # three colour classes: chance is 33%
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 1\), got 1"):
        prepare_linear_config({"pretrained_feature_extractor": "x", "label_smoothing": 1})
    with pytest.raises(ConfigError, match="mixup is the alpha of a Beta distribution: >= 0"):
        prepare_linear_config({"pretrained_feature_extractor": "x", "mixup": -0.5})
    for key, value in (("mixup", None), ("cutmix", float("inf")), ("label_smoothing", None)):
        with pytest.raises(ConfigError, match=f"{key} must be a number .0: off., got {value}"):
            prepare_linear_config({"pretrained_feature_extractor": "x", key: value})
