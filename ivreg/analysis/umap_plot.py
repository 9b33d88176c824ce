"""A 2-D map of a pretrained backbone's features, coloured by class: ``main_umap.py``.

    python3 main_umap.py trained_models/isoloss_cifar10/last.ckpt --out umap.png [--method umap|tsne|pca]

UMAP (McInnes et al. 2018) needs the optional ``umap-learn`` package
(``pip install 'ivreg[umap]'``); t-SNE and PCA need only scikit-learn. Features are those of
the non-augmented test split (``--split train`` for the training split) of the dataset the
checkpoint was pretrained on, at most ``--max-samples`` of them drawn at random.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from ivreg.cli import exit_on_user_error
from ivreg.data.datasets import class_names_of
from ivreg.errors import ConfigError, DataError, IvregError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHODS = ("umap", "tsne", "pca")
UMAP_MISSING = (
    "--method umap needs the optional umap-learn package: pip install 'ivreg[umap]' "
    "(or use --method tsne or --method pca, which need only scikit-learn)"
)


def require_umap() -> ModuleType:
    """The ``umap`` module, or a ConfigError that says how to install it."""
    try:
        import umap
    except ImportError as exc:
        raise ConfigError(UMAP_MISSING) from exc
    return umap


def embed_2d(features: np.ndarray, method: str = "umap", seed: int = 0, metric: str = "cosine") -> np.ndarray:
    """``(N, 2)`` coordinates of ``(N, D)`` features."""
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; choose one of {list(METHODS)}")
    x = np.asarray(features, dtype=np.float32)
    if len(x) < 3:
        raise DataError(f"a 2-D map needs at least 3 samples, got {len(x)}")
    if method == "umap":
        umap = require_umap()
        # its default spectral start needs more points than neighbours (scipy refuses k >= N)
        init = "spectral" if len(x) > 16 else "random"
        reducer = umap.UMAP(
            n_components=2, n_neighbors=min(15, len(x) - 1), metric=metric, random_state=seed, n_jobs=1, init=init
        )
        return np.asarray(reducer.fit_transform(x))
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (len(x) - 1) / 3))
        return TSNE(2, perplexity=perplexity, metric=metric, init="pca", random_state=seed).fit_transform(x)
    from sklearn.decomposition import PCA

    return PCA(2, random_state=seed).fit_transform(x)


def embedding_figure(
    xy: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None, title: str = ""
) -> Figure:
    """Scatter plot coloured by class (a legend up to 20 classes, a colour bar beyond)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    labels = np.asarray(labels)
    classes = np.unique(labels)
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    size = max(1.0, min(12.0, 4000.0 / len(xy)))
    if len(classes) <= 20:
        cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
        for i, c in enumerate(classes):
            mask = labels == c
            name = class_names[int(c)] if class_names is not None and 0 <= int(c) < len(class_names) else str(c)
            ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=cmap(i), label=name, alpha=0.8, linewidths=0)
        ax.legend(markerscale=max(1.0, 12.0 / size), fontsize=8, loc="best", frameon=False)
    else:
        norm = Normalize(vmin=float(classes.min()), vmax=float(classes.max()))
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=labels, cmap="turbo", norm=norm, alpha=0.8, linewidths=0)
        fig.colorbar(ScalarMappable(norm=norm, cmap="turbo"), ax=ax, label="class")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return fig


def plot_embedding(
    xy: np.ndarray,
    labels: np.ndarray,
    out: Path,
    class_names: Sequence[str] | None = None,
    title: str = "",
    dpi: int = 150,
) -> Path:
    """``embedding_figure`` written to ``out`` as a PNG (``write_png``)."""
    return write_png(embedding_figure(xy, labels, class_names, title), out, dpi)


def write_png(figure: Figure, out: Path, dpi: int = 150) -> Path:
    """``figure`` as a PNG at ``out``, written atomically (a killed run leaves no
    half-written picture under the final name)."""
    from ivreg.callbacks import atomic_write

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: figure.savefig(f, dpi=dpi, format="png"), binary=True)
    return out


def checkpoint_features(
    checkpoint: str | Path,
    split: str = "val",
    max_samples: int = 5000,
    data_overrides: dict[str, Any] | None = None,
    batch_size: int = 256,
    accelerator: str = "auto",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str] | None, str]:
    """Features, labels and class names of (a random subset of) a split, and the dataset name."""
    from torch.utils.data import Subset

    from ivreg.checkpoints import load_backbone_and_config
    from ivreg.eval.common import default_device, eval_data_config, eval_split, eval_view, extract_features

    device = default_device(accelerator)
    backbone, pretrain_cfg = load_backbone_and_config(checkpoint, map_location=device, pretraining=True)
    data = eval_data_config(pretrain_cfg, data_overrides)
    dataset = eval_split(data, split, seed)
    names = class_names_of(dataset)
    if max_samples > 0 and len(dataset) > max_samples:  # type: ignore[arg-type]
        keep = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:max_samples])  # type: ignore[arg-type]
        dataset = Subset(dataset, keep.tolist())
    feats, labels = extract_features(backbone, eval_view(dataset, data), batch_size, int(data["num_workers"]), device)
    return feats.cpu().numpy(), labels.cpu().numpy(), names, str(data["dataset"])


def default_out(checkpoint: Path, method: str) -> Path:
    """``<run folder>/<method>.png`` beside the checkpoint."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return folder / f"{method}.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main_umap.py", description="2-D map (UMAP, t-SNE or PCA) of a pretrained backbone's features."
    )
    parser.add_argument("checkpoint", type=Path, help="a pretraining last.ckpt, or its run folder")
    parser.add_argument("--out", type=Path, help="PNG to write (default: <run folder>/<method>.png)")
    parser.add_argument("--method", choices=METHODS, default="umap")
    parser.add_argument("--metric", default="cosine", help="distance between features (umap, tsne)")
    parser.add_argument("--split", choices=("train", "val"), default="val")
    parser.add_argument("--max-samples", type=int, default=5000, help="random subset size (0: all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    parser.add_argument("--seed", type=int, default=0)
    data = parser.add_argument_group("data (default: as in the pretraining run)")
    data.add_argument("--dataset")
    data.add_argument("--train-path")
    data.add_argument("--val-path")
    data.add_argument("--crop-size", type=int)
    data.add_argument("--num-workers", type=int)
    return parser


# The library's messages name config keys (data.train_path=...); this tool spells them as flags.
KEYS_AS_FLAGS = (
    ("data.train_path/data.val_path", "--train-path/--val-path"),
    ("data.train_path/val_path", "--train-path/--val-path"),
    ("data.train_path", "--train-path"),
    ("data.val_path", "--val-path"),
    ("data.dataset", "--dataset"),
    ("data.crop_size", "--crop-size"),
    ("data.num_workers", "--num-workers"),
)


def in_flags(exc: IvregError) -> IvregError:
    """``exc`` (same type) with the config keys of its message replaced by this tool's flags."""
    message = str(exc)
    for key, flag in KEYS_AS_FLAGS:
        message = message.replace(key, flag)
    return type(exc)(message)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except IvregError as exc:
        raise in_flags(exc) from exc


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.method == "umap":
        require_umap()  # before minutes of feature extraction
    overrides = {
        "dataset": args.dataset,
        "train_path": args.train_path,
        "val_path": args.val_path,
        "crop_size": args.crop_size,
        "num_workers": args.num_workers,
    }
    feats, labels, names, dataset = checkpoint_features(
        args.checkpoint, args.split, args.max_samples, overrides, args.batch_size, args.accelerator, args.seed
    )
    xy = embed_2d(feats, args.method, args.seed, args.metric)
    title = f"{args.method.upper() if args.method != 'tsne' else 't-SNE'} of {args.checkpoint} ({dataset} {args.split})"
    out = plot_embedding(xy, labels, args.out or default_out(args.checkpoint, args.method), names, title)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
