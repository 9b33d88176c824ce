"""Linear evaluation (and fine-tuning) of a pretrained backbone: ``main_linear.py``.

The standard protocol: the backbone of a pretraining checkpoint is frozen, BatchNorm
included (it keeps the running statistics of pretraining; Lightning's ``.train()`` calls
cannot switch it back), and a linear classifier on its pooled features is trained with
SGD (momentum 0.9, lr 0.1 per 256 images, no weight decay, cosine schedule, 100 epochs) on
RandomResizedCrop(crop, scale 0.08-1) + horizontal flip views, then tested on centre crops.
``finetune=True`` trains the whole network instead, BatchNorm in training mode.
solo-learn's regularisers of the probe are there too, off by default: ``label_smoothing``,
and ``mixup`` / ``cutmix`` (Beta parameters; with both, each batch takes one of the two).

The run folder mirrors pretraining: ``<checkpoint.dir>/<name>/`` with ``config.yaml``
(including the pretraining config under ``pretrain_cfg``), ``last.ckpt``, ``epochs.csv``
(epoch, step, times, train_loss, train_acc1, val_loss, val_acc1, val_acc5, lr) and ``logs/``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchvision.transforms import v2

from ivreg.callbacks import (
    EpochCheckpoint,
    EpochSummary,
    ScheduledRatesAtStart,
    StopAllProcessesOnError,
    StopTogetherOnSigterm,
    checkpoint_io,
    read_csv_rows,
    unvalidated_after,
    validated_values,
)
from ivreg.config import (
    LR_SCALINGS,
    PRECISIONS,
    check_value_types,
    config_leaves,
    from_solo_learn,
    launch_config,
    lr_scale,
    merged_with_defaults,
    require,
    to_container,
    trainer_arguments,
    warn_unread_keys,
)
from ivreg.data.augment import ViewSpec
from ivreg.data.datamodule import PretrainDataModule
from ivreg.errors import ConfigError
from ivreg.eval.common import EVAL_DATA_DEFAULTS, eval_data_config, eval_datasets, foreign_description
from ivreg.method import backbone_from_config, backbone_kwargs, seed_epoch
from ivreg.optim import check_schedule_section, optimizers_with_schedule, planned_optimizer_steps
from ivreg.readout import LabelledMean, top_k_hits
from ivreg.resume import check_resume, check_resumed_state, keep_fraction_draw
from ivreg.train import (
    build_loggers,
    claim_run_folder,
    fit,
    hardware_kwargs,
    make_trainer,
    passthrough_trainer_kwargs,
    run_dir_of,
)

LINEAR_DEFAULTS: dict[str, Any] = {
    "name": None,  # None: "<pretraining name>-linear" (or "-finetune")
    "pretrained_feature_extractor": None,
    "finetune": False,
    "seed": 5,
    # solo-learn's regularisers of the classifier's training (0: off, the standard protocol)
    "label_smoothing": 0.0,  # the targets' share spread evenly over the classes
    "mixup": 0.0,  # alpha of MixUp's Beta(alpha, alpha) blend of image pairs (DeiT: 0.8)
    "cutmix": 0.0,  # alpha of CutMix's pasted boxes (DeiT: 1.0); with mixup too, one or the other per batch
    # data.pipeline: as in pretraining (auto: the training split on the GPU when it fits)
    "data": {**EVAL_DATA_DEFAULTS, "pipeline": "auto"},
    # The training views: RandomResizedCrop(crop_size, scale=(crop_min_scale, crop_max_scale)) + flip.
    "augmentations": {"crop_min_scale": 0.08, "crop_max_scale": 1.0, "horizontal_flip_prob": 0.5},
    "optimizer": {
        "name": "sgd",
        "batch_size": 256,
        "lr": 0.1,
        "backbone_lr_scale": 1.0,  # with finetune: the backbone's lr is lr * this
        # lr is per 256 images: x batch size x devices / 256 (linear_accumulated, none: as in pretraining)
        "lr_scaling": "linear",
        "weight_decay": 0.0,
        "kwargs": {"momentum": 0.9},
    },
    # step (solo-learn's CIFAR probe): name=step lr_decay_steps=[60,80] multiplies the rate by gamma there
    "scheduler": {
        "name": "cosine",
        "warmup_epochs": 0,
        "warmup_start_lr": 0.0,
        "min_lr": 0.0,
        "lr_decay_steps": None,
        "gamma": 0.1,
    },
    "checkpoint": {
        "enabled": True,
        "dir": "trained_models",
        "frequency": 1,
        "keep_every_n_epochs": 0,
        "async_write": "auto",
    },
    "auto_resume": {"enabled": True},
    "logger": {
        "csv": True,
        "tensorboard": False,
        "wandb": {"enabled": False, "project": "ivreg", "entity": None, "offline": False},
    },
    "max_epochs": 100,
    "devices": 1,
    "num_nodes": 1,
    "accelerator": "auto",
    "strategy": "auto",
    "precision": 32,
    "sync_batchnorm": False,
    "log_every_n_steps": 50,
}

# Keys that must match for a linear run to continue from the checkpoint in its folder.
LINEAR_RESUME_KEYS = (
    "pretrained_feature_extractor",
    "pretrained_backbone_sha256",  # the same path may hold a later checkpoint of the pretraining run
    "finetune",
    "label_smoothing",
    "mixup",
    "cutmix",
    "data.dataset",
    "data.fraction",
    "data.crop_size",
    "data.mean",
    "data.std",
    "backbone.name",
    "optimizer",
    "scheduler",
    "augmentations",
    "seed",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "limit_train_batches",
    "max_steps",
)


# Sections whose keys are all known (a typo in them is warned about, as in pretraining), and
# the top-level keys besides LINEAR_DEFAULTS' and Lightning Trainer arguments.
LINEAR_CLOSED_SECTIONS = ("data", "augmentations", "optimizer", "scheduler", "checkpoint", "auto_resume", "logger")
# backbone: checked against the checkpoint's; the others are written into the run's config.yaml
LINEAR_TOP_LEVEL_KEYS = {
    "hydra",
    "defaults",
    "backbone",
    "resume_from_checkpoint",
    "pretrain_cfg",
    "pretrained_backbone_sha256",
}


# ----------------------------------------------------------------------------------- config
def linear_optimizer(opt: Mapping[str, Any], params: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW from the ``optimizer`` section; ConfigError names the options torch refuses
    (whatever torch takes, e.g. AdamW's ``amsgrad``, passes through ``optimizer.kwargs``)."""
    kwargs = dict(opt.get("kwargs") or {})
    kind = torch.optim.SGD if opt["name"] == "sgd" else torch.optim.AdamW
    try:
        return kind(params, lr=lr, weight_decay=float(opt["weight_decay"]), **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"optimizer.kwargs {dict(sorted(kwargs.items()))} do not fit {opt['name']}: {exc} (after switching "
            "optimizer.name, drop the previous optimizer's options with ~optimizer.kwargs)"
        ) from exc


def prepare_linear_config(cfg: DictConfig | Mapping[str, Any]) -> DictConfig:
    """Defaults merged under ``cfg`` and checked (the pretraining checkpoint is not read yet)."""
    user = from_solo_learn(launch_config(cfg), sections=("wandb",))
    warn_unread_keys(
        user,
        defaults=LINEAR_DEFAULTS,
        closed=LINEAR_CLOSED_SECTIONS,
        top_level=set(LINEAR_DEFAULTS) | LINEAR_TOP_LEVEL_KEYS | trainer_arguments(),
        run_keys={"data": {"num_classes"}},
    )
    merged = merged_with_defaults(user, LINEAR_DEFAULTS)
    check_value_types(merged, LINEAR_DEFAULTS, flexible=("devices", "precision", "scheduler.warmup_epochs"))
    require(
        bool(merged.pretrained_feature_extractor),
        "set pretrained_feature_extractor=<path to a pretraining checkpoint or run folder>",
    )
    require(
        isinstance(merged.get("logger"), DictConfig),
        f"logger={merged.get('logger')!r}: the linear configs have no logger groups; set its keys instead "
        "(logger.tensorboard=False for CSV only, logger.wandb.enabled=True)",
    )
    opt = merged.optimizer
    require(opt.name in ("sgd", "adamw"), f"unknown optimizer.name '{opt.name}'; choose sgd or adamw")
    require(int(opt.batch_size) >= 1, f"optimizer.batch_size must be >= 1, got {opt.batch_size}")
    require(
        not merged.finetune or int(opt.batch_size) >= 2,
        f"finetune=True trains the backbone's BatchNorm layers on batch statistics: optimizer.batch_size must be "
        f">= 2, got {opt.batch_size}",
    )
    for key in ("lr", "weight_decay", "backbone_lr_scale"):
        require(float(opt[key]) >= 0, f"optimizer.{key} must be >= 0, got {opt[key]}")
    require(
        opt.lr_scaling in LR_SCALINGS,
        f"optimizer.lr_scaling '{opt.lr_scaling}' is not supported; choose one of {list(LR_SCALINGS)}",
    )
    # its options, on a stand-in parameter, before anything is loaded or written
    linear_optimizer(OmegaConf.to_object(opt), [{"params": [torch.zeros(1, requires_grad=True)]}], float(opt.lr))  # type: ignore[arg-type]
    require(int(merged.max_epochs) >= 1, f"max_epochs must be >= 1, got {merged.max_epochs}")
    check_schedule_section(merged.scheduler, int(merged.max_epochs))
    require(
        str(merged.precision) in PRECISIONS,
        f"precision '{merged.precision}' is not supported; choose one of {sorted(set(PRECISIONS))}",
    )
    require(int(merged.checkpoint.frequency) >= 1, "checkpoint.frequency must be >= 1")
    for key in ("label_smoothing", "mixup", "cutmix"):  # (null passes the type check)
        value = merged[key]
        require(value is not None and math.isfinite(float(value)), f"{key} must be a number (0: off), got {value}")
    smoothing = float(merged.label_smoothing)
    require(0 <= smoothing < 1, f"label_smoothing must be in [0, 1), got {merged.label_smoothing}")
    for key in ("mixup", "cutmix"):
        require(float(merged[key]) >= 0, f"{key} is the alpha of a Beta distribution: >= 0 (0: off), got {merged[key]}")
    aug = merged.augmentations
    lo, hi = float(aug.crop_min_scale), float(aug.crop_max_scale)
    require(0 < lo <= hi <= 1, "augmentations needs 0 < crop_min_scale <= crop_max_scale <= 1")
    flip = float(aug.horizontal_flip_prob)
    require(0 <= flip <= 1, f"augmentations.horizontal_flip_prob must be in [0, 1], got {flip}")
    return merged


def weights_sha256(net: torch.nn.Module) -> str:
    """A digest of a network's weights and buffers: what identifies the pretrained backbone
    a linear run evaluates (a pretraining run goes on writing to the same ``last.ckpt``)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(net.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolved_backbone(pretrain_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The pretraining ``backbone`` section with the CIFAR-stem choice made explicit, so that
    evaluating on another dataset builds the same architecture."""
    backbone = copy.deepcopy(dict(pretrain_cfg["backbone"]))
    backbone["kwargs"] = backbone_kwargs(pretrain_cfg)
    return backbone


# ------------------------------------------------------------------------------------ data
class LinearDataModule(PretrainDataModule):
    """The labelled training split through random resized crops (bilinear, torchvision's
    default) and horizontal flips, the test split through the evaluation transform.

    Pretraining's data module with that one view, so the same pipelines serve it
    (``data.pipeline``): on a GPU the training split stays on the device as uint8 and the
    crops are drawn there in batches, without DataLoader workers, when it fits."""

    def __init__(
        self,
        data: Mapping[str, Any],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        augmentations: Mapping[str, float] | None = None,
    ):
        a = {**LINEAR_DEFAULTS["augmentations"], **(augmentations or {})}
        view = ViewSpec(
            crop_size=int(data["crop_size"]),
            crop_min_scale=float(a["crop_min_scale"]),
            crop_max_scale=float(a["crop_max_scale"]),
            color_jitter_prob=0.0,
            grayscale_prob=0.0,
            horizontal_flip_prob=float(a["horizontal_flip_prob"]),
            rrc_interpolation="bilinear",
        )
        super().__init__(data, [view], batch_size, seed, drop_last=drop_last)

    def prepare_raw(self) -> None:
        if self.raw_train is None:
            self.raw_train, self.raw_val, self._num_classes = eval_datasets(self.data_cfg, self.seed)
            # a split smaller than one batch still trains (fine-tuning drops partial batches)
            self.drop_last = self.drop_last and len(self.raw_train) > self.batch_size  # type: ignore[arg-type]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = super().on_after_batch_transfer(batch, dataloader_idx)
        return (images[0] if isinstance(images, list) else images), labels  # the one view


# ----------------------------------------------------------------------------------- model
def batch_mixing(mixup: float, cutmix: float, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix of whole training batches into soft targets, or None if both are 0.

    torchvision's batched transforms (a core dependency, any batch size; timm's ``Mixup`` needs
    an even one) draw as solo-learn's timm ``Mixup(prob=1, switch_prob=0.5, mode="batch")``:
    lam ~ Beta(alpha, alpha) per batch, the pasted box's sides sqrt(1 - lam) of the image's
    and lam corrected to its clipped area, MixUp or CutMix with equal probability when both
    are on. One difference: torchvision rounds the box's sides down to an even number of
    pixels, timm 1.0 keeps odd ones (32 px, alpha 1: a mean share of 0.700 against 0.689).
    They draw from torch's global generator, which ``seed_epoch`` seeds at every epoch's start."""
    parts: list[v2.Transform] = []
    if mixup > 0:
        parts.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        parts.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if len(parts) > 1:
        return v2.RandomChoice(parts)
    return parts[0] if parts else None


class LinearEvalModule(L.LightningModule):
    """A backbone (frozen unless ``finetune``) and a linear classifier on its features."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.finetune = bool(cfg["finetune"])
        num_classes = int(cfg["data"]["num_classes"])
        self.backbone = backbone_from_config(cfg)
        self.classifier = nn.Linear(self.backbone.num_features, num_classes)
        self.label_smoothing = float(cfg.get("label_smoothing", 0.0))
        self.mixing = batch_mixing(float(cfg.get("mixup", 0.0)), float(cfg.get("cutmix", 0.0)), num_classes)
        if not self.finetune:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        # per image over the DDP ranks' uneven shares, as in pretraining (without host syncs)
        self.val_acc1, self.val_acc5, self.val_loss = LabelledMean(), LabelledMean(), LabelledMean()

    def train(self, mode: bool = True) -> LinearEvalModule:
        """As ``nn.Module.train``, but a frozen backbone stays in eval mode: its BatchNorm keeps
        the pretraining statistics however often Lightning switches the module to training."""
        super().train(mode)
        if not self.finetune:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            feats = self.backbone(images)
        return self.classifier(feats)

    def on_train_epoch_start(self) -> None:
        seed_epoch(int(self.cfg["seed"]), self.current_epoch, self.global_rank)  # MixUp/CutMix resume alike

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        targets = labels
        if self.mixing is not None:  # soft targets: each image's shares of its two classes
            images, targets = self.mixing(images, labels)
            labels = targets.argmax(dim=1)  # train_acc1 counts the larger share as the label
        logits = self(images).float()
        # on soft targets too, label smoothing mixes them with the uniform distribution (as timm's Mixup does)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        acc1 = top_k_hits(logits.detach(), labels, 1).float().mean()
        # Epoch values are batch-size-weighted means: the exact loss and accuracy of the epoch.
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True, batch_size=len(labels))
        self.log("train_acc1", 100.0 * acc1, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images).float()
        self.val_acc1.update(top_k_hits(logits, labels, 1), labels)
        self.val_acc5.update(top_k_hits(logits, labels, 5), labels)
        self.val_loss.update(F.cross_entropy(logits, labels, reduction="none"), labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val_loss", self.val_loss.compute())
        self.val_loss.reset()
        self.log("val_acc1", 100.0 * self.val_acc1.compute())
        self.log("val_acc5", 100.0 * self.val_acc5.compute())
        self.val_acc1.reset()
        self.val_acc5.reset()

    def configure_optimizers(self) -> dict:
        opt = self.cfg["optimizer"]
        # optimizer.lr is the rate for 256 images per step, scaled linearly
        lr = float(opt["lr"]) * lr_scale(self.cfg, self.trainer.world_size, int(self.trainer.accumulate_grad_batches))
        params: list[dict[str, Any]] = [{"params": list(self.classifier.parameters()), "lr": lr}]
        if self.finetune:  # the pretrained weights usually want a smaller step than the new head
            scale = float(opt.get("backbone_lr_scale", 1.0))
            params.append({"params": list(self.backbone.parameters()), "lr": lr * scale})
        optimizer = linear_optimizer(opt, params, lr)
        total = planned_optimizer_steps(self.trainer)
        return optimizers_with_schedule(optimizer, self.cfg["scheduler"], total, int(self.cfg["max_epochs"]))


# -------------------------------------------------------------------------------- callbacks
LINEAR_COLUMNS = ("train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5")


class LinearEpochSummary(EpochSummary):
    """``epochs.csv`` with the columns of a supervised run, and a one-line report per epoch
    (resumption handling and timing are EpochSummary's)."""

    def __init__(self, run_dir: Path, print_lines: bool = True):
        super().__init__(run_dir, log_eigvals=False, print_lines=print_lines)

    def metric_columns(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        metrics = self.current_callback_metrics(trainer)
        return {key: float(metrics[key]) if key in metrics else math.nan for key in LINEAR_COLUMNS}

    @staticmethod
    def format_line(row: dict[str, Any]) -> str:
        return (
            f"epoch {row['epoch']:>4} | train {row['train_time_s']:7.1f} s | val {row['val_time_s']:5.1f} s | "
            f"loss {row['train_loss']:.4f} | train_acc1 {row['train_acc1']:6.2f} | "
            f"val_acc1 {row['val_acc1']:6.2f} | val_acc5 {row['val_acc5']:6.2f}"
        )


# ------------------------------------------------------------------------------------- run
@dataclass
class LinearRun:
    """A linear evaluation, built but not started."""

    cfg: DictConfig
    model: LinearEvalModule
    datamodule: LinearDataModule
    trainer: L.Trainer
    run_dir: Path
    resume_from: Path | None


def build_linear_run(cfg: DictConfig | Mapping[str, Any]) -> LinearRun:
    """Read the pretraining checkpoint, resolve the data, build model, data module and trainer."""
    from ivreg.checkpoints import load_backbone_and_config, resolve_path

    cfg = prepare_linear_config(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    hw = hardware_kwargs(cfg)
    ckpt_path = resolve_path(str(cfg.pretrained_feature_extractor)).resolve()
    pretrained, pretrain_cfg = load_backbone_and_config(ckpt_path, pretraining=True, foreign=foreign_description(cfg))

    cfg.pretrained_feature_extractor = str(ckpt_path)
    cfg.pretrained_backbone_sha256 = weights_sha256(pretrained)
    cfg.pretrain_cfg = pretrain_cfg
    backbone = resolved_backbone(pretrain_cfg)
    if "backbone" in cfg:  # the keys given (null: whatever the checkpoint has) must be the checkpoint's
        given, known = config_leaves(OmegaConf.to_object(cfg.backbone), "backbone"), config_leaves(backbone, "backbone")
        differ = [f"{k}={v!r}" for k, v in given.items() if k not in known or (v is not None and known[k] != v)]
        require(
            not differ,
            f"{', '.join(differ)} differs from the pretrained backbone, {backbone}: the backbone and its options "
            f"come from {ckpt_path}; drop the backbone settings",
        )
    cfg.backbone = backbone
    data = eval_data_config(pretrain_cfg, OmegaConf.to_object(cfg.data))  # type: ignore[arg-type]
    if not cfg.name:
        cfg.name = f"{pretrain_cfg.get('name', 'run')}-{'finetune' if cfg.finetune else 'linear'}"
    cfg.data = data
    run_dir = run_dir_of(cfg)
    resume_from = check_resume(cfg, run_dir, LINEAR_RESUME_KEYS, pretraining=False, defaults=LINEAR_DEFAULTS)
    keep_fraction_draw(cfg, resume_from)  # before the data module draws the labelled subset
    data = OmegaConf.to_object(cfg.data)  # type: ignore[assignment]
    datamodule = LinearDataModule(
        data,
        int(cfg.optimizer.batch_size),
        int(cfg.seed),
        drop_last=bool(cfg.finetune),
        augmentations=OmegaConf.to_object(cfg.augmentations),  # type: ignore[arg-type]
    )
    cfg.data = {**data, "num_classes": datamodule.num_classes}
    on_gpu = hw["accelerator"] != "cpu" and torch.cuda.is_available()
    datamodule.compile_augmentation = on_gpu  # as pretraining's default: eager it is launch bound
    datamodule.channels_last = on_gpu

    model = LinearEvalModule(to_container(cfg))
    check_resumed_state(
        resume_from, datamodule.class_names, datamodule.num_classes, model, None, datamodule.num_train_images
    )
    model.backbone.load_state_dict(pretrained.state_dict())
    if on_gpu:
        model.to(memory_format=torch.channels_last)  # cuDNN's convolutions prefer it

    callbacks: list[L.Callback] = [StopAllProcessesOnError(), StopTogetherOnSigterm(), ScheduledRatesAtStart()]
    callbacks.append(LinearEpochSummary(run_dir))
    loggers = build_loggers(cfg, run_dir, resuming=resume_from is not None)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cfg.checkpoint.enabled:
        callbacks.append(EpochCheckpoint.from_config(cfg.checkpoint, run_dir))
    trainer = make_trainer(
        max_epochs=int(cfg.max_epochs),
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[checkpoint_io(cfg.checkpoint, on_gpu)],
        enable_checkpointing=False,
        default_root_dir=str(run_dir),
        **hw,
        **passthrough_trainer_kwargs(cfg),
    )
    claim_run_folder(cfg, run_dir, trainer.loggers)  # only once everything is checked, as in pretraining
    return LinearRun(cfg, model, datamodule, trainer, run_dir, resume_from)


def linear_eval(cfg: DictConfig | Mapping[str, Any]) -> LinearRun:
    """Build and fit; prints the final and best top-1 accuracy."""
    run = build_linear_run(cfg)
    with warnings.catch_warnings():
        # A frozen backbone is in eval mode on purpose; Lightning would warn about it.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        fit(run)
    if run.trainer.is_global_zero:
        _print_result(run.run_dir)
    return run


def _print_result(run_dir: Path) -> None:
    rows = read_csv_rows(run_dir / "epochs.csv")
    if accs := validated_values(rows):
        best, epoch = max((acc, epoch) for epoch, acc in accs)
        final_epoch, final = accs[-1]
        at = f" ({note})" if (note := unvalidated_after(rows, final_epoch)) else ""
        print(f"{run_dir.name}: final val_acc1 {final:.2f}{at}, best {best:.2f} (epoch {epoch})", flush=True)
