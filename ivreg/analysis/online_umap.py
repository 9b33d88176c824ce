"""A 2-D map of the backbone's validation features during pretraining (solo-learn's auto_umap).

Every ``every_n_epochs`` epochs, and after the last one, ``OnlineUMAP`` embeds the features
of a fixed sample of the validation split (the same images every time, so that successive
pictures are comparable) in two dimensions and writes
``<run folder>/umap/<method>_epoch<NNNN>.png``; a TensorBoard logger also receives it as the
figure ``val_<method>``. Config section ``umap`` (``enabled``, ``every_n_epochs``,
``method``: umap, tsne or pca, ``max_samples``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from ivreg.analysis.umap_plot import METHODS, embed_2d, embedding_figure, require_umap, write_png
from ivreg.data.datasets import class_names_of
from ivreg.errors import ConfigError
from ivreg.eval.online import due_after_validation, images_seen, split_features


def embedding_title(method: str) -> str:
    return {"umap": "UMAP", "tsne": "t-SNE", "pca": "PCA"}[method]


class OnlineUMAP(L.Callback):
    """Writes a 2-D map (UMAP, t-SNE or PCA) of the validation features after validation.

    Under DDP every rank extracts its share of the sample and rank 0 alone embeds, draws and
    writes. Under ``limit_val_batches`` the sample is at most the images validation saw.
    """

    def __init__(
        self,
        out_dir: str | Path,
        every_n_epochs: int = 50,
        method: str = "umap",
        max_samples: int = 5000,
        seed: int = 0,
    ):
        if method not in METHODS:
            raise ConfigError(f"umap.method must be one of {list(METHODS)}, got {method!r}")
        if method == "umap":
            try:
                require_umap()  # now, not after the first epochs of training
            except ConfigError:
                raise ConfigError(
                    "umap.method=umap needs the optional umap-learn package: pip install 'ivreg[umap]' "
                    "(or set umap.method=tsne or umap.method=pca, which need only scikit-learn)"
                ) from None
        if int(every_n_epochs) < 1:
            raise ConfigError(f"umap.every_n_epochs must be at least 1, got {every_n_epochs}")
        if int(max_samples) != 0 and int(max_samples) < 3:
            raise ConfigError(f"umap.max_samples must be 0 (all) or at least 3, got {max_samples}")
        self.out_dir = Path(out_dir)
        self.every_n_epochs = int(every_n_epochs)
        self.method = method
        self.max_samples = int(max_samples)
        self.seed = int(seed)
        self.written: list[Path] = []  # pictures this process wrote

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not due_after_validation(trainer, self.every_n_epochs):
            return
        dm = trainer.datamodule
        seen = images_seen(trainer.limit_val_batches, sum(trainer.num_val_batches), dm, trainer.world_size, 1)
        limits = [n for n in (seen, self.max_samples or None) if n is not None]
        feats, labels = split_features(trainer, pl_module, "val", min(limits) if limits else None, 256)
        if trainer.global_rank != 0:
            return
        epoch = trainer.current_epoch + 1
        if len(feats) < 3:  # (a tiny limit_val_batches): no map, but the run goes on
            rank_zero_warn(f"no {self.method} map after epoch {epoch}: only {len(feats)} validation images")
            return
        xy = embed_2d(feats.float().cpu().numpy(), self.method, self.seed)
        names = class_names_of(dm.raw_val)
        title = f"{embedding_title(self.method)} of validation features, epoch {epoch} ({len(xy)} images)"
        figure = embedding_figure(xy, labels.cpu().numpy(), names, title)
        self.written.append(write_png(figure, self.out_dir / f"{self.method}_epoch{epoch:04d}.png"))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # (add_figure closes the figure: after the file)
                logger.experiment.add_figure(f"val_{self.method}", figure, global_step=trainer.global_step)
