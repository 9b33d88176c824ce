"""End-to-end pretraining on generated ImageFolder data (CPU, seconds per run)."""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from ivreg.config import compose
from ivreg.errors import ConfigError, DataError, DivergedError, TrainingError
from ivreg.targets import cosine_tau
from ivreg.train import build_run, fit, pretrain, release_run_folder

from .conftest import CIFAR_CONFIGS, ROOT, KillAtEpoch, tiny_overrides


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cfg(config: str, image_data: tuple[Path, Path], run_root: Path, *extra: str, name: str = "tiny"):
    train, val = image_data
    return compose(str(CIFAR_CONFIGS), config, tiny_overrides(train, val, run_root, name) + list(extra))


def _one_epoch_cfg(config: str, image_data: tuple[Path, Path], run_root: Path, *extra: str, name: str = "tiny"):
    """One epoch, no warmup (the scheduler needs warmup_epochs < max_epochs)."""
    return _cfg(config, image_data, run_root, "max_epochs=1", "scheduler.warmup_epochs=0", *extra, name=name)


@pytest.mark.parametrize("config", ["isoloss-noema.yaml", "byol.yaml"])
def test_two_epochs_write_checkpoint_metrics_and_spectrum(config: str, image_data, tmp_path: Path) -> None:
    run = pretrain(_cfg(config, image_data, tmp_path))
    run_dir = tmp_path / "tiny"
    assert (run_dir / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    assert not list(run_dir.glob("*.tmp"))
    rows = _rows(run_dir / "epochs.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for r in rows:
        for key in ("val_acc1", "val_acc5", "part_ratio", "eigval_max", "train_neg_cos_sim", "train_z_std"):
            assert math.isfinite(float(r[key])), f"{key} is not finite"
        assert 0.0 <= float(r["val_acc1"]) <= 100.0
        assert float(r["train_z_norm"]) > 0
        assert float(r["part_ratio"]) >= 1.0
    spectrum = _rows(run_dir / "eigvals.csv")
    assert len(spectrum) == 2 and len(spectrum[0]) == 1 + 16
    metrics = list((run_dir / "logs").glob("version_*/metrics.csv"))
    assert metrics, "the CSV logger wrote no metrics"
    header = _rows(metrics[0])[0].keys()
    assert {"val_acc1", "eigval_metrics/part_ratio_step", "train_neg_cos_sim_step"} <= set(header)
    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 * (48 // 8)
    assert "predictor.corr.C" in ckpt["state_dict"]
    assert torch.count_nonzero(ckpt["state_dict"]["predictor.corr.C"]) > 0
    assert ckpt["hyper_parameters"]["cfg"]["method_kwargs"]["proj_output_dim"] == 16
    assert run.trainer.global_step == 2 * (48 // 8)
    # The configured rates are per 256 images: batch 8 on one device trains at 8/256 of them.
    ssl_group, classifier_group = run.trainer.optimizers[0].param_groups
    assert ssl_group["initial_lr"] == pytest.approx(float(run.cfg.optimizer.lr) * 8 / 256)
    assert classifier_group["initial_lr"] == pytest.approx(float(run.cfg.optimizer.classifier_lr) * 8 / 256)


@pytest.mark.parametrize(
    ("overrides", "scale"),
    [
        ([], 1.0),
        (["optimizer.batch_size=64", "devices=2"], 0.5),
        # solo-learn's rule leaves gradient accumulation out ...
        (["++accumulate_grad_batches=4"], 1.0),
        # ... linear_accumulated counts the images per optimizer step
        (["++accumulate_grad_batches=4", "++optimizer.lr_scaling=linear_accumulated"], 4.0),
        (
            [
                "optimizer.batch_size=64",
                "devices=2",
                "++accumulate_grad_batches=4",
                "++optimizer.lr_scaling=linear_accumulated",
            ],
            2.0,
        ),
    ],
)
def test_learning_rates_scale_with_the_batch_size(overrides: list[str], scale: float) -> None:
    from ivreg.config import lr_scale, prepare_config

    cfg = prepare_config(compose(str(CIFAR_CONFIGS), "byol.yaml", overrides))
    world = 2 if "devices=2" in overrides else 1
    assert lr_scale(cfg, world, int(cfg.accumulate_grad_batches)) == pytest.approx(scale)
    cfg.optimizer.lr_scaling = "none"
    assert lr_scale(cfg, world, int(cfg.accumulate_grad_batches)) == 1.0


@pytest.mark.parametrize("config", ["byol.yaml", "directpred.yaml", "isoloss.yaml"])
def test_imagenet_configs_train_at_the_reference_rates(config: str) -> None:
    """The reference's ImageNet runs: batch 64 on 4 GPUs, 16 accumulated batches, lr 0.45 and
    classifier_lr 0.2 as written (solo-learn scales by 64 x 4 / 256 = 1)."""
    from ivreg.config import lr_scale, prepare_config

    cfg = prepare_config(compose(str(ROOT / "scripts" / "pretrain" / "imagenet"), config, []))
    assert int(cfg.accumulate_grad_batches) == 16 and len(cfg.devices) == 4
    scale = lr_scale(cfg, len(cfg.devices), int(cfg.accumulate_grad_batches))
    assert float(cfg.optimizer.lr) * scale == pytest.approx(0.45)
    assert float(cfg.optimizer.classifier_lr) * scale == pytest.approx(0.2)


def test_reference_order_of_decompositions_trains(image_data, tmp_path: Path) -> None:
    run = pretrain(
        _one_epoch_cfg("isoloss-noema.yaml", image_data, tmp_path, "++method_kwargs.decompose_per_view=True")
    )
    assert run.model.decompose_per_view
    assert torch.isfinite(run.model.predictor.corr.C).all() and torch.count_nonzero(run.model.predictor.corr.C) > 0
    assert math.isfinite(float(run.trainer.callback_metrics["train_neg_cos_sim"]))


def test_gradient_norm_is_reported_and_nonfinite_gradients_are_counted(image_data, tmp_path: Path) -> None:
    """train_grad_norm is the epoch mean of the SSL gradient's norm (backbone and projector, as
    the optimizer sees it); steps with NaN or infinite gradients are counted, not averaged in."""
    norms: list[float] = []

    class RecordNorm(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads = [p.grad for p in pl_module.online_parameters() if p.grad is not None]
            norms.append(float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads))))

    run = build_run(_one_epoch_cfg("isoloss-noema.yaml", image_data, tmp_path, "++method_kwargs.iso_tangent=True"))
    run.trainer.callbacks.append(RecordNorm())
    run.trainer.fit(run.model, datamodule=run.datamodule)
    row = _rows(tmp_path / "tiny" / "epochs.csv")[0]
    assert len(norms) == run.trainer.global_step == 48 // 8
    assert float(row["train_grad_norm"]) == pytest.approx(sum(norms) / len(norms), rel=1e-4)
    assert float(row["train_nonfinite_grad_steps"]) == 0

    model = build_run(_one_epoch_cfg("isoloss-noema.yaml", image_data, tmp_path / "fresh")).model
    params = model.online_parameters()
    for value in (1.0, float("inf"), 2.0):
        for p in params:
            p.grad = torch.full_like(p, value)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a trainer
            model.on_before_optimizer_step(None)
    count = sum(p.numel() for p in params)
    total, finite, nonfinite = model._grad_stats.tolist()
    assert (finite, nonfinite) == (2, 1)
    assert total == pytest.approx(3 * count**0.5, rel=1e-5)


def test_raw_readout_is_reported_beside_the_standardised_one(image_data, tmp_path: Path) -> None:
    run = pretrain(_one_epoch_cfg("byol.yaml", image_data, tmp_path, "++report.raw_readout=True"))
    assert isinstance(run.model.raw_readout.norm, torch.nn.Identity)
    assert isinstance(run.model.readout.norm, torch.nn.BatchNorm1d)
    row = _rows(tmp_path / "tiny" / "epochs.csv")[0]
    assert 0.0 <= float(row["val_acc1_raw"]) <= 100.0 and float(row["train_class_loss_raw"]) > 0
    assert 0.0 <= float(row["train_acc1_raw"]) <= 100.0 and math.isnan(float(row["train_acc1_momentum"]))
    classifier = run.trainer.optimizers[0].param_groups[1]["params"]
    assert any(p is run.model.raw_readout.linear.weight for p in classifier)  # it is trained


def test_auto_resume_continues_from_last_epoch(image_data, tmp_path: Path) -> None:
    """The command line, twice: the second launch resumes at epoch 2 instead of starting over."""
    train, val = image_data
    args = [
        sys.executable,
        str(ROOT / "main_pretrain.py"),
        "--config-path",
        str(CIFAR_CONFIGS),
        "--config-name",
        "directpred.yaml",
        *tiny_overrides(train, val, tmp_path, "resumed"),
    ]
    first = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _rows(tmp_path / "resumed" / "epochs.csv")
    second = subprocess.run([*args, "max_epochs=3"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stdout
    assert "epoch    0" not in second.stdout and "epoch    2" in second.stdout
    after = _rows(tmp_path / "resumed" / "epochs.csv")
    assert [int(r["epoch"]) for r in after] == [0, 1, 2]
    assert after[:2] == before  # the finished epochs are kept as they were
    assert int(after[2]["step"]) == 3 * 6


class _DeleteTablesAtEpoch(L.Callback):
    """Deletes the run's epochs.csv and eigvals.csv when ``epoch`` starts, as a user tidying up might."""

    def __init__(self, run_dir: Path, epoch: int) -> None:
        self.run_dir, self.epoch = run_dir, epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            for name in ("epochs.csv", "eigvals.csv"):
                (self.run_dir / name).unlink()


def test_deleted_epoch_tables_come_back_whole(image_data, tmp_path: Path) -> None:
    """epochs.csv and eigvals.csv deleted during a run are rewritten whole at the next epoch's
    end, and deleted after a kill, rebuilt from the checkpoint by the resumed run."""
    run = build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=3"))
    run_dir = run.run_dir
    run.trainer.callbacks[:0] = [_DeleteTablesAtEpoch(run_dir, 1), KillAtEpoch(2)]
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    epochs, eigvals = _rows(run_dir / "epochs.csv"), _rows(run_dir / "eigvals.csv")
    assert [int(r["epoch"]) for r in epochs] == [int(r["epoch"]) for r in eigvals] == [0, 1]
    for name in ("epochs.csv", "eigvals.csv"):
        (run_dir / name).unlink()
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=3"))
    assert _rows(run_dir / "epochs.csv")[:2] == epochs and _rows(run_dir / "eigvals.csv")[:2] == eigvals
    assert [int(r["epoch"]) for r in _rows(run_dir / "epochs.csv")] == [0, 1, 2]
    assert len(_rows(run_dir / "eigvals.csv")) == 3
    # the finished run relaunched trains nothing, but rewrites a table cut short or deleted since
    finished = {name: (run_dir / name).read_text() for name in ("epochs.csv", "eigvals.csv")}
    (run_dir / "epochs.csv").write_text(finished["epochs.csv"][: len(finished["epochs.csv"]) // 2])
    (run_dir / "eigvals.csv").unlink()
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=3"))
    assert {name: (run_dir / name).read_text() for name in finished} == finished


@pytest.mark.parametrize(("pipeline", "workers"), [("workers", 0), ("workers", 2), ("resident", 0)])
def test_killed_run_resumes_to_the_same_weights(pipeline: str, workers: int, image_data, tmp_path: Path) -> None:
    """3 epochs straight == 2 epochs, a kill, and a resumed third epoch (EMA, LARS, C, BN),
    with the checkpoints written by the background thread that GPU runs use, and with the
    views made per image (in the main process, or in two persistent DataLoader workers, which
    a resumed run starts afresh) or batched from the images on the device (the GPU default)."""
    extra = ("max_epochs=3", "++data.fraction=0.5", "++checkpoint.async_write=True", f"++data.pipeline={pipeline}")
    extra += (f"data.num_workers={workers}",)
    straight = pretrain(_cfg("isoloss.yaml", image_data, tmp_path, *extra, name="straight"))

    interrupted = build_run(_cfg("isoloss.yaml", image_data, tmp_path, *extra, name="killed"))
    interrupted.trainer.callbacks.insert(0, KillAtEpoch(2))
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        interrupted.trainer.fit(interrupted.model, datamodule=interrupted.datamodule)
    resumed = pretrain(_cfg("isoloss.yaml", image_data, tmp_path, *extra, name="killed"))
    assert resumed.resume_from is not None
    assert resumed.trainer.global_step == straight.trainer.global_step
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_ema_updates_once_per_optimizer_step_under_accumulation(image_data, tmp_path: Path) -> None:
    run = build_run(
        _cfg(
            "byol.yaml",
            image_data,
            tmp_path,
            "max_epochs=1",
            "++accumulate_grad_batches=2",
            "scheduler.name=none",
            "++data.fraction=0.375",  # 6 of each class's 16 images
        )
    )
    calls: list[float] = []
    update = run.model.target.update
    run.model.target.update = lambda params, tau: (calls.append(tau), update(params, tau))
    run.trainer.fit(run.model, datamodule=run.datamodule)
    batches = 18 // 8
    assert len(calls) == run.trainer.global_step == batches // 2


def test_ema_update_k_uses_tau_of_step_k(image_data, tmp_path: Path) -> None:
    """As in BYOL and solo-learn: the first update uses base_tau, the k-th (from 0) tau(k)."""
    run = build_run(_cfg("byol.yaml", image_data, tmp_path, "max_epochs=2", "scheduler.name=none"))
    calls: list[float] = []
    update = run.model.target.update
    run.model.target.update = lambda params, tau: (calls.append(tau), update(params, tau))
    run.trainer.fit(run.model, datamodule=run.datamodule)
    total = run.trainer.global_step
    assert total == 2 * (48 // 8)
    assert calls == pytest.approx([cosine_tau(k, total, 0.99, 1.0) for k in range(total)])
    assert calls[0] == pytest.approx(0.99)


def test_refuses_to_overwrite_a_finished_run_without_auto_resume(image_data, tmp_path: Path) -> None:
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=1", "scheduler.name=none"))
    with pytest.raises(ConfigError, match="already holds a run"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "auto_resume.enabled=False"))
    with pytest.raises(ConfigError, match="differs from this config in"):
        build_run(_cfg("byol.yaml", image_data, tmp_path))


def test_resume_needs_the_same_images_per_optimizer_step(image_data, tmp_path: Path) -> None:
    """The rate and the schedules' step counts depend on it (a requeue on fewer GPUs)."""
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=1", "scheduler.name=none"))
    with pytest.raises(ConfigError, match=r"images per optimizer step .*: 8 then, 4 now"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "optimizer.batch_size=4", "scheduler.name=none"))
    # half the batch, accumulated twice: the same optimizer steps
    half = ("optimizer.batch_size=4", "++accumulate_grad_batches=2", "scheduler.name=none")
    run = build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *half))
    assert run.resume_from == tmp_path / "tiny" / "last.ckpt"
    release_run_folder(run.run_dir)
    # ... but not under an integer limit_train_batches, which counts batches, not steps
    limit = ("max_epochs=1", "scheduler.name=none", "++limit_train_batches=3")
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, *limit, name="lim"))
    split = r"in \[.accumulate_grad_batches \(1 then, 2 now\) under limit_train_batches=3, which counts batches"
    with pytest.raises(ConfigError, match=split):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *half, *limit, name="lim"))
    # there, a checkpoint of two processes of 4 resumes on one of 8: the processes' k-th batches
    # hold the one process's k-th batch
    last = tmp_path / "lim" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["world_size"], ckpt["hyper_parameters"]["cfg"]["optimizer"]["batch_size"] = 2, 4
    torch.save(ckpt, last)
    assert build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *limit, name="lim")).resume_from == last


def test_resume_compares_the_processes_the_checkpoint_ran_with(image_data, tmp_path: Path) -> None:
    """devices=auto counts this machine's GPUs: a requeue on a machine with fewer must be
    refused by what the checkpoint recorded, not by the config read on the new machine."""
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=1", "scheduler.name=none", "devices=auto"))
    last = tmp_path / "tiny" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["world_size"] == 1
    ckpt["world_size"] = 2  # as if it had run on two GPUs
    torch.save(ckpt, last)
    with pytest.raises(ConfigError, match=r"images per optimizer step .*: 16 then, 8 now"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "scheduler.name=none", "devices=auto"))
    # a checkpoint from before the count was recorded falls back to its config
    del ckpt["world_size"]
    torch.save(ckpt, last)
    run = build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "scheduler.name=none", "devices=auto"))
    assert run.resume_from == last


def test_a_relaunch_under_fewer_epochs_than_done_is_refused_before_writing(image_data, tmp_path: Path) -> None:
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=2", "scheduler.name=none"))
    run_dir = tmp_path / "tiny"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(ConfigError, match=r"has finished 2 epochs, more than max_epochs=1; set max_epochs=2"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=1", "scheduler.name=none"))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # config.yaml, logs: untouched
    # an explicit resume may name the run folder (its last.ckpt)
    run = build_run(
        _cfg(
            "isoloss-noema.yaml",
            image_data,
            tmp_path,
            "max_epochs=3",
            "scheduler.name=none",
            f"++resume_from_checkpoint={run_dir}",
            name="again",
        )
    )
    assert run.resume_from == run_dir / "last.ckpt"
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint: checkpoint .*nowhere does not exist"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, f"++resume_from_checkpoint={tmp_path}/nowhere"))


def test_explicit_resume_keeps_the_target_folders_own_run(image_data, tmp_path: Path) -> None:
    """resume_from_checkpoint into a folder holding another run overwrote it without a word;
    into its own run's kept checkpoint it rolls back, and says that every relaunch with it will."""
    base = ("scheduler.name=none", "++checkpoint.keep_every_n_epochs=1")
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=2", *base, name="base"))
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=2", *base, "++seed=7", name="victim"))
    other = f"++resume_from_checkpoint={tmp_path / 'base' / 'last.ckpt'}"
    with pytest.raises(ConfigError, match=r"victim holds another run, which resume_from_checkpoint would overwrite"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=3", *base, other, name="victim"))
    back = f"++resume_from_checkpoint={tmp_path / 'base' / 'epoch0001.ckpt'}"
    with pytest.warns(UserWarning, match=r"rolling .*base back from 2 finished epochs to .*epoch0001.ckpt's 1"):
        run = build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=3", *base, back, name="base"))
    release_run_folder(run.run_dir)
    # a folder whose last.ckpt is a folder is named, not handed to Lightning
    (tmp_path / "odd" / "last.ckpt").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"odd/last.ckpt is a folder, not a checkpoint"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *base, name="odd"))


def test_a_finished_run_without_checkpoints_is_not_overwritten(image_data, tmp_path: Path) -> None:
    """checkpoint.enabled=False: epochs.csv is the run's only record, and a relaunch started over."""
    extra = ("max_epochs=1", "scheduler.name=none", "checkpoint.enabled=False")
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, *extra))
    rows = (tmp_path / "tiny" / "epochs.csv").read_text()
    with pytest.raises(ConfigError, match=r"holds the record of a run \(epochs.csv\) without a checkpoint"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *extra))
    # the run's own config.yaml says it kept no checkpoints: a relaunch with them on is refused too
    with pytest.raises(ConfigError, match=r"holds the record of a run \(epochs.csv\) without a checkpoint"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=1", "scheduler.name=none"))
    assert (tmp_path / "tiny" / "epochs.csv").read_text() == rows


def test_a_folder_without_last_checkpoint_is_not_overwritten_by_another_run(image_data, tmp_path: Path) -> None:
    """A deleted last.ckpt (after an "unreadable" error) leaves epochs.csv, config.yaml and kept
    checkpoints: another config is refused, the same one is pointed at the kept checkpoint,
    and a same-config run killed before its first checkpoint starts over."""
    extra = ("max_epochs=1", "scheduler.name=none", "++checkpoint.keep_every_n_epochs=1")
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, *extra, "optimizer.lr=0.3"))
    run_dir = tmp_path / "tiny"
    (run_dir / "last.ckpt").unlink()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(ConfigError, match=r"holds the record of another run .*\['optimizer.lr'\]\) and no last.ckpt"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *extra))
    with pytest.raises(ConfigError, match=r"no last.ckpt but keeps epoch0001.ckpt: .*resume_from_checkpoint=.*0001"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *extra, "optimizer.lr=0.3"))
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"} == before
    (run_dir / "epoch0001.ckpt").unlink()  # only the record of a run killed before its checkpoint
    assert build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *extra, "optimizer.lr=0.3")).resume_from is None


def test_explicit_resume_refuses_a_checkpoint_of_another_run(image_data, tmp_path: Path) -> None:
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=1", "scheduler.name=none", name="iso"))
    ckpt = tmp_path / "iso" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"cannot resume from .*last.ckpt: its run differs .*\['method'"):
        build_run(_cfg("byol.yaml", image_data, tmp_path, f"++resume_from_checkpoint={ckpt}", name="b"))
    resume = (f"++resume_from_checkpoint={ckpt}", "scheduler.name=none")
    with pytest.raises(ConfigError, match=r"differs from this config in \['backbone.name'\]"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *resume, "backbone.name=resnet18"))
    assert not (tmp_path / "b").exists()  # nothing written for a refused launch
    run = build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *resume, name="c"))
    assert run.resume_from == ckpt


def test_a_refused_launch_leaves_the_run_it_would_resume_untouched(image_data, tmp_path: Path, capsys) -> None:
    cfg = _cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=1", "scheduler.name=none")
    pretrain(cfg)
    saved = (tmp_path / "tiny" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="Lightning refused the trainer settings"):
        build_run(
            _cfg(
                "isoloss-noema.yaml",
                image_data,
                tmp_path,
                "max_epochs=3",
                "++reload_dataloaders_every_n_epochs=-1",
                "scheduler.name=none",
            )
        )
    with pytest.raises(ConfigError, match="unknown optimizer.name 'adam'"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=3", "optimizer.name=adam"))
    assert (tmp_path / "tiny" / "config.yaml").read_text() == saved
    with pytest.raises(ConfigError, match="Lightning refused the trainer settings"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "devices=0", name="zero"))
    assert not (tmp_path / "zero").exists()
    # Launching the finished run again trains nothing and says so, opens no new log version,
    # and hands back the trained weights.
    trained = torch.load(tmp_path / "tiny" / "last.ckpt", weights_only=True)["state_dict"]
    versions = sorted(p.name for p in (tmp_path / "tiny").glob("*/version_*"))
    capsys.readouterr()
    again = pretrain(cfg)
    assert "nothing to train" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "tiny").glob("*/version_*")) == versions
    for key, value in again.model.state_dict().items():
        torch.testing.assert_close(value, trained[key], msg=key)


@pytest.mark.parametrize("config", ["isoloss-noema.yaml", "byol.yaml"])
def test_nonfinite_loss_stops_with_a_clear_error(config: str, image_data, tmp_path: Path) -> None:
    """From the guard or from eigh (BYOL's spectrum on a logging step, before the guard looks):
    one TrainingError that says what the run folder keeps."""
    extra = ("max_epochs=1", "scheduler.name=none", "++log_every_n_steps=1")
    run = build_run(_cfg(config, image_data, tmp_path, *extra))
    with torch.no_grad():
        run.model.projector[0].weight.fill_(float("nan"))
    with pytest.raises(DivergedError, match=r"NaN or infinite.* No checkpoint was written; relaunch with a changed"):
        fit(run)
    assert not (tmp_path / "tiny" / "last.ckpt").exists()


def test_after_a_divergence_the_advice_is_a_new_run_not_the_same_command(image_data, tmp_path: Path) -> None:
    """Resuming is exact, so the same command would diverge again; a lower rate cannot resume
    the run (optimizer.lr is a resume key): the way on is another run."""
    from ivreg.train import _kept

    pretrain(_one_epoch_cfg("isoloss-noema.yaml", image_data, tmp_path))
    run_dir = tmp_path / "tiny"
    said = _kept(run_dir, diverged=True)
    assert said.startswith(f"{run_dir / 'last.ckpt'} keeps the 1 finished epoch(s) before it")
    assert "another name=..." in said and "launch the same command to resume" not in said
    assert _kept(run_dir).endswith("holds 1 finished epoch(s); launch the same command to resume")
    # a data error: the same command meets the file again until it is mended
    assert _kept(run_dir, data=True).endswith(
        "holds 1 finished epoch(s); repair or replace the file (deleting a training image changes the training "
        "split, which a resumed run refuses), then launch the same command to resume"
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_met_in_training_says_what_the_run_folder_keeps(
    workers: int, image_data, tmp_path: Path, capsys
) -> None:
    """A corrupt image is found when its batch is loaded, with the run under way: the error
    names the file and what a relaunch resumes from (from a DataLoader worker too, whose
    error carries the worker's traceback; the command line prints its last line)."""
    import shutil

    from ivreg.cli import exit_on_user_error

    train = tmp_path / "train"
    shutil.copytree(image_data[0], train)
    (train / "class_1" / "broken.png").write_bytes(b"not a png")
    cfg = _one_epoch_cfg("isoloss-noema.yaml", (train, image_data[1]), tmp_path / "runs", f"data.num_workers={workers}")
    with pytest.raises(SystemExit):
        exit_on_user_error(pretrain)(cfg)
    assert re.fullmatch(
        r"error: cannot read image \S+broken\.png: .*\. No checkpoint was written in \S+; repair or replace the "
        r"file \(.*\), then a relaunch starts over\.\n",
        capsys.readouterr().err.splitlines(keepends=True)[-1],
    )


def test_the_nan_guard_reads_once_per_logged_optimizer_step(image_data, tmp_path: Path, monkeypatch) -> None:
    """With accumulated batches the micro-batches share a global step: the guard's host read
    comes once per optimizer step it is due at (here every step), then before validation and
    at the epoch's end; not once per micro-batch."""
    from ivreg.callbacks import NonFiniteLossGuard

    seen: list[int] = []
    monkeypatch.setattr(NonFiniteLossGuard, "_check", lambda self, trainer, module: seen.append(trainer.global_step))
    extra = ("max_epochs=1", "scheduler.name=none", "++log_every_n_steps=1", "++accumulate_grad_batches=2")
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, *extra))  # 6 batches of 8: 3 optimizer steps
    assert seen == [1, 2, 3, 3, 3]


def test_a_resumed_run_keeps_the_images_its_fraction_drew(image_data, tmp_path: Path) -> None:
    """data.fraction draws per class since 2026-11-28; a run begun before (its checkpoint has no
    data.fraction_draw) must go on with the images it drew then, at random from the whole set."""
    from ivreg.data.datasets import subset_fraction

    extra = ("max_epochs=1", "scheduler.name=none", "++data.fraction=0.5")
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, *extra))
    last = tmp_path / "tiny" / "last.ckpt"
    resumed = build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *extra[1:], "max_epochs=2"))
    assert resumed.cfg.data.fraction_draw == "per_class"
    release_run_folder(resumed.run_dir)
    ckpt = torch.load(last, weights_only=True)
    del ckpt["hyper_parameters"]["cfg"]["data"]["fraction_draw"]  # as an older ivreg wrote it
    torch.save(ckpt, last)
    resumed = build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *extra[1:], "max_epochs=2"))
    assert resumed.cfg.data.fraction_draw == "random"
    resumed.datamodule.prepare_raw()
    full = resumed.datamodule.raw_train.dataset
    assert resumed.datamodule.raw_train.indices == subset_fraction(full, 0.5, 5, "random").indices
    assert resumed.datamodule.raw_train.indices != subset_fraction(full, 0.5, 5, "per_class").indices
    release_run_folder(resumed.run_dir)


def test_relative_data_paths_are_stored_absolute(image_data, tmp_path: Path, monkeypatch) -> None:
    """main_linear, main_knn and main_umap read the data paths from the checkpoint, launched
    from anywhere: the shipped configs' ./datasets would not be found from another folder."""
    train, val = image_data
    monkeypatch.chdir(train.parent)
    run = build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "data.train_path=./train", "data.val_path=val"))
    assert (run.cfg.data.train_path, run.cfg.data.val_path) == (str(train.resolve()), str(val.resolve()))
    saved = OmegaConf.load(tmp_path / "tiny" / "config.yaml")
    assert saved.data.train_path == str(train.resolve())
    release_run_folder(run.run_dir)


def test_missing_data_folder_is_named(tmp_path: Path, image_data) -> None:
    cfg = _cfg("isoloss.yaml", image_data, tmp_path, f"data.train_path={tmp_path / 'nowhere'}")
    with pytest.raises(DataError, match="nowhere"):
        build_run(cfg)


def test_bf16_autocast_run_is_finite(image_data, tmp_path: Path) -> None:
    run = pretrain(
        _cfg("isoloss-noema.yaml", image_data, tmp_path, "precision=bf16", "max_epochs=1", "scheduler.name=none")
    )
    rows = _rows(tmp_path / "tiny" / "epochs.csv")
    assert torch.isfinite(torch.tensor(float(rows[0]["train_neg_cos_sim"])))
    assert run.model.predictor.corr.C.dtype == torch.float32


@pytest.mark.parametrize(("config", "copies"), [("byol.yaml", 4), ("isoloss-noema.yaml", 2)])
def test_compile_applies_the_mode_to_backbone_projector_and_ema_copy(
    config: str, copies: int, image_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_run compiles in place (checkpoint keys unchanged) with performance.compile_mode,
    the EMA copy as its backbone and projector (the momentum readout calls them one by one);
    nn.Module.compile is recorded rather than run, so this takes no compile time."""
    compiled: list[tuple[type, dict]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self), kw)))
    extra = ("++performance.compile=True", "++performance.compile_mode=reduce-overhead")
    run = build_run(_one_epoch_cfg(config, image_data, tmp_path, *extra))
    assert len(compiled) == copies and all(kw == {"mode": "reduce-overhead"} for _, kw in compiled)
    assert compiled[0][0] is type(run.model.backbone) and compiled[1][0] is type(run.model.projector)
    assert "backbone.conv1.weight" in run.model.state_dict()


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_cudagraph_modes_mark_every_train_and_validation_step(
    mode: str, image_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a compile mode that replays CUDA graphs, every training and validation batch starts
    with torch.compiler.cudagraph_mark_step_begin(); without CUDA graphs nothing is marked."""
    marks: list[int] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: None)  # eager; only the hooks are under test
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    extra = ("++performance.compile=True", f"++performance.compile_mode={mode}")
    run = pretrain(_one_epoch_cfg("isoloss-noema.yaml", image_data, tmp_path, *extra))
    expected = run.trainer.global_step + int(sum(run.trainer.num_val_batches))
    assert run.trainer.global_step == 6 and expected > 6
    assert len(marks) == (expected if mode == "reduce-overhead" else 0)


def _fit_recording_losses(run) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Fit ``run`` and return the loss of every training step."""
    losses: list[torch.Tensor] = []
    step = run.model.training_step

    def recording_step(batch, batch_idx=0):  # type: ignore[no-untyped-def]
        loss = step(batch, batch_idx)
        losses.append(loss.detach().clone())
        return loss

    run.model.training_step = recording_step
    run.trainer.fit(run.model, datamodule=run.datamodule)
    return torch.stack(losses)


@pytest.mark.parametrize("batch_views", [True, False])
@pytest.mark.parametrize("config", ["isoloss-noema.yaml", "byol.yaml"])
def test_compiled_step_is_two_graphs_with_the_eager_losses(
    config: str, batch_views: bool, image_data, tmp_path: Path
) -> None:
    """compile_step traces the step's forward once into two graphs (split where C is updated
    and decomposed), reuses them on every later step (no recompilation) and computes the eager
    losses, with all views in one pass or one pass per view. The graphs run as traced (no
    inductor), so this checks the capture, quickly."""
    views = f"++performance.batch_views={batch_views}"
    eager = _fit_recording_losses(build_run(_one_epoch_cfg(config, image_data, tmp_path / "eager", views)))
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    run = build_run(_one_epoch_cfg(config, image_data, tmp_path / "compiled", views))
    run.model.compile_step(backend=recording_backend)
    compiled = _fit_recording_losses(run)
    assert len(eager) == len(compiled) == 6
    assert len(graphs) == 2
    passes = 1 if batch_views else 2  # of the ResNet-10 (12 convolutions) per network
    convolutions = [sum("conv2d" in str(n.target) for n in g.graph.nodes) for g in graphs]
    assert convolutions[0] == 12 * passes  # the online backbone, in the first graph
    assert convolutions[1] == (12 * passes if config == "byol.yaml" else 0)  # the EMA copy, in the second
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compile_scope_step_trains_with_inductor_like_eager(image_data, tmp_path: Path) -> None:
    """performance.compile_scope=step end to end, with inductor's CPU code: the first steps'
    losses are the eager ones to float rounding, and the checkpoint keys are unchanged. (Later
    steps drift apart: this tiny run amplifies a relative change of 1e-6 in the initial
    weights to 3e-3 in the loss within 6 eager steps, so only the first steps are compared.)"""
    eager_run = build_run(_one_epoch_cfg("byol.yaml", image_data, tmp_path, name="eager"))
    eager = _fit_recording_losses(eager_run)
    extra = ("++performance.compile=True", "++performance.compile_scope=step")
    torch._dynamo.reset()
    run = build_run(_one_epoch_cfg("byol.yaml", image_data, tmp_path, *extra, name="compiled"))
    assert run.model._compiled_step is not None and eager_run.model._compiled_step is None
    compiled = _fit_recording_losses(run)
    torch.testing.assert_close(compiled[:3], eager[:3], rtol=2e-4, atol=0)
    assert torch.isfinite(compiled).all()
    assert set(run.model.state_dict()) == set(eager_run.model.state_dict())


def test_unknown_compile_scope_is_refused(image_data, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="performance.compile_scope must be one of modules, step"):
        build_run(_one_epoch_cfg("byol.yaml", image_data, tmp_path, "++performance.compile_scope=everything"))


def test_a_failing_compiler_is_named(image_data, tmp_path: Path) -> None:
    """A compiler failure stops the run with an error that says how to train without it."""
    run = build_run(_one_epoch_cfg("isoloss-noema.yaml", image_data, tmp_path))

    def failing_backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        raise RuntimeError("no C compiler found")

    torch._dynamo.reset()
    run.model.compile_step(backend=failing_backend)
    with pytest.raises(TrainingError, match=r"torch.compile of the training step failed .*performance.compile=False"):
        run.trainer.fit(run.model, datamodule=run.datamodule)


def test_nonfinite_projections_in_a_compiled_step_give_the_eager_error(image_data, tmp_path: Path) -> None:
    """The eigendecomposition's error passes through the compiled step unchanged (it runs eager
    between the step's two graphs), so a diverged run reads the same in both modes."""
    run = build_run(_one_epoch_cfg("isoloss-noema.yaml", image_data, tmp_path))
    torch._dynamo.reset()
    run.model.compile_step(backend=lambda gm, example_inputs: gm.forward)
    with torch.no_grad():
        run.model.projector[0].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="NaN or infinite") as raised:
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert "torch.compile" not in str(raised.value)


@pytest.mark.parametrize("config", ["isoloss-noema.yaml", "byol.yaml"])
def test_views_in_one_pass_train_like_views_one_by_one(config: str, image_data, tmp_path: Path) -> None:
    """performance.batch_views (the default: one backbone, projector and EMA pass for all views,
    BatchNorm statistics per view) trains like one pass per view, the reference's order: the
    same losses to float rounding (only the first steps are compared; see the compiled-step
    test for why later steps drift apart) and the same running statistics after a step."""
    runs, losses = {}, {}
    for batch_views in (True, False):
        runs[batch_views] = build_run(
            _one_epoch_cfg(
                config, image_data, tmp_path, f"++performance.batch_views={batch_views}", name=str(batch_views)
            )
        )
        losses[batch_views] = _fit_recording_losses(runs[batch_views])
    assert runs[True].model.batch_views and not runs[False].model.batch_views
    torch.testing.assert_close(losses[True][:3], losses[False][:3], rtol=1e-4, atol=0)


def test_sync_batchnorm_goes_view_by_view(image_data, tmp_path: Path) -> None:
    """BatchNorm layers swapped for SyncBatchNorm (Lightning's sync_batchnorm, on several GPUs)
    would normalise all views together in one pass, so training starts view by view instead."""
    run = build_run(_one_epoch_cfg("byol.yaml", image_data, tmp_path, "++performance.batch_views=True"))
    assert run.model.batch_views
    run.model.projector = torch.nn.SyncBatchNorm.convert_sync_batchnorm(run.model.projector)
    run.model.on_train_start()
    assert not run.model.batch_views


@pytest.mark.parametrize(
    ("backbone", "kwargs"),
    [
        ("timm:resnet10t", []),  # BatchNorm layers: per-view statistics in one pass
        ("timm:vit_tiny_patch16_224", ["++backbone.kwargs.img_size=32", "++backbone.kwargs.patch_size=8"]),
    ],
)
def test_timm_backbones_pretrain_and_load_back(backbone: str, kwargs: list[str], image_data, tmp_path: Path) -> None:
    pytest.importorskip("timm")
    from ivreg.checkpoints import load_backbone

    extra = [f"backbone.name={backbone}", "++performance.batch_views=True", *kwargs]
    if "vit" in backbone:
        extra.append("++backbone.kwargs.depth=2")
    run = pretrain(_one_epoch_cfg("isoloss-noema.yaml", image_data, tmp_path, *extra))
    assert run.model.batch_views  # every BatchNorm (if any) keeps per-view statistics
    rows = _rows(tmp_path / "tiny" / "epochs.csv")
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_neg_cos_sim"]))
    loaded = load_backbone(tmp_path / "tiny")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), run.model.backbone.eval()(x))
    # the offline linear evaluation rebuilds the same model from the checkpoint's config
    from ivreg.eval.linear import linear_eval

    linear = {"pretrained_feature_extractor": str(tmp_path / "tiny"), "max_epochs": 1, "accelerator": "cpu"}
    linear |= {"precision": 32, "optimizer": {"batch_size": 16}, "checkpoint": {"dir": str(tmp_path)}}
    linear_eval(linear | {"num_sanity_val_steps": 0, "enable_model_summary": False})
    assert 0 <= float(_rows(tmp_path / "tiny-linear" / "epochs.csv")[0]["val_acc1"]) <= 100


_NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    ("config", "device"),
    [
        ("isoloss.yaml", "cpu"),
        pytest.param("isoloss.yaml", "cuda", marks=_NEEDS_CUDA),
        pytest.param("byol.yaml", "cuda", marks=_NEEDS_CUDA),
    ],
)
def test_fast_path_trains_with_resident_data_knn_and_background_checkpoints(
    config: str, device: str, image_data, tmp_path: Path
) -> None:
    """The GPU defaults together (images on the device, their kNN there too, checkpoints written
    by a background thread, bf16, the timed choice of where C is decomposed): one epoch that
    the CPU runs in CI and a device session runs on CUDA (``gpu_check.sh`` section cudatests)."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    extra = ["++data.pipeline=resident", "++knn.enabled=True", "++checkpoint.async_write=True"]
    if device == "cuda":
        extra += ["accelerator=gpu", "precision=bf16"]
    run = pretrain(_one_epoch_cfg(config, image_data, tmp_path, *extra))
    assert run.datamodule.pipeline == "resident"
    assert run.datamodule._resident["train_images"].device.type == device
    assert isinstance(run.trainer.strategy.checkpoint_io, AsyncCheckpointIO)
    run_dir = tmp_path / "tiny"
    assert (run_dir / "last.ckpt").is_file() and not list(run_dir.glob("*.tmp"))
    row = _rows(run_dir / "epochs.csv")[0]
    for key in ("val_acc1", "val_knn_acc1", "train_neg_cos_sim", "part_ratio"):
        assert math.isfinite(float(row[key])), f"{key} is not finite"
    if run.cfg.method == "directpred":  # auto was decided: by timing on a GPU, as the device on the CPU
        assert run.model.predictor.eigh_on_host in ((False,) if device == "cpu" else (False, True))
    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=False)
    state = run.model.state_dict()
    for key in ("backbone.conv1.weight", "projector.0.weight"):
        torch.testing.assert_close(ckpt["state_dict"][key], state[key].cpu())


def test_world_size_reads_every_form_of_devices() -> None:
    from ivreg.resume import world_size_of

    assert world_size_of([0, 1, 2], 2) == 6
    assert world_size_of("0,1", 1) == 2
    assert world_size_of(4, 1) == 4 and world_size_of("3", 1) == 3
    with pytest.raises(ConfigError, match="devices='gpus'"):
        world_size_of("gpus", 1)


def test_sync_batchnorm_on_cpu_processes_is_said_to_have_no_effect() -> None:
    from ivreg.config import prepare_config
    from ivreg.train import hardware_kwargs

    cpu = ["accelerator=cpu", "precision=32", "sync_batchnorm=True"]
    with pytest.warns(UserWarning, match="sync_batchnorm=True has no effect on the CPU .* each of the 2 processes"):
        kwargs = hardware_kwargs(prepare_config(compose(str(CIFAR_CONFIGS), "isoloss.yaml", [*cpu, "devices=2"])))
    assert kwargs["sync_batchnorm"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one process: nothing to synchronise, nothing to say
        hardware_kwargs(prepare_config(compose(str(CIFAR_CONFIGS), "isoloss.yaml", [*cpu, "devices=1"])))


def test_a_resume_onto_other_class_folders_is_refused_before_anything_is_written(image_data, tmp_path: Path) -> None:
    """A renamed class folder shifts every label under the trained readout (silently, before);
    a removed one changes the readout's shape (a state_dict traceback, after config.yaml had
    been rewritten); added images change the steps per epoch (the schedules jumped, silently)."""
    import shutil

    train, val = image_data
    pretrain(_one_epoch_cfg("isoloss-noema.yaml", image_data, tmp_path))
    run_dir = tmp_path / "tiny"
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["data_classes"] == ["class_0", "class_1", "class_2"]
    config_before = (run_dir / "config.yaml").read_text()
    renamed, fewer, more = tmp_path / "renamed", tmp_path / "fewer", tmp_path / "more"
    for root in (renamed, fewer, more):
        shutil.copytree(train, root / "train")
        shutil.copytree(val, root / "val")
    for split in ("train", "val"):
        (renamed / split / "class_0").rename(renamed / split / "class_9")
        shutil.rmtree(fewer / split / "class_2")
    images = sorted((more / "train" / "class_1").iterdir())
    for image in images[:5]:  # the same classes, 5 more images (a copy that had not finished at launch)
        shutil.copy(image, image.with_name(f"copy_{image.name}"))
    n = sum(1 for p in Path(train).rglob("*") if p.is_file())
    half = build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "++data.fraction=0.5", name="half"))
    assert half.datamodule.num_train_images == n  # the split a fraction draws from: its draw changes with it
    release_run_folder(half.run_dir)
    cases = [
        (renamed, r"trained on other classes than the data now given .*gone: class_0; new: class_9"),
        (fewer, r"trained on other classes than the data now given .*3 classes then, 2 now; gone: class_2"),
        (more, rf"was trained on a training split of {n} images, the data now given has {n + 5}: the steps per"),
    ]
    for root, message in cases:
        paths = [f"data.train_path={root / 'train'}", f"data.val_path={root / 'val'}", "max_epochs=2"]
        with pytest.raises(ConfigError, match=message):
            build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "scheduler.warmup_epochs=0", *paths))
    assert (run_dir / "config.yaml").read_text() == config_before
    # the same class folders elsewhere (data paths may change on resume): resumed
    moved = [f"data.train_path={renamed / 'train'}", f"data.val_path={renamed / 'val'}", "scheduler.warmup_epochs=0"]
    for split in ("train", "val"):
        (renamed / split / "class_9").rename(renamed / split / "class_0")
    run = build_run(
        _cfg("isoloss-noema.yaml", image_data, tmp_path, "scheduler.warmup_epochs=0", "max_epochs=2", *moved)
    )
    assert run.resume_from == run_dir / "last.ckpt"
    release_run_folder(run_dir)


def _store_unread_keys(checkpoint: Path, **sections: dict) -> None:
    """What an older ivreg did with keys it did not read: kept them in the stored config (and
    it had no report.momentum_readout of its own)."""
    ckpt = torch.load(checkpoint, weights_only=True)
    cfg = ckpt["hyper_parameters"]["cfg"]
    del cfg["report"]["momentum_readout"], cfg["optimizer"]["exclude_bias_n_norm_wd"]
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    torch.save(ckpt, checkpoint)


def test_a_run_whose_stored_keys_now_act_is_refused_in_one_line_before_writing(image_data, tmp_path: Path) -> None:
    """report.momentum_readout and optimizer.exclude_bias_n_norm_wd were stored unread before
    they existed: resuming such a run now would need weights or optimizer groups it lacks."""
    pretrain(_one_epoch_cfg("byol.yaml", image_data, tmp_path))
    run_dir = tmp_path / "tiny"
    pristine = (run_dir / "last.ckpt").read_bytes()
    config_before = (run_dir / "config.yaml").read_text()
    cases = [
        ({"report": {"momentum_readout": True}}, "++report.momentum_readout=True", r"missing weight.*momentum_readout"),
        ({"momentum": {"classifier": True}}, "++momentum.classifier=True", r"missing weight.*momentum_readout"),
        (
            {"optimizer": {"exclude_bias_n_norm_wd": True}},
            "++optimizer.exclude_bias_n_norm_wd=True",
            r"optimizer parameter groups \['ssl', 'classifier'\] then, \['ssl', 'classifier', 'ssl_no_weight_decay'\]",
        ),
    ]
    for stored, override, message in cases:
        (run_dir / "last.ckpt").write_bytes(pristine)
        _store_unread_keys(run_dir / "last.ckpt", **stored)
        with pytest.raises(ConfigError, match=f"does not fit the model and optimizer this config builds .*{message}"):
            build_run(_cfg("byol.yaml", image_data, tmp_path, "scheduler.warmup_epochs=0", "max_epochs=2", override))
        assert (run_dir / "config.yaml").read_text() == config_before
    # solo-learn's momentum.classifier=False, stored unread, resumes without the key
    (run_dir / "last.ckpt").write_bytes(pristine)
    _store_unread_keys(run_dir / "last.ckpt", momentum={"classifier": False})
    run = build_run(_cfg("byol.yaml", image_data, tmp_path, "scheduler.warmup_epochs=0", "max_epochs=2"))
    assert run.resume_from == run_dir / "last.ckpt"
    release_run_folder(run_dir)


def test_a_checkpoint_without_class_names_is_compared_by_its_number_of_classes(tmp_path: Path) -> None:
    from ivreg.resume import check_resumed_classes

    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": {"data": {"num_classes": 10}}}}, path)
    check_resumed_classes(path, ["a"] * 10, 10)  # (names unknown then: the number agrees)
    with pytest.raises(ConfigError, match=r"\(10 classes then, 9 now\)"):
        check_resumed_classes(path, None, 9)
    check_resumed_classes(None, ["a"], 1)  # a fresh start compares nothing


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("++limit_train_batches=0", r"limit_train_batches=0 trains no batch"),
        ("accelerator=tpu", r"Lightning refused the trainer settings: .*torch_xla"),
        ("augmentations.0.crop_size=abc", r"augmentations\[0\].crop_size must be a whole number, got 'abc'"),
        ("augmentations.0.rrc.crop_min_scale=x", r"augmentations\[0\].rrc.crop_min_scale must be a number"),
    ],
)
def test_settings_lightning_or_the_views_cannot_take_are_one_line_errors(
    extra: str, message: str, image_data, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_run(_one_epoch_cfg("isoloss-noema.yaml", image_data, tmp_path, extra))


def test_a_limit_below_one_batch_is_a_config_error_when_lightning_meets_it(image_data, tmp_path: Path) -> None:
    """Lightning checks a fractional limit against the loader only when fitting."""
    run = build_run(_one_epoch_cfg("isoloss-noema.yaml", image_data, tmp_path, "++limit_train_batches=0.001"))
    with pytest.raises(ConfigError, match=r"Lightning refused the settings: .*0.001 \* 6 < 1"):
        fit(run)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("''", "gives the run no folder of its own"),
        ("null", "gives the run no folder"),
        (".", "gives the run no folder"),
        ("../out", "leads out of"),
    ],
)
def test_a_name_without_a_folder_of_its_own_is_refused(name: str, message: str, image_data, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        build_run(_one_epoch_cfg("isoloss-noema.yaml", image_data, tmp_path / "runs", f"name={name}"))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_gpu_indices_on_the_cpu_are_refused_with_the_way_out() -> None:
    """The shipped configs' devices=[0] with accelerator=cpu (Lightning: a TypeError from
    inside its CPU accelerator)."""
    from ivreg.config import prepare_config
    from ivreg.train import hardware_kwargs

    cfg = prepare_config(compose(str(CIFAR_CONFIGS), "isoloss.yaml", ["accelerator=cpu", "precision=32"]))
    assert OmegaConf.to_object(cfg.devices) == [0]  # as shipped
    with pytest.raises(ConfigError, match=r"devices=\[0\] lists GPU indices .* on the CPU .* devices=1"):
        hardware_kwargs(cfg)


def test_only_global_rank_zero_writes_the_config_of_a_multi_node_launch(
    image_data, tmp_path: Path, monkeypatch
) -> None:
    """A launch by hand on the second node (NODE_RANK=1) writes no config.yaml: the config is
    written after the Trainer has set the global rank from the node rank."""
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning.pytorch.utilities import rank_zero as pytorch_rank_zero

    ranks = (fabric_rank_zero.rank_zero_only.rank, pytorch_rank_zero.rank_zero_only.rank)
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    try:
        run = build_run(_cfg("byol.yaml", image_data, tmp_path, "strategy=ddp", "++num_nodes=2"))
        assert run.trainer.global_rank == 1
        assert not (tmp_path / "tiny" / "config.yaml").exists()
    finally:  # the Trainer set the process-wide rank that rank_zero_only reads
        fabric_rank_zero.rank_zero_only.rank, pytorch_rank_zero.rank_zero_only.rank = ranks


def test_resume_compares_the_checkpoints_own_config(image_data, tmp_path: Path) -> None:
    """Against the checkpoint's config, not config.yaml (which a launch with checkpoints off
    rewrote: the next launch then trained an IsoLoss checkpoint as DirectPred), and over whole
    sections: a changed rate, decay or seed would be overridden by the restored optimizer and
    schedules while config.yaml claimed it."""
    first = ("max_epochs=1", "scheduler.name=none")
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, *first))
    (tmp_path / "tiny" / "config.yaml").unlink()  # what a config.yaml rewritten by another launch claims is not read
    with pytest.raises(ConfigError, match=r"differs from this config in \['method_kwargs.iso'\]"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *first, "method_kwargs.iso=False"))
    with pytest.raises(ConfigError, match=r"in \['method_kwargs.iso'\]"):  # checkpoints off: still that run's folder
        build_run(
            _cfg(
                "isoloss-noema.yaml",
                image_data,
                tmp_path,
                *first,
                "method_kwargs.iso=False",
                "checkpoint.enabled=False",
            )
        )
    with pytest.raises(ConfigError, match="already holds a run"):
        build_run(
            _cfg(
                "isoloss-noema.yaml",
                image_data,
                tmp_path,
                *first,
                "checkpoint.enabled=False",
                "auto_resume.enabled=False",
            )
        )
    added = {
        "++optimizer.kwargs.nesterov=True": "optimizer.kwargs.nesterov",
        "++limit_train_batches=7": "limit_train_batches",
    }
    for override, key in added.items():  # what the checkpoint's config lacks counts unless it holds the default
        name = key.rsplit(".", 1)[-1]  # the sweep's example names the key that differs
        hint = rf"\(in a sweep, e.g. name=<run>_{name}\$\{{{key}\}}\)"
        with pytest.raises(ConfigError, match=rf"differs from this config in \['{key}'\]\. .*{hint}"):
            build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *first, override))
    changed = ["optimizer.lr=20.0", "optimizer.weight_decay=0.1", "++seed=7", "method_kwargs.dp_tau=0.9"]
    with pytest.raises(
        ConfigError, match=r"\['method_kwargs.dp_tau', 'optimizer.lr', 'optimizer.weight_decay', 'seed'\]"
    ):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, *first, *changed))
    # what changes no trained number may change: epochs, logging, workers, performance switches
    harmless = ["max_epochs=2", "method_kwargs.log_eigvals=False", "logger.tensorboard=False", "data.num_workers=1"]
    run = build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "scheduler.name=none", *harmless))
    assert run.resume_from == tmp_path / "tiny" / "last.ckpt"


def test_a_truncated_last_checkpoint_is_named_and_nothing_is_written(image_data, tmp_path: Path) -> None:
    from ivreg.errors import CheckpointError

    first = ("max_epochs=2", "scheduler.name=none", "++checkpoint.keep_every_n_epochs=1")
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, *first))
    run_dir = tmp_path / "tiny"
    last = run_dir / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = sorted(p.name for p in run_dir.rglob("*"))
    with pytest.raises(
        CheckpointError,
        match=r"last.ckpt is not a readable PyTorch checkpoint .*resume_from_checkpoint=.*epoch0002.ckpt",
    ):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=3", "scheduler.name=none"))
    assert sorted(p.name for p in run_dir.rglob("*")) == before
    for kept in run_dir.glob("epoch*.ckpt"):  # none kept: the way out is to start over
        kept.unlink()
    with pytest.raises(CheckpointError, match=f"Nothing was changed in {run_dir}: move or delete {last} to start"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=3", "scheduler.name=none"))


class _SigtermAtStep(L.Callback):
    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step = step
        self.signum = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)  # SIGTERM: what SLURM sends on preemption


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_exit_with_their_status_and_say_what_is_kept(
    signum: int, status: int, image_data, tmp_path: Path, capsys
) -> None:
    """Lightning turns SIGTERM into a SystemExit without a code (status 0, nothing printed):
    a job script would have gone on to evaluate an unfinished run; Ctrl-C into status 1 with
    a message that its disabled logging dropped."""
    from ivreg.train import fit

    run = build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=3", "scheduler.name=none"))
    run.trainer.callbacks.append(_SigtermAtStep(8, signum))  # in epoch 1 (6 steps per epoch)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stopped:
            fit(run)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    assert stopped.value.code == status
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name} in epoch 1: " in err and "holds 1 finished epoch(s)" in err
    assert torch.load(tmp_path / "tiny" / "last.ckpt", weights_only=False)["epoch"] == 0


def test_a_second_launch_into_a_folder_in_use_is_refused(image_data, tmp_path: Path) -> None:
    """Two launches into one folder both trained and mixed their epochs, config and checkpoint;
    the folder is now locked by the first until it ends (or is killed), and stale temporary
    files of killed runs are cleared by the next accepted launch."""
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    (run_dir / "last.ckpt.999999.tmp").write_bytes(b"torn")  # no such process
    # a user's own files, and one of a live process (this one's parent), stay
    mine = ["notes.tmp", "backup.ckpt.tmp", f"eigvals.csv.{os.getppid()}.tmp"]
    for name in mine:
        (run_dir / name).write_text("keep")
    hold = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); f.write('4242 on elsewhere'); f.flush(); "
        "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=r"tiny is in use by another launch \(process 4242 on elsewhere\)"):
            build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path))
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path))  # the lock went with the process
    assert (run_dir / "config.yaml").exists() and sorted(p.name for p in run_dir.glob("*.tmp")) == sorted(mine)

    # a run that has ended frees its folder for another process (a notebook or sweep goes on)
    pretrain(_cfg("isoloss-noema.yaml", image_data, tmp_path, "max_epochs=1", "scheduler.name=none", name="done"))
    try_lock = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a+'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    subprocess.run([sys.executable, "-c", try_lock, str(tmp_path / "done" / ".lock")], check=True)


def test_a_run_folder_that_cannot_be_made_is_named(image_data, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot create the run folder .*file/tiny"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path / "file"))


def test_a_named_dataset_with_other_classes_is_refused(image_data, tmp_path: Path) -> None:
    """CIFAR-10 JPEGs under data.dataset=cifar100 trained a 100-way readout on 10 classes and
    filed the results under CIFAR-100."""
    with pytest.raises(DataError, match=r"data.dataset=cifar100 has 100 classes but .*train holds 3"):
        build_run(_cfg("isoloss-noema.yaml", image_data, tmp_path, "data.dataset=cifar100"))
    assert not (tmp_path / "tiny").exists()


def test_a_resumed_run_goes_on_in_its_wandb_run(tmp_path: Path, monkeypatch) -> None:
    """A relaunch that resumes passes W&B the id the first launch chose (kept in the run
    folder), so a preempted run's charts stay one W&B run; a fresh start draws a new id."""
    import importlib.machinery
    import types

    import lightning.pytorch.loggers

    from ivreg.config import prepare_config
    from ivreg.train import WANDB_ID_FILE, build_loggers, claim_run_folder

    class WandbLogger:  # stands in for Lightning's (wandb is optional); the name is what counts
        def __init__(self, **kwargs):
            self.kwargs, self.version = kwargs, kwargs["id"]

    fake_wandb = types.ModuleType("wandb")
    fake_wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setattr(lightning.pytorch.loggers, "WandbLogger", WandbLogger)
    overrides = ["++logger.wandb.enabled=True", "++logger.csv=False", "++logger.tensorboard=False"]
    cfg = prepare_config(compose(str(CIFAR_CONFIGS), "isoloss.yaml", overrides))
    run_dir = tmp_path / "run"

    (first,) = build_loggers(cfg, run_dir, resuming=False)
    claim_run_folder(cfg, run_dir, [first])
    release_run_folder(run_dir)
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == first.kwargs["id"]
    assert len(first.kwargs["id"]) == 8 and first.kwargs["save_dir"] == str(run_dir)
    (resumed,) = build_loggers(cfg, run_dir, resuming=True)
    assert resumed.kwargs["id"] == first.kwargs["id"]
    (fresh,) = build_loggers(cfg, run_dir, resuming=False)
    assert fresh.kwargs["id"] != first.kwargs["id"]


def test_step_metrics_land_in_the_row_of_their_own_step(image_data, tmp_path: Path, monkeypatch) -> None:
    """log_every_n_steps=2: Lightning writes the rows of steps 1, 3, 5; each must hold that
    step's loss (values computed at steps 0, 2, 4 once waited and landed a row later)."""
    from ivreg.method import SSLMethod

    losses: dict[int, float] = {}
    record = SSLMethod._record

    def recording(self, metrics):
        losses[self.global_step] = float(metrics["train_neg_cos_sim"])
        return record(self, metrics)

    monkeypatch.setattr(SSLMethod, "_record", recording)
    train, val = image_data
    overrides = [*tiny_overrides(train, val, tmp_path), "max_epochs=1", "scheduler.warmup_epochs=0"]
    run = pretrain(compose(str(CIFAR_CONFIGS), "byol.yaml", [*overrides, "++log_every_n_steps=2", "logger.csv=True"]))
    with open(run.run_dir / "logs" / "version_0" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_neg_cos_sim_step")]
    assert sorted(losses) == list(range(6))  # 48 images, batches of 8
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    for r in rows:
        assert float(r["train_neg_cos_sim_step"]) == pytest.approx(losses[int(r["step"])], rel=1e-6)


def test_the_final_line_reports_a_random_init_accuracy_of_zero(tmp_path: Path) -> None:
    """0.00 is an accuracy (a tiny validation set), not a missing value."""
    from ivreg.train import readout_result

    epochs = tmp_path / "epochs.csv"
    epochs.write_text("epoch,val_acc1,val_acc1_random\n0,50.0,0.0\n1,nan,nan\n")
    assert readout_result(epochs) == (
        "online readout val_acc1 50.00 (pretrained backbone) vs 0.00 (randomly initialised backbone) "
        "after epoch 0, the last validated of 2"
    )
