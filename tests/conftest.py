"""Shared fixtures: generated ImageFolder data and overrides that make runs tiny."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR_CONFIGS = ROOT / "scripts" / "pretrain" / "cifar"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_image_folder(root: Path, classes: int = 3, per_class: int = 16, size: int = 32, seed: int = 0) -> Path:
    """Class c images: a bright square at a class-specific place on noise (learnable)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
            x0 = (c * size) // classes
            img[size // 4 : size // 2, x0 : x0 + size // classes] = 230
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("imgdata")
    return make_image_folder(base / "train", per_class=16), make_image_folder(base / "val", per_class=6, seed=1)


def tiny_overrides(train: Path, val: Path, run_root: Path, name: str = "tiny") -> list[str]:
    """Overrides turning a shipped CIFAR config into a seconds-long CPU run."""
    return [
        "data.dataset=custom",
        f"data.train_path={train}",
        f"data.val_path={val}",
        "data.num_workers=0",
        "backbone.name=resnet10",
        "++method_kwargs.proj_hidden_dim=64",
        "++method_kwargs.pred_hidden_dim=64",
        "++method_kwargs.proj_output_dim=16",
        "optimizer.batch_size=8",
        "accelerator=cpu",
        "devices=1",
        "precision=32",
        "strategy=auto",
        "max_epochs=2",
        "scheduler.warmup_epochs=1",
        f"checkpoint.dir={run_root}",
        f"name={name}",
        "++num_sanity_val_steps=0",
        "++log_every_n_steps=1",
        "++enable_model_summary=False",
    ]


class KillAtEpoch(L.Callback):
    """Raises KeyboardInterrupt when ``epoch`` starts, as if the job had been killed there."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt
