"""The command line turns bad input into one clear line on stderr, never a traceback."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CIFAR_CONFIGS, ROOT


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=simclr"], "unknown method 'simclr'"),
        (["backbone.name=vgg11"], "unknown backbone.name 'vgg11'"),
        (["data.dataset=mnist"], "unknown data.dataset 'mnist'"),
        (["data.dataset=custom", "data.train_path=/nonexistent/train"], "/nonexistent/train does not exist"),
        (["momentum.base_tau=1.2"], r"momentum.base_tau must be in [0, 1]"),
        (["method_kwargs.dp_alpha=-1"], "method_kwargs.dp_alpha must be >= 0"),
    ],
)
def test_bad_input_gives_one_error_line(overrides: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "main_pretrain.py"),
            "--config-path",
            str(CIFAR_CONFIGS),
            "--config-name",
            "isoloss.yaml",
            "accelerator=cpu",
            "devices=1",
            "precision=32",
            f"checkpoint.dir={tmp_path}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def test_gpu_config_on_a_machine_without_gpu_says_how_to_run_on_cpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "main_pretrain.py"),
            "--config-path",
            str(CIFAR_CONFIGS),
            "--config-name",
            "byol.yaml",
            "data.dataset=digits",
            f"checkpoint.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "error: accelerator=gpu but no CUDA GPU is visible; run with accelerator=cpu" in proc.stderr


def test_a_failed_sweep_job_does_not_stop_the_others(tmp_path: Path) -> None:
    """An lr search expects some jobs to fail: the sweep goes on, then names them and exits 1.
    (``-m`` after an override, as appended to a longer command: Hydra alone refused it.)"""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "main_pretrain.py"),
            f"checkpoint.dir={tmp_path}",
            "-m",
            "optimizer.lr=-1,0.5",
            "name=sw${optimizer.lr}",
            "max_epochs=1",
            "scheduler.warmup_epochs=0",
            "++limit_train_batches=1",
            "++limit_val_batches=1",
            "++num_sanity_val_steps=0",
            "report.compare_random_init=False",
            "logger.tensorboard=False",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.search(
        r"error: optimizer.lr must be >= 0, got -1.0 \[job 0 \(checkpoint.dir=\S+ optimizer.lr=-1 ", proc.stderr
    )
    assert re.search(
        r"error: 1 job\(s\) of the sweep failed:\n  job 0 \(checkpoint.dir=\S+ optimizer.lr=-1 ", proc.stderr
    )
    assert (tmp_path / "sw0.5" / "last.ckpt").is_file() and not (tmp_path / "sw-1").exists()


def test_sigterm_to_the_whole_process_group_exits_with_143(tmp_path: Path) -> None:
    """SLURM (and kill -- -<pgid>) signal every process of the job, DataLoader workers too: a
    worker killed by it stopped the run with a traceback and status 1 instead of 143."""
    import os
    import signal

    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "main_pretrain.py"),
            f"checkpoint.dir={tmp_path}",
            "data.num_workers=2",
            "max_epochs=20",
            "report.compare_random_init=False",
            "++limit_val_batches=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("epoch    0"):  # one epoch done: the workers are running
                break
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM in epoch" in err and "DataLoader worker" not in err


def test_the_multirun_flag_moves_before_the_overrides() -> None:
    from ivreg.cli import multirun_flag_first

    argv = ["main.py", "--config-path", "p/", "--config-name", "c.yaml", "a=1", "-m", "lr=0.1,1"]
    assert multirun_flag_first(argv) == [
        "main.py",
        "-m",
        "--config-path",
        "p/",
        "--config-name",
        "c.yaml",
        "a=1",
        "lr=0.1,1",
    ]
    assert multirun_flag_first(["main.py", "a=1", "--multirun"]) == ["main.py", "--multirun", "a=1"]
    assert multirun_flag_first(["main.py", "a=1"]) == ["main.py", "a=1"]
