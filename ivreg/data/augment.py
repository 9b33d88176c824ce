"""Per-view augmentation: the ``augmentations`` config parsed once into ``ViewSpec``s.

The config is the seed's list of view groups (``rrc``, ``color_jitter``, ``grayscale``,
``gaussian_blur``, ``solarization``, ``equalization``, ``horizontal_flip``, ``crop_size``,
``num_crops``). Both the per-image torchvision pipeline here and the batched pipeline in
``ivreg.data.batched_aug`` are built from the same ``ViewSpec`` so that they draw from
the same distributions.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import v2

from ivreg.errors import ConfigError

# Gaussian blur sigma range (SimCLR/BYOL convention, also solo-learn's) and the kernel
# that covers +-3 sigma of the largest sigma, as PIL's radius-based blur does.
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL = 13
SOLARIZE_THRESHOLD = 128  # on uint8 pixels, as PIL.ImageOps.solarize


@dataclass(frozen=True)
class ViewSpec:
    """Everything that defines the random distribution of one augmented view."""

    crop_size: int
    rrc: bool = True
    crop_min_scale: float = 0.08
    crop_max_scale: float = 1.0
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = BLUR_SIGMA
    solarization_prob: float = 0.0
    equalization_prob: float = 0.0
    horizontal_flip_prob: float = 0.5
    # the random resized crop's resampling: pretraining's bicubic, or torchvision's default
    # bilinear (the linear evaluation's crops)
    rrc_interpolation: str = "bicubic"


def load_view_specs(path: str | Path) -> list[ViewSpec]:
    """The views of an augmentations YAML file (e.g. ``scripts/pretrain/cifar/augmentations/
    asymmetric.yaml``), for code that does not compose a whole config."""
    from omegaconf import OmegaConf

    return parse_view_specs(OmegaConf.to_object(OmegaConf.load(path)))  # type: ignore[arg-type]


def _as(kind: type[int] | type[float], value: object, where: str) -> Any:
    """``value`` as an int or a float, or a ConfigError naming its key (``crop_size=abc``)."""
    what = "a whole number" if kind is int else "a number"
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{where} must be {what}, got {value!r}")
    try:
        return kind(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be {what}, got {value!r}") from None


def _prob(value: object, where: str) -> float:
    p = _as(float, value, where)
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{where} must be a probability in [0, 1], got {p}")
    return p


def _non_negative(value: object, where: str) -> float:
    x = _as(float, value, where)
    if x < 0:
        raise ConfigError(f"{where} must be >= 0, got {x}")
    return x


# The keys of a view group and of its sections (solo-learn's names). Anything else is refused:
# read with defaults, a misspelt key (``solarisation``, ``color_jitter.probability``) would
# silently switch its augmentation off.
VIEW_GROUP_KEYS: dict[str, frozenset[str]] = {
    "rrc": frozenset({"enabled", "crop_min_scale", "crop_max_scale"}),
    "color_jitter": frozenset({"prob", "brightness", "contrast", "saturation", "hue"}),
    "grayscale": frozenset({"prob"}),
    "gaussian_blur": frozenset({"prob"}),
    "solarization": frozenset({"prob"}),
    "equalization": frozenset({"prob"}),
    "horizontal_flip": frozenset({"prob"}),
}
VIEW_GROUP_SCALARS = frozenset({"crop_size", "num_crops"})
# solo-learn keys of a view group that ivreg reads elsewhere
VIEW_GROUP_ELSEWHERE = {"mean": "data.mean", "std": "data.std"}


def _refuse_unknown(
    keys: Iterable[Any], known: Iterable[str], where: str, elsewhere: Mapping[str, str] | None = None
) -> None:
    """ConfigError for the first key outside ``known``: the ivreg key ``elsewhere`` names for
    it, or the closest known one."""
    known = sorted(known)
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            if elsewhere and key in elsewhere:
                hint = f"the normalisation of every view is {elsewhere[key]} here; "
            raise ConfigError(f"unknown augmentation key {where}.{key}; {hint}known keys: {known}")


def check_view_group(group: Any, where: str) -> None:
    """ConfigError for a view group that is not a mapping, or that names a key the pipelines
    do not read."""
    if not isinstance(group, Mapping):
        raise ConfigError(f"{where} must be a mapping of augmentation sections, got {group!r}")
    _refuse_unknown(group, VIEW_GROUP_SCALARS | set(VIEW_GROUP_KEYS), where, VIEW_GROUP_ELSEWHERE)
    for section, known in VIEW_GROUP_KEYS.items():
        value = group.get(section)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}.{section} must be a mapping with keys {sorted(known)}, got {value!r}")
        _refuse_unknown(value, known, f"{where}.{section}")


def parse_view_specs(aug_cfg: Sequence[Mapping]) -> list[ViewSpec]:
    """Expand the config's view groups (each ``num_crops`` times) into one spec per view."""
    if not isinstance(aug_cfg, Sequence) or isinstance(aug_cfg, (str, bytes)) or not aug_cfg:
        raise ConfigError("augmentations must be a non-empty list of view groups")
    specs: list[ViewSpec] = []
    for i, group in enumerate(aug_cfg):
        where = f"augmentations[{i}]"
        check_view_group(group, where)
        if "crop_size" not in group:
            raise ConfigError(f"{where}.crop_size is missing")
        rrc = group.get("rrc", {}) or {}
        cj = group.get("color_jitter", {}) or {}
        lo = _as(float, rrc.get("crop_min_scale", 0.08), f"{where}.rrc.crop_min_scale")
        hi = _as(float, rrc.get("crop_max_scale", 1.0), f"{where}.rrc.crop_max_scale")
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{where}.rrc needs 0 < crop_min_scale <= crop_max_scale <= 1")
        hue = _non_negative(cj.get("hue", 0.0), f"{where}.color_jitter.hue")
        if hue > 0.5:
            raise ConfigError(f"{where}.color_jitter.hue must be <= 0.5, got {hue}")
        spec = ViewSpec(
            crop_size=_as(int, group["crop_size"], f"{where}.crop_size"),
            rrc=bool(rrc.get("enabled", True)),
            crop_min_scale=lo,
            crop_max_scale=hi,
            color_jitter_prob=_prob(cj.get("prob", 0.0), f"{where}.color_jitter.prob"),
            brightness=_non_negative(cj.get("brightness", 0.0), f"{where}.color_jitter.brightness"),
            contrast=_non_negative(cj.get("contrast", 0.0), f"{where}.color_jitter.contrast"),
            saturation=_non_negative(cj.get("saturation", 0.0), f"{where}.color_jitter.saturation"),
            hue=hue,
            grayscale_prob=_prob((group.get("grayscale") or {}).get("prob", 0.0), f"{where}.grayscale.prob"),
            blur_prob=_prob((group.get("gaussian_blur") or {}).get("prob", 0.0), f"{where}.gaussian_blur.prob"),
            solarization_prob=_prob((group.get("solarization") or {}).get("prob", 0.0), f"{where}.solarization.prob"),
            equalization_prob=_prob((group.get("equalization") or {}).get("prob", 0.0), f"{where}.equalization.prob"),
            horizontal_flip_prob=_prob(
                (group.get("horizontal_flip") or {}).get("prob", 0.0), f"{where}.horizontal_flip.prob"
            ),
        )
        if spec.crop_size < 1:
            raise ConfigError(f"{where}.crop_size must be positive, got {spec.crop_size}")
        num_crops = _as(int, group.get("num_crops", 1), f"{where}.num_crops")
        if num_crops < 1:
            raise ConfigError(f"{where}.num_crops must be >= 1, got {num_crops}")
        specs.extend([spec] * num_crops)
    if len(specs) < 2:
        raise ConfigError("augmentations must produce at least two views in total")
    large = specs[0].crop_size
    n_large = sum(spec.crop_size == large for spec in specs)
    if any(spec.crop_size != large for spec in specs[:n_large]):
        raise ConfigError(
            f"augmentations: the views of the first group's crop_size ({large}, the large crops, the only targets) "
            "must come first; list the groups of smaller crops after them"
        )
    return specs


def _random_apply(transform: v2.Transform, p: float) -> list[v2.Transform]:
    if p <= 0:
        return []
    return [transform if p >= 1 else v2.RandomApply([transform], p=p)]


def build_view_transform(spec: ViewSpec, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Per-image torchvision pipeline for one view: PIL or uint8 CHW in, normalised float out."""
    ops: list[v2.Transform] = [v2.ToImage(), _crop_op(spec)]
    jitter = v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    ops += _random_apply(jitter, spec.color_jitter_prob)
    if spec.grayscale_prob > 0:
        ops.append(v2.RandomGrayscale(p=spec.grayscale_prob))
    ops += _random_apply(v2.GaussianBlur(BLUR_KERNEL, sigma=spec.blur_sigma), spec.blur_prob)
    if spec.solarization_prob > 0:
        ops.append(v2.RandomSolarize(SOLARIZE_THRESHOLD, p=spec.solarization_prob))
    if spec.equalization_prob > 0:
        ops.append(v2.RandomEqualize(p=spec.equalization_prob))
    if spec.horizontal_flip_prob > 0:
        ops.append(v2.RandomHorizontalFlip(p=spec.horizontal_flip_prob))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def _crop_op(spec: ViewSpec) -> v2.Transform:
    if spec.rrc:
        return v2.RandomResizedCrop(
            spec.crop_size,
            scale=(spec.crop_min_scale, spec.crop_max_scale),
            ratio=spec.ratio,
            interpolation=v2.InterpolationMode(spec.rrc_interpolation),
            antialias=True,
        )
    return v2.Resize((spec.crop_size, spec.crop_size), antialias=True)


def build_geometric_transform(spec: ViewSpec) -> v2.Compose:
    """Only the crop and flip of a view, uint8 in and out: the CPU half of the ``hybrid``
    pipeline, whose colour ops then run batched on the device. Moving the flip before the
    colour ops keeps the distribution: every later op commutes with a horizontal flip."""
    ops: list[v2.Transform] = [v2.ToImage(), _crop_op(spec)]
    if spec.horizontal_flip_prob > 0:
        ops.append(v2.RandomHorizontalFlip(p=spec.horizontal_flip_prob))
    ops.append(v2.ToPureTensor())
    return v2.Compose(ops)


def eval_resize(crop_size: int) -> int:
    """The short side evaluation resizes images to before its centre crop: the crop itself
    for CIFAR-sized crops, 8/7 of it for ImageNet-sized ones (224 -> 256, as in ImageNet
    evaluation)."""
    return crop_size if crop_size < 128 else int(round(crop_size * 8 / 7))


def build_eval_transform(crop_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Deterministic evaluation pipeline: resize the short side (``eval_resize``),
    centre-crop, normalise."""
    ops: list[v2.Transform] = [v2.ToImage()]
    ops += [v2.Resize(eval_resize(crop_size), antialias=True), v2.CenterCrop(crop_size)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


class MultiViewTransform:
    """Applies one transform per view to the same image; returns the list of views."""

    def __init__(self, transforms: Sequence[v2.Compose]):
        self.transforms = list(transforms)

    def __call__(self, image: object) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]
