"""Projector and predictor MLPs: Linear -> BatchNorm1d -> ReLU -> Linear, as in BYOL."""

from __future__ import annotations

from torch import nn

from ivreg.norms import BatchNorm1d


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The two-layer head every method here uses for its projector (and BYOL's predictor)."""
    if min(in_dim, hidden_dim, out_dim) < 1:
        raise ValueError(f"MLP dimensions must be positive, got {in_dim}, {hidden_dim}, {out_dim}")
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )
