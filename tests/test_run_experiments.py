"""run_experiments.sh lists the paper's 40 runs, and every command composes to the intended method."""

import os
import shlex
import subprocess
from collections import Counter

from ivreg.config import compose, method_label, prepare_config

from .conftest import ROOT


def test_run_experiments_covers_the_papers_table() -> None:
    out = subprocess.run(
        ["bash", str(ROOT / "run_experiments.sh")],
        env={**os.environ, "DRY_RUN": "1", "PYTHON": "python3"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 40
    cells = Counter()
    for line in out:
        args = shlex.split(line)
        assert args[:2] == ["python3", "main_pretrain.py"]
        path, name = args[args.index("--config-path") + 1], args[args.index("--config-name") + 1]
        overrides = [a for a in args[2:] if "=" in a]
        cfg = prepare_config(compose(str(ROOT / path), name, overrides))
        cells[(method_label(cfg), cfg.data.dataset)] += 1
        assert cfg.optimizer.weight_decay == (1e-5 if cfg.method == "byol" else 1e-4)
    labels = {label for label, _ in cells}
    assert labels == {
        "BYOL", "SimSiam", "DirectPred", "DirectPred (no EMA)", "DirectCopy", "DirectCopy (no EMA)",
        "IsoLoss", "IsoLoss (no EMA)", "IsoLoss-DirectCopy", "IsoLoss-DirectCopy (no EMA)",
    }  # fmt: skip
    assert {d for _, d in cells} == {"cifar10", "cifar100", "stl10", "tinyimagenet"}
    assert set(cells.values()) == {1}


def test_run_experiments_filters_sets_paths_per_dataset_and_goes_on_after_a_failure() -> None:
    env = {
        **os.environ,
        "ONLY": "^isoloss(-noema)?_cifar10$",
        "CIFAR10_TRAIN": "/c10/train",
        "CIFAR10_VAL": "/c10/test",
    }
    out = subprocess.run(
        ["bash", str(ROOT / "run_experiments.sh")], env={**env, "DRY_RUN": "1"}, capture_output=True, text=True
    ).stdout.splitlines()
    assert [shlex.split(line)[shlex.split(line).index("--config-name") + 1] for line in out] == [
        "isoloss.yaml",
        "isoloss-noema.yaml",
    ]
    assert all("data.train_path=/c10/train" in line and "data.val_path=/c10/test" in line for line in out)
    failing = subprocess.run(
        ["bash", str(ROOT / "run_experiments.sh")], env={**env, "PYTHON": "false"}, capture_output=True, text=True
    )
    assert failing.returncode == 1
    assert failing.stderr.strip().endswith("failed: isoloss_cifar10 isoloss-noema_cifar10")


def test_a_filter_that_matches_nothing_or_is_no_regex_is_an_error() -> None:
    """A mistyped ONLY printed nothing and exited 0, as if the runs had been done."""
    for only, status, message in (
        ("^isoloss_cifar1$", 1, "no run's name matches ONLY='^isoloss_cifar1$'"),
        ("[", 2, "ONLY='[' is not a valid (extended) regular expression"),
    ):
        proc = subprocess.run(
            ["bash", str(ROOT / "run_experiments.sh")],
            env={**os.environ, "DRY_RUN": "1", "ONLY": only},
            capture_output=True,
            text=True,
        )
        assert proc.returncode == status and message in proc.stderr and not proc.stdout
