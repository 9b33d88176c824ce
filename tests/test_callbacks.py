import csv
import math
from pathlib import Path

from ivreg.callbacks import EpochSummary


def _row(**extra: float) -> dict:
    row = {"epoch": 3, "train_time_s": 1.0, "val_time_s": 0.5, "val_acc1": 42.0, "train_z_norm": 12.5}
    row.update(extra)
    return row


def test_epoch_line_reports_norm_and_only_nonzero_skipped_steps() -> None:
    line = EpochSummary.format_line(_row(train_nonfinite_grad_steps=0.0))
    assert "z_norm 12.5" in line and "val_acc1  42.00" in line
    assert "non-finite" not in line
    line = EpochSummary.format_line(_row(train_nonfinite_grad_steps=3.0))
    assert line.endswith("non-finite gradient steps 3")
    assert "non-finite" not in EpochSummary.format_line(_row(train_nonfinite_grad_steps=math.nan))
    assert "knn val_acc1  61.50 |" in EpochSummary.format_line(_row(val_knn_acc1=61.5))
    assert "knn" not in EpochSummary.format_line(_row(val_knn_acc1=math.nan))  # not enabled, or not due


def test_rows_written_before_a_column_existed_read_as_nan(tmp_path: Path) -> None:
    """A run resumed by a newer version adds columns; its earlier rows get 'nan', not ''."""
    path = tmp_path / "epochs.csv"
    summary = EpochSummary(tmp_path, log_eigvals=False)
    summary._append("epochs.csv", {"epoch": 0, "val_acc1": 10.0})
    summary._append("epochs.csv", {"epoch": 1, "val_acc1": 11.0, "train_z_norm": 5.0})
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert math.isnan(float(rows[0]["train_z_norm"])) and float(rows[1]["train_z_norm"]) == 5.0


def test_background_checkpoint_writes_are_point_in_time_atomic_and_report_failures(tmp_path: Path) -> None:
    import pytest
    import torch
    from lightning.pytorch.plugins.io import AsyncCheckpointIO
    from omegaconf import OmegaConf

    from ivreg.callbacks import AtomicCheckpointIO, checkpoint_io
    from ivreg.errors import CheckpointError

    assert type(checkpoint_io(OmegaConf.create({"async_write": False}), on_gpu=True)) is AtomicCheckpointIO
    assert type(checkpoint_io(OmegaConf.create({}), on_gpu=False)) is AtomicCheckpointIO  # auto: sync on the CPU
    io = checkpoint_io(OmegaConf.create({}), on_gpu=True)  # auto: in the background on a GPU
    assert type(checkpoint_io(OmegaConf.create({"async_write": True}), on_gpu=False)) is AsyncCheckpointIO
    assert isinstance(io, AsyncCheckpointIO) and isinstance(io.checkpoint_io, AtomicCheckpointIO)
    weight = torch.zeros(1000)
    io.save_checkpoint({"state_dict": {"w": weight}}, tmp_path / "last.ckpt")
    weight.add_(1.0)  # training goes on while the thread writes
    io.teardown()  # waits for the write, as the trainer does when a run ends
    saved = torch.load(tmp_path / "last.ckpt")
    assert torch.equal(saved["state_dict"]["w"], torch.zeros(1000))  # the weights at save time
    assert not list(tmp_path.glob("*.tmp"))

    (tmp_path / "blocked").write_text("a file where the run folder should be")
    # the background failure is raised (at the next write or the end), not lost, and names the epoch
    # (a quick failure is raised by the submitting call itself, a slow one at the end)
    with pytest.raises(CheckpointError, match=r"epoch 3's checkpoint: could not create .*blocked for last.ckpt"):
        io.save_checkpoint({"w": weight, "epoch": 3}, tmp_path / "blocked" / "last.ckpt")
        io.teardown()
    with pytest.raises(CheckpointError, match=r"epoch 4's checkpoint: could not create .*blocked"):
        checkpoint_io(OmegaConf.create({"async_write": False}), on_gpu=False).save_checkpoint(
            {"epoch": 4}, tmp_path / "blocked" / "last.ckpt"
        )


def test_an_error_in_the_launching_process_kills_the_processes_it_started() -> None:
    """With NCCL the others would otherwise wait for the process group's timeout (gloo, as in
    tests/test_ddp.py, notices the closed connection and ends them anyway)."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    from ivreg.callbacks import StopAllProcessesOnError

    launcher = _SubprocessScriptLauncher(LightningEnvironment(), num_processes=2, num_nodes=1)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    launcher.procs = [child]
    try:
        trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=launcher))
        StopAllProcessesOnError().on_exception(trainer, None, OSError("disk full"))
        assert child.wait(timeout=10) != 0  # killed, not finished
        # a process that launched nothing (a child rank, torchrun, one device) has nothing to kill
        StopAllProcessesOnError().on_exception(
            SimpleNamespace(strategy=SimpleNamespace(launcher=None)), None, OSError()
        )
    finally:
        child.kill()


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    """A full disk: the previous checkpoint stays whole, no temporary file is left behind (one
    blocked every later launch), and the error names the file."""
    import pytest
    import torch

    from ivreg.callbacks import AtomicCheckpointIO, atomic_write_text
    from ivreg.errors import CheckpointError

    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.zeros(3)}, tmp_path / "last.ckpt")

    def full_disk(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"epoch 4's checkpoint: could not write .*last.ckpt .*previous version"):
        io.save_checkpoint({"w": torch.ones(3), "epoch": 4}, tmp_path / "last.ckpt")
    monkeypatch.undo()
    assert torch.equal(torch.load(tmp_path / "last.ckpt")["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    (tmp_path / "not_a_folder").write_text("")  # open() fails as in a read-only folder
    with pytest.raises(CheckpointError, match=r"could not write .*config.yaml .*nothing was written"):
        atomic_write_text(tmp_path / "not_a_folder" / "config.yaml", "x: 1\n")


def test_every_kept_epoch_is_also_the_last_checkpoint(tmp_path: Path) -> None:
    """checkpoint.frequency=2 with keep_every_n_epochs=1: a run killed after epoch 1 resumes
    from epoch 1, not from scratch."""
    from types import SimpleNamespace

    from ivreg.callbacks import EpochCheckpoint

    saved: list[str] = []
    trainer = SimpleNamespace(max_epochs=4, save_checkpoint=lambda path, weights_only: saved.append(Path(path).name))
    callback = EpochCheckpoint(tmp_path, every_n_epochs=2, keep_every_n_epochs=1)
    for epoch in range(2):
        trainer.current_epoch = epoch
        callback.on_train_epoch_end(trainer, None)  # type: ignore[arg-type]
    assert saved == ["last.ckpt", "epoch0001.ckpt", "last.ckpt", "epoch0002.ckpt"]


def test_epochs_without_validation_hold_no_stale_figures(image_data, tmp_path: Path, capsys) -> None:
    """check_val_every_n_epoch=2 of 3 epochs: only epoch 1 is validated; Lightning keeps its
    figures in callback_metrics through epoch 2, whose row and the final line must not show
    them as epoch 2's."""
    from ivreg.config import compose
    from ivreg.train import pretrain

    from .conftest import CIFAR_CONFIGS, tiny_overrides

    train, val = image_data
    extra = ["++knn.enabled=True", "++knn.k=5", "++check_val_every_n_epoch=2", "max_epochs=3"]
    extra += ["scheduler.warmup_epochs=0", "++report.compare_random_init=True"]
    run = pretrain(compose(str(CIFAR_CONFIGS), "isoloss-noema.yaml", tiny_overrides(train, val, tmp_path) + extra))
    with open(run.run_dir / "epochs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for column in ("val_loss", "val_acc1", "val_acc5", "val_knn_acc1", "val_acc1_random"):
        assert [math.isnan(float(r[column])) for r in rows] == [True, False, True], (column, rows)
    assert all(math.isfinite(float(r["train_neg_cos_sim"])) for r in rows)
    final = [line for line in capsys.readouterr().out.splitlines() if "online readout" in line]
    assert final == [
        f"tiny: online readout val_acc1 {float(rows[1]['val_acc1']):.2f} (pretrained backbone) vs "
        f"{float(rows[1]['val_acc1_random']):.2f} (randomly initialised backbone) after epoch 1, the last "
        "validated of 3"
    ]


def test_rows_a_file_cut_short_lost_part_of_are_left_out(tmp_path: Path) -> None:
    from ivreg.callbacks import read_complete_rows

    path = tmp_path / "epochs.csv"
    summary = EpochSummary(tmp_path, log_eigvals=False)
    for epoch in range(3):
        summary._append("epochs.csv", {"epoch": epoch, "val_acc1": 10.0 + epoch, "lr": 0.125})
    text = path.read_text()
    assert read_complete_rows(path) == (
        [{"epoch": str(e), "val_acc1": f"{10.0 + e}", "lr": "0.125"} for e in range(3)],
        False,
    )
    path.write_text(text[:-3])  # inside the last field: "0.1", all fields there, no line end
    rows, cut = read_complete_rows(path)
    assert [r["epoch"] for r in rows] == ["0", "1"] and cut
    path.write_text(text[: text.rindex(",12.0")])  # fields missing
    rows, cut = read_complete_rows(path)
    assert [r["epoch"] for r in rows] == ["0", "1"] and cut
    assert read_complete_rows(tmp_path / "none.csv") == ([], False)
