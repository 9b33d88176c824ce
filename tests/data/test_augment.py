import pytest
import torch
from PIL import Image

from ivreg.config import compose
from ivreg.data.augment import (
    MultiViewTransform,
    build_eval_transform,
    build_view_transform,
    parse_view_specs,
)
from ivreg.errors import ConfigError

from ..conftest import CIFAR_CONFIGS


def _cifar_specs():
    cfg = compose(str(CIFAR_CONFIGS), "byol.yaml")
    return parse_view_specs(cfg.augmentations)


def test_asymmetric_cifar_views_follow_the_paper() -> None:
    v1, v2 = _cifar_specs()
    for v in (v1, v2):
        assert v.crop_size == 32 and (v.crop_min_scale, v.crop_max_scale) == (0.08, 1.0)
        assert (v.brightness, v.contrast, v.saturation, v.hue) == (0.4, 0.4, 0.2, 0.1)
        assert v.color_jitter_prob == 0.8 and v.grayscale_prob == 0.2 and v.horizontal_flip_prob == 0.5
        assert v.blur_prob == 0.0
    assert (v1.solarization_prob, v2.solarization_prob) == (0.0, 0.2)


def test_num_crops_expands_views() -> None:
    group = {"crop_size": 8, "num_crops": 3}
    assert len(parse_view_specs([group])) == 3


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ({"num_crops": 2}, "crop_size is missing"),
        ({"crop_size": 8, "num_crops": 2, "grayscale": {"prob": 1.5}}, "grayscale.prob must be a probability"),
        ({"crop_size": 8, "num_crops": 2, "rrc": {"crop_min_scale": 0.9, "crop_max_scale": 0.5}}, "crop_min_scale"),
        ({"crop_size": 8, "num_crops": 2, "color_jitter": {"hue": 0.7}}, "hue must be <= 0.5"),
        ({"crop_size": 8, "num_crops": 1}, "at least two views"),
    ],
)
def test_bad_augmentation_configs(group: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_view_specs([group])


def test_view_transform_outputs_normalised_float_views() -> None:
    specs = _cifar_specs()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    multi = MultiViewTransform([build_view_transform(s, mean, std) for s in specs])
    torch.manual_seed(0)
    image = Image.new("RGB", (40, 40), color=(128, 64, 200))
    views = multi(image)
    assert len(views) == 2
    for v in views:
        assert v.shape == (3, 32, 32) and v.dtype == torch.float32
        assert v.min() >= (0 - 0.5) / 0.25 - 1e-5 and v.max() <= (1 - 0.5) / 0.25 + 1e-5
    uint8 = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    assert build_view_transform(specs[0], mean, std)(uint8).shape == (3, 32, 32)


def test_eval_transform_is_deterministic_and_centre_crops() -> None:
    t = build_eval_transform(224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    image = Image.new("RGB", (300, 400), color=(255, 0, 0))
    a, b = t(image), t(image)
    assert a.shape == (3, 224, 224) and torch.equal(a, b)
    assert a[0].mean().item() == pytest.approx(1.0)
