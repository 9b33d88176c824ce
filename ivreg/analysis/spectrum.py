"""The eigenvalue spectrum of the projection correlation matrix C over training.

``python -m ivreg.analysis.spectrum <run_dir> [<run_dir> ...] [--out spectrum.png] [--summary]``

One column per run: on top the sorted eigenvalues of C (``eigvals.csv``) on a log scale, one
curve per epoch coloured by epoch; below, the participation ratio
``(sum lambda)^2 / sum lambda^2`` per epoch (``epochs.csv``; computed from the spectrum when
that column is missing). A collapsing run shows eigenvalues falling away and a participation
ratio near 1, an isotropic one a flat spectrum: the comparison the paper draws between
DirectPred, IsoLoss and friends.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ivreg.callbacks import read_csv_rows
from ivreg.cli import exit_on_user_error
from ivreg.errors import DataError

NORMALIZATIONS = ("none", "max", "sum")


def _float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def load_spectrum(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Epochs ``(E,)`` and eigenvalues ``(E, d)`` (descending per row) from ``eigvals.csv``."""
    path = Path(run_dir) / "eigvals.csv"
    if not Path(run_dir).is_dir():
        raise DataError(f"{run_dir} is not a folder; pass a run folder (<checkpoint.dir>/<name>) or its last.ckpt")
    if not path.is_file():
        raise DataError(f"{run_dir} has no eigvals.csv (pretrain with method_kwargs.log_eigvals=True)")
    rows = read_csv_rows(path)
    if not rows:
        raise DataError(f"{path} has no rows yet")
    columns = sorted((c for c in rows[0] if c.startswith("eigval_")), key=lambda c: int(c.split("_")[1]))
    if not columns or "epoch" not in rows[0]:
        raise DataError(f"{path} is not an eigenvalue file (expected columns epoch, eigval_0, eigval_1, ...)")
    epochs = np.array([int(float(r["epoch"])) for r in rows])
    values = np.array([[_float(r[c]) for c in columns] for r in rows], dtype=float)
    return epochs, -np.sort(-values, axis=1)  # descending, whatever the file's order


def participation_ratio(eigvals: np.ndarray) -> np.ndarray:
    """``(sum lambda)^2 / sum lambda^2`` per row: between 1 (one direction) and d (isotropic)."""
    lam = np.clip(eigvals, 0, None)
    return lam.sum(axis=1) ** 2 / np.maximum((lam**2).sum(axis=1), np.finfo(float).tiny)


def normalized(eigvals: np.ndarray, normalize: str) -> np.ndarray:
    """Each row as is (``none``), over its largest eigenvalue (``max``) or over its trace (``sum``)."""
    if normalize == "max":
        return eigvals / np.maximum(np.nanmax(eigvals, axis=1, keepdims=True), np.finfo(float).tiny)
    if normalize == "sum":
        trace = np.nansum(np.clip(eigvals, 0, None), axis=1, keepdims=True)
        return eigvals / np.maximum(trace, np.finfo(float).tiny)
    return eigvals


def numerical_rank(eigvals: np.ndarray, rel: float = 1e-3) -> np.ndarray:
    """Eigenvalues above ``rel`` times the largest, per row: how many directions ``z`` still
    uses. The participation ratio hides a collapse to a few directions when one dominates
    (1, 0.1, 0.07, then zeros gives 1.3 and rank 3)."""
    lam = np.clip(np.nan_to_num(eigvals), 0, None)
    return (lam > rel * lam.max(axis=1, keepdims=True)).sum(axis=1)


def summary_lines(run_dir: Path, rel: float = 1e-3, top: int = 4) -> list[str]:
    """One line per epoch: participation ratio, numerical rank and the largest eigenvalues
    divided by the largest."""
    epochs, eig = load_spectrum(Path(run_dir))
    ranks, ratios = numerical_rank(eig, rel), participation_ratio(eig)
    scaled = normalized(eig, "max")
    lines = [f"{run_title(Path(run_dir))}", f"epoch  part_ratio  rank(>{rel:g} max)  top eigenvalues / largest"]
    for e, pr, r, row in zip(epochs, ratios, ranks, scaled):
        lines.append(f"{e:>5}  {pr:10.3f}  {r:15d}  " + " ".join(f"{v:.3g}" for v in row[:top]))
    return lines


def load_part_ratio(run_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Epochs and ``part_ratio`` from ``epochs.csv``; None when the file or the values are missing."""
    path = Path(run_dir) / "epochs.csv"
    if not path.is_file():
        return None
    rows = [r for r in read_csv_rows(path) if math.isfinite(_float(r.get("part_ratio")))]
    if not rows:
        return None
    return np.array([int(float(r["epoch"])) for r in rows]), np.array([_float(r["part_ratio"]) for r in rows])


def run_title(run_dir: Path) -> str:
    """``<folder>: <method label>, <dataset>`` when the run's config.yaml can be read."""
    path = Path(run_dir)
    try:
        from omegaconf import OmegaConf

        from ivreg.analysis.results_table import run_key

        label, dataset = run_key(OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True))
        return f"{path.name}: {label}, {dataset}"
    except Exception:  # a title is a nicety: any unreadable config just gives the folder name
        return path.name


def _selected(count: int, max_curves: int) -> np.ndarray:
    """At most ``max_curves`` row indices, evenly spread, always with the first and the last."""
    if count <= max_curves:
        return np.arange(count)
    return np.unique(np.round(np.linspace(0, count - 1, max_curves)).astype(int))


def spectrum_figure(run_dirs: Sequence[Path], normalize: str = "none", max_curves: int = 50) -> Figure:
    """The figure: one column per run, spectra on top, participation ratio below."""
    if normalize not in NORMALIZATIONS:
        raise DataError(f"unknown normalisation '{normalize}'; choose one of {list(NORMALIZATIONS)}")
    if not run_dirs:
        raise DataError("name at least one run folder")
    data = [(Path(d), *load_spectrum(Path(d))) for d in run_dirs]
    fig = Figure(figsize=(4.6 * len(data), 7.0), layout="constrained")
    axes = fig.subplots(2, len(data), squeeze=False, height_ratios=[2, 1])
    cmap = colormaps["viridis"]
    for col, (run_dir, epochs, eig) in enumerate(data):
        top, bottom = axes[0, col], axes[1, col]
        values = normalized(eig, normalize)
        norm = Normalize(vmin=float(epochs.min()), vmax=float(max(epochs.max(), epochs.min() + 1)))
        index = np.arange(1, eig.shape[1] + 1)
        for i in _selected(len(epochs), max_curves):
            positive = np.where(values[i] > 0, values[i], np.nan)  # log scale: drop round-off zeros
            top.plot(index, positive, color=cmap(norm(epochs[i])), linewidth=1.0)
        if np.any(values > 0):
            top.set_yscale("log")
        top.set_xlabel("eigenvalue index (descending)")
        top.set_ylabel(
            {"none": "eigenvalue of C", "max": "eigenvalue / largest", "sum": "eigenvalue / trace"}[normalize]
        )
        top.set_title(run_title(run_dir), fontsize=9)
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=top, label="epoch")
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers

        pr = load_part_ratio(run_dir)
        source = "epochs.csv"
        if pr is None:
            pr, source = (epochs, participation_ratio(eig)), "from eigvals.csv"
        bottom.plot(pr[0], pr[1], marker="o" if len(pr[0]) <= 30 else None, markersize=3)
        bottom.set_xlabel("epoch")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        bottom.set_ylabel("participation ratio")
        bottom.set_title(f"participation ratio ({source})", fontsize=9)
        bottom.set_ylim(bottom=0)
        bottom.grid(alpha=0.3)
    return fig


def plot_spectra(
    run_dirs: Sequence[Path], out: Path, normalize: str = "none", max_curves: int = 50, dpi: int = 150
) -> Path:
    """Write the figure (one column per run) to ``out`` and return its path."""
    fig = spectrum_figure(run_dirs, normalize, max_curves)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ivreg.analysis.spectrum",
        description="Plot the eigenvalue spectrum of C over epochs (eigvals.csv) and the participation ratio.",
    )
    parser.add_argument(
        "run_dirs", nargs="+", type=Path, help="run folders (each with eigvals.csv), or a checkpoint in one"
    )
    parser.add_argument("--out", type=Path, help="PNG to write (default: <run_dir>/spectrum.png, or ./spectrum.png)")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default="none", help="scale each epoch's spectrum")
    parser.add_argument("--max-curves", type=int, default=50, help="most epochs drawn per run (evenly spread)")
    parser.add_argument(
        "--summary",
        action="store_true",
        help="also print, per epoch, the participation ratio, the numerical rank (eigenvalues above "
        "--rank-threshold times the largest) and the largest eigenvalues over the largest",
    )
    parser.add_argument("--rank-threshold", type=float, default=1e-3)
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a checkpoint (last.ckpt, epoch0010.ckpt) stands for its run folder, as in the other tools
    args.run_dirs = [d.parent if d.is_file() else d for d in args.run_dirs]
    out = args.out or (args.run_dirs[0] / "spectrum.png" if len(args.run_dirs) == 1 else Path("spectrum.png"))
    path = plot_spectra(args.run_dirs, out, args.normalize, max(args.max_curves, 2))
    if args.summary:
        for run_dir in args.run_dirs:
            print("\n".join(summary_lines(run_dir, args.rank_threshold)))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
