"""Short real-data check: pretrain one method on CIFAR-10 (JPEG folders) with the published
recipe on a short schedule and print one line per epoch (wall time, val_acc1, loss,
part_ratio).

    python benchmarks/cifar10_short.py --method isoloss-noema                  # GPU, full set
    python benchmarks/cifar10_short.py --method byol --stop-after 8 --precision bf16
    python benchmarks/cifar10_short.py --method byol --accelerator cpu --fraction 0.02 \
        --backbone resnet10 --batch-size 64 --stop-after 2                      # CPU smoke run
    python benchmarks/cifar10_short.py --method isoloss-noema --precision 32 --emulate-reference-fp16

The schedule is ``--epochs`` long (20, with ``--warmup`` 2 warmup epochs) whatever
``--stop-after`` says, so the first epochs of a longer-scheduled run can be compared with
the reference's. The archive ``../shared/data/cifar10-jpeg.tar.xz`` is unpacked once into
``--cache``. This is a benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tarfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from ivreg.analysis.projections import FLOAT16_MAX, largest_gram_entry, largest_products  # noqa: E402
from ivreg.callbacks import NonFiniteLossGuard  # noqa: E402
from ivreg.cli import exit_on_user_error  # noqa: E402
from ivreg.config import compose  # noqa: E402
from ivreg.errors import ConfigError, DataError  # noqa: E402
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


class ReferenceFloat16Overflow(L.Callback):
    """Float32 training that skips the optimizer steps the reference's fp16 run could not take.

    A diagnostic for comparing with the reference's fp16 figures, not a training feature. The
    reference (solo-learn under fp16 autocast) forms ``z * z'`` and ``p * z'`` of the cosine
    IsoLoss elementwise in float16, and the batch Gram matrix ``(z / sqrt(B))^T (z / sqrt(B))``
    of ``C`` as a float16 matmul. Where a value passes float16's 65,504 the loss is inf or NaN
    and GradScaler skips the whole optimizer step (the readout's too); a Gram overflow makes
    ``C`` infinite for good (``C <- tau C + (1 - tau) G`` keeps the inf), so every later step
    is skipped as well. This replays those conditions on the float32 values of this run and
    skips the same steps (the LR schedule still advances, as under GradScaler).

    With ``grad_scaler`` it also follows GradScaler's loss scale (``init_scale`` 2^16, halved
    at every skipped step, doubled after 2,000 clean steps in a row) and replays float16
    gradient underflow at the parameters: in a step that is taken, every gradient entry with
    ``|g * scale|`` below float16's smallest subnormal (2^-24) becomes 0 before the update.
    The reference's activation gradients are smaller than these parameter gradients, so it
    underflows at least this much: a lower bound. Not replayed: the reference's C updates
    during validation.
    """

    FP16_MAX = FLOAT16_MAX
    FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal); below it a float16 value is 0
    INIT_SCALE, GROWTH_INTERVAL = 2.0**16, 2000  # torch.amp.GradScaler's defaults

    def __init__(self, grad_scaler: bool = False) -> None:
        self.grad_scaler = grad_scaler
        self.scale = self.INIT_SCALE
        self.clean_in_a_row = 0
        self.zeroed = 0.0  # fraction of gradient entries zeroed by underflow, summed over steps
        self.overflow = False
        self.first_overflow_step: int | None = None
        self.poisoned_step: int | None = None
        self.skipped = 0
        self.steps = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mk = pl_module.cfg["method_kwargs"]
        if pl_module.cfg["method"] != "directpred" or not mk["iso"] or mk["use_l2"]:
            # The reference's other losses normalise before any product and cannot overflow.
            raise ConfigError("--emulate-reference-fp16 replays the cosine IsoLoss only (the isoloss configs)")
        # Without it the float32 run would stop at the first skipped step: nothing is NaN here.
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, NonFiniteLossGuard)]
        loss_fn, observe = pl_module.loss_fn, pl_module.predictor.observe

        def loss_with_check(z, p, p_sqrt, z_t):  # type: ignore[no-untyped-def]
            with torch.no_grad():
                self.overflow |= bool(max(largest_products(z, p, z_t)) > self.FP16_MAX)
            return loss_fn(z, p, p_sqrt, z_t)

        def observe_with_check(zs):  # type: ignore[no-untyped-def]
            with torch.no_grad():
                if self.poisoned_step is None and any(bool(largest_gram_entry(z) > self.FP16_MAX) for z in zs):
                    self.poisoned_step = trainer.global_step
            return observe(zs)

        pl_module.loss_fn, pl_module.predictor.observe = loss_with_check, observe_with_check
        optimizer = trainer.optimizers[0]
        step = optimizer.step

        def guarded_step(closure=None, **kwargs):  # type: ignore[no-untyped-def]
            self.overflow = False
            loss = closure() if closure is not None else None
            self.steps += 1
            if self.overflow or self.poisoned_step is not None:
                if self.first_overflow_step is None:
                    self.first_overflow_step = trainer.global_step
                self.skipped += 1
                self.scale, self.clean_in_a_row = self.scale * 0.5, 0
                optimizer.zero_grad(set_to_none=True)
                return loss
            if self.grad_scaler:
                self._underflow(optimizer)
                self.clean_in_a_row += 1
                if self.clean_in_a_row == self.GROWTH_INTERVAL:
                    self.scale, self.clean_in_a_row = self.scale * 2.0, 0
            step(**kwargs)
            return loss

        optimizer.step = guarded_step
        # The LR scheduler notices the replaced step and warns that it may run first; it does not.
        warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")

    @torch.no_grad()
    def _underflow(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the gradient entries that float16 could not hold at the current loss scale."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        threshold = self.FP16_TINY / self.scale
        zeroed = total = 0
        for g in grads:
            tiny = g.abs() < threshold
            zeroed += int(tiny.sum())
            total += g.numel()
            g.masked_fill_(tiny, 0.0)
        self.zeroed += zeroed / total

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        scaler = ""
        if self.grad_scaler:
            taken = max(self.steps - self.skipped, 1)
            scaler = (
                f"; loss scale {self.scale:.3g}, mean share of gradient entries lost to float16 underflow "
                f"in the steps taken {self.zeroed / taken:.3f}"
            )
        print(
            f"[reference fp16] epoch {trainer.current_epoch}: {self.skipped} of {self.steps} steps skipped so far; "
            f"first overflow at step {self.first_overflow_step}; C infinite from step {self.poisoned_step}{scaler}",
            flush=True,
        )


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
    cpus = os.cpu_count() or 1
    p.add_argument("--workers", type=int, default=min(8, cpus), help="DataLoader workers (default: min(8, CPUs))")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    p.add_argument(
        "--compile-aug", choices=("auto", "True", "False"), default="auto", help="performance.compile_augmentation"
    )
    p.add_argument("--out", type=Path, default=Path("trained_models") / "benchmarks")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument(
        "--emulate-reference-fp16",
        action="store_true",
        help="skip the steps whose float16 arithmetic would overflow in the reference (see ReferenceFloat16Overflow)",
    )
    p.add_argument(
        "--emulate-grad-scaler",
        action="store_true",
        help="with --emulate-reference-fp16: also follow GradScaler's loss scale and zero the gradients "
        "that would underflow in float16",
    )
    p.add_argument("overrides", nargs="*", help="further Hydra overrides (key=value)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.emulate_grad_scaler and not args.emulate_reference_fp16:
        raise ConfigError("--emulate-grad-scaler needs --emulate-reference-fp16")
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
    if args.emulate_reference_fp16:
        run.trainer.callbacks.append(ReferenceFloat16Overflow(grad_scaler=args.emulate_grad_scaler))
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
