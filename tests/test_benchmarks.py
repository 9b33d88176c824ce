"""The benchmark scripts still run (tiny sizes, CPU). They print figures and assert nothing
themselves; these tests only keep them from rotting as the library changes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from .conftest import ROOT, make_image_folder


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
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
        + ["--profile", "--override", "++method_kwargs.eigh_on_host=True"]
    )["steps"]["isoloss-noema"]
    assert steps["steps_per_s"] > 0 and steps["launches_per_step"] > 100  # aten ops of a ResNet step
    out = capsys.readouterr().out
    assert "views/s" in out and "aten ops/step" in out and "aten::" in out  # the profiler's table
    assert "++method_kwargs.eigh_on_host=True" in out
    run = throughput.build_step_run(
        "isoloss-noema", "cpu", 8, 1, "resnet10", "32", extra_overrides=["++method_kwargs.eigh_on_host=True"]
    )
    assert run.model.predictor.eigh_on_host  # the override reached the benchmarked config


def test_hybrid_section_times_both_pipelines_on_jpeg_folders(tmp_path: Path) -> None:
    throughput = _load("throughput")
    folder = throughput.synthetic_jpeg_folder(tmp_path, 3, size=(40, 30))
    assert sorted(p.name for p in folder.rglob("*.jpg")) == ["00000.jpg", "00001.jpg", "00002.jpg"]
    args = ["--section", "hybrid", "--device", "cpu", "--n-images", "8", "--batch-size", "4", "--repeats", "1"]
    hybrid = throughput.main([*args, "--workers", "0"])["hybrid"]
    for key in ("workers", "hybrid", "hybrid_workers_half"):
        assert hybrid[key] > 0
    assert hybrid["speedup"] == pytest.approx(hybrid["hybrid"] / hybrid["workers"])


def test_op_census_attributes_every_step_op_to_a_phase() -> None:
    throughput = _load("throughput")
    args = ["--section", "census", "--device", "cpu", "--methods", "byol", "--steps", "1", "--step-batch", "4"]
    byol = throughput.main([*args, "--backbone", "resnet10"])["census"]["byol"]
    phases = byol["phases"]
    assert {"forward: backbone", "forward: EMA target", "backward", "optimizer step, EMA"} <= set(phases)
    assert byol["total"]["ops"] == sum(p["ops"] for p in phases.values())
    # ResNet-10 forward of both views in one pass: 12 convolutions, 9 ReLUs, 4 residual adds,
    # one pooling mean, and per BatchNorm one call per view and a cat (per-view statistics),
    # with no num_batches_tracked increments (ivreg.norms)
    assert phases["forward: backbone"]["ops"] == 12 + 9 + 4 + 1 + 12 * (2 + 1)


def test_census_counts_a_foreach_op_that_cuda_runs_per_tensor_once_per_tensor() -> None:
    launches = _load("throughput").cuda_launches
    a, b = [torch.zeros(3, 2), torch.zeros(4)], [torch.ones(3, 2), torch.ones(4)]
    assert launches("_foreach_add_", (a, b)) == 1  # same shapes at every position: multi-tensor
    assert launches("_foreach_norm", (a,)) == 1
    assert launches("_foreach_mul_", (a, [torch.tensor(2.0), torch.tensor(3.0)])) == 2  # 0-dim factors
    conv = torch.zeros(2, 3, 2, 2)
    assert launches("_foreach_add_", ([conv, a[1]], [conv.contiguous(memory_format=torch.channels_last), b[1]])) == 2
    assert launches("mul", (a[0], 2.0)) == 1


def test_lars_section_times_both_paths_of_the_update() -> None:
    lars = _load("throughput").main(["--section", "lars", "--device", "cpu", "--backbone", "resnet10", "--steps", "1"])
    assert len(lars["lars"]["ms"]) == 2 and all(ms > 0 for ms in lars["lars"]["ms"].values())


def test_eig_vs_eigh_measures_the_reference_predictors_drift() -> None:
    figures = _load("eig_vs_eigh").main(["--dim", "48"])
    assert set(figures) == {3, 6, 9}
    assert all(value >= 0 for row in figures.values() for value in row)


def test_eigh_section_times_the_decompositions_and_checks_newton_schulz() -> None:
    throughput = _load("throughput")
    eigh = throughput.main(["--section", "eigh", "--device", "cpu", "--eigh-repeats", "2"])["eigh"]
    assert set(eigh["ms"]) >= {"eigh float32 (cpu)", "eigh float64 (cpu)"}
    assert all(ms > 0 for ms in eigh["ms"].values())
    errors = eigh["newton_schulz"]
    # converged to float rounding; 10 iterations are not enough for the steep spectrum
    assert errors["steep, float64"][30] < 1e-10 and errors["steep, float32"][30] < 1e-4
    assert errors["steep, float64"][10] > 1e-3
    assert errors["flat, float32"][10] < 1e-5


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


def _emulated_epoch_0(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    name: str,
    **limits: float,
) -> str:
    """One epoch of IsoLoss without EMA on 40 generated images (5 steps of 8) under
    ``--emulate-reference-fp16`` plus ``flags``, with ``ReferenceFloat16Overflow``'s class
    constants set from ``limits``; returns the callback's line for epoch 0."""
    cache = tmp_path / "cifar"
    make_image_folder(cache / "train", classes=10, per_class=4)
    make_image_folder(cache / "test", classes=10, per_class=2, seed=1)
    short = _load("cifar10_short")
    for attr, value in limits.items():
        monkeypatch.setattr(short.ReferenceFloat16Overflow, attr, value)
    short.main(
        ["--method", "isoloss-noema", "--cache", str(cache), "--archive", str(tmp_path / "none.tar.xz")]
        + ["--accelerator", "cpu", "--precision", "32", "--backbone", "resnet10", "--batch-size", "8"]
        + ["--workers", "0", "--epochs", "2", "--warmup", "1", "--out", str(tmp_path / "runs"), "--stop-after", "1"]
        + ["--emulate-reference-fp16", *flags, "method_kwargs.proj_hidden_dim=64", f"name={name}"]
    )
    return next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[reference fp16] epoch 0"))


@pytest.mark.parametrize("fp16_max, all_skipped", [(0.0, True), (65504.0, False)])
def test_cifar10_short_reference_fp16_emulation_skips_overflowing_steps(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fp16_max: float,
    all_skipped: bool,
) -> None:
    line = _emulated_epoch_0(tmp_path, capsys, monkeypatch, [], "emulated", FP16_MAX=fp16_max)
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


@pytest.mark.parametrize(
    ("fp16_max", "init_scale", "expected"),
    [
        # Every step overflows: skipped, the scale halves five times, nothing is zeroed.
        (
            0.0,
            2.0**16,
            "loss scale 2.05e+03, mean share of gradient entries lost to float16 underflow in the steps taken 0.000",
        ),
        # No step overflows, and at a scale of 2^-200 every gradient entry underflows.
        (
            65504.0,
            2.0**-200,
            "loss scale 6.22e-61, mean share of gradient entries lost to float16 underflow in the steps taken 1.000",
        ),
    ],
)
def test_cifar10_short_grad_scaler_emulation(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fp16_max: float,
    init_scale: float,
    expected: str,
) -> None:
    line = _emulated_epoch_0(
        tmp_path, capsys, monkeypatch, ["--emulate-grad-scaler"], "scaled", FP16_MAX=fp16_max, INIT_SCALE=init_scale
    )
    assert line.endswith(expected)


def test_cifar10_short_grad_scaler_emulation_needs_fp16_emulation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = _load("cifar10_short")
    with pytest.raises(SystemExit) as exit_info:
        short.main(
            ["--cache", str(tmp_path / "cifar"), "--archive", str(tmp_path / "none.tar.xz"), "--emulate-grad-scaler"]
        )
    assert exit_info.value.code == 2
    assert "--emulate-grad-scaler needs --emulate-reference-fp16" in capsys.readouterr().err


def _synthetic_trace() -> list[dict]:
    """Main thread: aten::conv2d [0, 100) launching two kernels, Optimizer work [300, 400)
    launching one; a second thread (autograd) with one op and one launch. Kernels: [10, 50),
    [40, 90) (overlapping), [200, 220) and [390, 400): busy 80 + 20 + 10 = 110 of 390 us."""

    def ev(cat: str, name: str, ts: float, dur: float, tid: int = 1) -> dict:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}

    return [
        ev("cpu_op", "aten::conv2d", 0, 100),
        ev("cpu_op", "aten::cudnn_convolution", 5, 50),  # nested: not top-level
        ev("cuda_runtime", "cudaLaunchKernel", 8, 1),
        ev("cuda_runtime", "cudaLaunchKernel", 30, 1),
        ev("cpu_op", "aten::_foreach_add_", 300, 100),
        ev("cuda_driver", "cuLaunchKernel", 350, 1),  # how Triton kernels are launched
        ev("cuda_runtime", "cudaMemcpyAsync", 360, 1),  # not a launch
        ev("cpu_op", "autograd::engine::evaluate_function: AddBackward0", 150, 60, tid=2),
        ev("cuda_runtime", "cudaLaunchKernel", 160, 1, tid=2),
        ev("cuda_runtime", "cudaLaunchKernel", 250, 1, tid=2),  # outside any op of its thread
        ev("kernel", "k1", 10, 40, tid=7),
        ev("kernel", "k2", 40, 50, tid=7),
        ev("gpu_memset", "m", 200, 20, tid=7),
        ev("kernel", "k3", 390, 10, tid=7),
        {"ph": "s", "cat": "ac2g", "name": "flow", "ts": 8, "pid": 1, "tid": 1},  # not a duration event
    ]


def test_trace_gaps_busy_share_launches_and_gaps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gzip
    import json

    gaps = _load("trace_gaps")
    events = _synthetic_trace()
    summary = gaps.summarize([e for e in events if e["ph"] == "X"], num_gaps=2)
    assert summary.span_us == 390 and summary.busy_us == 110
    assert summary.launches == {
        "aten::conv2d": 2,
        "aten::_foreach_add_": 1,
        "autograd::engine::evaluate_function: AddBackward0": 1,
        "(outside any op)": 1,
    }
    # Gaps: [220, 390) of 170 us while the optimizer op ran, then [90, 200) of 110 us while
    # conv2d (until 100) and the autograd op (from 150) ran.
    assert [(start, length) for start, length, _ in summary.gaps] == [(210, 170), (80, 110)]
    assert summary.gaps[0][2] == ["aten::_foreach_add_"]
    assert sorted(summary.gaps[1][2]) == ["aten::conv2d", "autograd::engine::evaluate_function: AddBackward0"]
    # The command line reads gzipped traces and prints per-step figures.
    path = tmp_path / "trace_x.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    gaps.main([str(path), "--steps", "2", "--gaps", "1"])
    out = capsys.readouterr().out
    assert "GPU busy 0.1 ms of 0.4 ms (28%); per step 0.06 of 0.20 ms" in out
    assert "2.5 in all" in out and "1.0  aten::conv2d" in out


def test_trace_gaps_refuses_a_trace_without_kernels() -> None:
    gaps = _load("trace_gaps")
    with pytest.raises(ValueError, match="no GPU kernels"):
        gaps.summarize([{"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 1}])


def test_checkpoint_write_times_writes_and_leaves_no_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from .eval_helpers import pretrain_config, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "run" / "last.ckpt", pretrain_config(None, None), None)
    times = _load("checkpoint_write").main([str(tmp_path / "run"), "--repeats", "2"])
    assert len(times) == 2 and all(t > 0 for t in times)
    assert "MiB written in" in capsys.readouterr().out
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"]


def test_h5_read_packs_and_times_both(image_data, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("h5py", reason="h5py is not installed (pip install -e '.[h5]')")
    figures = _load("h5_read").main([str(image_data[1]), "--images", "10"])
    assert figures["size_mib"] > 0 and figures["folder_images_per_s"] > 0 and figures["h5_images_per_s"] > 0
    assert "18 images of 3 classes packed in" in capsys.readouterr().out
