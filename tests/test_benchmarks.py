"""The benchmark scripts still run (tiny sizes, CPU). They print figures and assert nothing
themselves; these tests only keep them from rotting as the library changes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from .conftest import ROOT, make_image_folder


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_sections_run_and_report(capsys: pytest.CaptureFixture[str]) -> None:
    throughput = _load("throughput")
    aug = throughput.main(
        ["--section", "aug", "--device", "cpu", "--n-images", "256", "--batch-size", "128", "--repeats", "1"]
        + ["--workers", "0", "--no-compile"]
    )["aug"]
    assert aug["per_image"]["median"] > 0 and aug["batched"]["median"] > 0 and "compiled" not in aug
    steps = throughput.main(
        ["--section", "steps", "--device", "cpu", "--methods", "isoloss-noema", "--steps", "2", "--step-batch", "8"]
        + ["--profile"]
    )["steps"]["isoloss-noema"]
    assert steps["steps_per_s"] > 0 and steps["launches_per_step"] > 100  # aten ops of a ResNet step
    out = capsys.readouterr().out
    assert "views/s" in out and "aten ops/step" in out and "aten::" in out  # the profiler's table


def test_cifar10_short_runs_on_image_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cifar"
    make_image_folder(cache / "train", classes=10, per_class=4)
    make_image_folder(cache / "test", classes=10, per_class=2, seed=1)
    short = _load("cifar10_short")
    args = (
        ["--method", "byol", "--cache", str(cache), "--archive", str(tmp_path / "none.tar.xz")]
        + ["--accelerator", "cpu", "--precision", "32", "--backbone", "resnet10", "--batch-size", "8"]
        + ["--workers", "0", "--epochs", "3", "--warmup", "1", "--out", str(tmp_path / "runs")]
        + ["method_kwargs.proj_hidden_dim=64", "method_kwargs.pred_hidden_dim=64", "name=short"]
    )
    short.main([*args, "--stop-after", "1"])
    out = capsys.readouterr().out
    summary = out[out.index("epoch  train_s") :].splitlines()
    assert len(summary) == 2 and summary[1].split()[0] == "0"  # one epoch of a 3-epoch schedule
    # Launched again with the same name, it resumes: epoch 0's row is kept, epoch 1 is added.
    short.main([*args, "--stop-after", "2"])
    out = capsys.readouterr().out
    assert "resuming" in out
    summary = out[out.index("epoch  train_s") :].splitlines()
    assert [line.split()[0] for line in summary[1:]] == ["0", "1"]


@pytest.mark.parametrize("fp16_max, all_skipped", [(0.0, True), (65504.0, False)])
def test_cifar10_short_reference_fp16_emulation_skips_overflowing_steps(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fp16_max: float,
    all_skipped: bool,
) -> None:
    cache = tmp_path / "cifar"
    make_image_folder(cache / "train", classes=10, per_class=4)
    make_image_folder(cache / "test", classes=10, per_class=2, seed=1)
    short = _load("cifar10_short")
    monkeypatch.setattr(short.ReferenceFloat16Overflow, "FP16_MAX", fp16_max)
    short.main(
        ["--method", "isoloss-noema", "--cache", str(cache), "--archive", str(tmp_path / "none.tar.xz")]
        + ["--accelerator", "cpu", "--precision", "32", "--backbone", "resnet10", "--batch-size", "8"]
        + ["--workers", "0", "--epochs", "2", "--warmup", "1", "--out", str(tmp_path / "runs"), "--stop-after", "1"]
        + ["--emulate-reference-fp16", "method_kwargs.proj_hidden_dim=64", "name=emulated"]
    )
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("[reference fp16] epoch 0"))
    skipped, _, steps = line.split(": ")[1].split()[:3]
    assert int(steps) == 5  # 40 images, batch 8
    # Every step overflows at a threshold of 0 (and C is infinite from the first one); none
    # does at float16's real limit on this tiny run.
    assert int(skipped) == (5 if all_skipped else 0)
    assert ("C infinite from step 0" in line) == all_skipped
    # A skipped step leaves no trace in the optimizer: SGD creates its momentum buffers on
    # the first step it takes.
    ckpt = torch.load(tmp_path / "runs" / "emulated" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (ckpt["optimizer_states"][0]["state"] == {}) == all_skipped


def test_cifar10_short_reference_fp16_emulation_refuses_other_losses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cifar"
    make_image_folder(cache / "train", classes=10, per_class=2)
    make_image_folder(cache / "test", classes=10, per_class=1, seed=1)
    short = _load("cifar10_short")
    with pytest.raises(SystemExit) as exit_info:
        short.main(
            ["--method", "byol", "--cache", str(cache), "--archive", str(tmp_path / "none.tar.xz")]
            + ["--accelerator", "cpu", "--precision", "32", "--backbone", "resnet10", "--batch-size", "8"]
            + ["--workers", "0", "--epochs", "2", "--warmup", "1", "--out", str(tmp_path / "runs")]
            + ["--emulate-reference-fp16", "method_kwargs.proj_hidden_dim=64", "method_kwargs.pred_hidden_dim=64"]
        )
    assert exit_info.value.code == 2
    assert "replays the cosine IsoLoss only" in capsys.readouterr().err
