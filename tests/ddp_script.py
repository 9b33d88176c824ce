"""Run by tests/test_ddp.py in a subprocess: Lightning's DDP launcher starts this file again
for rank 1, so it cannot live inside pytest. Each rank saves its correlation matrix C and its epoch metrics."""

import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivreg.config import compose  # noqa: E402
from ivreg.train import build_run, fit  # noqa: E402
from tests.conftest import CIFAR_CONFIGS, tiny_overrides  # noqa: E402


class SaveRankState(L.Callback):
    def __init__(self, out: Path):
        self.out = out
        self.metrics: dict[str, float] = {}
        self.local: dict[str, float] = {}
        self.val_images = 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_images, self.val_loss_sum = 0, 0.0

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args) -> None:
        images, labels = batch
        self.val_images += len(labels)
        with torch.no_grad():  # this rank's share of the summed per-image loss
            logits = pl_module.readout(pl_module.backbone(images)).float()
            self.val_loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metrics = {k: float(v) for k, v in pl_module.epoch_metrics().items()}
        local = dict(zip(pl_module._metric_names, pl_module._metric_sums.tolist()))
        self.local = {**local, "steps": float(pl_module._metric_steps)}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(
            {
                "C": pl_module.predictor.corr.C.detach().cpu(),
                "steps": trainer.global_step,
                "world": trainer.world_size,
                "weight": pl_module.backbone.conv1.weight.detach().cpu(),
                "epoch_metrics": self.metrics,
                "local_sums": self.local,
                "val_images": self.val_images,
                "val_loss_sum": self.val_loss_sum,
                "val_loss": float(trainer.callback_metrics["val_loss"]),
                "knn_acc1": float(trainer.callback_metrics.get("val_knn_acc1", float("nan"))),
                "knn_bank": next((cb.bank_size for cb in trainer.callbacks if hasattr(cb, "bank_size")), 0),
                "pipeline": trainer.datamodule.pipeline,
                "maps": [str(path) for cb in trainer.callbacks for path in getattr(cb, "written", [])],
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


class NonFiniteOnRank1(L.Callback):
    """Counts a non-finite loss on rank 1 only, before its first forward pass."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 0:
            pl_module.nonfinite_steps += 1


class FailOnRank(L.Callback):
    """An error only one process meets (as a full disk while rank 0 writes epochs.csv)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == 1:
            raise OSError(f"No space left on device (simulated, rank {self.rank} only)")


class SigtermOnRank(L.Callback):
    """A SIGTERM that reaches one process only (``kill <pid>``; a preemption signal that
    arrives at another step on each node), in the second epoch."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == 4:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermToGroup(L.Callback):
    """SIGTERM to the whole process group (``kill -- -<pgid>``, as scancel signals a job
    step): both processes and their DataLoader workers at once."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_rank == 0 and trainer.global_step == 4:
            os.killpg(os.getpgid(0), signal.SIGTERM)


def main() -> None:
    train, val, out, config = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    overrides = tiny_overrides(train, val, out, "ddp") + [
        "devices=2",
        "strategy=ddp",
        "max_epochs=1",
        "scheduler.name=none",
        "++limit_train_batches=3",
        *sys.argv[5:],  # more overrides
    ]
    run = build_run(compose(str(CIFAR_CONFIGS), config, overrides))
    run.trainer.callbacks.append(SaveRankState(out))
    if os.environ.get("IVREG_TEST_NONFINITE_ON_RANK1"):
        run.trainer.callbacks.append(NonFiniteOnRank1())
    if os.environ.get("IVREG_TEST_FAIL_ON_RANK"):
        run.trainer.callbacks.append(FailOnRank(int(os.environ["IVREG_TEST_FAIL_ON_RANK"])))
    if os.environ.get("IVREG_TEST_SIGTERM_GROUP"):
        run.trainer.callbacks.append(SigtermToGroup())
    if os.environ.get("IVREG_TEST_SIGTERM_ON_RANK"):
        run.trainer.callbacks.append(SigtermOnRank(int(os.environ["IVREG_TEST_SIGTERM_ON_RANK"])))
    fit(run)  # as main_pretrain.py does: with the SIGTERM and error reporting around trainer.fit


if __name__ == "__main__":
    main()
