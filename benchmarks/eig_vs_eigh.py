"""How far the reference's predictor drifts from the symmetric one: the reference decomposes
``C`` with the general ``torch.linalg.eig`` and rebuilds ``W_p = U diag(f(s)) U^T`` from its
eigenvectors, which ``eig`` does not make orthogonal where eigenvalues cluster; ``ivreg`` uses
``torch.linalg.eigh``. Prints, for float32 correlation matrices whose spectra fall
log-uniformly from 1 to 10^-k, the orthogonality error ``max |U^T U - I|`` of ``eig``'s
eigenvectors and the relative Frobenius distance between the two ``W_p`` for DirectPred
(alpha 0.5) and DirectCopy (alpha 1, eps_iso 0.25).

    python benchmarks/eig_vs_eigh.py [--dim 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ivreg.predictors import SpectralPredictor  # noqa: E402


def reference_predictor(values: torch.Tensor, vectors: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """The reference's W_p from the real parts of ``torch.linalg.eig``'s eigenvalues and
    eigenvectors: U diag((clamp(s, 0) / max(s) + eps) ** alpha) U^T."""
    scaled = (values.clamp_min(0) / values.max() + eps) ** alpha
    return (vectors * scaled) @ vectors.T


def ivreg_predictor(c: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """``SpectralPredictor``'s W_p (``eigh``) for the correlation matrix ``c``."""
    predictor = SpectralPredictor(len(c), alpha=alpha, normalize=True, eps_iso=eps, tau=0.0, with_sqrt=False)
    predictor.corr.C.copy_(c)
    return predictor.matrix()


def main(argv: list[str] | None = None) -> dict[int, tuple[float, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    figures = {}
    gen = torch.Generator().manual_seed(args.seed)
    basis, _ = torch.linalg.qr(torch.randn(args.dim, args.dim, generator=gen, dtype=torch.float64))
    print(f"{args.dim}x{args.dim} float32 C, seed {args.seed}")
    print("spectrum      eig: max|U^T U - I|   W_p distance, DirectPred   W_p distance, DirectCopy")
    for decades in (3, 6, 9):
        spectrum = torch.logspace(0, -decades, args.dim, dtype=torch.float64)
        c = ((basis * spectrum) @ basis.T).float()
        values, vectors = (part.real for part in torch.linalg.eig(c))
        ortho = (vectors.T @ vectors - torch.eye(args.dim)).abs().max().item()
        distances = []
        for alpha, eps in ((0.5, 0.0), (1.0, 0.25)):
            w_eig, w_eigh = reference_predictor(values, vectors, alpha, eps), ivreg_predictor(c, alpha, eps)
            distances.append(((w_eig - w_eigh).norm() / w_eigh.norm()).item())
        print(f"1 .. 1e-{decades:<6} {ortho:18.2e}   {distances[0]:24.2e}   {distances[1]:24.2e}")
        figures[decades] = (ortho, *distances)
    return figures


if __name__ == "__main__":
    main()
