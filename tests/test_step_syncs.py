"""The training step issues no host-device synchronisation (issue 4: "no host-device syncs in
the step, metrics reduced lazily").

On the CPU nothing synchronises, but the ATen ops that would are the same: reading a scalar on
the host (``.item()``, ``bool(t)`` dispatch ``_local_scalar_dense``) and ops whose output size
depends on the data (``nonzero``, boolean-mask indexing, ``unique``...), which must copy a count
to the host on a GPU. Copies to the host (``.tolist()``, ``.cpu()``, ``.numpy()``) dispatch
nothing on a CPU tensor, so those methods are wrapped to record their calls. A dispatch mode
records the ops of a few steps that log nothing, from the batch's arrival on the device (where
the resident and hybrid pipelines augment) to the end of the EMA update. The
eigendecomposition's error check stays, inside ``linalg_eigh`` (ATen reads its ``info`` on the
host; torch offers no unchecked variant).
"""

from __future__ import annotations

import traceback
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ivreg.config import compose
from ivreg.train import build_run, fit

from .conftest import CIFAR_CONFIGS, tiny_overrides

# Ops that make the host wait for the device (or, for the data-dependent shapes, for a count).
SYNCING_OPS = {
    "_local_scalar_dense",
    "item",
    "is_nonzero",
    "equal",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "_assert_scalar",
}

# Indexing with a boolean mask: the number of selected elements is copied to the host.
MASK_INDEXING_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


class _RecordSyncs(TorchDispatchMode):
    """Records the syncing ops dispatched while ``recording`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = False
        self.found: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if self.recording:
            self.ops += 1
            name = func.overloadpacket.__name__
            if name in SYNCING_OPS or (name in MASK_INDEXING_OPS and any(_is_bool_mask(i) for i in args[1])):
                self.found.append(f"{name} at " + _our_frames())
        return func(*args, **(kwargs or {}))


def _recorded(method, name: str, mode: _RecordSyncs):  # type: ignore[no-untyped-def]
    def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if mode.recording:
            mode.found.append(f"Tensor.{name} at " + _our_frames())
        return method(self, *args, **kwargs)

    return wrapper


def _our_frames() -> str:
    ours = [f for f in traceback.extract_stack() if "/ivreg/" in f.filename]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in ours[::-1])


def _is_bool_mask(index: torch.Tensor | None) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


class _Window(L.Callback):
    """Records the steps after ``first`` up to ``last``: each step from its batch on the device
    (``on_after_batch_transfer``: the GPU augmentation of the resident and hybrid pipelines) to
    its end, EMA update included. The DataLoader that fetches a batch (the workers pipeline's
    per-image transforms, which run in worker processes) is left out."""

    def __init__(self, datamodule: L.LightningDataModule, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.mode = _RecordSyncs()
        transfer = datamodule.on_after_batch_transfer

        def recorded_transfer(batch, dataloader_idx):  # type: ignore[no-untyped-def]
            self.mode.recording = self.active
            return transfer(batch, dataloader_idx)

        datamodule.on_after_batch_transfer = recorded_transfer  # type: ignore[method-assign]
        self.active = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.mode.recording = self.active

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.mode.recording = False
        if batch_idx == self.first:
            self.mode.__enter__()
            self.active = True
        elif batch_idx == self.last:
            self.mode.__exit__(None, None, None)
            self.active = False


def _fit_recording_steps(run, monkeypatch) -> _RecordSyncs:  # type: ignore[no-untyped-def]
    """Fit ``run``, recording the ops of its training steps 2 to 4."""
    window = _Window(run.datamodule, first=1, last=4)
    # Copies to the host dispatch nothing on the CPU (to a CPU tensor they are no-ops): the
    # methods that make them record themselves while the window records.
    for name in ("tolist", "cpu", "numpy", "item", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, _recorded(getattr(torch.Tensor, name), name, window.mode))
    run.trainer.callbacks.append(window)
    fit(run)
    return window.mode


@pytest.mark.parametrize(
    ("config", "pipeline", "extra"),
    [
        ("byol.yaml", "hybrid", []),
        ("isoloss-noema.yaml", "resident", []),
        ("directpred.yaml", "resident", []),
        ("directpred-noema.yaml", "workers", ["method_kwargs.dp_alpha=1", "method_kwargs.eps_iso=0.25"]),
    ],
    ids=["byol", "isoloss-noema", "directpred", "directcopy-noema"],
)
def test_training_steps_never_wait_for_the_device(
    config: str, pipeline: str, extra: list[str], image_data, tmp_path: Path, monkeypatch
) -> None:
    train, val = image_data
    cfg = compose(
        str(CIFAR_CONFIGS),
        config,
        tiny_overrides(train, val, tmp_path)
        + ["max_epochs=1", "scheduler.warmup_epochs=0", "++log_every_n_steps=100", f"++data.pipeline={pipeline}"]
        + extra,
    )
    recorded = _fit_recording_steps(build_run(cfg), monkeypatch)
    assert recorded.ops > 1000, "the window recorded no training steps"
    assert recorded.found == [], f"host syncs in the training step: {recorded.found[:3]}"


def _linear_run(tmp_path: Path, per_class_val: int, **options):  # type: ignore[no-untyped-def]
    """A linear probe of a random resnet10 on 3 colour classes (16 training images each)."""
    from ivreg.eval.linear import build_linear_run

    from .eval_helpers import colour_checkpoint

    ckpt = colour_checkpoint(tmp_path / "data", per_class_train=16, per_class_val=per_class_val)[2]
    cfg = {
        "pretrained_feature_extractor": str(ckpt),
        "max_epochs": 1,
        "accelerator": "cpu",
        "precision": 32,
        "optimizer": {"batch_size": 8},
        "checkpoint": {"dir": str(tmp_path / "runs")},
        "logger": {"csv": False, "tensorboard": False},
        "num_sanity_val_steps": 0,
        "enable_model_summary": False,
        "log_every_n_steps": 100,
        **options,
    }
    return build_linear_run(cfg)


@pytest.mark.parametrize("finetune", [False, True])
def test_linear_evaluation_steps_never_wait_for_the_device(finetune: bool, tmp_path: Path, monkeypatch) -> None:
    """The linear probe's (and fine-tuning's) training step, accuracy and logged means included."""
    recorded = _fit_recording_steps(_linear_run(tmp_path, 4, finetune=finetune), monkeypatch)
    assert recorded.ops > 100, "the window recorded no training steps"
    assert recorded.found == [], f"host syncs in the training step: {recorded.found[:3]}"


class _ValidationWindow(L.Callback):
    """Records the validation steps after the first (the metrics' states exist by then), from
    the batch on the device to the metrics' updates."""

    def __init__(self, mode: _RecordSyncs) -> None:
        self.mode, self.batches = mode, 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self.mode.recording = batch_idx >= 1 and not trainer.sanity_checking
        self.batches += self.mode.recording

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self.mode.recording = False


def _fit_recording_validation(run, monkeypatch) -> tuple[_RecordSyncs, int]:  # type: ignore[no-untyped-def]
    mode = _RecordSyncs()
    for name in ("tolist", "cpu", "numpy", "item", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, _recorded(getattr(torch.Tensor, name), name, mode))
    window = _ValidationWindow(mode)
    run.trainer.callbacks.append(window)
    with mode:
        fit(run)
    return mode, window.batches


@pytest.mark.parametrize("config", ["byol.yaml", "isoloss-noema.yaml"])
def test_validation_steps_never_wait_for_the_device(config: str, image_data, tmp_path: Path, monkeypatch) -> None:
    """The readouts' top-1 (online, raw, random, momentum), top-5 and loss accumulate on the
    device over a validation epoch, unlabelled images left out without a boolean mask."""
    train, val = image_data
    cfg = compose(
        str(CIFAR_CONFIGS),
        config,
        tiny_overrides(train, val, tmp_path)
        + [
            "max_epochs=1",
            "scheduler.warmup_epochs=0",
            "++limit_train_batches=1",
            "++report.compare_random_init=True",
            "++report.raw_readout=True",
        ]
        + (["++report.momentum_readout=True"] if config == "byol.yaml" else []),
    )
    recorded, batches = _fit_recording_validation(build_run(cfg), monkeypatch)
    assert batches >= 2 and recorded.ops > 100, "the window recorded no validation steps"
    assert recorded.found == [], f"host syncs in the validation step: {recorded.found[:3]}"


def test_linear_validation_steps_never_wait_for_the_device(tmp_path: Path, monkeypatch) -> None:
    recorded, batches = _fit_recording_validation(_linear_run(tmp_path, 8), monkeypatch)
    assert batches >= 2 and recorded.ops > 100, "the window recorded no validation steps"
    assert recorded.found == [], f"host syncs in the validation step: {recorded.found[:3]}"
