"""The pretraining LightningModule: a composition of the parts, and the step that joins them.

    views (concatenated) -> backbone -> feats -> projector -> z   # BatchNorm statistics per view
    predictor.observe(z.detach())                    # running C; eigh once per step (or per view)
    p, p_sqrt = predictor.predict_views(z, n_views, groups)
    z_t = target(views, z, n_views, groups)          # EMA copy or stop-gradient online z
    loss = sum over ordered view pairs (a, b) of loss_fn(z_a, p_a, p_sqrt_a, z_t_b)
    + the online readouts' cross-entropy on detached features (``SSLMethod.readouts``)
    optimizer step, then the EMA target update (once per optimizer step)

``method`` chooses the predictor (``byol``: learned MLP, ``directpred``: closed form);
``iso`` and ``use_l2`` choose the loss; ``momentum`` chooses the target.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.seed import seed_everything
from torch import nn
from torch._dynamo.exc import TorchDynamoException
from torch._inductor.exc import InductorError

from ivreg.backbones import build_backbone, is_timm
from ivreg.config import lr_scale, uses_ema
from ivreg.data.datasets import dataset_info
from ivreg.errors import ConfigError, TrainingError, first_line
from ivreg.heads import mlp
from ivreg.losses import select_loss, symmetric_loss
from ivreg.norms import ViewGroups, follows_view_groups, run_views, share_view_groups
from ivreg.optim import (
    build_optimizer,
    optimizers_with_schedule,
    param_groups,
    planned_optimizer_steps,
    trainable_params,
)
from ivreg.predictors import MLPPredictor, SpectralPredictor, observe_and_predict, observe_views, spectrum_metrics
from ivreg.readout import IGNORE_LABEL, LabelledMean, OnlineReadout, top_k_hits
from ivreg.targets import EMATarget, StopGradTarget, cosine_tau


def build_predictor(cfg: Mapping) -> MLPPredictor | SpectralPredictor:
    mk = cfg["method_kwargs"]
    dim = int(mk["proj_output_dim"])
    if cfg["method"] == "byol":
        return MLPPredictor(dim, int(mk["pred_hidden_dim"]), float(mk["spectrum_tau"]))
    return SpectralPredictor(
        dim,
        alpha=float(mk["dp_alpha"]),
        normalize=bool(mk["dp_normalize"]),
        eps_iso=float(mk["eps_iso"]),
        tau=float(mk["dp_tau"]),
        with_sqrt=bool(mk["iso"]),
        eigh_on_host=mk.get("eigh_on_host", "auto"),
    )


def backbone_kwargs(cfg: Mapping) -> dict[str, Any]:
    """``backbone.kwargs`` with the CIFAR-stem choice made explicit for the torchvision ResNets:
    by default, datasets of at most 32 px get the 3x3 stem."""
    kwargs = dict(cfg["backbone"].get("kwargs") or {})
    if kwargs.get("cifar_stem") is None and not is_timm(str(cfg["backbone"]["name"])):
        size = dataset_info(cfg["data"]["dataset"]).image_size
        kwargs["cifar_stem"] = size is not None and size <= 32
    return kwargs


def backbone_from_config(cfg: Mapping) -> nn.Module:
    """The backbone a config describes."""
    return build_backbone(cfg["backbone"]["name"], **backbone_kwargs(cfg))


class Readout(NamedTuple):
    """An online readout, the features it reads and the suffix of its metrics' names."""

    suffix: str  # "" (the readout), "_raw" (unstandardised), "_random", "_momentum"
    module: OnlineReadout
    features: str  # whose backbone: "online", "random" (frozen random init) or "momentum" (EMA copy)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seeds every generator from (seed, epoch, rank), at an epoch's start: a resumed epoch
    draws the same random numbers as an uninterrupted one, and DDP ranks draw different ones."""
    # workers=True keeps the DataLoader workers' seeding if the loaders are rebuilt
    seed_everything((seed + 1_000_003 * epoch + 7919 * rank) % 2**31, workers=True, verbose=False)


def _metric_key(suffix: str) -> str:
    return suffix.lstrip("_") or "online"  # (a ModuleDict key may not be empty)


def metric_means(sums: Mapping[str, torch.Tensor], steps: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """Named figures from step metrics summed over ``steps`` steps: the mean per step of each
    loss and statistic, and ``train_acc1<suffix>`` from each readout's hits per labelled image
    (NaN, not 0, when no image was labelled). The one place that turns the sums that
    ``forward_step`` returns into what is logged, per step and per epoch."""
    count = torch.where(sums["train_count"] > 0, sums["train_count"], torch.nan)
    means = {}
    for name, value in sums.items():
        if name.startswith("train_hits"):
            means["train_acc1" + name.removeprefix("train_hits")] = 100.0 * value / count
        elif name != "train_count":
            means[name] = value / steps
    return means


class SSLMethod(L.LightningModule):
    """Backbone + projector + predictor + loss + target + online readout, from one config."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        mk = cfg["method_kwargs"]
        # (unlabelled images, or one class: a readout of two classes keeps the metrics defined)
        num_classes = max(int(cfg["data"]["num_classes"]), 2)
        self.backbone = backbone_from_config(cfg)
        feat_dim = self.backbone.num_features
        self.projector = mlp(feat_dim, int(mk["proj_hidden_dim"]), int(mk["proj_output_dim"]))
        self.predictor = build_predictor(cfg)
        self.target: EMATarget | StopGradTarget = (
            EMATarget(nn.Sequential(self.backbone, self.projector)) if uses_ema(cfg) else StopGradTarget()
        )
        self.loss_fn = select_loss(bool(mk["iso"]), bool(mk["use_l2"]), bool(mk.get("iso_tangent", False)))
        self.decompose_per_view = bool(mk.get("decompose_per_view", False))
        readout_bn = bool((cfg.get("readout") or {}).get("batchnorm", True))
        report = cfg.get("report") or {}
        # (built in this order, the random numbers of a seed initialise what they did before)
        self.readout = OnlineReadout(feat_dim, num_classes, batchnorm=readout_bn)
        # Optional baseline: the same readout, trained the same way, on a frozen randomly
        # initialised backbone (its BatchNorm statistics still follow the data).
        self.random_backbone: nn.Module | None = None
        self.random_readout: OnlineReadout | None = None
        if report.get("compare_random_init", False):
            self.random_backbone = backbone_from_config(cfg).requires_grad_(False)
            self.random_readout = OnlineReadout(feat_dim, num_classes, batchnorm=readout_bn)
        # Optional: the reference's raw readout (no standardisation) on the same features, so
        # that one run reports both (val_acc1_raw).
        self.raw_readout: OnlineReadout | None = None
        if report.get("raw_readout", False) and readout_bn:
            self.raw_readout = OnlineReadout(feat_dim, num_classes, batchnorm=False)
        # Optional: a readout on the EMA copy's backbone (solo-learn's momentum classifier).
        self.momentum_readout: OnlineReadout | None = None
        if report.get("momentum_readout", False):
            if not self.target.has_copy:
                raise ConfigError("report.momentum_readout=True needs an EMA target; this config has none")
            self.momentum_readout = OnlineReadout(feat_dim, num_classes, batchnorm=readout_bn)
        # val_acc1<suffix> of every readout, val_acc5 and val_loss: per labelled image, summed
        # over the DDP ranks' uneven shares (Lightning's sync_dist mean divided by a truncated
        # mean count); metric states are not saved in checkpoints
        self.val_top1 = nn.ModuleDict({_metric_key(r.suffix): LabelledMean() for r in self.readouts()})
        self.val_acc5 = LabelledMean()
        self.val_loss = LabelledMean()
        self.base_tau = float(cfg["momentum"]["base_tau"])
        self.final_tau = float(cfg["momentum"]["final_tau"])
        # Counted on the device; NonFiniteLossGuard reads it now and then (no per-step sync).
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long), persistent=False)
        # Rank-local: DDP would overwrite it with rank 0's count before every forward pass
        # (broadcast_buffers), forgetting a NaN on another rank; the guard sums it over ranks.
        self._ddp_params_and_buffers_to_ignore = ["nonfinite_steps"]
        self._metric_names: list[str] = []
        self._metric_sums: torch.Tensor | None = None
        self._metric_steps = 0
        self._epoch_cache: tuple[int, dict[str, torch.Tensor]] | None = None
        # [sum of finite gradient norms, optimizer steps with a finite norm, steps without]
        self._grad_stats: torch.Tensor | None = None
        # Set by apply_performance_options when the compiled modules replay CUDA graphs.
        self.cudagraph_steps = False
        # One network call for all views, with per-view BatchNorm statistics (ivreg.norms): set
        # by apply_performance_options (performance.batch_views); on_train_start turns it off
        # if the BatchNorm layers were swapped (SyncBatchNorm).
        self.view_groups = ViewGroups()
        share_view_groups(self._view_networks(), self.view_groups)
        self.batch_views = False
        self._compiled_step: Callable[..., Any] | None = None

    # ----------------------------------------------------------------------------- steps
    def _view_networks(self) -> list[nn.Module]:
        """The networks that see the views during training (not the readouts, whose
        BatchNorm normalises all views together)."""
        nets: list[nn.Module] = [self.backbone, self.projector, self.predictor, self.target]
        return nets + ([self.random_backbone] if self.random_backbone is not None else [])

    def readouts(self) -> list[Readout]:
        """The online readouts this run trains (the first is the one reported as val_acc1)."""
        found = [Readout("", self.readout, "online")]
        if self.raw_readout is not None:
            found.append(Readout("_raw", self.raw_readout, "online"))
        if self.random_readout is not None:
            found.append(Readout("_random", self.random_readout, "random"))
        if self.momentum_readout is not None:
            found.append(Readout("_momentum", self.momentum_readout, "momentum"))
        return found

    def on_train_start(self) -> None:
        if self.batch_views and not follows_view_groups(self._view_networks(), self.view_groups):
            # e.g. SyncBatchNorm: its statistics would span all views, so go view by view
            self.batch_views = False

    def online_parameters(self) -> list[nn.Parameter]:
        """Parameters the EMA target follows, in the order of ``EMATarget.net``."""
        return list(itertools.chain(self.backbone.parameters(), self.projector.parameters()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (what downstream evaluation uses)."""
        return self.backbone(x)

    def training_step(self, batch: tuple[list[torch.Tensor], torch.Tensor], batch_idx: int) -> torch.Tensor:
        views, labels = batch
        try:
            loss, metrics = self.step_fn(views, labels)
        except (TorchDynamoException, InductorError) as exc:
            raise TrainingError(
                f"torch.compile of the training step failed ({type(exc).__name__}: {first_line(exc)}); "
                "train eagerly with performance.compile=False"
            ) from exc
        self._record(metrics)
        return loss

    @property
    def step_fn(self) -> Callable[[list[torch.Tensor], torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """``forward_step``, or its ``torch.compile``d version (``performance.compile_scope=step``)."""
        return self._compiled_step if self._compiled_step is not None else self.forward_step

    def compile_step(self, **compile_kwargs: Any) -> None:
        """Run ``forward_step`` through ``torch.compile`` from now on: the whole forward pass of
        a training step (both views through backbone and projector, the EMA target, predictor,
        loss, readouts and metrics) becomes two graphs, split at the update of C and its
        eigendecomposition (eager: they may all-reduce and they check for errors on the host;
        with ``decompose_per_view=True`` one more graph per further view, split likewise),
        and AOTAutograd compiles their backward passes as well."""
        self._compiled_step = torch.compile(self.forward_step, **compile_kwargs)

    def forward_step(
        self, views: list[torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and this step's metrics (tensors), without touching the trainer,
        so that it can be compiled as a whole."""
        n_views = len(views)
        # With batch_views the views travel concatenated in view order: backbone and projector
        # run once on the whole batch, their BatchNorm layers keeping per-view statistics as in
        # the reference (ivreg.norms); otherwise (or for views of different sizes) one view at a
        # time. From the projections on, the predictor, the loss and the readout cost one set of
        # ops for all views.
        batched = self.batch_views and all(v.shape == views[0].shape for v in views)
        inputs: torch.Tensor | list[torch.Tensor] = torch.cat(views) if batched else list(views)
        # Multi-crop as solo-learn: the views of view 0's size (the large crops, first) are the
        # only targets, the EMA copy and the readouts see only them; every view is predicted.
        n_large = sum(v.shape == views[0].shape for v in views)
        large_rows = n_large * views[0].shape[0]
        large_inputs = inputs if n_large == n_views else list(views[:n_large])
        groups = self.view_groups if batched else None
        feats = run_views(self.backbone, inputs, n_views, groups)
        z = run_views(self.projector, feats, n_views, groups)
        if self.decompose_per_view:
            p, p_sqrt = observe_and_predict(self.predictor, z, n_views, per_view=True)
        else:  # observe_and_predict's default order, spelled out so that a compiled step
            # splits its graph here (observe_views runs eager) and not inside a nested frame
            observe_views(self.predictor, z, n_views)
            p, p_sqrt = self.predictor.predict_views(z, n_views, groups)
        features = {"online": feats[:large_rows]}
        if self.momentum_readout is not None:  # the EMA copy's features as well as its projections
            features["momentum"], z_t = self.target.features_and_projections(large_inputs, n_large, groups)
        else:
            z_t = self.target(large_inputs, z[:large_rows], n_large, groups)
        ssl_loss = symmetric_loss(self.loss_fn, z, p, p_sqrt, z_t, n_views, n_large)

        with torch.no_grad():
            z_all = z.unflatten(0, (n_views, -1)).float()
            metrics = {
                "train_neg_cos_sim": ssl_loss.detach(),
                "train_z_std": F.normalize(z_all, dim=-1).std(dim=1).mean(),
                "train_z_norm": z_all.norm(dim=-1).mean(),
            }
            if self.random_backbone is not None:
                features["random"] = run_views(self.random_backbone, large_inputs, n_large, groups)
        all_labels = labels.repeat(n_large)
        class_loss = ssl_loss.new_zeros(())
        for readout in self.readouts():
            loss, hits, count = readout.module.loss_and_hits(features[readout.features], all_labels)
            class_loss = class_loss + loss
            metrics[f"train_class_loss{readout.suffix}"] = loss.detach()
            metrics[f"train_hits{readout.suffix}"] = hits.float()
        metrics["train_count"] = count.float()
        self.nonfinite_steps += (~torch.isfinite(ssl_loss)).long()
        return ssl_loss + class_loss, metrics

    # ------------------------------------------------------------------ lazy metric sums
    def _record(self, metrics: dict[str, torch.Tensor]) -> None:
        """Adds this step's metrics to on-device sums (one stack and one add per step; the
        host reads them only when a step is logged and at the end of the epoch)."""
        values = torch.stack([v.detach().float() for v in metrics.values()])
        if self._metric_sums is None or self._metric_names != list(metrics):
            self._metric_names, self._metric_sums, self._metric_steps = list(metrics), torch.zeros_like(values), 0
        self._metric_sums += values
        self._metric_steps += 1
        if self._is_logging_step():
            step_metrics = metric_means(dict(zip(self._metric_names, values)), 1)
            step_metrics.update(spectrum_metrics(self.predictor.spectrum()))
            self.log_dict({f"{k}_step": v for k, v in step_metrics.items()}, on_step=True, on_epoch=False)

    def _is_logging_step(self) -> bool:
        """Whether Lightning writes this optimizer step's ``on_step`` values to the loggers:
        its rule is the (k+1)-th step for k+1 a multiple of ``log_every_n_steps`` (0: never),
        in the row labelled k. Values logged at other steps would wait, unwritten, and land
        in the next written row, under that row's step."""
        if self._trainer is None:
            return True
        every = int(self.trainer.log_every_n_steps)
        return every > 0 and (self.global_step + 1) % every == 0

    def epoch_metrics(self) -> dict[str, torch.Tensor]:
        """Epoch means of the step metrics, the spectrum of C at the end of the epoch, and tau.

        Computed once per epoch (callbacks that run before this module's epoch-end hook, such
        as EpochSummary, read the same values that are then logged)."""
        if self._epoch_cache is not None and self._epoch_cache[0] == self.current_epoch:
            return self._epoch_cache[1]
        if self._metric_sums is None or self._metric_steps == 0:
            return {}
        totals = self._global_metric_sums()
        epoch = metric_means(dict(zip(self._metric_names, totals[:-1])), totals[-1].clamp_min(1))
        if self._grad_stats is not None:
            epoch["train_grad_norm"] = self._grad_stats[0] / self._grad_stats[1].clamp_min(1)
            epoch["train_nonfinite_grad_steps"] = self._grad_stats[2]
        epoch.update(spectrum_metrics(self.predictor.spectrum()))
        if self.target.has_copy:
            epoch["tau"] = torch.tensor(self._current_tau())
        self._epoch_cache = (self.current_epoch, epoch)
        return epoch

    def _global_metric_sums(self) -> torch.Tensor:
        """This epoch's metric sums and step count, summed over the DDP ranks (one all-reduce
        per epoch; every rank must call it, as ``epoch_metrics`` does on every rank), so that
        ``train_acc1`` and the loss means cover the global batch and not rank 0's share. The
        gradient statistics need no reduction: DDP's gradients are the same on every rank."""
        assert self._metric_sums is not None
        local = torch.cat([self._metric_sums, self._metric_sums.new_tensor([self._metric_steps])])
        if self._trainer is None or self.trainer.world_size == 1:
            return local
        return self.trainer.strategy.reduce(local, reduce_op="sum")

    def on_train_epoch_end(self) -> None:
        metrics = self.epoch_metrics()
        if metrics:
            self.log_dict(metrics, on_step=False, on_epoch=True)

    def _current_tau(self) -> float:
        return cosine_tau(self.global_step, planned_optimizer_steps(self.trainer), self.base_tau, self.final_tau)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.view_groups.count = 1  # in case a failed step left it set
        self._mark_cudagraph_step()

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._mark_cudagraph_step()

    def _mark_cudagraph_step(self) -> None:
        """Tells torch.compile's CUDA graphs that a new iteration begins, so that they may reuse
        the previous iteration's output memory (the documented call for training loops)."""
        if self.cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()

    def on_train_epoch_start(self) -> None:
        """Reseed from (seed, epoch, rank): a resumed epoch draws the same random numbers as an
        uninterrupted one (the augmentations have their own seeds: per image from (seed,
        epoch, index) in ``Transformed``, per epoch and rank on the device)."""
        seed_epoch(int(self.cfg["seed"]), self.current_epoch, self.global_rank)
        self._metric_sums, self._metric_steps, self._epoch_cache, self._grad_stats = None, 0, None, None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Norm of the SSL gradient (backbone and projector, after GradScaler's unscaling), kept
        on the device: its epoch mean is ``train_grad_norm``, and ``train_nonfinite_grad_steps``
        counts the steps whose gradient was NaN or infinite (GradScaler skips those in fp16)."""
        grads = [p.grad for p in self.online_parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        finite = torch.isfinite(norm)
        stats = torch.stack([torch.where(finite, norm, 0.0), finite.float(), (~finite).float()])
        self._grad_stats = stats if self._grad_stats is None else self._grad_stats + stats
        if self._is_logging_step():
            self.log("train_grad_norm_step", norm, on_step=True, on_epoch=False)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.target.has_copy:
            self.target.update(self.online_parameters(), self._current_tau())

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        features = {"online": self.backbone(images)}
        if self.random_backbone is not None:
            features["random"] = self.random_backbone(images)
        if self.momentum_readout is not None:
            features["momentum"] = self.target.net[0](images)
        for readout in self.readouts():  # unlabelled images (label -1) count in none of the means
            logits = readout.module(features[readout.features]).float()
            self.val_top1[_metric_key(readout.suffix)].update(top_k_hits(logits, labels, 1), labels)
            if readout.module is self.readout:
                self.val_acc5.update(top_k_hits(logits, labels, 5), labels)
                losses = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, reduction="none")
                self.val_loss.update(losses, labels)

    def on_validation_epoch_end(self) -> None:
        for readout in self.readouts():
            top1 = self.val_top1[_metric_key(readout.suffix)]
            self.log(f"val_acc1{readout.suffix}", 100.0 * top1.compute(), sync_dist=False)
            top1.reset()
        self.log("val_acc5", 100.0 * self.val_acc5.compute(), sync_dist=False)
        self.log("val_loss", self.val_loss.compute(), sync_dist=False)
        self.val_acc5.reset()
        self.val_loss.reset()

    # ------------------------------------------------------------------------ optimisation
    def _optimized_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The SSL parameters and the readouts' (they learn at classifier_lr)."""
        ssl = trainable_params([self.backbone, self.projector, self.predictor])
        return ssl, trainable_params([readout.module for readout in self.readouts()])

    def optimizer_group_names(self) -> list[str]:
        """The names of the optimizer's parameter groups, in order (what a checkpoint's
        optimizer state must have to be restored)."""
        exclude = bool(self.cfg["optimizer"].get("exclude_bias_n_norm_wd", False))
        return [group["name"] for group in param_groups(*self._optimized_params(), 0.0, exclude)]

    def configure_optimizers(self) -> dict:
        opt_cfg = self.cfg["optimizer"]
        ssl, readouts = self._optimized_params()
        scale = lr_scale(self.cfg, self.trainer.world_size, int(self.trainer.accumulate_grad_batches))
        optimizer = build_optimizer(
            opt_cfg["name"],
            ssl,
            readouts,
            lr=float(opt_cfg["lr"]) * scale,
            classifier_lr=float(opt_cfg["classifier_lr"]) * scale,
            weight_decay=float(opt_cfg["weight_decay"]),
            kwargs=dict(opt_cfg.get("kwargs") or {}),
            exclude_bias_n_norm_wd=bool(opt_cfg.get("exclude_bias_n_norm_wd", False)),
        )
        total = planned_optimizer_steps(self.trainer)
        return optimizers_with_schedule(optimizer, self.cfg["scheduler"], total, int(self.cfg["max_epochs"]))
