"""Callbacks and plugins that make runs trustworthy: atomic checkpoints, a NaN guard, and
per-epoch summary files (``epochs.csv``, ``eigvals.csv``) that survive resumption."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from ivreg.config import auto_switch
from ivreg.errors import CheckpointError, DataError, DivergedError, first_line

# epochs.csv column -> logged metric name. train_neg_cos_sim is the SSL loss summed over the
# view pairs, whatever the loss (solo-learn's name, kept for its users): a negative cosine
# similarity for the cosine losses, the Euclidean or IsoLoss value for the others.
EPOCH_COLUMNS = {
    "train_neg_cos_sim": "train_neg_cos_sim",
    "train_z_std": "train_z_std",
    "train_z_norm": "train_z_norm",
    "train_grad_norm": "train_grad_norm",
    "train_nonfinite_grad_steps": "train_nonfinite_grad_steps",
    "train_class_loss": "train_class_loss",
    "train_acc1": "train_acc1",
    "val_loss": "val_loss",
    "val_acc1": "val_acc1",
    "val_acc5": "val_acc5",
    "val_acc1_random": "val_acc1_random",
    "val_acc1_raw": "val_acc1_raw",
    "val_acc1_momentum": "val_acc1_momentum",
    "train_acc1_random": "train_acc1_random",
    "train_acc1_raw": "train_acc1_raw",
    "train_acc1_momentum": "train_acc1_momentum",
    "train_class_loss_raw": "train_class_loss_raw",
    "val_knn_acc1": "val_knn_acc1",
    "val_knn_acc5": "val_knn_acc5",
    "eigval_min": "eigval_metrics/eigval_min",
    "eigval_max": "eigval_metrics/eigval_max",
    "eigval_mean": "eigval_metrics/eigval_mean",
    "eigval_std": "eigval_metrics/eigval_std",
    "part_ratio": "eigval_metrics/part_ratio",
}


def atomic_write(path: Path, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """Write ``path`` through ``write(file)`` so that a reader, a crash or a failed write sees
    the old file or the new one: a temporary file of this process beside it (another process
    writing the same folder uses another), synced, then renamed over it. A failed write (a
    full disk) removes its temporary file and raises a CheckpointError naming the path."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(exc, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
            raise
        first = first_line(exc)
        kept = "the previous version is kept" if path.exists() else "nothing was written"
        raise CheckpointError(f"could not write {path} ({first}; disk full or read-only?); {kept}") from exc


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write`` of a text file."""
    atomic_write(path, lambda f: f.write(text))


def remove_stale_temporaries(folder: Path) -> None:
    """The temporary files ``atomic_write`` of killed processes left in ``folder`` (their rename
    never came): ``<file>.<pid>.tmp`` of a process no longer running. Other ``*.tmp`` files
    (a user's own) and those of a live process are left alone."""
    for tmp in folder.glob("*.*.tmp"):
        pid = tmp.name.removesuffix(".tmp").rpartition(".")[2]
        if pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to another user
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves through ``atomic_write``: a killed run never leaves a torn checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        try:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                where = f"{path.parent} for {path.name}"
                raise CheckpointError(f"could not create {where} ({exc.strerror or exc})") from exc
            atomic_write(path, lambda f: torch.save(checkpoint, f), binary=True)
        except CheckpointError as exc:  # (with async writes it surfaces at the next write: say which failed)
            epoch = checkpoint.get("epoch")
            raise CheckpointError(f"epoch {epoch}'s checkpoint: {exc}" if epoch is not None else str(exc)) from exc


def checkpoint_io(checkpoint_cfg: Any, on_gpu: bool) -> AtomicCheckpointIO | AsyncCheckpointIO:
    """Atomic writes; with ``checkpoint.async_write`` (``auto``: on a GPU) also off the training
    loop: Lightning's ``AsyncCheckpointIO`` clones the tensors on their device (a point-in-time
    copy, so training may go on changing the weights) and one background thread copies them to
    the host and writes them. A synchronous write of a ResNet-18 BYOL checkpoint (181 MiB:
    model, EMA copy, LARS state) took 0.15-0.42 s on this project's 2-core CPU machine, once per
    epoch, time a GPU would stand idle. On the CPU the writer thread would compete with the
    training threads for the same cores, so ``auto`` writes there synchronously. The run waits
    for the last write when it ends (also on an error); a failed write raises at the next write
    or at the end. A run killed while a write is in flight resumes from the previous
    ``last.ckpt``, which the atomic rename left whole."""
    atomic = AtomicCheckpointIO()
    return AsyncCheckpointIO(atomic) if auto_switch(checkpoint_cfg.get("async_write", "auto"), on_gpu) else atomic


# The processes a run trained with, as Lightning counted them (``devices=auto`` resolved on
# the machine that ran it): a resume must keep the images per optimizer step.
WORLD_SIZE_KEY = "world_size"
CLASSES_KEY = "data_classes"  # the training data's class names, in label order
TRAIN_IMAGES_KEY = "data_train_images"  # the training split's number of images (before data.fraction)


class EpochCheckpoint(L.Callback):
    """Writes ``last.ckpt`` every ``every_n_epochs`` epochs and after the last one, and keeps
    ``epoch<NNNN>.ckpt`` every ``keep_every_n_epochs`` epochs (0: never).

    Lightning's ModelCheckpoint only writes ``last.ckpt`` alongside a top-k checkpoint; a
    run needs just the latest state, so this saves it directly. The checkpoint IO plugin
    (``AtomicCheckpointIO``) makes each write atomic.
    """

    def __init__(self, run_dir: Path, every_n_epochs: int = 1, keep_every_n_epochs: int = 0):
        self.run_dir = Path(run_dir)
        self.every_n_epochs = max(every_n_epochs, 1)
        self.keep_every_n_epochs = keep_every_n_epochs

    @classmethod
    def from_config(cls, checkpoint_cfg: Any, run_dir: Path) -> EpochCheckpoint:
        """From a config's ``checkpoint`` section (``frequency``, ``keep_every_n_epochs``)."""
        keep = int(checkpoint_cfg.get("keep_every_n_epochs", 0) or 0)
        return cls(run_dir, every_n_epochs=int(checkpoint_cfg.frequency), keep_every_n_epochs=keep)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[WORLD_SIZE_KEY] = trainer.world_size
        # the class names, for a resume onto renamed class folders to be refused
        classes = getattr(trainer.datamodule, "class_names", None)
        if classes is not None:
            checkpoint[CLASSES_KEY] = classes
        # and the size of the training set, for a resume onto more or fewer images to be refused
        images = getattr(trainer.datamodule, "num_train_images", None)
        if images is not None:
            checkpoint[TRAIN_IMAGES_KEY] = images

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        keep = self.keep_every_n_epochs > 0 and done % self.keep_every_n_epochs == 0
        # last.ckpt also with every kept epoch: a run killed after it resumes from there
        if keep or done % self.every_n_epochs == 0 or done == trainer.max_epochs:
            trainer.save_checkpoint(self.run_dir / "last.ckpt", weights_only=False)  # full state, to resume
        if keep:
            trainer.save_checkpoint(self.run_dir / f"epoch{done:04d}.ckpt", weights_only=False)


class ScheduledRatesAtStart(L.Callback):
    """Sets each optimizer's rates to what its per-step schedule gives at the (restored) step
    when training starts. A checkpoint restores the rates of the schedule it was trained
    towards: resumed under a raised max_epochs, the first step ran at the old schedule's last
    rate (0) before the new schedule took over. Otherwise this changes nothing."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                rates = zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas)
                for group, base, factor in rates:
                    group["lr"] = base * factor(scheduler.last_epoch)


class NonFiniteLossGuard(L.Callback):
    """Stops training with a clear error when the SSL loss became NaN or infinite.

    The module counts non-finite steps on the device; this reads the count (summed over the
    DDP ranks) every ``every_n_steps`` steps and before validation, so a bad epoch is never
    checkpointed and no rank stops alone while the others wait in a collective.
    """

    def __init__(self, every_n_steps: int = 50):
        # log_every_n_steps=0 turns logging off, not the guard: it then reads every 50 steps
        self.every_n_steps = every_n_steps if every_n_steps > 0 else 50
        self._checked_at = -1

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        count = pl_module.nonfinite_steps
        if trainer.world_size > 1:  # every rank checks at the same steps, so all of them stop together
            count = trainer.strategy.reduce(count.clone(), reduce_op="sum")
        bad = int(count.item())
        if bad:
            precision = str(trainer.precision)
            hint = "a lower optimizer.lr" + (
                "" if precision.startswith("32") or precision.startswith("64") else ", precision=bf16 or precision=32"
            )
            raise DivergedError(
                f"the SSL loss became NaN or infinite in {bad} step(s) of epoch {trainer.current_epoch} "
                f"(global step {trainer.global_step}). Try {hint}"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # the step that just ended is global_step - 1: the logging steps' (k+1 a multiple of
        # log_every_n_steps), so the host waits for the device once for both; once per
        # optimizer step (the micro-batches of an accumulated step share its global_step)
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._checked_at:
            self._checked_at = step
            self._check(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)


class StopAllProcessesOnError(L.Callback):
    """Under Lightning's own DDP launcher (``devices=N`` from one command) the first process
    starts the others. When it raises (a NaN it alone saw, a full disk while it writes
    ``epochs.csv``), Lightning kills the others only on Ctrl-C; otherwise they wait in their
    next collective until the process group times out (30 minutes) before the run ends.
    This kills them at once. In the other processes, and under torchrun or SLURM (whose
    agents stop the rest themselves), the launcher has no children and this does nothing."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # _SubprocessScriptLauncher is Lightning's launcher class for this case (its public
        # exports hold no other handle on the child processes); its kill skips finished ones
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher):
            launcher.kill(getattr(signal, "SIGKILL", signal.SIGTERM))


class StopTogetherOnSigterm(L.Callback):
    """Under DDP, a SIGTERM that reaches some processes only (``kill <pid>``; a preemption
    whose signals arrive at different steps on different nodes) stops every process at the
    end of the same training step, so each exits with 143 and says what ``last.ckpt`` keeps.

    Lightning 2.6's own handler broadcasts inside the signal handler; that broadcast pairs
    with whatever collective the other processes are in, and they hung (a second SIGTERM did
    nothing) or lost their connection. Here the handler only notes the signal; after every
    training step the processes agree on it with one all-reduce of a CPU flag over a gloo
    group, which waits for no GPU work, and all of them mark the trainer as signalled at
    once (Lightning then stops each at that step's end). A signal during validation is
    acted on after the next training step (during the last epoch's validation, the run
    ends as it would have). One process: Lightning's handler.
    """

    def __init__(self) -> None:
        self.signalled = False
        self._installed = False
        self._group: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the data and the sanity check: the group (a collective: every process calls
        setup) and the handler, so that a signal from here on is noted, not fatal."""
        import threading

        import torch.distributed as dist

        main_thread = threading.current_thread() is threading.main_thread()  # (signal.signal needs it)
        if stage != "fit" or trainer.world_size <= 1 or not dist.is_initialized() or not main_thread:
            return
        # gloo runs the flag's all-reduce on the CPU
        try:
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        except (RuntimeError, ValueError) as exc:  # a torch build without gloo: Lightning's handling stays
            rank_zero_warn(f"no gloo process group to agree on SIGTERM ({first_line(exc)}); Lightning's handler stays")
            return
        self._installed = True
        self._take_the_signal()

    def _take_the_signal(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._note)  # Lightning restores its predecessor's at teardown

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_the_signal()  # back from Lightning's handler, registered after setup

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_the_signal()

    def _note(self, signum: int, frame: Any) -> None:
        self.signalled = True  # nothing else in a signal handler: no collective, no I/O

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self._installed:
            return
        import torch.distributed as dist

        flag = torch.tensor([int(self.signalled)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item():
            # the Trainer's received_sigterm reads this flag of its signal connector (no public setter)
            trainer._signal_connector.received_sigterm = True


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


def log_spectrum_histogram(trainer: L.Trainer, eigvals: torch.Tensor) -> None:
    """The epoch's spectrum of C as a TensorBoard histogram of log10 eigenvalues
    (``C/log10_eigenvalues``: one slice per epoch, so the spread of the spectrum, and a
    collapse towards few dimensions, can be watched during training). Eigenvalues at or
    below 1e-12 of the largest are drawn at that floor."""
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not loggers or eigvals.numel() == 0 or not torch.isfinite(eigvals).all():
        return
    floor = max(float(eigvals.max()), 1e-30) * 1e-12
    values = eigvals.clamp_min(floor).log10()
    for logger in loggers:
        logger.experiment.add_histogram("C/log10_eigenvalues", values, global_step=trainer.current_epoch)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file a run writes (``epochs.csv``, ``eigvals.csv``); none when it does
    not exist; a DataError naming it when it cannot be read."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (FileNotFoundError, NotADirectoryError):  # (a folder not made yet, or a file in its place)
        return []
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def parse_csv_rows(text: str) -> list[dict[str, str]]:
    """The rows of a CSV table held as text (a file's, or the copy a checkpoint holds)."""
    return list(csv.DictReader(io.StringIO(text, newline="")))


def read_complete_rows(path: Path) -> tuple[list[dict[str, str]], bool]:
    """``read_csv_rows`` without the rows a file cut short lost part of (a missing field, or a
    last line without its line end: cut inside its last field), and whether there were any."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return [], False
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    rows = parse_csv_rows(text)
    whole = [row for row in rows if None not in row and None not in row.values()]
    if rows and whole and whole[-1] is rows[-1] and not text.endswith("\n"):
        whole.pop()
    return whole, len(whole) < len(rows)


def validated_values(rows: list[dict[str, str]], column: str = "val_acc1") -> list[tuple[int, float]]:
    """``(epoch, value)`` of the rows whose ``column`` holds a finite number: the validated
    epochs (the others, ``check_val_every_n_epoch`` > 1 or a newer column, hold nan)."""
    out = []
    for row in rows:
        with contextlib.suppress(TypeError, ValueError):
            if math.isfinite(value := float(row.get(column) or "nan")):
                out.append((int(row["epoch"]), value))
    return out


def unvalidated_after(rows: list[dict[str, str]], epoch: int) -> str:
    """``"epoch <epoch>, the last validated of <N>"`` when the ``epochs.csv`` rows go on past the
    validated ``epoch`` (``check_val_every_n_epoch`` > 1), else empty: what a final figure names."""
    last = int(rows[-1]["epoch"])
    return "" if epoch == last else f"epoch {epoch}, the last validated of {last + 1}"


class EpochSummary(L.Callback):
    """One row per finished epoch in ``epochs.csv`` (and the spectrum in ``eigvals.csv``), and a
    one-line report on stdout. Rows from epochs a resumed run repeats are dropped.

    The tables are kept in memory and rewritten whole each epoch, and each checkpoint holds
    them as CSV text (``state_dict``): a resume rebuilds the files from the checkpoint, so the
    rows of a file deleted or edited during a run come back; so does relaunching a finished run
    whose file lost rows (``on_fit_end``)."""

    TABLES = ("epochs.csv", "eigvals.csv")

    def __init__(self, run_dir: Path, log_eigvals: bool, print_lines: bool = True):
        self.run_dir = Path(run_dir)
        self.log_eigvals = log_eigvals
        self.print_lines = print_lines
        self._t_start = 0.0
        self._t_val = None
        self._lr = math.nan
        self._rows: dict[str, list[dict[str, Any]]] = {name: [] for name in self.TABLES}
        self._texts: dict[str, str] = {}  # each table's CSV text, as last written
        self._restored: dict[str, str] = {}  # the tables of the checkpoint resumed from

    def _write(self, name: str, columns: list[str]) -> None:
        """Writes table ``name`` (its rows, under ``columns``) to the run folder, atomically."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="nan", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self._rows[name])
        self._texts[name] = buf.getvalue()
        atomic_write_text(self.run_dir / name, self._texts[name])

    def _append(self, name: str, row: dict[str, Any]) -> None:
        self._rows[name].append(row)
        self._write(name, list(row.keys()))

    def state_dict(self) -> dict[str, Any]:
        return dict(self._texts)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = {name: text for name, text in state_dict.items() if name in self.TABLES}

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        first = trainer.current_epoch  # > 0 when resuming (the loops are restored by now)
        for name in self.TABLES:
            # the checkpoint's rows; the file's for a checkpoint written before checkpoints held them
            text = self._restored.get(name)
            rows = parse_csv_rows(text) if text else read_csv_rows(self.run_dir / name)
            if rows:
                self._rows[name] = [r for r in rows if int(r["epoch"]) < first]
                self._write(name, list(rows[0].keys()))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A finished run relaunched trains nothing (``on_train_start`` never ran): a table
        whose file lost rows since (deleted, cut short) is written again from the checkpoint.
        Values edited in the file are left as they are."""
        for name, text in self._restored.items():
            if name in self._texts:  # written by this launch
                continue
            rows = parse_csv_rows(text)
            on_disk, cut = read_complete_rows(self.run_dir / name)
            if cut or [r["epoch"] for r in on_disk] != [r["epoch"] for r in rows]:
                atomic_write_text(self.run_dir / name, text)
                print(f"rebuilt {self.run_dir / name} from the checkpoint ({len(rows)} epochs)", flush=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t_start = time.perf_counter()
        self._t_val = None
        # the rate of the epoch's first step (at its end a step schedule may already show the next epoch's)
        self._lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._t_val is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t_val = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        t_val = self._t_val or now
        columns = self.metric_columns(trainer, pl_module)  # on every rank: it all-reduces under DDP
        if not trainer.is_global_zero:
            return
        row: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "train_time_s": round(t_val - self._t_start, 3),
            "val_time_s": round(now - t_val, 3),
            **columns,
        }
        row["lr"] = self._lr
        self._append("epochs.csv", row)
        if self.log_eigvals:
            eigvals = pl_module.predictor.spectrum().detach().float().cpu()
            eig_row = {"epoch": trainer.current_epoch, **{f"eigval_{i}": v for i, v in enumerate(eigvals.tolist())}}
            self._append("eigvals.csv", eig_row)
            log_spectrum_histogram(trainer, eigvals)
        if self.print_lines:
            print(self.format_line(row), flush=True)

    def current_callback_metrics(self, trainer: L.Trainer) -> dict[str, Any]:
        """``trainer.callback_metrics`` without validation figures of an earlier epoch: Lightning
        keeps the last validation's values through epochs that skip it
        (``check_val_every_n_epoch`` > 1), which would otherwise fill their rows."""
        metrics = dict(trainer.callback_metrics)
        if self._t_val is None:  # no validation ran in this epoch
            metrics = {key: value for key, value in metrics.items() if not key.startswith("val_")}
        return metrics

    def metric_columns(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The metric columns of this epoch's row (NaN for what was not logged)."""
        metrics = self.current_callback_metrics(trainer)
        if hasattr(pl_module, "epoch_metrics"):  # logged by the module after this hook runs
            metrics.update(pl_module.epoch_metrics())
        return {col: _as_float(metrics[key]) if key in metrics else math.nan for col, key in EPOCH_COLUMNS.items()}

    @staticmethod
    def format_line(row: dict[str, Any]) -> str:
        def fmt(key: str, spec: str) -> str:
            value = row.get(key, math.nan)
            return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

        return (
            f"epoch {row['epoch']:>4} | train {row['train_time_s']:7.1f} s | val {row['val_time_s']:5.1f} s | "
            f"loss {fmt('train_neg_cos_sim', '.4f')} | val_acc1 {fmt('val_acc1', '6.2f')} | "
            f"val_acc5 {fmt('val_acc5', '6.2f')} | "
            + (f"raw readout val_acc1 {fmt('val_acc1_raw', '6.2f')} | " if _finite(row.get("val_acc1_raw")) else "")
            + (
                f"momentum readout val_acc1 {fmt('val_acc1_momentum', '6.2f')} | "
                if _finite(row.get("val_acc1_momentum"))
                else ""
            )
            + (
                f"random-init val_acc1 {fmt('val_acc1_random', '6.2f')} | "
                if _finite(row.get("val_acc1_random"))
                else ""
            )
            + (f"knn val_acc1 {fmt('val_knn_acc1', '6.2f')} | " if _finite(row.get("val_knn_acc1")) else "")
            + f"part_ratio {fmt('part_ratio', '7.2f')} | z_std {fmt('train_z_std', '.4f')} | "
            f"z_norm {fmt('train_z_norm', '.4g')}"
            + (
                f" | non-finite gradient steps {fmt('train_nonfinite_grad_steps', '.0f')}"
                if _finite(row.get("train_nonfinite_grad_steps")) and row["train_nonfinite_grad_steps"] > 0
                else ""
            )
        )
