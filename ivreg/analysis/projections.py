"""Per-sample geometry of a run's projections: has the bulk collapsed, do a few outliers own
C, and how close are the values to float16's limit?

    python -m ivreg.analysis.projections trained_models/isoloss_cifar10 [--batches 4] [--batch-size 256]

The spectrum of C (``ivreg.analysis.spectrum``) shows that the projections collapse onto a few
directions; it cannot show whether all samples share them or whether a minority of samples
with huge projections dominates an otherwise collapsed bulk. This tool loads a checkpoint's
online network (backbone, projector and predictor with its running C), draws batches of two
augmented views of the run's training split with the run's augmentations, runs them in
training mode (BatchNorm with batch statistics, as in a training step) and prints, over all
batches: quantiles of ``||z||`` and of ``||p|| / ||z||``; the mean pairwise cosine of the
projections of the bulk (the samples below the 80th percentile of ``||z||`` in their batch)
and the share of ``trace(Z^T Z)`` held by the other 20%; and the largest ``|z_i z'_i|``,
``|p_i z'_i|`` and Gram entry ``((Z / sqrt(B))^T (Z / sqrt(B)))_ij``, the values that the
reference computes in float16 under fp16 autocast (largest finite float16: 65,504).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ivreg.checkpoints import config_of, read_checkpoint, require_pretraining_config, resolve_path
from ivreg.cli import exit_on_user_error
from ivreg.data.augment import MultiViewTransform, build_view_transform, parse_view_specs
from ivreg.data.datasets import Transformed
from ivreg.errors import ConfigError, DataError
from ivreg.eval.common import eval_data_config, eval_split
from ivreg.predictors import observe_and_predict

FLOAT16_MAX = 65504.0
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
BULK_QUANTILE = 0.8


def largest_products(z: torch.Tensor, p: torch.Tensor, z_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest ``|z_i z'_i|`` and ``|p_i z'_i|``: the elementwise products of the cosine IsoLoss,
    which the reference forms in float16."""
    t = z_t.detach().float()
    return (z.detach().float() * t).abs().max(), (p.detach().float() * t).abs().max()


def largest_gram_entry(z: torch.Tensor) -> torch.Tensor:
    """Largest entry of ``(Z / sqrt(B))^T (Z / sqrt(B))``, the reference's float16 Gram matrix of C."""
    zn = z.detach().float() / z.shape[0] ** 0.5
    return (zn.T @ zn).abs().max()


def load_method(path: str | Path) -> tuple[Any, int]:
    """The run's ``SSLMethod`` with the checkpoint's weights and C (on the CPU), and its epoch."""
    from ivreg.method import SSLMethod

    ckpt = read_checkpoint(path)
    cfg = config_of(ckpt, path)
    require_pretraining_config(cfg, path)
    method = SSLMethod(cfg)
    method.load_state_dict(ckpt["state_dict"])
    return method, int(ckpt.get("epoch", -1))


@torch.no_grad()
def batch_geometry(method: Any, view1: torch.Tensor, view2: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample and per-batch quantities of one batch of two views (training mode)."""
    zs = [method.projector(method.backbone(v)).float() for v in (view1, view2)]
    # Predict as a training step does (this batch's Gram matrix enters C first), then restore
    # the checkpoint's C so that every batch starts from the C the run ended with.
    predictor = method.predictor
    saved = {k: v.clone() for k, v in predictor.state_dict().items()}
    p, _ = observe_and_predict(predictor, torch.cat(zs), n_views=2)
    predictor.load_state_dict(saved)
    z1, z2 = zs
    p1 = p[: len(z1)]
    norm = z1.norm(dim=-1)
    bulk = norm < norm.quantile(BULK_QUANTILE)
    unit = torch.nn.functional.normalize(z1[bulk], dim=-1)
    cos = unit @ unit.T
    off_diagonal = ~torch.eye(len(unit), dtype=torch.bool)
    energy = z1.pow(2).sum(dim=-1)
    max_zz, max_pz = largest_products(z1, p1, z2)
    return {
        "z_norm": norm,
        "p_over_z": p1.float().norm(dim=-1) / norm.clamp_min(1e-12),
        "bulk_cos": cos[off_diagonal].mean(),
        "outlier_share": energy[~bulk].sum() / energy.sum().clamp_min(1e-30),
        "max_zz": max_zz,
        "max_pz": max_pz,
        "max_gram": largest_gram_entry(z1),
    }


def summarise(batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """Quantiles over all samples, means of the bulk statistics, maxima of the float16 values."""
    q = torch.tensor(QUANTILES)
    out: dict[str, Any] = {}
    for key in ("z_norm", "p_over_z"):
        out[key] = torch.cat([b[key] for b in batches]).quantile(q).tolist()
    for key in ("bulk_cos", "outlier_share"):
        out[key] = float(torch.stack([b[key] for b in batches]).mean())
    for key in ("max_zz", "max_pz", "max_gram"):
        out[key] = float(torch.stack([b[key] for b in batches]).max())
    return out


def measure(path: str | Path, batches: int = 4, batch_size: int = 256, seed: int = 0) -> dict[str, Any]:
    """:func:`summarise` of ``batches`` batches drawn from the run's training split."""
    method, epoch = load_method(path)
    method.train()
    cfg = method.cfg
    data = eval_data_config(cfg)
    train = eval_split(data, "train", seed=seed)
    specs = parse_view_specs(cfg["augmentations"])
    if len(specs) < 2:
        raise ConfigError("the run's augmentations define fewer than two views")
    views = MultiViewTransform([build_view_transform(s, data["mean"], data["std"]) for s in specs[:2]])
    torch.manual_seed(seed)
    loader = DataLoader(Transformed(train, views), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
    if len(loader) == 0:
        raise DataError(f"the training split has fewer than --batch-size {batch_size} images")
    results = []
    for i, ((v1, v2), _) in enumerate(loader):
        if i == batches:
            break
        results.append(batch_geometry(method, v1, v2))
    summary = summarise(results)
    summary.update(epoch=epoch, batches=len(results), batch_size=batch_size)
    return summary


def report(summary: Mapping[str, Any]) -> list[str]:
    def row(values: Sequence[float]) -> str:
        return " / ".join(f"{v:.4g}" for v in values)

    def vs_fp16(value: float) -> str:
        return f"{value:.4g} ({'over' if value > FLOAT16_MAX else 'within'} float16's {FLOAT16_MAX:.0f})"

    qs = "/".join(f"{q:g}" for q in QUANTILES)
    return [
        f"after epoch {summary['epoch']}, {summary['batches']} batches of {summary['batch_size']} (training mode)",
        f"||z|| quantiles {qs}: {row(summary['z_norm'])}",
        f"||p|| / ||z|| quantiles {qs}: {row(summary['p_over_z'])}",
        f"bulk (below the {BULK_QUANTILE:g} quantile of ||z||): mean pairwise cosine of z {summary['bulk_cos']:.6f}",
        f"share of trace(Z^T Z) held by the rest: {summary['outlier_share']:.4f}",
        f"largest |z_i z'_i|: {vs_fp16(summary['max_zz'])}",
        f"largest |p_i z'_i|: {vs_fp16(summary['max_pz'])}",
        f"largest entry of (Z/sqrt(B))^T (Z/sqrt(B)): {vs_fp16(summary['max_gram'])}",
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a pretraining checkpoint or its run folder (last.ckpt)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    return p


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batches < 1 or args.batch_size < 2:
        raise SystemExit("--batches must be at least 1 and --batch-size at least 2")
    resolve_path(args.checkpoint)  # a clear error for a missing file before any work
    for line in report(measure(args.checkpoint, args.batches, args.batch_size, args.seed)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
