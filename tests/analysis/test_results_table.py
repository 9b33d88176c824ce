"""The results table from hand-written run folders, checked against hand-written Markdown."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from ivreg.analysis.results_table import collect, find_runs, main

EMA = {"base_tau": 0.99, "final_tau": 1.0}
NO_EMA = {"base_tau": 0.0, "final_tau": 0.0}


def _run(root: Path, name: str, cfg: dict, val_acc1: list[float | str]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(run / "epochs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "val_loss", "val_acc1", "val_acc5"])
        for epoch, acc in enumerate(val_acc1):
            writer.writerow([epoch, 10 * (epoch + 1), 1.0, acc, 99.0])
    return run


def _pretrain(method: str, momentum: dict, dataset: str, **method_kwargs) -> dict:
    return {"method": method, "momentum": momentum, "data": {"dataset": dataset}, "method_kwargs": method_kwargs}


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    _run(root, "byol-c10-s1", _pretrain("byol", EMA, "cifar10"), [80, 85, 84])
    _run(root, "byol-c10-s2", _pretrain("byol", EMA, "cifar10"), [82, 87, 86])
    _run(root, "simsiam-c10", _pretrain("byol", NO_EMA, "cifar10"), [70, 75])
    _run(root, "iso-noema-c100", _pretrain("directpred", NO_EMA, "cifar100", iso=True), [50, 60, 58, "nan"])
    _run(root / "deeper" / "nested", "iso-stl", _pretrain("directpred", EMA, "stl10", iso=True), [90])
    _run(root, "dp-alpha-digits", _pretrain("directpred", EMA, "digits", dp_alpha=0.7), [30, 40, 35])
    _run(root, "dcopy-noema-c10", _pretrain("directpred", NO_EMA, "cifar10", dp_alpha=1.0, eps_iso=0.25), [66.666])
    _run(root, "diverged", _pretrain("directpred", EMA, "cifar10"), ["nan", "nan"])  # skipped with a warning
    (root / "no-epochs-yet").mkdir()
    (root / "no-epochs-yet" / "config.yaml").write_text(yaml.safe_dump(_pretrain("byol", EMA, "cifar10")))
    linear_cfg = {
        "pretrained_feature_extractor": "/x/last.ckpt",
        "finetune": False,
        "data": {"dataset": "cifar10"},
        "pretrain_cfg": _pretrain("directpred", EMA, "cifar10", iso=True),
    }
    _run(root, "iso-c10-linear", linear_cfg, [91.5, 92.25])
    return root


BEST = """\
| Method | cifar10 | cifar100 | stl10 | digits |
| --- | --- | --- | --- | --- |
| BYOL | 86.00 ± 1.41 (n=2) | - | - | - |
| SimSiam | 75.00 | - | - | - |
| DirectCopy (no EMA) | 66.67 | - | - | - |
| IsoLoss | - | - | 90.00 | - |
| IsoLoss (no EMA) | - | 60.00 | - | - |
| DirectPred(alpha=0.7, eps=0) | - | - | - | 40.00 |"""

FINAL = """\
| Method | cifar10 | cifar100 | stl10 | digits |
| --- | --- | --- | --- | --- |
| BYOL | 85.00 ± 1.41 (n=2) | - | - | - |
| SimSiam | 75.00 | - | - | - |
| DirectCopy (no EMA) | 66.67 | - | - | - |
| IsoLoss | - | - | 90.00 | - |
| IsoLoss (no EMA) | - | 58.00 | - | - |
| DirectPred(alpha=0.7, eps=0) | - | - | - | 35.00 |"""


def test_best_and_final_tables_match_by_hand(runs_root: Path, tmp_path: Path, capsys):
    md, table_csv = tmp_path / "out" / "table.md", tmp_path / "out" / "table.csv"
    assert main([str(runs_root), "--md", str(md), "--csv", str(table_csv)]) == 0
    captured = capsys.readouterr()
    assert captured.out == BEST + "\n"
    assert md.read_text() == BEST + "\n"
    assert "skipping" in captured.err and "diverged" in captured.err
    with open(table_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["method"] == "BYOL" and rows[0]["dataset"] == "cifar10" and rows[0]["n"] == "2"
    assert float(rows[0]["mean"]) == 86.0 and float(rows[0]["std"]) == pytest.approx(2**0.5)
    assert [r["method"] for r in rows][-1] == "DirectPred(alpha=0.7, eps=0)"

    assert main([str(runs_root), "--metric", "final"]) == 0
    assert capsys.readouterr().out == FINAL + "\n"


def test_linear_runs_are_a_separate_table(runs_root: Path, capsys):
    assert main([str(runs_root), "--kind", "linear"]) == 0
    assert capsys.readouterr().out == "| Method | cifar10 |\n| --- | --- |\n| IsoLoss | 92.25 |\n"


def test_run_discovery_and_errors(runs_root: Path, tmp_path: Path, capsys):
    names = [p.name for p in find_runs(runs_root)]
    assert "no-epochs-yet" not in names and "iso-stl" in names and len(names) == 9
    warnings: list[str] = []
    results = collect(runs_root, warn=warnings.append)
    assert len(results) == 7 and len(warnings) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: no pretrain runs with a finite val_acc1 under")


def test_runs_that_share_a_seed_are_named(tmp_path: Path, capsys):
    root = tmp_path / "runs"
    _run(root, "byol-a", {**_pretrain("byol", EMA, "cifar10"), "seed": 5}, [80])
    _run(root, "byol-b", {**_pretrain("byol", EMA, "cifar10"), "seed": 5}, [82])
    _run(root, "byol-c", {**_pretrain("byol", EMA, "cifar10"), "seed": 6}, [81])
    _run(root, "iso-a", {**_pretrain("directpred", EMA, "cifar10", iso=True), "seed": 5}, [90])
    assert main([str(root)]) == 0
    captured = capsys.readouterr()
    assert "BYOL | 81.00 ± 1.00 (n=3)" in captured.out
    warnings = [line for line in captured.err.splitlines() if "share seed" in line]
    assert len(warnings) == 1
    assert "2 runs of BYOL on cifar10 share seed 5" in warnings[0] and "byol-a" in warnings[0]


def test_a_cell_mixing_settings_is_named(tmp_path: Path, capsys):
    """Runs that differ in more than their seed (an lr sweep) would be averaged into one cell."""
    root = tmp_path / "runs"
    for seed, lr in ((1, 0.5), (2, 0.5), (3, 1.0)):
        _run(root, f"byol-{seed}", {**_pretrain("byol", EMA, "cifar10"), "seed": seed, "optimizer": {"lr": lr}}, [80])
    for seed in (1, 2):  # seeds alone: no warning
        _run(root, f"iso-{seed}", {**_pretrain("directpred", EMA, "cifar10", iso=True), "seed": seed}, [90])
    assert main([str(root)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "differ in" in line]
    assert warnings == [
        "warning: the 3 runs of BYOL on cifar10 differ in optimizer.lr (0.5, 1.0): the cell averages different "
        "settings; tabulate them from separate folders"
    ]


def test_unfinished_runs_are_left_out_unless_asked_for(tmp_path: Path, capsys):
    """A run still training (or stopped) would pull its cell towards an early epoch's accuracy."""
    root = tmp_path / "runs"
    _run(root, "byol-done", {**_pretrain("byol", EMA, "cifar10"), "seed": 1, "max_epochs": 3}, [80, 85, 86])
    _run(root, "byol-short", {**_pretrain("byol", EMA, "cifar10"), "seed": 2, "max_epochs": 3}, [60])
    steps = {**_pretrain("byol", EMA, "cifar100"), "max_epochs": 3, "max_steps": 20}  # stopped by max_steps
    _run(root, "byol-steps", steps, [50])
    assert main([str(root), "--metric", "final"]) == 0
    captured = capsys.readouterr()
    assert "| BYOL | 86.00 | 50.00 |" in captured.out
    assert "skipping" in captured.err and "byol-short: unfinished (1 of max_epochs=3 epochs)" in captured.err
    assert main([str(root), "--metric", "final", "--include-unfinished"]) == 0
    captured = capsys.readouterr()
    assert "| BYOL | 73.00 ± 18.38 (n=2) | 50.00 |" in captured.out
    assert "byol-short is unfinished (1 of max_epochs=3 epochs): its final val_acc1 is not the finished run's" in (
        captured.err
    )


def test_a_run_whose_epochs_csv_lost_rows_is_told_how_to_rebuild_it(tmp_path: Path, capsys):
    """Its last.ckpt finished more epochs than the complete rows hold (rows deleted, the file
    deleted, its last row cut short, which --metric final would have reported as the last
    epoch's): a relaunch rewrites them from the checkpoint."""
    import torch

    root = tmp_path / "runs"
    _run(root, "byol-done", {**_pretrain("byol", EMA, "cifar10"), "max_epochs": 3}, [80, 85, 86])
    cfg = {**_pretrain("byol", EMA, "cifar10"), "max_epochs": 3}
    lost, gone, cut = _run(root, "lost", cfg, [60]), _run(root, "gone", cfg, [60]), _run(root, "cut", cfg, [60, 70, 90])
    (gone / "epochs.csv").unlink()
    text = (cut / "epochs.csv").read_text()
    (cut / "epochs.csv").write_text(text[: text.rindex(",90")])  # the last row ends before its val_acc1
    for run in (lost, gone, cut):
        torch.save({"epoch": 2, "state_dict": {}}, run / "last.ckpt")  # (Lightning's count: 3 epochs finished)
    assert main([str(root), "--metric", "final"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "| Method | cifar10 |\n| --- | --- |\n| BYOL | 86.00 |\n"
    for run, done in ((lost, 1), (gone, 0), (cut, 2)):
        assert (
            f"skipping {run}: missing rows: its epochs.csv holds {done} of the 3 epochs its last.ckpt has finished; "
            "relaunch the run's command to rebuild epochs.csv from the checkpoint"
        ) in captured.err
    assert main([str(root), "--metric", "final", "--include-unfinished"]) == 0
    assert f"{cut} is missing rows: its epochs.csv holds 2 of the 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"data": {"dataset": "cifar10", "fraction": 0.01}}, "differ in linear.data.fraction (0.01, 1.0)"),
        ({"mixup": 0.8, "cutmix": 1.0}, "differ in linear.cutmix (0.0, 1.0), linear.mixup (0.0, 0.8)"),
        ({"label_smoothing": 0.1}, "differ in linear.label_smoothing (0.0, 0.1)"),
    ],
)
def test_linear_runs_with_other_training_settings_are_named(setting: dict, message: str, tmp_path: Path, capsys):
    """Another share of the labels, or the probe's regularisers: not one setting to average."""
    root = tmp_path / "runs"
    for seed, extra in ((1, {}), (2, setting)):
        pretrain = {**_pretrain("directpred", EMA, "cifar10", iso=True), "seed": seed}
        linear = {"pretrained_feature_extractor": f"/x{seed}/last.ckpt", "pretrain_cfg": pretrain}
        _run(root, f"lin-{seed}", {**linear, "data": {"dataset": "cifar10", "fraction": 1.0}, **extra}, [90])
    assert main([str(root), "--kind", "linear"]) == 0
    assert message in capsys.readouterr().err


def test_options_newer_than_a_run_count_at_their_defaults(tmp_path: Path, capsys):
    """A run from before scheduler.gamma existed and one with it at its default are one setting."""
    root = tmp_path / "runs"
    old = {**_pretrain("byol", EMA, "cifar10"), "seed": 1, "scheduler": {"name": "warmup_cosine"}}
    new = {**_pretrain("byol", EMA, "cifar10"), "seed": 2, "scheduler": {"name": "warmup_cosine", "gamma": 0.1}}
    _run(root, "old", old, [80])
    _run(root, "new", new, [82])
    assert main([str(root)]) == 0
    assert "differ in" not in capsys.readouterr().err


def test_a_cell_mixing_images_per_step_is_named(tmp_path: Path, capsys):
    """batch_size alone may change with the processes (256 x 1 = 128 x 2), but runs with
    other images per step (another rate and schedule) must not be averaged silently; the
    processes come from the checkpoint where it records them (devices=auto says nothing)."""
    import torch

    root = tmp_path / "runs"
    iso = _pretrain("directpred", EMA, "cifar10", iso=True)
    _run(root, "iso-1", {**iso, "seed": 1, "optimizer": {"batch_size": 256}, "devices": 1}, [90])
    _run(root, "iso-2", {**iso, "seed": 2, "optimizer": {"batch_size": 128}, "devices": 2}, [91])
    auto = _run(root, "iso-3", {**iso, "seed": 3, "optimizer": {"batch_size": 64}, "devices": "auto"}, [92])
    torch.save({"state_dict": {}, "epoch": 0, "world_size": 4}, auto / "last.ckpt")  # 64 x 4 = 256
    assert main([str(root)]) == 0
    assert "differ in" not in capsys.readouterr().err
    _run(root, "iso-4", {**iso, "seed": 4, "optimizer": {"batch_size": 64}, "devices": 1}, [80])
    assert main([str(root)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "differ in" in line]
    assert len(warnings) == 1 and "differ in images_per_step (256, 64)" in warnings[0], warnings


def test_a_cell_mixing_validation_subsets_is_named(tmp_path: Path, capsys):
    """A run validated on half the split (or on fewer epochs) is another measurement; full
    validation written out (1.0, every epoch) is the same as the defaults."""
    root = tmp_path / "runs"
    byol = _pretrain("byol", EMA, "cifar10")
    _run(root, "byol-1", {**byol, "seed": 1}, [80])
    _run(root, "byol-2", {**byol, "seed": 2, "limit_val_batches": 1.0, "check_val_every_n_epoch": 1}, [82])
    assert main([str(root)]) == 0
    assert "differ in" not in capsys.readouterr().err
    _run(root, "byol-3", {**byol, "seed": 3, "limit_val_batches": 0.5}, [70])
    _run(root, "byol-4", {**byol, "seed": 4, "limit_val_batches": 1}, [71])  # an int: one batch
    assert main([str(root)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "differ in" in line]
    assert len(warnings) == 1 and "differ in limit_val_batches (0.5, 1, None)" in warnings[0], warnings


def test_linear_runs_of_external_checkpoints_are_rows_of_their_own(runs_root: Path, capsys):
    """A solo-learn checkpoint evaluated by main_linear.py has no method to label it with; it
    is not a BYOL run (the defaults would have said so)."""
    external = {"name": "solo-byol-ep999", "backbone": {"name": "resnet18"}, "data": {"dataset": "cifar10"}}
    linear = {
        "pretrained_feature_extractor": "/x/solo-byol-ep999.ckpt",
        "data": {"dataset": "cifar10"},
        "pretrain_cfg": {**external, "foreign_checkpoint": True},
    }
    _run(runs_root, "solo-linear", linear, [70.0])
    assert main([str(runs_root), "--kind", "linear"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "| solo-byol-ep999 (external checkpoint) | 70.00 |" in out and "| IsoLoss | 92.25 |" in out


def test_cells_of_runs_on_part_of_their_data_are_named(tmp_path: Path, capsys):
    """Runs that all share a smoke test's limits raise no "differ in" line; they are named."""
    root = tmp_path / "runs"
    byol, iso = _pretrain("byol", EMA, "cifar10"), _pretrain("directpred", EMA, "cifar10", iso=True)
    for seed in (1, 2):
        _run(root, f"byol-{seed}", {**byol, "seed": seed, "limit_train_batches": 5, "limit_val_batches": 3}, [50])
        _run(root, f"iso-{seed}", {**iso, "seed": seed, "limit_train_batches": 1.0, "max_steps": -1}, [60])
    assert main([str(root)]) == 0
    err = capsys.readouterr().err
    assert (
        "warning: runs of BYOL on cifar10 trained or validated on part of their data (limit_train_batches=5, "
        "limit_val_batches=3): smoke-test settings, not the full protocol"
    ) in err
    assert "differ in" not in err and "IsoLoss" not in err  # full runs: nothing to say
