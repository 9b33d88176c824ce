"""From a config to a finished run: run folder, auto-resume, loggers, callbacks, Trainer.

A run lives in ``<checkpoint.dir>/<name>/``::

    config.yaml     the resolved config of the run
    last.ckpt       written atomically after every ``checkpoint.frequency`` epochs
    epochs.csv      one row per epoch: times, losses, val_acc1/5, spectrum summary
    eigvals.csv     the full spectrum of C per epoch (``method_kwargs.log_eigvals``)
    epoch<N>.ckpt   kept checkpoints (``checkpoint.keep_every_n_epochs``)
    logs/           CSV metrics per step (``logs/version_<k>/metrics.csv``, one version per launch)
    tensorboard/    the same for TensorBoard (``logger.tensorboard``)
    umap/           the online 2-D maps (``umap.enabled``)
    wandb_id        the W&B run a resumed run continues (``logger=wandb``)
    .lock           held by the launch that is running (the operating system drops it)

With ``auto_resume.enabled`` a second launch with the same name continues from
``last.ckpt``.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from omegaconf import DictConfig, OmegaConf

from ivreg.callbacks import (
    EpochCheckpoint,
    EpochSummary,
    NonFiniteLossGuard,
    ScheduledRatesAtStart,
    StopAllProcessesOnError,
    StopTogetherOnSigterm,
    atomic_write_text,
    checkpoint_io,
    read_csv_rows,
    remove_stale_temporaries,
    unvalidated_after,
    validated_values,
)
from ivreg.cli import user_message
from ivreg.config import (
    CUDAGRAPH_COMPILE_MODES,
    PRECISIONS,
    auto_switch,
    prepare_config,
    to_container,
    trainer_arguments,
)
from ivreg.data.augment import parse_view_specs
from ivreg.data.datamodule import PretrainDataModule
from ivreg.errors import ConfigError, DataError, DivergedError, TrainingError, first_line
from ivreg.method import SSLMethod
from ivreg.resume import (
    check_resume,
    check_resumed_state,
    finished_epochs,
    is_finished,
    keep_fraction_draw,
    world_size_of,
)

if TYPE_CHECKING:
    from ivreg.eval.linear import LinearRun

# Trainer arguments this module sets itself; other top-level keys matching Trainer's
# signature (limit_train_batches, num_nodes, gradient_clip_val, ...) are passed through.
MANAGED_TRAINER_KEYS = {
    "logger",
    "callbacks",
    "plugins",
    "default_root_dir",
    "enable_checkpointing",
    "precision",
    "strategy",
    "sync_batchnorm",
    "devices",
    "accelerator",
    "max_epochs",
}


@dataclass
class Run:
    """Everything a pretraining run is made of, built but not started."""

    cfg: DictConfig
    model: SSLMethod
    datamodule: PretrainDataModule
    trainer: L.Trainer
    run_dir: Path
    resume_from: Path | None


def run_dir_of(cfg: DictConfig) -> Path:
    """``<checkpoint.dir>/<name>``; a name that is empty, null or leads out of checkpoint.dir is
    refused (the run's files would land in checkpoint.dir itself, in a folder named None, or
    elsewhere, where the tools that walk checkpoint.dir would not find it or take the root for a run)."""
    name = cfg.get("name")
    text = "" if name is None else str(name)
    if not text.strip():
        raise ConfigError(f"name={name!r} gives the run no folder of its own; set name=<run name>")
    if Path(text).is_absolute() or ".." in Path(text).parts:
        raise ConfigError(f"name={text!r} leads out of checkpoint.dir; set checkpoint.dir for another place")
    if os.path.normpath(text) == ".":  # (name=. or ./: checkpoint.dir itself)
        raise ConfigError(f"name={text!r} gives the run no folder of its own; set name=<run name>")
    return Path(cfg.checkpoint.dir).expanduser() / text


def hardware_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """accelerator, devices, strategy, precision and sync_batchnorm, checked against the machine."""
    accelerator = str(cfg.accelerator)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"accelerator={accelerator} but no CUDA GPU is visible; run with accelerator=cpu devices=1 precision=32"
        )
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    precision = PRECISIONS[str(cfg.precision)]
    if precision == "auto":  # bf16 needs no loss scaling (and so no host sync per step)
        precision = "32-true" if not on_gpu else ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed")
    if precision == "16-mixed" and not on_gpu:
        raise ConfigError("precision=16 (float16 autocast) needs a GPU; use precision=bf16 or 32 on the CPU")
    devices = OmegaConf.to_object(cfg.devices) if OmegaConf.is_list(cfg.devices) else cfg.devices
    if isinstance(devices, list) and not on_gpu:  # (Lightning: a TypeError from inside its CPU accelerator)
        raise ConfigError(
            f"devices={devices} lists GPU indices (the shipped configs' devices=[0]), but the run is on the CPU "
            f"(accelerator={accelerator}); give a number of processes instead: devices=1"
        )
    world = world_size_of(cfg.devices, int(cfg.get("num_nodes", 1)), accelerator)
    strategy = str(cfg.strategy)
    if world == 1 and strategy.startswith("ddp"):
        strategy = "auto"  # one process: DDP would only add its wrapper and all-reduces
    if bool(cfg.sync_batchnorm) and world > 1 and not on_gpu:
        rank_zero_warn(
            f"sync_batchnorm=True has no effect on the CPU (torch's SyncBatchNorm runs on GPUs only): each of "
            f"the {world} processes normalises with its own batch of {cfg.optimizer.batch_size}, so the run "
            "differs from one process with the whole batch",
            category=UserWarning,
        )
    return {
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "precision": precision,
        # SyncBatchNorm only runs on GPUs and only matters with several processes.
        "sync_batchnorm": bool(cfg.sync_batchnorm) and world > 1 and on_gpu,
    }


def passthrough_trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    accepted = trainer_arguments() - MANAGED_TRAINER_KEYS
    out = {k: cfg[k] for k in cfg if k in accepted}
    limit = out.get("limit_train_batches")
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit == 0:
        # Lightning would skip training and end without a word, a checkpoint or a result
        raise ConfigError(
            f"limit_train_batches={limit} trains no batch; give a number of batches (>= 1) or a fraction of the "
            "epoch (0 < x <= 1.0), or drop it"
        )
    out.setdefault("enable_progress_bar", False)  # epochs.csv and one line per epoch instead
    return {k: (OmegaConf.to_object(v) if OmegaConf.is_config(v) else v) for k, v in out.items()}


WANDB_ID_FILE = "wandb_id"


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id for a launch into ``run_dir``: the id its first launch chose (kept in
    ``run_dir/wandb_id`` by ``claim_run_folder``) when this launch resumes, so that the charts
    of a preempted run go on in one W&B run, as with solo-learn's auto-resume; a new one
    when it starts over."""
    saved = run_dir / WANDB_ID_FILE
    if resuming and saved.is_file():
        run_id = saved.read_text().strip()
        if run_id:
            return run_id
    return secrets.token_hex(4)  # W&B's own ids: 8 characters of [0-9a-z]


def build_loggers(cfg: DictConfig, run_dir: Path, resuming: bool = False) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="logs"))
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", default_hp_metric=False))
    wandb_cfg = cfg.logger.wandb
    if wandb_cfg.enabled:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logger.wandb.enabled=True needs the wandb package: pip install 'ivreg[wandb]'")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                name=str(cfg.name),
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                offline=bool(wandb_cfg.offline),
                save_dir=str(run_dir),
                id=wandb_run_id(run_dir, resuming),
            )
        )
    return loggers


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    callbacks: list[L.Callback] = [
        StopAllProcessesOnError(),
        StopTogetherOnSigterm(),
        NonFiniteLossGuard(int(cfg.log_every_n_steps)),
        ScheduledRatesAtStart(),
        EpochSummary(run_dir, log_eigvals=bool(cfg.method_kwargs.log_eigvals)),
    ]
    if cfg.logger.csv or cfg.logger.tensorboard or cfg.logger.wandb.enabled:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cfg.knn.enabled:
        from ivreg.eval.knn import OnlineKNN

        knn = cfg.knn
        callbacks.append(OnlineKNN(int(knn.k), float(knn.temperature), int(knn.every_n_epochs), str(knn.distance)))
    if cfg.umap.enabled:
        from ivreg.analysis.online_umap import OnlineUMAP

        u = cfg.umap
        callbacks.append(
            OnlineUMAP(run_dir / "umap", int(u.every_n_epochs), str(u.method), int(u.max_samples), int(cfg.seed))
        )
    if cfg.checkpoint.enabled:
        callbacks.append(EpochCheckpoint.from_config(cfg.checkpoint, run_dir))
    return callbacks


def apply_performance_options(cfg: DictConfig, model: SSLMethod, datamodule: PretrainDataModule, on_gpu: bool) -> None:
    """channels_last memory format (default on GPUs, where cuDNN's convolutions prefer it), all
    views in one network pass (default on GPUs, where it saves launches; on the CPU the
    per-view BatchNorm's copies cost more than they save),
    ``torch.compile`` of the batched augmentation (default on GPUs, where eager it is launch
    bound) and optional ``torch.compile`` with ``performance.compile_mode``: of the backbone and
    projector (and the EMA copy of both) in place, so checkpoint keys do not change, or with
    ``performance.compile_scope=step`` of the training step's forward pass as a whole."""
    perf = cfg.performance

    def switch(key: str) -> bool:
        return auto_switch(perf.get(key, "auto"), on_gpu)

    datamodule.compile_augmentation = switch("compile_augmentation")
    if switch("channels_last"):
        model.to(memory_format=torch.channels_last)
        datamodule.channels_last = True
    model.batch_views = switch("batch_views")
    if perf.compile:
        mode = str(perf.get("compile_mode", "default"))
        if perf.get("compile_scope", "modules") == "step":
            model.compile_step(mode=mode)
        else:
            model.backbone.compile(mode=mode)
            model.projector.compile(mode=mode)
            if model.target.has_copy:  # its parts, which the momentum readout calls one by one
                for part in model.target.net:
                    part.compile(mode=mode)
        model.cudagraph_steps = mode in CUDAGRAPH_COMPILE_MODES


@rank_zero_only
def claim_run_folder(cfg: DictConfig, run_dir: Path, loggers: Sequence[Any] = ()) -> None:
    """On global rank 0, once the launch is accepted: lock ``run_dir`` for this process, clear
    the temporary files that killed runs left there, and write ``config.yaml`` (and the W&B
    run id of a W&B logger in ``loggers``, for a later resume) atomically."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run folder {run_dir}: {exc.strerror or exc}; set checkpoint.dir") from exc
    lock_run_folder(run_dir)
    remove_stale_temporaries(run_dir)
    try:  # resolved, as the checkpoint's copy: ${hydra:job.num} or ${now:...} mean nothing later
        text = OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # an interpolation that only resolves inside Hydra, outside it: as written
        text = OmegaConf.to_yaml(cfg)
    atomic_write_text(run_dir / "config.yaml", text)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":  # (without importing wandb's logger)
            atomic_write_text(run_dir / WANDB_ID_FILE, f"{logger.version}\n")


_HELD_LOCKS: dict[Path, IO[str]] = {}


def lock_run_folder(run_dir: Path) -> None:
    """An exclusive ``flock`` on ``run_dir/.lock``, held until ``release_run_folder`` or the end
    of the process (the OS drops it when the process dies, also when killed): a second launch
    into the same folder is refused instead of mixing its epochs, checkpoints and config into
    this run's. Re-entrant within a process; skipped with a warning where the file system has
    no locks."""
    key = run_dir.resolve()
    if key in _HELD_LOCKS:
        return
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return
    try:
        f = open(run_dir / ".lock", "a+")  # noqa: SIM115 (held open for the life of the process)
    except OSError as exc:  # a read-only folder: nothing could be written there anyway
        where = f"the run folder {run_dir} ({exc.strerror})"
        raise ConfigError(f"cannot write in {where}; choose another checkpoint.dir") from exc
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(
            f"{run_dir} is in use by another launch (process {holder}); wait for it to end, or choose another name=..."
        ) from None
    except OSError as exc:
        f.close()
        warnings.warn(f"could not lock {run_dir} ({exc}); two launches into it would not be told apart", stacklevel=2)
        return
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _HELD_LOCKS[key] = f


def release_run_folder(run_dir: Path) -> None:
    """Drop this process's lock on ``run_dir`` once its run has ended (a notebook or a Hydra
    sweep goes on in the same process, and may launch into the folder again)."""
    f = _HELD_LOCKS.pop(run_dir.resolve(), None)
    if f is not None:
        f.close()  # closing the file releases the flock


def build_run(cfg: DictConfig | dict) -> Run:
    """Validate the config and build data, model and trainer; touches only the run folder."""
    cfg = prepare_config(cfg)
    for key in ("train_path", "val_path"):  # as absolute paths: the evaluation tools read them from anywhere
        if cfg.data.get(key):
            cfg.data[key] = str(Path(str(cfg.data[key])).expanduser().resolve())
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    hw = hardware_kwargs(cfg)
    run_dir = run_dir_of(cfg)
    resume_from = check_resume(cfg, run_dir)
    keep_fraction_draw(cfg, resume_from)
    views = parse_view_specs(OmegaConf.to_object(cfg.augmentations))  # type: ignore[arg-type]
    datamodule = PretrainDataModule(cfg.data, views, int(cfg.optimizer.batch_size), int(cfg.seed))
    cfg.data.num_classes = datamodule.num_classes
    require_online_evaluation_data(cfg, datamodule)
    model = SSLMethod(to_container(cfg))
    check_resumed_state(
        resume_from,
        datamodule.class_names,
        datamodule.num_classes,
        model,
        model.optimizer_group_names(),
        datamodule.num_train_images,
    )
    on_gpu = hw["accelerator"] != "cpu" and torch.cuda.is_available()
    apply_performance_options(cfg, model, datamodule, on_gpu=on_gpu)
    trainer = make_trainer(
        max_epochs=int(cfg.max_epochs),
        logger=build_loggers(cfg, run_dir, resuming=resume_from is not None) or False,
        callbacks=build_callbacks(cfg, run_dir),
        plugins=[checkpoint_io(cfg.checkpoint, on_gpu)],
        enable_checkpointing=False,  # EpochCheckpoint writes last.ckpt itself
        default_root_dir=str(run_dir),
        **hw,
        **passthrough_trainer_kwargs(cfg),
    )
    # Only now, with everything checked: a launch that fails must not rewrite the config of
    # the run it would have resumed.
    claim_run_folder(cfg, run_dir, trainer.loggers)
    return Run(cfg, model, datamodule, trainer, run_dir, resume_from)


def require_online_evaluation_data(cfg: DictConfig, datamodule: PretrainDataModule) -> None:
    """The online kNN and the online 2-D map read the validation split, and the kNN's bank
    the labelled training images: refused at launch without them, not at the end of the
    first epoch."""
    from ivreg.data.datasets import labels_of

    online = [key for key in ("knn", "umap") if cfg[key].enabled]
    if online and datamodule.raw_val is None:
        raise ConfigError(
            f"{' and '.join(f'{key}.enabled=True' for key in online)} needs a validation split, "
            "but data.val_path is null; set data.val_path or turn it off"
        )
    if cfg.knn.enabled and datamodule.raw_train is not None and not (labels_of(datamodule.raw_train) >= 0).any():
        raise ConfigError(
            "knn.enabled=True needs labelled training images for its feature bank, but data.train_path "
            f"({cfg.data.train_path}) holds unlabelled images only; turn it off (main_knn.py can use a labelled set)"
        )


def make_trainer(**kwargs: Any) -> L.Trainer:
    """``L.Trainer(**kwargs)``, with Lightning's refusal of a setting (``devices=0``, an
    unknown strategy, ...) turned into a ConfigError: one line, no traceback."""
    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, TypeError, ImportError) as exc:
        # (accelerator=tpu without torch_xla, strategy=fsdp on the CPU, devices=[5] on the CPU, ...)
        raise ConfigError(f"Lightning refused the trainer settings: {first_line(exc)}") from exc


OWN_METRICS_SYNC_ADVICE = r"It is recommended to use `self\.log\('(val_|train_|eigval_|part_ratio|tau'|lr')"


def fit(run: Run | LinearRun) -> None:
    """``trainer.fit`` of a built run (pretraining's, or ``build_linear_run``'s), from its
    checkpoint when the build chose to resume.

    Scripts that add callbacks between ``build_run`` and training call this instead of
    ``trainer.fit``: fitting without the checkpoint would start the run over and rewrite its
    ``epochs.csv`` from epoch 0."""
    finished = is_finished(run.trainer, run.resume_from)
    if finished:  # Lightning restores the weights and trains nothing; its loggers would open empty versions
        run.trainer.loggers = []
    elif run.resume_from is not None and run.trainer.is_global_zero:
        print(f"resuming {run.run_dir} from {run.resume_from}", flush=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    started = _TrainStarted()
    run.trainer.callbacks.append(started)
    try:
        with exit_as_signalled(run.trainer, run.run_dir), say_what_is_kept(run.run_dir), warnings.catch_warnings():
            # Every epoch-level value ivreg logs is reduced over the processes already
            # (torchmetrics, all-reduced sums, gathered kNN features): under DDP Lightning's
            # advice to add sync_dist=True, twenty lines per process, would only mislead.
            warnings.filterwarnings("ignore", message=OWN_METRICS_SYNC_ADVICE, category=PossibleUserWarning)
            ckpt_path = str(run.resume_from) if run.resume_from else None
            try:
                run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=ckpt_path)
            except MisconfigurationException as exc:  # a setting Lightning checks against the data
                raise ConfigError(f"Lightning refused the settings: {first_line(exc)}") from exc
    finally:
        release_run_folder(run.run_dir)
    if run.resume_from is not None and not started.started and run.trainer.is_global_zero:
        print(
            f"nothing to train: {run.run_dir} has finished its {run.trainer.current_epoch} epoch(s) "
            f"(max_epochs={run.cfg.max_epochs}); raise max_epochs to train on",
            flush=True,
        )


class _TrainStarted(L.Callback):
    """Notes whether training began: Lightning skips it silently when the checkpoint a run
    resumes from has already reached max_epochs."""

    started = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = True


@contextmanager
def exit_as_signalled(trainer: L.Trainer, run_dir: Path) -> Iterator[None]:
    """SIGTERM (SLURM's preemption, ``scancel``) makes Lightning raise ``SIGTERMException``,
    a ``SystemExit`` without a code: the job ended with status 0 and said nothing, so a
    script's ``main_pretrain.py ... && main_linear.py ...`` went on with an unfinished run.
    Here it says what is kept and exits with 143 (128 + SIGTERM), as a killed process would.
    SLURM and ``kill -- -<pgid>`` signal the DataLoader workers too: the error their death
    raises once SIGTERM has arrived is the same stop, not a failure of the run. Ctrl-C
    (SIGINT) made Lightning exit with 1 after a message its disabled logging dropped; it
    says what is kept too and exits with 130 (128 + SIGINT)."""
    try:
        yield
    except (SystemExit, Exception) as exc:  # (Lightning's SIGTERMException is a SystemExit)
        signal_name, status = _stopping_signal(trainer, exc)
        if signal_name is None:
            raise
        if trainer.is_global_zero:
            print(
                f"stopped by {signal_name} in epoch {trainer.current_epoch}: {_kept(run_dir)}",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(status) from None


def _stopping_signal(trainer: L.Trainer, exc: BaseException) -> tuple[str | None, int]:
    """The signal ``exc`` is the stop of (SIGINT: 130, SIGTERM: 143), or (None, 0)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    # Lightning's answer to KeyboardInterrupt: sys.exit(1) inside its except clause
    if isinstance(exc, SystemExit) and exc.code == 1 and isinstance(exc.__context__, KeyboardInterrupt):
        return "SIGINT", 130
    # under DDP StopTogetherOnSigterm notes the signal first and tells the trainer later
    noted = any(isinstance(cb, StopTogetherOnSigterm) and cb.signalled for cb in trainer.callbacks)
    if isinstance(exc, SIGTERMException) or trainer.received_sigterm or noted:
        return "SIGTERM", 143
    return None, 0


@contextmanager
def say_what_is_kept(run_dir: Path) -> Iterator[None]:
    """A training error (a NaN loss) or a data error met during the run (a corrupt image in
    epoch k) ends with what the run folder keeps of the run."""
    try:
        yield
    except (TrainingError, DataError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not _peer_gone(exc):
            raise
        if isinstance(exc, RuntimeError):  # (its own error, the cause, is printed by that process)
            first = first_line(exc, last=True)
            exc = TrainingError(f"another process of this run stopped, and this one lost its connection ({first})")
        kept = _kept(run_dir, diverged=isinstance(exc, DivergedError), data=isinstance(exc, DataError))
        said = user_message(exc).rstrip(".")  # (a DataLoader worker's error: its last line)
        raise type(exc)(f"{said}. {kept[0].upper()}{kept[1:]}.") from exc


def _peer_gone(exc: RuntimeError) -> bool:
    """The error a DDP process meets in a collective when another process of the run died."""
    import torch.distributed as dist

    text = str(exc)
    return (
        dist.is_available()
        and dist.is_initialized()
        and ("Connection closed by peer" in text or "Connection reset by peer" in text)
    )


def _kept(run_dir: Path, diverged: bool = False, data: bool = False) -> str:
    """What a relaunch of a stopped run would resume from. After a divergence the same
    command would diverge again (resuming is exact) and a changed rate is another run; after
    a data error (an unreadable image) the same command meets it again until the file is
    mended."""
    last = run_dir / "last.ckpt"
    epochs = finished_epochs(last)
    if diverged:
        if not epochs:  # the folder holds no run yet: any setting may take it
            return (
                "no checkpoint was written; relaunch with a changed setting (the same name=... may stay; the "
                "same command would diverge again)"
            )
        return (
            f"{last} keeps the {epochs} finished epoch(s) before it; a changed setting is another run: relaunch "
            "with it and another name=... (the same command would resume and diverge again)"
        )
    mend = (
        "repair or replace the file (deleting a training image changes the training split, which a resumed run "
        "refuses), then "
        if data
        else ""
    )
    if not epochs:  # none (checkpoint.enabled=False, or none written yet) or unreadable
        return f"no checkpoint was written in {run_dir}; {mend}a relaunch starts over"
    return f"{last} holds {epochs} finished epoch(s); {mend}launch the same command to resume"


def pretrain(cfg: DictConfig | dict) -> Run:
    """Build and fit; returns the run (its ``trainer.callback_metrics`` hold the last metrics)."""
    run = build_run(cfg)
    fit(run)
    if run.trainer.is_global_zero and (line := readout_result(run.run_dir / "epochs.csv")):
        print(f"{run.cfg.name}: {line}", flush=True)
    return run


def readout_result(epochs_csv: Path) -> str | None:
    """The online readout's accuracy after the last validated epoch of ``epochs.csv`` (and the
    random-init readout's beside it), naming that epoch when later ones were not validated."""
    rows = read_csv_rows(epochs_csv)
    validated = validated_values(rows)
    if not validated:
        return None
    epoch, acc = validated[-1]
    line = f"online readout val_acc1 {acc:.2f}"
    if (random := dict(validated_values(rows, "val_acc1_random")).get(epoch)) is not None:  # (0.00 included)
        line += f" (pretrained backbone) vs {random:.2f} (randomly initialised backbone)"
    if note := unvalidated_after(rows, epoch):
        line += f" after {note}"
    return line
