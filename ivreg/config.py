"""Configuration: defaults for every key the seed's configs use, and validation.

Configs are the seed's YAML files composed by Hydra. ``prepare_config`` fills in what a
file leaves out and rejects what cannot work, with a message that names the key, before
anything expensive happens.
"""

from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ivreg.backbones import check_backbone_name
from ivreg.data.datasets import DATASETS, FRACTION_DRAWS, check_normalisation
from ivreg.data.h5 import is_h5_file
from ivreg.errors import ConfigError, DataError
from ivreg.optim import check_optimizer, check_schedule_section

METHODS = ("byol", "directpred")
# The other names the paper and solo-learn use, and what they are here
METHOD_ALIASES = {
    "simsiam": "method=byol ++momentum.base_tau=0 ++momentum.final_tau=0, or byol-noema.yaml: the paper's SimSiam, "
    "BYOL's networks without EMA (solo-learn's SimSiam has a 3-layer projector)",
    "isoloss": "method=directpred with method_kwargs.iso=True (isoloss.yaml, isoloss-noema.yaml)",
    "directcopy": "method=directpred with method_kwargs.dp_alpha=1 method_kwargs.eps_iso=0.25",
}

DEFAULTS: dict[str, Any] = {
    "name": "ivreg-run",
    "seed": 5,
    "method": "byol",
    "backbone": {"name": "resnet18", "kwargs": {"cifar_stem": None, "stem_padding": 2, "zero_init_residual": False}},
    "method_kwargs": {
        "proj_hidden_dim": 4096,
        "proj_output_dim": 256,
        "pred_hidden_dim": 4096,
        "dp_alpha": 0.5,
        "dp_normalize": True,
        "iso": False,
        "dp_tau": 0.998,
        "eps_iso": 0.0,
        "spectrum_tau": 0.99,
        "decompose_per_view": False,  # True: the reference's order, one eigh after each view's C update
        # True: C's eigh by LAPACK on the host instead of cuSOLVER on the GPU; auto: the faster, timed
        "eigh_on_host": "auto",
        "iso_tangent": False,  # True: cosine IsoLoss without the radial part of its gradient
        "log_eigvals": True,
        "use_l2": False,
    },
    "momentum": {"base_tau": 0.99, "final_tau": 1.0},
    "data": {
        "dataset": "cifar10",
        "train_path": "./datasets",
        "val_path": "./datasets",
        "format": "image_folder",
        "num_workers": 4,
        "download": True,
        "fraction": 1.0,
        # per_class (stratified) or random (the whole set): how a fraction < 1 is drawn
        "fraction_draw": "per_class",
        "mean": None,
        "std": None,
        "pipeline": "auto",
    },
    "performance": {
        "channels_last": "auto",
        "compile": False,
        "compile_scope": "modules",
        "compile_mode": "default",
        "compile_augmentation": "auto",
        "batch_views": "auto",
    },
    "optimizer": {
        "name": "lars",
        "batch_size": 256,
        "lr": 1.0,
        "classifier_lr": 0.1,
        # "linear": lr and classifier_lr are per 256 images and are scaled by
        # batch_size x devices x nodes / 256 (solo-learn's rule); "linear_accumulated": also
        # x accumulate_grad_batches; "none": used as given
        "lr_scaling": "linear",
        "weight_decay": 1e-5,
        # True: no weight decay on biases and normalisation parameters (solo-learn's key; LARS's
        # kwargs.exclude_bias_n_norm also leaves them out of its trust-ratio adaptation)
        "exclude_bias_n_norm_wd": False,
        "kwargs": {},
    },
    # step: the rate times gamma at each epoch of lr_decay_steps (e.g. [60, 80]), after the warmup
    "scheduler": {
        "name": "warmup_cosine",
        "warmup_epochs": 10,
        "warmup_start_lr": 3e-5,
        "min_lr": 0.0,
        "lr_decay_steps": None,
        "gamma": 0.1,
    },
    "checkpoint": {
        "enabled": True,
        "dir": "trained_models",
        "frequency": 1,
        "keep_every_n_epochs": 0,
        "async_write": "auto",  # auto: by a background thread on a GPU (ivreg.callbacks.checkpoint_io)
    },
    "auto_resume": {"enabled": True},
    "logger": {
        "csv": True,
        "tensorboard": True,
        "wandb": {"enabled": False, "project": "ivreg", "entity": None, "offline": False},
    },
    "readout": {"batchnorm": True},
    # distance: cosine (weights exp(s / T)) or euclidean (weights 1 / d; solo-learn's knn_eval default)
    "knn": {"enabled": False, "k": 20, "temperature": 0.07, "distance": "cosine", "every_n_epochs": 1},
    # a 2-D map of validation features, <run folder>/umap/<method>_epoch<N>.png (method: umap,
    # which needs pip install 'ivreg[umap]', tsne or pca); max_samples 0: the whole split
    "umap": {"enabled": False, "every_n_epochs": 50, "method": "umap", "max_samples": 5000},
    # compare_random_init: the same readout on a frozen random backbone (val_acc1_random);
    # raw_readout: also the reference's unstandardised readout (val_acc1_raw)
    # momentum_readout: also a readout on the EMA copy's backbone (val_acc1_momentum; solo-learn's
    # momentum.classifier, logged there as val_momentum_acc1)
    "report": {"compare_random_init": False, "raw_readout": False, "momentum_readout": False},
    "max_epochs": 1000,
    "devices": 1,
    "accelerator": "auto",
    "strategy": "auto",
    "precision": 32,
    "sync_batchnorm": False,
    "accumulate_grad_batches": 1,
    "log_every_n_steps": 50,
    "benchmark": True,  # cuDNN picks the fastest convolution algorithms (inputs have fixed sizes)
}

PRECISIONS = {
    "auto": "auto",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "32": "32-true",
    "32-true": "32-true",
    "64": "64-true",
    "64-true": "64-true",
}


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _number(cfg: DictConfig, key: str) -> float:
    value = OmegaConf.select(cfg, key)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}") from None


def plain_value(value: Any) -> Any:
    """A config node as plain Python (lists and dicts), other values as they are."""
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def config_leaves(node: Any, prefix: str) -> dict[str, Any]:
    """``{dotted.key[index]: value}`` of every leaf under ``node`` (plain containers)."""
    if isinstance(node, Mapping):
        return {k: v for key, child in node.items() for k, v in config_leaves(child, f"{prefix}.{key}").items()}
    if isinstance(node, (list, tuple)):
        return {k: v for i, child in enumerate(node) for k, v in config_leaves(child, f"{prefix}[{i}]").items()}
    return {prefix: node}


DATA_FORMATS = ("image_folder", "h5")


def check_data_format(data: Any) -> None:
    """``data.format``: image_folder (ImageFolder trees, or the files torchvision reads) or h5
    (solo-learn's: one HDF5 file per split, read by its .h5 suffix, which then every given
    path needs)."""
    fmt = data.get("format", "image_folder")
    if fmt == "dali":
        raise ConfigError(
            "data.format=dali is not supported: ivreg augments on the GPU itself (data.pipeline: the whole "
            "training set on the GPU when it fits, else workers that decode and crop); use image_folder or h5"
        )
    require(fmt in DATA_FORMATS, f"data.format '{fmt}' is not supported; choose one of {list(DATA_FORMATS)}")
    if fmt == "h5":
        for key in ("train_path", "val_path"):
            path = data.get(key)
            require(
                path is None or is_h5_file(Path(str(path))),
                f"data.format=h5 needs HDF5 files, but data.{key}={path} is not a .h5 or .hdf5 file",
            )


def _whole_number(cfg: DictConfig, key: str) -> int:
    """An integer option (``2.5`` epochs or ``x`` is refused, not rounded or left to crash)."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be a whole number, got {value!r}")
    return value


def auto_switch(value: Any, on_gpu: bool) -> bool:
    """The value of an auto/True/False option (validated by ``validate``): auto means on with a GPU."""
    return on_gpu if str(value) == "auto" else bool(value)


def uses_ema(cfg: Mapping) -> bool:
    """False for the ``*-noema`` configs (base_tau = final_tau = 0): the target is the online
    network under stop-gradient."""
    m = cfg["momentum"]
    return not (float(m["base_tau"]) == 0.0 and float(m["final_tau"]) == 0.0)


# Sections whose keys are all known here: a key outside them (a typo such as
# ++method_kwargs.eps_isos=0.25) would otherwise be ignored without a word. It is a warning,
# not an error, because the seed's command line accepts ++new_key=value anywhere (a key the
# reference reads and this library does not). The top level stays open (any Lightning Trainer
# argument may be added), as do optimizer.kwargs (checked per optimizer) and backbone.kwargs
# (a timm model's own arguments).
CLOSED_SECTIONS = (
    "method_kwargs",
    "momentum",
    "data",
    "performance",
    "optimizer",
    "scheduler",
    "checkpoint",
    "auto_resume",
    "logger",
    "readout",
    "knn",
    "umap",
    "report",
)
RUN_KEYS = {"data": {"num_classes"}}  # written by the run itself (train.build_run)


class UnreadConfigKeyWarning(UserWarning):
    """A config key that no part of the library reads (most likely a typo)."""


# Top-level keys read outside DEFAULTS (besides Lightning Trainer arguments, passed through).
TOP_LEVEL_KEYS = {"augmentations", "resume_from_checkpoint", "wandb", "defaults", "hydra"}


def trainer_arguments() -> set[str]:
    """The arguments of Lightning's ``Trainer`` (top-level config keys passed through to it)."""
    import inspect

    import lightning as L

    return set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


def _top_level_known() -> set[str]:
    return set(DEFAULTS) | TOP_LEVEL_KEYS | trainer_arguments()


def unread_keys(
    cfg: DictConfig,
    defaults: Mapping[str, Any] = DEFAULTS,
    closed: Iterable[str] = CLOSED_SECTIONS,
    top_level: set[str] | None = None,
    run_keys: Mapping[str, set[str]] = RUN_KEYS,
) -> list[str]:
    """One line per key that nothing reads, with the likely intended key: keys of the
    ``closed`` sections outside ``defaults``, and top-level keys outside ``top_level``
    (pretraining's: ivreg's keys and Lightning Trainer arguments; ``++max_epoch=3`` would
    otherwise train for the default number of epochs in silence)."""
    top = _top_level_known() if top_level is None else top_level
    lines = []
    for key in sorted(set(cfg) - top):
        close = difflib.get_close_matches(key, top, n=1)
        hint = f"did you mean {close[0]}?" if close else "it is neither an ivreg key nor a Lightning Trainer argument"
        hint = SOLO_LEARN_KEY_ADVICE.get(key, hint)
        lines.append(f"{key} is not read by ivreg and has no effect; {hint}")
    for section in closed:
        given = cfg.get(section)
        if not isinstance(given, DictConfig):
            continue
        known = set(defaults[section]) | run_keys.get(section, set())
        for key in sorted(set(given) - known):
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {section}.{close[0]}?" if close else f"{section} takes {sorted(known)}"
            hint = SOLO_LEARN_KEY_ADVICE.get(f"{section}.{key}", hint)
            lines.append(f"{section}.{key} is not read by ivreg and has no effect; {hint}")
    return lines


# solo-learn keys without a counterpart of the same name here, and what to do instead (the
# closest name would mislead: disable_channel_last is the opposite of channels_last).
SOLO_LEARN_KEY_ADVICE = {
    "performance.disable_channel_last": "ivreg's switch has the opposite sense: performance.channels_last=False "
    "turns channels_last off (auto: on with a GPU)",
    "checkpoint.keep_prev": "ivreg keeps last.ckpt only; checkpoint.keep_every_n_epochs=N also keeps epoch<N>.ckpt "
    "every N epochs",
    "auto_resume.max_hours": "ivreg resumes from the run folder's last.ckpt whatever its age, after checking that "
    "the config matches (auto_resume.enabled=False starts over elsewhere: give the run another name)",
    "data.no_labels": "a data.train_path folder with the images directly in it (no class folders) is read as "
    "unlabelled images (data.dataset=custom)",
    "scheduler.interval": "ivreg's schedules update the rate after every optimizer step, as solo-learn's interval=step",
    "no_validation": "leave data.val_path unset (null) to train without validation",
    "auto_augment": "ivreg's linear probe has no RandAugment: its training views are RandomResizedCrop "
    "(augmentations.crop_min_scale, crop_max_scale) and flips (augmentations.horizontal_flip_prob)",
    "data.augmentations": "the evaluation's crop size and normalisation are data.crop_size, data.mean and "
    "data.std (null: the pretraining run's)",
    # main_knn.py's names for solo-learn's knn flags
    "pretrained_checkpoint_dir": "main_knn.py reads pretrained_feature_extractor=<checkpoint or run folder>",
    "feature_type": "main_knn.py reads features=[backbone,projector]",
    "distance_function": "main_knn.py reads distance=[cosine,euclidean]",
    "num_workers": "it is data.num_workers",
}
# solo-learn's sections that ivreg reads under its own names: {section: (ivreg section,
# {solo-learn key: ivreg key})}; None: every key as it is.
SOLO_LEARN_SECTIONS: dict[str, tuple[str, dict[str, str] | None]] = {
    "wandb": ("logger.wandb", None),
    "auto_umap": ("umap", {"enabled": "enabled", "frequency": "every_n_epochs"}),
    "knn_eval": ("knn", {"enabled": "enabled", "k": "k", "distance_func": "distance", "T": "temperature"}),
}
SOLO_LEARN_NOTES = {"auto_umap.dir": "the maps go to <run folder>/umap/"}
# solo-learn's defaults where they differ from ivreg's: a solo-learn section without the key means these
SOLO_LEARN_SECTION_DEFAULTS = {"knn_eval": {"distance_func": "euclidean"}}


def from_solo_learn(user: DictConfig, sections: Iterable[str] = tuple(SOLO_LEARN_SECTIONS)) -> DictConfig:
    """``user`` with solo-learn's (and the seed's) ``sections`` moved under this library's
    names (``wandb`` -> ``logger.wandb``, ``auto_umap`` -> ``umap``, ``knn_eval`` -> ``knn``),
    and ``momentum.classifier`` as ``report.momentum_readout``. Their keys without a
    counterpart are warned about. A solo-learn section given wins over the library's (the
    seed's ``wandb`` group over the ``logger`` group of the same config)."""
    for name in sections:
        section = user.get(name)
        if not isinstance(section, DictConfig):
            continue
        target, keys = SOLO_LEARN_SECTIONS[name]
        mapped: dict[str, Any] = {}
        entries = {**SOLO_LEARN_SECTION_DEFAULTS.get(name, {}), **{str(k): v for k, v in section.items()}}
        for key, value in entries.items():
            if keys is None or key in keys:
                mapped[str(key) if keys is None else keys[str(key)]] = value
                continue
            note = SOLO_LEARN_NOTES.get(f"{name}.{key}", f"{name} takes {sorted(keys)}")
            warnings.warn(f"{name}.{key} is not read by ivreg and has no effect; {note}", UnreadConfigKeyWarning, 3)
        for part in reversed(target.split(".")):
            mapped = {part: mapped}
        user.pop(name)  # (launch_config's copy)
        user = OmegaConf.merge(user, mapped)
    momentum = user.get("momentum")
    if isinstance(momentum, DictConfig) and "classifier" in momentum:
        user = OmegaConf.merge(user, {"report": {"momentum_readout": momentum.classifier}})
        user.momentum.pop("classifier")
    return user


def warn_unread_keys(cfg: DictConfig, **where: Any) -> None:
    """``unread_keys`` as warnings (``where``: its arguments for another entry point's keys)."""
    for line in unread_keys(cfg, **where):
        warnings.warn(line, UnreadConfigKeyWarning, stacklevel=3)


def _decoded(text: str, kind: type) -> Any:
    """``text`` as a ``kind`` (bool, int or float) when it spells one, else None: an
    interpolation such as ``${oc.env:EPOCHS}`` resolves to a string."""
    word = text.strip()
    if kind is bool:
        return {"true": True, "false": False}.get(word.lower())
    try:
        return kind(word) if kind is float or word.lstrip("+-").isdigit() else None
    except ValueError:
        return None


def check_value_types(cfg: DictConfig, defaults: Mapping[str, Any], flexible: Iterable[str] = ()) -> None:
    """Raise ConfigError for a value of another kind than its key's default: a switch must be
    True or False (``iso=no`` would count as True), a count a whole number (``max_epochs=2.5``
    would be rounded down, ``abc`` fail with a traceback), a rate a number. A string that
    spells the right kind (an environment variable through ``${oc.env:...}``) is converted in
    place; null passes (the reader of the key decides). ``flexible``: keys that take other
    kinds too (``devices=auto``, ``precision=bf16``)."""
    missing = object()
    skip = set(flexible)
    for dotted, default in config_leaves(dict(defaults), "").items():
        key = dotted[1:]
        if "[" in key or key in skip or default is None or isinstance(default, str):
            continue
        value = OmegaConf.select(cfg, key, default=missing)
        if value is missing or value is None:
            continue
        kind = bool if isinstance(default, bool) else int if isinstance(default, int) else float
        if isinstance(value, str) and _decoded(value, kind) is not None:
            value = _decoded(value, kind)
            OmegaConf.update(cfg, key, value, merge=False)
        if kind is bool:
            require(isinstance(value, bool), f"{key} must be True or False, got {value!r}")
        elif kind is int:
            require(
                isinstance(value, int) and not isinstance(value, bool), f"{key} must be a whole number, got {value!r}"
            )
        else:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            require(number, f"{key} must be a number, got {value!r}")


def launch_config(cfg: DictConfig | Mapping) -> DictConfig:
    """An editable copy of what a tool was launched with (Hydra's config or a plain mapping),
    without Hydra's own section: ``cfg`` itself is left unchanged."""
    user = copy.deepcopy(cfg) if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    OmegaConf.set_struct(user, False)
    if "hydra" in user:
        del user["hydra"]
    return user


def merged_with_defaults(user: DictConfig, defaults: Mapping[str, Any]) -> DictConfig:
    """``defaults`` with ``user`` merged over them, open to new keys (``++key=value``)."""
    merged = OmegaConf.merge(OmegaConf.create(dict(defaults)), user)
    OmegaConf.set_struct(merged, False)
    return merged


def prepare_config(cfg: DictConfig | Mapping) -> DictConfig:
    """Defaults merged under ``cfg``, validated. Returns a new config; ``cfg`` is unchanged."""
    user = from_solo_learn(launch_config(cfg))
    warn_unread_keys(user)
    merged = merged_with_defaults(user, DEFAULTS)
    validate(merged)
    warn_off_paper_settings(merged)
    return merged


class PaperSettingWarning(UserWarning):
    """A combination of settings that the paper's runs do not use, probably left over from
    another config (the run goes on as configured)."""


def warn_off_paper_settings(cfg: DictConfig) -> None:
    """The closed-form predictor's C averages over 500 steps with an EMA target
    (``dp_tau=0.998``) and over 2 without one (0.5, the ``*-noema`` configs): turning the EMA
    off on an EMA config keeps the slow average unless dp_tau is changed too."""
    dp_tau = float(cfg.method_kwargs.dp_tau)
    if cfg.method == "directpred" and not uses_ema(cfg) and dp_tau == DEFAULTS["method_kwargs"]["dp_tau"]:
        warnings.warn(
            f"method_kwargs.dp_tau={dp_tau} (the EMA configs' value) without an EMA target "
            "(momentum.base_tau=final_tau=0): the paper's runs without EMA use dp_tau=0.5, as the "
            "*-noema configs do; set method_kwargs.dp_tau to choose",
            PaperSettingWarning,
            stacklevel=3,
        )


# method_kwargs that only the closed-form predictor (method=directpred) reads.
CLOSED_FORM_KEYS = ("dp_alpha", "dp_normalize", "eps_iso")
LR_SCALINGS = ("linear", "linear_accumulated", "none")
# torch.compile's modes; "reduce-overhead" replays the compiled graphs as CUDA graphs, which
# removes the per-kernel launch cost that bounds a ResNet-18 step on a fast GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
# What performance.compile compiles: "modules" (backbone, projector and EMA copy, one graph
# each per call) or "step" (the training step's whole forward pass, two graphs split at the
# eigendecomposition, and their backward passes).
COMPILE_SCOPES = ("modules", "step")
LR_REFERENCE_BATCH = 256


def lr_scale(cfg: Mapping, world_size: int, accumulate_grad_batches: int = 1) -> float:
    """The factor ``optimizer.lr`` and ``classifier_lr`` are multiplied by, so that the
    published rates (per 256 images) carry over to other batch sizes and device counts.

    ``linear`` (default): batch size x devices x nodes / 256, solo-learn's rule, which leaves
    ``accumulate_grad_batches`` out: a solo-learn config trains at the same rate here (its
    ImageNet runs accumulate 16 batches of 64 on 4 GPUs at lr 0.45 as written).
    ``linear_accumulated``: also times ``accumulate_grad_batches``, i.e. the images per
    optimizer step over 256. ``none``: 1."""
    scaling = cfg["optimizer"].get("lr_scaling", "linear")
    if scaling == "none":
        return 1.0
    images = int(cfg["optimizer"]["batch_size"]) * world_size
    if scaling == "linear_accumulated":
        images *= accumulate_grad_batches
    return images / LR_REFERENCE_BATCH


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key that cannot work."""
    check_value_types(cfg, DEFAULTS, flexible=("devices", "precision", "scheduler.warmup_epochs"))
    alias = METHOD_ALIASES.get(str(cfg.method).lower().replace("-", "").replace("_", ""))
    if str(cfg.method).lower() in METHODS:
        alias = f"method={str(cfg.method).lower()}: names are lower case"
    require(
        cfg.method in METHODS,
        f"unknown method '{cfg.method}'; choose one of {list(METHODS)}"
        + (
            f" ({cfg.method} is {alias})"
            if alias
            else " (ivreg has the paper's non-contrastive methods; for others, such as SimCLR, use solo-learn)"
        ),
    )
    check_backbone_name(str(cfg.backbone.name))
    if cfg.data.dataset not in DATASETS:
        raise DataError(f"unknown data.dataset '{cfg.data.dataset}'; choose one of {sorted(DATASETS)}")
    mk = cfg.method_kwargs
    for key in ("base_tau", "final_tau"):
        tau = _number(cfg, f"momentum.{key}")
        require(0.0 <= tau <= 1.0, f"momentum.{key} must be in [0, 1], got {tau}")
    if cfg.knn.enabled:  # the online kNN's settings, before any folder is written
        from ivreg.eval.knn import check_knn_args

        knn = cfg.knn
        check_knn_args([int(knn.k)], [float(knn.temperature)], str(knn.distance), bank_size=int(knn.k))
    require(
        not cfg.report.momentum_readout or uses_ema(cfg),
        "report.momentum_readout=True reads the EMA copy's backbone, and this config has none "
        "(momentum.base_tau = final_tau = 0: the *-noema configs); drop it or use an EMA config",
    )
    for key in ("proj_hidden_dim", "proj_output_dim", "pred_hidden_dim"):
        require(int(mk[key]) >= 1, f"method_kwargs.{key} must be a positive integer, got {mk[key]}")
    alpha = _number(cfg, "method_kwargs.dp_alpha")
    require(alpha >= 0, f"method_kwargs.dp_alpha must be >= 0, got {alpha}")
    eps = _number(cfg, "method_kwargs.eps_iso")
    require(eps >= 0, f"method_kwargs.eps_iso must be >= 0, got {eps}")
    for key in ("dp_tau", "spectrum_tau"):
        tau = _number(cfg, f"method_kwargs.{key}")
        require(0.0 <= tau < 1.0, f"method_kwargs.{key} must be in [0, 1), got {tau}")
    require(
        not (bool(mk.iso) and cfg.method == "byol"),
        "method_kwargs.iso=True needs the closed-form predictor: use method=directpred",
    )
    if cfg.method == "byol":  # e.g. DirectCopy's keys on a BYOL config would train plain BYOL
        changed = [k for k in CLOSED_FORM_KEYS if mk.get(k) != DEFAULTS["method_kwargs"][k]]
        require(
            not changed,
            f"method_kwargs {', '.join(changed)} shape the closed-form predictor, which method=byol does not "
            "use (its predictor is learned): use a directpred or isoloss config for DirectPred/DirectCopy",
        )
    require(
        not bool(mk.get("iso_tangent", False)) or (bool(mk.iso) and not bool(mk.use_l2)),
        "method_kwargs.iso_tangent=True applies to the cosine IsoLoss only: set method_kwargs.iso=True "
        "and method_kwargs.use_l2=False",
    )
    opt = cfg.optimizer
    require(int(opt.batch_size) >= 2, f"optimizer.batch_size must be >= 2, got {opt.batch_size}")
    for key in ("lr", "classifier_lr", "weight_decay"):
        value = _number(cfg, f"optimizer.{key}")
        require(value >= 0, f"optimizer.{key} must be >= 0, got {value}")
    require(isinstance(opt.kwargs, DictConfig), "optimizer.kwargs must be a mapping")
    check_optimizer(str(opt.name), opt.kwargs)
    require(
        opt.get("lr_scaling", "linear") in LR_SCALINGS,
        f"optimizer.lr_scaling '{opt.get('lr_scaling')}' is not supported; choose one of {list(LR_SCALINGS)}",
    )
    require(int(cfg.max_epochs) >= 1, f"max_epochs must be >= 1, got {cfg.max_epochs}")
    check_schedule_section(cfg.scheduler, int(cfg.max_epochs))
    require(
        str(cfg.precision) in PRECISIONS,
        f"precision '{cfg.precision}' is not supported; choose one of {sorted(set(PRECISIONS))}",
    )
    require(int(cfg.accumulate_grad_batches) >= 1, "accumulate_grad_batches must be >= 1")
    check_data_format(cfg.data)
    require(isinstance(cfg.get("augmentations"), ListConfig), "the config has no augmentations list")
    workers = _whole_number(cfg, "data.num_workers")
    require(workers >= 0, f"data.num_workers must be >= 0 (0: load in the main process), got {workers}")
    fraction = _number(cfg, "data.fraction")
    all_images = " (solo-learn's -1, all images, is 1.0 here)" if fraction == -1 else ""
    require(0 < fraction <= 1, f"data.fraction must be in (0, 1], got {fraction}{all_images}")
    check_normalisation(*(plain_value(cfg.data.get(key)) for key in ("mean", "std")))
    draw = cfg.data.get("fraction_draw")
    require(draw in FRACTION_DRAWS, f"data.fraction_draw must be one of {list(FRACTION_DRAWS)}, got {draw!r}")
    frequency = _whole_number(cfg, "checkpoint.frequency")
    require(frequency >= 1, f"checkpoint.frequency must be >= 1 (epochs), got {frequency}")
    keep = _whole_number(cfg, "checkpoint.keep_every_n_epochs")
    require(keep >= 0, f"checkpoint.keep_every_n_epochs must be >= 0 (0: keep none), got {keep}")
    switches = [f"performance.{key}" for key in ("channels_last", "compile_augmentation", "batch_views")]
    for key in [*switches, "checkpoint.async_write", "method_kwargs.eigh_on_host"]:
        value = OmegaConf.select(cfg, key, default="auto")
        require(isinstance(value, bool) or value == "auto", f"{key} must be auto, True or False, got {value!r}")
    mode = cfg.performance.get("compile_mode", "default")
    require(mode in COMPILE_MODES, f"performance.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    scope = cfg.performance.get("compile_scope", "modules")
    require(
        scope in COMPILE_SCOPES, f"performance.compile_scope must be one of {', '.join(COMPILE_SCOPES)}, got {scope!r}"
    )


def method_label(cfg: Mapping) -> str:
    """The name a results table gives this configuration, e.g. 'SimSiam' or 'IsoLoss (no EMA)'."""
    mk = cfg["method_kwargs"]
    ema = uses_ema(cfg)
    if cfg["method"] == "byol":
        label = "BYOL" if ema else "SimSiam"
        suffix = ""
    else:
        alpha, eps = float(mk["dp_alpha"]), float(mk["eps_iso"])
        if alpha == 1.0 and eps > 0:
            core = "DirectCopy"
        elif alpha == 0.5 and eps == 0:
            core = "DirectPred"
        else:
            core = f"DirectPred(alpha={alpha:g}, eps={eps:g})"
        if mk["iso"]:
            label = "IsoLoss" if core == "DirectPred" else f"IsoLoss-{core}"
        else:
            label = core
        suffix = "" if ema else " (no EMA)"
    if mk["use_l2"]:
        label += " L2"
    return label + suffix


def to_container(cfg: DictConfig) -> dict:
    """A plain, resolved dict (what checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def compose(config_path: str, config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a config file with Hydra overrides, as ``main_pretrain.py`` would (for scripts,
    notebooks and tests that do not go through the command line)."""
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_path).resolve()), version_base="1.2"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))
