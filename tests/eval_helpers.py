"""Helpers for the evaluation and analysis tests: colour-coded image folders whose classes a
random (BatchNorm-calibrated) ResNet separates linearly, hand-written checkpoints, and a
closed-loop linear probe to check that precondition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ivreg.backbones import build_backbone
from ivreg.config import DEFAULTS

# Dominant colour per class: global average pooling keeps colour, so even a random network's
# features separate these classes (unlike the position-coded images of tests/conftest.py).
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def make_colour_folder(root: Path, per_class: int, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLOURS):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-40, 40, size=(size, size, 3))
            img = np.clip(np.asarray(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def pretrain_config(train: Path | None, val: Path | None, arch: str = "resnet10", name: str = "fake") -> dict[str, Any]:
    """A complete pretraining config (the package defaults) for an ImageFolder dataset, 32 px crops."""
    cfg = OmegaConf.merge(
        OmegaConf.create(DEFAULTS),
        {
            "name": name,
            "backbone": {"name": arch},
            "data": {
                "dataset": "custom",
                "train_path": str(train) if train else None,
                "val_path": str(val) if val else None,
                "num_workers": 0,
                "download": False,
            },
            "augmentations": [{"crop_size": 32}, {"crop_size": 32}],
        },
    )
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


@torch.no_grad()
def calibrated_backbone(arch: str, images: torch.Tensor, seed: int = 0) -> nn.Module:
    """A random backbone whose BatchNorm running statistics are those of ``images`` (so that
    they are neither the initial 0/1 nor what a training-mode pass over other data gives)."""
    torch.manual_seed(seed)
    net = build_backbone(arch)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    net.train()
    for batch in images.split(32):
        net(batch)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return net.eval()


def folder_images(root: Path, mean: float = 0.45, std: float = 0.25) -> torch.Tensor:
    """All images of an ImageFolder tree as one normalised float batch (roughly the eval transform)."""
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(root.glob("*/*.png"))]
    x = torch.as_tensor(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


def write_checkpoint(
    path: Path,
    cfg: dict[str, Any] | None,
    backbone: nn.Module | dict[str, torch.Tensor] | None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A Lightning-style checkpoint: ``state_dict`` with ``backbone.*`` (+ ``extra``) and the config."""
    state = backbone.state_dict() if isinstance(backbone, nn.Module) else dict(backbone or {})
    ckpt: dict[str, Any] = {"state_dict": {f"backbone.{k}": v for k, v in state.items()} | dict(extra or {})}
    if cfg is not None:
        ckpt["hyper_parameters"] = {"cfg": cfg}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def colour_checkpoint(base: Path, per_class_train: int = 40, per_class_val: int = 10) -> tuple[Path, Path, Path]:
    """Colour data (train, val) and a checkpoint of a calibrated random resnet10 on it."""
    train = make_colour_folder(base / "train", per_class_train, seed=0)
    val = make_colour_folder(base / "val", per_class_val, seed=1)
    net = calibrated_backbone("resnet10", folder_images(train))
    ckpt = write_checkpoint(base / "run" / "last.ckpt", pretrain_config(train, val), net)
    return train, val, ckpt


def linear_probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, steps: int = 100
) -> float:
    """Top-1 accuracy (%) of a multinomial logistic regression on standardised features, fitted
    with full-batch L-BFGS (deterministic, no learning rate to tune)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    linear = nn.Linear(xs.shape[1], int(max(train_y.max(), test_y.max())) + 1)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(xs), train_y) + 1e-4 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * (linear(xt).argmax(1) == test_y).float().mean().item()
