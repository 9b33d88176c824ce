"""Optimisers (LARS, SGD, AdamW) and the learning-rate schedules (warmup-cosine, cosine, step).

LARS is written here because neither torch nor torchvision ships one, and the maintained
ones (timm's ``Lars``, solo-learn's) loop over parameters in Python with several small
kernels per tensor, which costs more launch time per step than a ResNet-18 step on a
modern GPU takes. This one uses ``torch._foreach_*`` ops: a constant number of launches
per parameter group. Its update is solo-learn's LARS, which the paper used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ivreg.errors import ConfigError

# The options (optimizer.kwargs) each optimizer takes.
OPTIMIZER_KWARGS: dict[str, set[str]] = {
    "adamw": {"betas", "eps"},
    "lars": {"momentum", "eta", "clip_lr", "exclude_bias_n_norm", "eps"},
    "sgd": {"momentum", "nesterov", "dampening"},
}
OPTIMIZERS = tuple(OPTIMIZER_KWARGS)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    For every parameter tensor that is adapted, with ||w|| > 0 and ||g|| > 0:
    ``ratio = eta ||w|| / (||g|| + weight_decay ||w|| + eps)``, ``d = ratio (g + weight_decay w)``,
    with ``clip_lr`` the ratio becomes ``min(ratio / lr, 1)``. Other tensors (biases and norm
    parameters with ``exclude_bias_n_norm``) get plain momentum SGD without weight decay.
    Then ``buf = momentum buf + d`` and ``w -= lr buf``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,  # solo-learn's default (the paper's CIFAR configs set 0.02)
        clip_lr: bool = False,
        exclude_bias_n_norm: bool = False,
        eps: float = 1e-8,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ConfigError("LARS needs lr >= 0, momentum >= 0, weight_decay >= 0 and eta > 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "clip_lr": clip_lr,
            "exclude_bias_n_norm": exclude_bias_n_norm,
            "eps": eps,
        }
        super().__init__(params, defaults)
        # (group index, device, dtype, exclude_bias_n_norm, momentum > 0) -> its flat buffers
        self._flat: dict[tuple, _FlatSteps] = {}
        self._gather: bool | None = None  # _FlatSteps' choice by device; tests force either path

    def __setstate__(self, state: dict) -> None:
        """Unpickled (``Optimizer.__getstate__`` keeps only the state and the groups): the flat
        buffers are made again at the next step, from the momentum buffers in the state."""
        super().__setstate__(state)
        self.__dict__.setdefault("_flat", {})
        self.__dict__.setdefault("_gather", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            for key, params in buckets.items():
                cache_key = (index, *key, group["exclude_bias_n_norm"], group["momentum"] > 0)
                flat = self._flat.get(cache_key)
                if flat is None or not flat.holds(params, self.state):
                    adapted = [not (group["exclude_bias_n_norm"] and p.ndim == 1) for p in params]
                    flat = _FlatSteps(params, adapted, group["momentum"] > 0, self.state, self._gather)
                    self._flat[cache_key] = flat
                self._update(group, flat)
        return loss

    @staticmethod
    def _update(group: dict, flat: _FlatSteps) -> None:
        """d = factor (g + wd w) for the adapted tensors, g for the others; factor is the trust
        ratio where both norms are non-zero, 1 where ||w|| = 0 (then wd w = 0 as well) and 0
        where ||g|| = 0 (then d = 0 = g). Then buf = momentum buf + d and w -= lr buf."""
        wd, lr = group["weight_decay"], group["lr"]
        params = flat.params
        grads = [p.grad for p in params]
        torch._foreach_copy_(flat.step_views, grads)
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        ratio = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
        if group["clip_lr"]:
            ratio = (ratio / lr).clamp(max=1.0) if lr > 0 else torch.ones_like(ratio)
        factor = torch.where(g_norm > 0, torch.where(w_norm > 0, ratio, 1.0), 0.0)
        factor = torch.where(flat.adapted_mask, factor, 1.0)
        if wd != 0 and flat.adapted:
            torch._foreach_add_(flat.adapted_step_views, flat.adapted, alpha=wd)
        if flat.segments is not None:
            flat.steps.mul_(factor.index_select(0, flat.segments))
        else:
            torch._foreach_mul_(flat.step_views, list(factor.unbind()))
        if flat.momentum is not None:
            flat.momentum.mul_(group["momentum"]).add_(flat.steps)
            torch._foreach_add_(params, flat.momentum_views, alpha=-lr)
        else:
            torch._foreach_add_(params, flat.step_views, alpha=-lr)


class _FlatSteps:
    """Persistent flat buffers for the LARS update of one bucket of parameter tensors (one
    group's tensors that have a gradient, of one device and dtype), with views shaped and
    strided like each tensor, made once: the update steps and the momentum buffers.

    Why: every tensor is scaled by its own trust ratio. On CUDA ``torch._foreach_mul_`` with a
    list of 0-dim factors cannot take the multi-tensor route (its lists differ in shape) and
    falls back to one kernel per tensor, as would ``_foreach_mul`` by per-tensor weight
    decays: two launches per adapted tensor (42 more per step with the shipped BYOL options,
    by ``benchmarks/throughput.py --section census``), and host time per launch is what bounds
    a step on a fast GPU. Off the CPU the factors are therefore gathered to one per element
    (``segments``, the tensor index of each element, kept as int32) and applied by one flat
    multiply; every other op is a flat op or a foreach op over same-shaped lists. On the CPU,
    where foreach ops loop over the tensors anyway and a gather over every element costs
    more than the loop, the factors go through ``_foreach_mul_`` (the same products, bit for
    bit). The momentum buffers in ``optimizer.state`` are the views into the flat one, so
    ``state_dict`` is the usual per-tensor one (``torch.save`` stores the shared storage once).
    """

    def __init__(
        self, params: list[torch.Tensor], adapted: list[bool], momentum: bool, state: dict, gather: bool | None = None
    ) -> None:
        self.params = params
        numels = torch.tensor([p.numel() for p in params])
        like = params[0]
        if gather is None:
            gather = like.device.type != "cpu"
        self.segments = (
            torch.arange(len(params), dtype=torch.int32).repeat_interleave(numels).to(like.device) if gather else None
        )
        self.adapted_mask = torch.tensor(adapted, device=like.device)
        self.steps = like.new_empty(int(numels.sum()))
        self.step_views = _views_like(self.steps, params)
        self.adapted = [p for p, a in zip(params, adapted) if a]
        self.adapted_step_views = [v for v, a in zip(self.step_views, adapted) if a]
        self.momentum: torch.Tensor | None = None
        self.momentum_views: list[torch.Tensor] = []
        if momentum:  # a tensor without a saved buffer starts from zero: m * 0 + d = d, as a clone of d
            self.momentum = torch.zeros_like(self.steps)
            self.momentum_views = _views_like(self.momentum, params)
            for p, view in zip(params, self.momentum_views):
                saved = state[p].get("momentum_buffer")
                if saved is not None:
                    view.copy_(saved)
                state[p]["momentum_buffer"] = view

    def holds(self, params: list[torch.Tensor], state: dict) -> bool:
        """Whether this layout is for ``params`` and ``state`` still holds its buffers (not
        so after ``load_state_dict`` or a move to another device)."""
        if len(params) != len(self.params) or any(p is not q for p, q in zip(params, self.params)):
            return False
        return all(state[p].get("momentum_buffer") is view for p, view in zip(params, self.momentum_views))


def _views_like(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of ``flat`` with each tensor's shape and, for dense tensors, its
    strides (channels_last convolutions included), so foreach ops pair them with the
    parameters and their gradients on the multi-tensor route."""
    views, offset = [], 0
    for p in params:
        dense = torch.empty_like(p, device="meta").stride() == p.stride()
        views.append(
            flat.as_strided(p.shape, p.stride(), offset) if dense else flat[offset : offset + p.numel()].view(p.shape)
        )
        offset += p.numel()
    return views


def trainable_params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """All trainable parameters of ``modules`` (each once)."""
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def param_groups(
    ssl_params: list[nn.Parameter],
    classifier_params: list[nn.Parameter],
    classifier_lr: float,
    exclude_bias_n_norm_wd: bool = False,
) -> list[dict[str, Any]]:
    """``build_optimizer``'s parameter groups: ``ssl``, ``classifier`` (at ``classifier_lr``,
    no weight decay) and, with ``exclude_bias_n_norm_wd``, ``ssl_no_weight_decay`` (the 1-D SSL
    parameters: biases and normalisation), last, so the first two keep their places in the
    logs and checkpoints."""
    exempt = [p for p in ssl_params if exclude_bias_n_norm_wd and p.ndim <= 1]
    groups = [
        {"name": "ssl", "params": [p for p in ssl_params if not any(p is q for q in exempt)]},
        {"name": "classifier", "params": classifier_params, "lr": classifier_lr, "weight_decay": 0.0},
    ]
    if exempt:
        groups.append({"name": "ssl_no_weight_decay", "params": exempt, "weight_decay": 0.0})
    return groups


def build_optimizer(
    name: str,
    ssl_params: list[nn.Parameter],
    classifier_params: list[nn.Parameter],
    lr: float,
    classifier_lr: float,
    weight_decay: float,
    kwargs: dict,
    exclude_bias_n_norm_wd: bool = False,
) -> torch.optim.Optimizer:
    """The SSL parameters at ``lr`` with weight decay; the readout at ``classifier_lr`` without
    weight decay (under LARS its weights are adapted too, as in the reference).
    ``exclude_bias_n_norm_wd``: the SSL biases and normalisation parameters (the 1-D ones) go to
    a third group at ``lr`` without weight decay (solo-learn's option; see ``param_groups``).

    SGD and AdamW use torch's multi-tensor (``foreach``) implementation on every device, not
    only on CUDA where it is the default: the same arithmetic in a few ops per step instead of
    a few per parameter tensor."""
    groups = param_groups(ssl_params, classifier_params, classifier_lr, exclude_bias_n_norm_wd)
    kwargs = dict(kwargs)
    check_optimizer(name, kwargs)
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    if name == "sgd":
        kwargs.setdefault("momentum", 0.9)
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, foreach=True, **kwargs)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=True, **kwargs)


def check_optimizer(name: str, kwargs: Mapping) -> None:
    """Raise ConfigError for an unknown optimizer or an option it does not take; the configs
    call it before anything is built or written."""
    if name not in OPTIMIZER_KWARGS:
        raise ConfigError(f"unknown optimizer.name '{name}'; choose one of {list(OPTIMIZERS)}")
    allowed = OPTIMIZER_KWARGS[name]
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(
            f"optimizer.kwargs {unknown} are not options of {name} (it takes {sorted(allowed)}); after "
            "switching optimizer.name, drop the previous optimizer's options with ~optimizer.kwargs "
            "(then ++optimizer.kwargs.<option>=... for the new one's)"
        )


SCHEDULERS = ("cosine", "none", "step", "warmup_cosine")


def check_schedule(
    name: str,
    warmup_epochs: float,
    max_epochs: int,
    lr_decay_steps: Sequence[float] | None = None,
    gamma: float = 0.1,
) -> None:
    """Raise ConfigError for an unknown scheduler, a warmup that leaves no cosine phase, or
    ``step`` milestones that are missing, unordered or outside the run; the configs call it
    before anything is built or written."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler.name '{name}'; choose one of {list(SCHEDULERS)}")
    if name == "warmup_cosine" and warmup_epochs >= max_epochs:
        raise ConfigError(
            f"scheduler.warmup_epochs ({warmup_epochs:g}) must be shorter than max_epochs ({max_epochs}); "
            "set scheduler.warmup_epochs lower (0 for none)"
        )
    if name != "step":
        if lr_decay_steps:
            raise ConfigError(f"scheduler.lr_decay_steps applies to scheduler.name=step, not to {name}")
        return
    steps = list(lr_decay_steps or [])
    if not steps or any(not isinstance(e, (int, float)) or isinstance(e, bool) for e in steps):
        raise ConfigError(
            f"scheduler.name=step needs scheduler.lr_decay_steps, the epochs at which the rate is multiplied "
            f"by scheduler.gamma, e.g. [60,80]; got {lr_decay_steps!r}"
        )
    if steps != sorted(steps) or not warmup_epochs <= steps[0] or not steps[-1] < max_epochs:
        raise ConfigError(
            f"scheduler.lr_decay_steps {steps} must increase, begin after the warmup ({warmup_epochs:g} epochs) "
            f"and end before max_epochs ({max_epochs})"
        )
    if not 0 < gamma <= 1:
        raise ConfigError(f"scheduler.gamma must be in (0, 1], got {gamma}")


def warmup_cosine_factor(
    step: int, warmup_steps: int, total_steps: int, base_lr: float, warmup_start_lr: float, min_lr: float
) -> float:
    """Multiplier of ``base_lr`` at ``step``: linear from warmup_start_lr to base_lr over the
    warmup (``_warmup_factor``), then cosine from base_lr to min_lr at ``total_steps``."""
    if base_lr <= 0:
        return 0.0
    if step < warmup_steps:
        return _warmup_factor(step, warmup_steps, base_lr, warmup_start_lr)
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return (min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / base_lr


def _warmup_factor(step: int, warmup_steps: int, base_lr: float, warmup_start_lr: float) -> float:
    """Multiplier of ``base_lr`` during a linear warmup from warmup_start_lr: base_lr is reached
    at the warmup's last step (``warmup_steps - 1``), as in solo-learn's (pl_bolts')
    LinearWarmupCosineAnnealingLR, which the paper's runs stepped per step."""
    return (warmup_start_lr + (base_lr - warmup_start_lr) * step / max(warmup_steps - 1, 1)) / base_lr


def warmup_step_factor(
    step: int, warmup_steps: int, milestones: Sequence[int], gamma: float, base_lr: float, warmup_start_lr: float
) -> float:
    """Multiplier of ``base_lr`` at ``step``: linear from warmup_start_lr over the warmup,
    then ``gamma`` to the power of the milestones (steps) reached, as torch's MultiStepLR."""
    if base_lr <= 0:
        return 0.0
    if step < warmup_steps:
        return _warmup_factor(step, warmup_steps, base_lr, warmup_start_lr)
    return gamma ** sum(step >= m for m in milestones)


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    max_epochs: int,
    warmup_epochs: float = 10,
    warmup_start_lr: float = 3e-5,
    min_lr: float = 0.0,
    lr_decay_steps: Sequence[float] | None = None,
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-step scheduler (``warmup_cosine``, ``cosine``, ``step``: rate x ``gamma`` at each
    epoch of ``lr_decay_steps``, after the warmup) or None (``none``)."""
    check_schedule(name, warmup_epochs, max_epochs, lr_decay_steps, gamma)
    if name == "none":
        return None
    total = max(steps_per_epoch * max_epochs, 1)
    warmup = int(round(warmup_epochs * steps_per_epoch)) if name in ("warmup_cosine", "step") else 0
    if warmup >= total:
        raise ConfigError(f"scheduler.warmup_epochs ({warmup_epochs}) must be shorter than max_epochs ({max_epochs})")
    milestones = [int(round(e * steps_per_epoch)) for e in lr_decay_steps or []]

    def factor(step: int, base: float) -> float:
        if name == "step":
            return warmup_step_factor(step, warmup, milestones, gamma, base, warmup_start_lr)
        return warmup_cosine_factor(step, warmup, total, base, warmup_start_lr, min_lr)

    lambdas = [(lambda step, base=g["lr"]: factor(step, base)) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def schedule_options(scheduler_cfg: Mapping) -> dict[str, Any]:
    """``build_scheduler``'s and ``check_schedule``'s keyword arguments from a ``scheduler``
    config section (whose warmup_epochs, warmup_start_lr and min_lr each entry point's
    defaults fill in; lr_decay_steps and gamma only ``step`` needs)."""
    steps = scheduler_cfg.get("lr_decay_steps")
    if steps is not None and not isinstance(steps, (list, tuple)) and not OmegaConf.is_list(steps):
        steps = [steps]  # one milestone given as a number
    return {
        "warmup_epochs": float(scheduler_cfg["warmup_epochs"]),
        "warmup_start_lr": float(scheduler_cfg.get("warmup_start_lr", 0.0)),
        "min_lr": float(scheduler_cfg.get("min_lr", 0.0)),
        "lr_decay_steps": list(steps) if steps is not None else None,
        "gamma": float(scheduler_cfg.get("gamma", 0.1)),
    }


def check_schedule_section(scheduler_cfg: Mapping, max_epochs: int) -> None:
    """``check_schedule`` of a config's ``scheduler`` section."""
    opts = schedule_options(scheduler_cfg)
    name = str(scheduler_cfg["name"])
    check_schedule(name, opts["warmup_epochs"], max_epochs, opts["lr_decay_steps"], opts["gamma"])


def optimizers_with_schedule(
    optimizer: torch.optim.Optimizer, scheduler_cfg: Mapping, total_steps: int, max_epochs: int
) -> dict:
    """What a ``configure_optimizers`` returns: ``optimizer`` and, unless ``scheduler.name`` is
    ``none``, its per-step scheduler built from the ``scheduler`` config section."""
    scheduler = build_scheduler(
        scheduler_cfg["name"],
        optimizer,
        steps_per_epoch=max(total_steps // max_epochs, 1),
        max_epochs=max_epochs,
        **schedule_options(scheduler_cfg),
    )
    if scheduler is None:
        return {"optimizer": optimizer}
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def planned_optimizer_steps(trainer: Any) -> int:
    """``trainer.estimated_stepping_batches``, without starting the training data before a
    checkpoint is restored.

    Lightning's property sets the fit loop's data up, which creates the DataLoader iterator
    (its workers draw their first indices at once). From ``configure_optimizers`` that
    happens before a resumed run's epoch is restored, and Lightning keeps that iterator for
    the first resumed epoch: with DataLoader workers it replayed epoch 0's order and views.
    Here the length of a freshly built (not iterated) training loader stands in; the
    formula is Lightning's (limit_train_batches, accumulation, max_steps)."""
    if trainer.train_dataloader is not None or trainer.datamodule is None or trainer.max_epochs in (None, -1):
        return int(trainer.estimated_stepping_batches)
    length = len(trainer.datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    batches = min(length, limit) if isinstance(limit, int) else int(length * limit)
    steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(int(trainer.max_epochs), 1)
    return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps
