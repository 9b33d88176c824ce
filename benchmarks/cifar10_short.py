"""Short real-data check: pretrain one method on CIFAR-10 (JPEG folders) with the published
recipe on a short schedule and print one line per epoch (wall time, val_acc1, loss,
part_ratio).

    python benchmarks/cifar10_short.py --method isoloss-noema                  # GPU, full set
    python benchmarks/cifar10_short.py --method byol --stop-after 8 --precision bf16
    python benchmarks/cifar10_short.py --method byol --accelerator cpu --fraction 0.02 \
        --backbone resnet10 --batch-size 64 --stop-after 2                      # CPU smoke run

The schedule is ``--epochs`` long (20, with ``--warmup`` 2 warmup epochs) whatever
``--stop-after`` says, so the first epochs of a longer-scheduled run can be compared with
the reference's. The archive ``../shared/data/cifar10-jpeg.tar.xz`` is unpacked once into
``--cache``. This is a benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from ivreg.cli import exit_on_user_error  # noqa: E402
from ivreg.config import compose  # noqa: E402
from ivreg.errors import DataError  # noqa: E402
from ivreg.train import build_run, fit  # noqa: E402

METHODS = ("byol", "byol-noema", "directpred", "directpred-noema", "isoloss", "isoloss-noema")


def cifar_root(archive: Path, cache: Path) -> Path:
    """The folder holding train/ and test/, unpacking ``archive`` into ``cache`` once."""
    for candidate in (cache, *cache.glob("*")):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    if not archive.exists():
        raise DataError(f"no CIFAR-10 JPEG folders under {cache} and no archive at {archive}")
    print(f"unpacking {archive} into {cache} ...", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(cache, filter="data")
    return cifar_root(archive, cache)


class StopAfter(L.Callback):
    """Ends the run after ``epochs`` epochs while the LR/tau schedules keep their full length."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="isoloss-noema")
    p.add_argument("--archive", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ivreg" / "cifar10-jpeg")
    p.add_argument("--epochs", type=int, default=20, help="length of the schedule")
    p.add_argument("--warmup", type=float, default=2, help="warmup epochs")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of the training set")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default="auto", help="auto (bf16 where supported), 16, bf16 or 32")
    p.add_argument("--pipeline", default="auto", choices=("auto", "workers", "hybrid", "resident"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    p.add_argument(
        "--compile-aug", choices=("auto", "True", "False"), default="auto", help="performance.compile_augmentation"
    )
    p.add_argument("--out", type=Path, default=Path("trained_models") / "benchmarks")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="further Hydra overrides (key=value)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = cifar_root(args.archive, args.cache)
    name = f"cifar10_short_{args.method}_{args.precision}_{args.pipeline}_{int(time.time())}"
    overrides = [
        "data.dataset=cifar10",
        f"data.train_path={root / 'train'}",
        f"data.val_path={root / 'test'}",
        f"data.num_workers={args.workers}",
        f"++data.fraction={args.fraction}",
        f"++data.pipeline={args.pipeline}",
        f"backbone.name={args.backbone}",
        f"optimizer.batch_size={args.batch_size}",
        f"max_epochs={args.epochs}",
        f"scheduler.warmup_epochs={args.warmup}",
        f"accelerator={args.accelerator}",
        "devices=1",
        f"precision={args.precision}",
        f"checkpoint.dir={args.out}",
        f"name={name}",
        f"++seed={args.seed}",
        f"++performance.compile={args.compile}",
        f"++performance.compile_augmentation={args.compile_aug}",
        "++num_sanity_val_steps=0",
        "++enable_model_summary=False",
        "++report.raw_readout=True",  # also the reference's raw readout, for comparison
        *args.overrides,
    ]
    run = build_run(compose(str(ROOT / "scripts" / "pretrain" / "cifar"), f"{args.method}.yaml", overrides))
    if args.stop_after:
        run.trainer.callbacks.append(StopAfter(args.stop_after))
    print(
        f"{args.method}: {run.cfg.backbone.name}, batch {args.batch_size}, precision {run.trainer.precision}, "
        f"{args.epochs}-epoch schedule, warmup {args.warmup}",
        flush=True,
    )
    start = time.perf_counter()
    fit(run)  # resumes when name= points at an unfinished run of the same config
    total = time.perf_counter() - start
    with open(run.run_dir / "epochs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    print(f"\nsummary ({args.method}, pipeline={run.datamodule.pipeline}, {total:.1f} s in all incl. setup)")
    # train_acc1 and class_loss are the online readout's; *_raw the same readout without the
    # standardisation (the reference's); z_norm (mean ||z||) and eigval_max show whether the
    # projections blow up; nonfinite_grad_steps counts the steps GradScaler skipped (fp16).
    print(
        "epoch  train_s  val_acc1  val_acc1_raw  train_acc1  class_loss  class_loss_raw  "
        "loss      part_ratio  eigval_max  z_norm  grad_norm  nonfinite_grad_steps"
    )
    for r in rows:
        print(
            f"{int(r['epoch']):>5}  {float(r['train_time_s']):7.2f}  {float(r['val_acc1']):8.2f}  "
            f"{float(r['val_acc1_raw']):12.2f}  {float(r['train_acc1']):10.2f}  {float(r['train_class_loss']):10.3f}  "
            f"{float(r['train_class_loss_raw']):14.3f}  {float(r['train_neg_cos_sim']):8.4f}  "
            f"{float(r['part_ratio']):10.2f}  {float(r['eigval_max']):10.4g}  "
            f"{float(r['train_z_norm']):6.4g}  {float(r['train_grad_norm']):9.4g}  "
            f"{float(r['train_nonfinite_grad_steps']):20.0f}"
        )


if __name__ == "__main__":
    main()
