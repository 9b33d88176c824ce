"""Whether and from where a run resumes: the config keys a checkpoint must share with the
launch, the images per optimizer step it was trained with, and the refusals that keep a
launch from overwriting finished work (another run's folder, a record without checkpoint,
kept checkpoints without ``last.ckpt``). Used by pretraining and linear evaluation alike."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from ivreg.callbacks import CLASSES_KEY, TRAIN_IMAGES_KEY, WORLD_SIZE_KEY, read_csv_rows
from ivreg.checkpoints import config_of, mismatch_report, read_checkpoint, require_pretraining_config, resolve_path
from ivreg.config import DEFAULTS, config_leaves, from_solo_learn, plain_value
from ivreg.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import lightning as L


# What must match for a run to resume from a checkpoint: every leaf under these keys (a
# section stands for all its keys) that the checkpoint's config has. They fix the model, the
# data it sees and the optimisation; the checkpoint restores the optimizer and schedules, so
# a changed rate, decay or seed would be silently ignored while config.yaml claimed it.
RESUME_KEYS = (
    "method",
    "backbone",
    "method_kwargs",
    "momentum",
    "optimizer",
    "scheduler",
    "augmentations",
    "seed",
    "data.dataset",
    "data.fraction",
    "data.mean",
    "data.std",
    "readout",
    "report",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "limit_train_batches",
    "max_steps",
)


# Leaves under RESUME_KEYS that may change: they alter no trained number (the images per
# optimizer step, of which the batch size is one factor, are compared apart).
RESUME_FREE = ("method_kwargs.log_eigvals", "method_kwargs.eigh_on_host", "optimizer.batch_size")


# Leaves compared only when the checkpoint recorded them: a linear run begun before its
# pretrained weights' digest was recorded resumes as before (nothing to compare it with).
RECORDED_ONLY = ("pretrained_backbone_sha256",)


def world_size_of(devices: Any, num_nodes: int, accelerator: Any = "auto") -> int:
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        n = len(devices)
    elif str(devices) in ("auto", "-1"):  # as Lightning counts them: one process on the CPU
        n = 1 if str(accelerator) == "cpu" else max(torch.cuda.device_count(), 1)
    elif isinstance(devices, str) and "," in devices:  # "0,1": device indices, as Lightning reads them
        n = len([d for d in devices.split(",") if d.strip()])
    else:
        try:
            n = int(devices)
        except ValueError:
            raise ConfigError(f"devices={devices!r} is neither a count, a list of indices nor auto") from None
    return n * num_nodes


def step_split(cfg: Any, world_size: int | None = None) -> tuple[int, int, int]:
    """(per-process batch, processes, accumulated batches) of an optimizer step. ``world_size``:
    the processes the run had (a checkpoint records them), else counted from the config on
    this machine."""
    nodes = int(OmegaConf.select(cfg, "num_nodes", default=1) or 1)
    world = world_size or world_size_of(
        OmegaConf.select(cfg, "devices"), nodes, OmegaConf.select(cfg, "accelerator", default="auto")
    )
    accumulate = int(OmegaConf.select(cfg, "accumulate_grad_batches", default=1) or 1)
    return int(OmegaConf.select(cfg, "optimizer.batch_size")), world, accumulate


def images_per_step(cfg: Any, world_size: int | None = None) -> int:
    """Images per optimizer step: per-device batch x devices x nodes x accumulated batches.
    The learning rate, the step counts of the schedules and a checkpoint's position in them
    all depend on it, so a run cannot resume under another value."""
    return math.prod(step_split(cfg, world_size))


def check_resume(
    cfg: DictConfig,
    run_dir: Path,
    keys: tuple[str, ...] = RESUME_KEYS,
    pretraining: bool = True,
    defaults: Mapping[str, Any] = DEFAULTS,
) -> Path | None:
    """The checkpoint to continue from (``resume_from_checkpoint``, else the run folder's
    ``last.ckpt`` under auto_resume), or None for a fresh start. Refuses to overwrite a run's
    checkpoint when auto_resume is off, a checkpoint that cannot be read, and a checkpoint
    whose own config differs under ``keys`` or in its images per optimizer step.
    ``pretraining``: the checkpoint must be a pretraining run's."""
    explicit = cfg.get("resume_from_checkpoint")
    last = run_dir / "last.ckpt"
    if last.is_dir():
        raise ConfigError(f"{last} is a folder, not a checkpoint; move it away")
    if explicit:
        try:
            path = resolve_path(explicit)  # a run folder stands for its last.ckpt
        except CheckpointError as exc:
            raise ConfigError(f"resume_from_checkpoint: {exc}") from None
        advice = "Resume with the config it was trained with, or start a new run without resume_from_checkpoint"
        _require_same_run(path, cfg, keys, defaults, pretraining, advice)
        if last.exists() and not last.samefile(path):
            # the folder's own run would be overwritten: it must be the same run, rolled back
            advice = f"{run_dir} holds another run, which resume_from_checkpoint would overwrite; choose another name"
            _require_same_run(last, cfg, keys, defaults, pretraining, advice)
            then, now = finished_epochs(path) or 0, finished_epochs(last) or 0
            if then < now:
                rank_zero_warn(
                    f"rolling {run_dir} back from {now} finished epochs to {path}'s {then}: the later epochs' rows "
                    "and checkpoint are replaced. Relaunch without resume_from_checkpoint to go on from last.ckpt "
                    "(with it, every relaunch rolls back again)",
                )
        return path
    if not last.exists():
        _refuse_to_overwrite_a_record(cfg, run_dir, keys, defaults)
        return None
    if not cfg.auto_resume.enabled:
        raise ConfigError(
            f"{run_dir} already holds a run (last.ckpt). Choose another name=..., enable auto_resume to "
            "continue it, or delete the folder to start over"
        )
    try:
        advice = "Choose another name=... for this config"
        _require_same_run(last, cfg, keys, defaults, pretraining, advice, sweep_hint=True)
    except CheckpointError as exc:
        kept = sorted(p.name for p in run_dir.glob("epoch*.ckpt"))
        way = (
            f"resume from a kept one with ++resume_from_checkpoint={run_dir / kept[-1]}"
            if kept
            else f"move or delete {last} to start the run over"
        )
        said = str(exc).rstrip(". ")
        raise CheckpointError(f"{said}. Nothing was changed in {run_dir}: {way}, or choose another name=...") from exc
    return last


def _refuse_to_overwrite_a_record(
    cfg: DictConfig, run_dir: Path, keys: tuple[str, ...], defaults: Mapping[str, Any]
) -> None:
    """A folder without ``last.ckpt`` starts over, unless that would overwrite finished work:
    the record (``epochs.csv``) of a run that wrote no checkpoints, of a run with another
    config (its ``config.yaml``), or kept ``epoch<N>.ckpt`` files (a deleted ``last.ckpt``).
    A same-config run killed before its first checkpoint starts over."""
    rows = read_csv_rows(run_dir / "epochs.csv")
    kept = sorted(run_dir.glob("epoch*.ckpt"))
    if not rows and not kept:
        return
    saved = None
    with contextlib.suppress(Exception):  # an unreadable config.yaml: nothing to compare with
        saved = OmegaConf.load(run_dir / "config.yaml")
    unsaved = [c for c in (cfg, saved) if c is not None and not c.get("checkpoint", {}).get("enabled", True)]
    if rows and unsaved:
        raise ConfigError(
            f"{run_dir} holds the record of a run (epochs.csv) without a checkpoint to resume "
            "(checkpoint.enabled=False); a relaunch would start over and overwrite it. Choose another "
            "name=... or delete the folder"
        )
    diffs = _differing_keys(saved, cfg, keys, defaults) if saved is not None else []
    if diffs:
        raise ConfigError(
            f"{run_dir} holds the record of another run (its config.yaml differs from this config in {diffs}) "
            "and no last.ckpt to resume; a launch would overwrite it. Choose another name=... or delete the folder"
        )
    if kept:
        raise ConfigError(
            f"{run_dir} has no last.ckpt but keeps {kept[-1].name}: resume from it with "
            f"++resume_from_checkpoint={kept[-1]}, or delete the folder to start over"
        )


def keep_fraction_draw(cfg: DictConfig, resume_from: Path | None) -> None:
    """A resumed run keeps the images it began with: ``data.fraction_draw`` is its checkpoint's,
    ``random`` for a checkpoint from before the option existed (the draw of that time)."""
    if resume_from is not None:
        saved = config_of(read_checkpoint(resume_from, mmap=True), resume_from)
        cfg.data.fraction_draw = (saved.get("data") or {}).get("fraction_draw") or "random"


def _require_same_run(
    path: Path,
    cfg: DictConfig,
    keys: tuple[str, ...],
    defaults: Mapping[str, Any],
    pretraining: bool,
    advice: str,
    sweep_hint: bool = False,
) -> None:
    """Refuse to resume from ``path`` unless its run is this config's (``keys`` compared);
    ``sweep_hint``: the advice also shows a sweep's name built from the first differing key."""
    ckpt = read_checkpoint(path, mmap=True)
    saved = config_of(ckpt, path)
    if pretraining:  # a linear-evaluation checkpoint would not fit
        require_pretraining_config(saved, path)
    diffs = _differing_keys(_with_solo_learn_names(saved), cfg, keys, defaults, ckpt.get(WORLD_SIZE_KEY))
    if diffs == ["pretrained_backbone_sha256"]:  # a linear run whose pretraining went on writing its checkpoint
        advice = (
            "The pretrained weights it began on have changed since (the pretraining run wrote that checkpoint "
            "again); choose another name=... to evaluate the new weights, or delete the folder"
        )
    if sweep_hint and (key := next((d for d in diffs if " " not in d and d not in RECORDED_ONLY), None)):
        advice += f" (in a sweep, e.g. name=<run>_{key.rsplit('.', 1)[-1]}${{{key}}})"
    if diffs:
        raise ConfigError(f"cannot resume from {path}: its run differs from this config in {diffs}. {advice}")
    done, then, now = finished_epochs(path, ckpt) or 0, saved.get("max_epochs"), cfg.get("max_epochs")
    if now is None:
        return
    if done > int(now):
        raise ConfigError(
            f"{path} has finished {done} epochs, more than max_epochs={now}; set max_epochs={done} or more "
            f"to go on from it ({done}: nothing is left to train), or choose another name=..."
        )
    if then is not None and int(then) != int(now) and int(now) > done:
        rank_zero_warn(
            f"{path} was trained towards max_epochs={then}; resumed with max_epochs={now}, its learning-rate "
            f"(and EMA) schedules are recomputed over {now} epochs from its step on, so the rate jumps there "
            "and the run follows neither schedule throughout",
        )


def _with_solo_learn_names(saved: Mapping[str, Any]) -> DictConfig:
    """A checkpoint's config with solo-learn's keys under this library's names, as a launch's
    are (``momentum.classifier``, stored unread by an older ivreg, is ``report.momentum_readout``)."""
    return from_solo_learn(OmegaConf.create(dict(saved)), sections=())


def check_resumed_state(
    resume_from: Path | None,
    classes: list[str] | None,
    num_classes: int,
    model: torch.nn.Module,
    group_names: list[str] | None,
    train_images: int | None = None,
) -> None:
    """``check_resumed_classes``, ``check_resumed_images`` then ``check_checkpoint_fits``, from
    one read of the checkpoint (the classes first: they name the cause of a readout of another
    shape)."""
    if resume_from is None:
        return
    ckpt = read_checkpoint(resume_from, mmap=True)
    check_resumed_classes(resume_from, classes, num_classes, ckpt)
    check_resumed_images(resume_from, train_images, ckpt)
    check_checkpoint_fits(resume_from, model, group_names, ckpt)


def check_resumed_images(resume_from: Path, train_images: int | None, ckpt: Mapping[str, Any]) -> None:
    """Refuse to resume onto a training split of another size (a requeued job that first started
    while the data was still being copied): the steps per epoch set the schedules' length and
    where the resumed epoch stands in them, an image's index its augmentation draws, and the
    split the images ``data.fraction`` draws. Checkpoints from before the count was recorded
    are not compared."""
    then = ckpt.get(TRAIN_IMAGES_KEY)
    if then is None or train_images is None or int(then) == train_images:
        return
    raise ConfigError(
        f"{resume_from} was trained on a training split of {int(then)} images, the data now given has "
        f"{train_images}: the steps per epoch, and with them the rate and EMA schedules (and the images a "
        "data.fraction draws), would change mid-run. Resume with the images it was trained on, or start a new "
        "run (another name=...)"
    )


def check_checkpoint_fits(
    resume_from: Path | None,
    model: torch.nn.Module,
    group_names: list[str] | None,
    ckpt: Mapping[str, Any] | None = None,
) -> None:
    """Refuse, before anything is written, to resume from a checkpoint whose weights or
    optimizer parameter groups are not those this config builds: a setting an older ivreg
    stored without reading it (``report.momentum_readout``, ``optimizer.exclude_bias_n_norm_wd``)
    acts now and would fail the restore with a traceback, after config.yaml was rewritten.
    ``ckpt``: the checkpoint, when read already."""
    if resume_from is None:
        return
    ckpt = ckpt if ckpt is not None else read_checkpoint(resume_from, mmap=True)
    problems = [mismatch_report(model, ckpt["state_dict"])]
    states = ckpt.get("optimizer_states") or []
    saved = [g.get("name") for g in states[0].get("param_groups", [])] if states and group_names is not None else []
    if saved and saved != group_names:
        problems.append(f"optimizer parameter groups {saved} then, {group_names} now")
    problem = "; ".join(p for p in problems if p)
    if problem:
        raise ConfigError(
            f"{resume_from} does not fit the model and optimizer this config builds ({problem}): it was trained "
            "with other settings (a key an older ivreg stored without reading, such as report.momentum_readout or "
            "optimizer.exclude_bias_n_norm_wd, now acts). Resume with the settings it was trained with, or start "
            "a new run (another name=...)"
        )


def _differing_keys(
    saved: Any,
    cfg: DictConfig,
    keys: tuple[str, ...],
    defaults: Mapping[str, Any] = DEFAULTS,
    saved_world_size: int | None = None,
) -> list[str]:
    """The leaves under ``keys`` that the checkpoint's config ``saved`` has and ``cfg`` sets
    otherwise (or drops), and those only ``cfg`` has unless they hold their value in
    ``defaults`` (an option newer than the checkpoint, left at its default); an added
    ``optimizer.kwargs`` entry or view-group key is a difference; so are other images per
    optimizer step than the checkpoint's (``saved_world_size``: the processes it ran with)."""
    missing = object()

    def plain(config: Any, key: str) -> Any:
        return plain_value(OmegaConf.select(config, key, default=missing))

    defaults_cfg = OmegaConf.create(dict(defaults))
    diffs = []
    for key in keys:
        then = plain(saved, key)
        if then is missing:  # a section the checkpoint's version of ivreg did not have
            then = {}
        then, now = config_leaves(then, key), config_leaves(plain(cfg, key), key)
        default = config_leaves(plain(defaults_cfg, key), key)
        diffs += [k for k, v in then.items() if k not in RESUME_FREE and (k not in now or now[k] != v)]
        only_now = [k for k in now if k not in then and k not in RESUME_FREE and k not in RECORDED_ONLY]
        diffs += [k for k in only_now if default.get(k, missing) != now[k]]
    split_then, split_now = step_split(saved, saved_world_size), step_split(cfg)
    then, now = math.prod(split_then), math.prod(split_now)
    limit = OmegaConf.select(cfg, "limit_train_batches", default=None)
    if then != now:
        diffs.append(
            f"images per optimizer step (batch_size x devices x nodes x accumulate_grad_batches: "
            f"{then} then, {now} now)"
        )
    elif isinstance(limit, int) and not isinstance(limit, bool) and split_then[2] != split_now[2]:
        # (batch x processes is the same: the processes' k-th batches hold one process's k-th)
        diffs.append(
            f"accumulate_grad_batches ({split_then[2]} then, {split_now[2]} now) under "
            f"limit_train_batches={limit}, which counts batches, not optimizer steps: an epoch would hold "
            "other images"
        )
    return diffs


def finished_epochs(checkpoint: Path, ckpt: Mapping[str, Any] | None = None) -> int | None:
    """The epochs a checkpoint written by ``EpochCheckpoint`` (at an epoch's end) has
    finished; None when there is none or it cannot be read. ``ckpt``: its contents, if read."""
    try:
        return int((ckpt or read_checkpoint(checkpoint, mmap=True))["epoch"]) + 1
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def is_finished(trainer: L.Trainer, resume_from: Path | None) -> bool:
    """The checkpoint a run resumes from has already reached ``max_epochs`` (and no
    ``max_steps`` limit is set, which Lightning would judge itself)."""
    if resume_from is None or trainer.max_steps != -1 or trainer.max_epochs is None:
        return False
    done = finished_epochs(resume_from)
    return done is not None and done >= trainer.max_epochs


def check_resumed_classes(
    resume_from: Path | None, classes: list[str] | None, num_classes: int, ckpt: Mapping[str, Any] | None = None
) -> None:
    """Refuse to resume onto data whose classes differ from the checkpoint's (a label is an
    index into the sorted class folders: a renamed, added or removed folder moves the labels
    under the readout, or changes its shape). Checkpoints record their class names
    (``EpochCheckpoint``); older ones only their number, in the run's config. ``ckpt``: the
    checkpoint, when read already."""
    if resume_from is None:
        return
    ckpt = ckpt if ckpt is not None else read_checkpoint(resume_from, mmap=True)
    then = ckpt.get(CLASSES_KEY)
    if then is None or classes is None:  # (an older checkpoint, or no class names to compare)
        saved = (ckpt.get("hyper_parameters") or {}).get("cfg") or {}  # (check_resume read it whole)
        then_count = int((saved.get("data") or {}).get("num_classes", -1))
        if then_count in (-1, num_classes):
            return
        detail = f"{then_count} classes then, {num_classes} now"
    elif list(then) == list(classes):
        return
    else:
        gone = [c for c in then if c not in classes]
        new = [c for c in classes if c not in then]
        detail = f"{len(then)} classes then, {len(classes)} now" + (
            f"; gone: {_few(gone)}; new: {_few(new)}" if gone or new else "; the same names in another order"
        )
    raise ConfigError(
        f"{resume_from} was trained on other classes than the data now given ({detail}): its labels would "
        "point at other classes. Resume with the class folders it was trained on, or start a new run "
        "(another name=...)"
    )


def _few(names: list[str], at_most: int = 5) -> str:
    shown = ", ".join(names[:at_most]) or "-"
    return shown + (f" and {len(names) - at_most} more" if len(names) > at_most else "")
