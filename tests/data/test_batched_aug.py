"""The batched augmentation against torchvision: parameter distributions, op outputs with
given parameters, whole-pipeline statistics, determinism, shapes and input checks.

Statistical tolerances are 5 standard errors computed from the samples (two-sample where
both sides are sampled); KS tests use the asymptotic critical value at alpha = 1e-6. All
random draws are seeded, so the tests are deterministic.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ivreg.data import batched_aug as ba
from ivreg.data.augment import BLUR_KERNEL, ViewSpec, build_view_transform, load_view_specs

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
BICUBIC = v2.InterpolationMode.BICUBIC
Z = 5.0  # standard errors allowed for sampled statistics
KS_ALPHA = 1e-6


CIFAR_SPECS = load_view_specs(
    Path(__file__).resolve().parents[2] / "scripts/pretrain/cifar/augmentations/asymmetric.yaml"
)
# Every op switched on, with probabilities away from 0 and 1.
FULL_SPEC = ViewSpec(
    crop_size=24,
    color_jitter_prob=0.8,
    brightness=0.4,
    contrast=0.4,
    saturation=0.4,
    hue=0.1,
    grayscale_prob=0.3,
    blur_prob=0.4,
    solarization_prob=0.3,
    equalization_prob=0.25,
    horizontal_flip_prob=0.5,
)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Per-image torchvision calls are much slower with intra-op threads on a busy 2-core
    machine; one thread keeps the file fast and does not change any result."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- helpers


def tv_params(transform: v2.Transform, inputs: list) -> dict:
    """``make_params`` of a v2 transform (``_get_params`` before torchvision 0.21)."""
    make = getattr(transform, "make_params", None) or transform._get_params
    return make(inputs)


def assert_same_mean(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.double(), b.double()
    se = math.sqrt(a.var().item() / a.numel() + b.var().item() / b.numel())
    diff = abs(a.mean().item() - b.mean().item())
    assert diff <= Z * se + 1e-12, f"{what}: means {a.mean():.5f} vs {b.mean():.5f}, diff {diff:.2e} > {Z}*{se:.2e}"


def _std_se(x: torch.Tensor) -> float:
    # Delta method: Var(s) ~ (mu4 - sigma^4) / (4 n sigma^2).
    centred = x - x.mean()
    var = centred.pow(2).mean().item()
    mu4 = centred.pow(4).mean().item()
    return math.sqrt(max(mu4 - var**2, 0.0) / (4 * x.numel() * max(var, 1e-300)))


def assert_same_std(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.double(), b.double()
    se = math.sqrt(_std_se(a) ** 2 + _std_se(b) ** 2)
    diff = abs(a.std().item() - b.std().item())
    assert diff <= Z * se + 1e-12, f"{what}: stds {a.std():.5f} vs {b.std():.5f}, diff {diff:.2e} > {Z}*{se:.2e}"


def assert_same_distribution(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Two-sample Kolmogorov-Smirnov test plus mean and spread within 5 SE."""
    a, b = a.double().flatten(), b.double().flatten()
    n, m = a.numel(), b.numel()
    grid = torch.cat([a, b]).unique()
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True).double() / n
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True).double() / m
    stat = (cdf_a - cdf_b).abs().max().item()
    critical = math.sqrt(-math.log(KS_ALPHA / 2) / 2) * math.sqrt((n + m) / (n * m))
    assert stat <= critical, f"{what}: KS statistic {stat:.4f} > {critical:.4f}"
    assert_same_mean(a, b, what)
    assert_same_std(a, b, what)


def assert_rate(hits: torch.Tensor, p: float, what: str, other: torch.Tensor | None = None) -> None:
    """Bernoulli rate within 5 SE of p (and of torchvision's empirical rate, if given)."""
    n = hits.numel()
    rate = hits.double().mean().item()
    se = math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) <= Z * se + 1e-12, f"{what}: rate {rate:.4f} vs p={p} (SE {se:.4f})"
    if other is not None:
        m = other.numel()
        other_rate = other.double().mean().item()
        se2 = math.sqrt(p * (1 - p) * (1 / n + 1 / m))
        assert abs(rate - other_rate) <= Z * se2 + 1e-12, f"{what}: {rate:.4f} vs torchvision {other_rate:.4f}"


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Colourful uint8 images with structure at several scales (so crops differ)."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=(size, size), mode="bilinear")
    fine = torch.rand(n, 3, size, size, generator=g)
    return ((0.8 * coarse + 0.2 * fine) * 255).round().to(torch.uint8)


def random_float_images(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Floats in [0, 1]; half of them on a coarse grid so channel ties (grey pixels, equal
    maxima) occur, which exercises the RGB -> HSV tie-breaking."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, height, width, generator=g)
    coarse = torch.randint(0, 5, (n, 3, height, width), generator=g).float() / 4
    return torch.where(torch.arange(n).view(-1, 1, 1, 1) % 2 == 0, x, coarse)


# --------------------------------------------------------------------------- parameter distributions


@pytest.mark.parametrize(
    ("height", "width", "scale"),
    [(32, 32, (0.08, 1.0)), (20, 64, (0.3, 1.0))],  # the second often exhausts attempts
    ids=["cifar", "wide-with-fallbacks"],
)
def test_crop_distribution_matches_torchvision(height: int, width: int, scale: tuple[float, float]) -> None:
    spec = ViewSpec(crop_size=32, crop_min_scale=scale[0], crop_max_scale=scale[1])
    ours = ba.BatchedViewAugment(spec, CIFAR_MEAN, CIFAR_STD).sample_params(
        20000, height, width, generator=torch.Generator().manual_seed(0)
    )["crop"]
    rrc = v2.RandomResizedCrop(32, scale=scale, ratio=spec.ratio)
    image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
    torch.manual_seed(1)
    theirs = torch.tensor(
        [[p["top"], p["left"], p["height"], p["width"]] for p in (tv_params(rrc, [image]) for _ in range(8000))]
    )
    assert (ours[:, 2] >= 1).all() and (ours[:, 3] >= 1).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    for name, fn in [
        ("area fraction", lambda c: c[:, 2] * c[:, 3] / (height * width)),
        ("log aspect ratio", lambda c: torch.log(c[:, 3] / c[:, 2])),
        ("top", lambda c: c[:, 0].double()),
        ("left", lambda c: c[:, 1].double()),
    ]:
        assert_same_distribution(fn(ours.double()), fn(theirs.double()), name)


@pytest.mark.parametrize(("height", "width"), [(10, 100), (100, 10), (12, 12)])
def test_crop_fallback_is_torchvisions_centre_crop(height: int, width: int) -> None:
    # Every attempt fails (area fraction near 1 of an extreme image, or scale range that
    # makes w or h exceed the side): all samples take the deterministic fallback.
    scale = (0.95, 1.0) if height != width else (1.0, 1.0)
    ratio = (3 / 4, 4 / 3) if height != width else (2.0, 3.0)
    spec = ViewSpec(crop_size=8, crop_min_scale=scale[0], crop_max_scale=scale[1], ratio=ratio)
    ours = ba.BatchedViewAugment(spec, CIFAR_MEAN, CIFAR_STD).sample_params(
        500, height, width, generator=torch.Generator().manual_seed(0)
    )["crop"]
    rrc = v2.RandomResizedCrop(8, scale=scale, ratio=ratio)
    p = tv_params(rrc, [tv_tensors.Image(torch.zeros(3, height, width))])
    expected = torch.tensor([p["top"], p["left"], p["height"], p["width"]])
    assert (ours == expected).all(), (ours[:3], expected)


def test_jitter_factors_and_order_match_torchvision() -> None:
    spec = CIFAR_SPECS[0]
    ours = ba.BatchedViewAugment(spec, CIFAR_MEAN, CIFAR_STD).sample_params(
        20000, 32, 32, generator=torch.Generator().manual_seed(0)
    )
    jitter = v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    torch.manual_seed(2)
    draws = [tv_params(jitter, []) for _ in range(10000)]
    for name, key in [
        ("brightness", "brightness_factor"),
        ("contrast", "contrast_factor"),
        ("saturation", "saturation_factor"),
        ("hue", "hue_factor"),
    ]:
        theirs = torch.tensor([d[key] for d in draws])
        lo, hi = (1 - getattr(spec, name), 1 + getattr(spec, name)) if name != "hue" else (-spec.hue, spec.hue)
        assert ours[name].min() >= lo and ours[name].max() <= hi
        assert_same_distribution(ours[name], theirs, name)
    # The order is a uniformly random permutation per sample, as torchvision's randperm(4).
    perms = list(itertools.permutations(range(4)))
    index = {p: i for i, p in enumerate(perms)}
    ours_perm = torch.tensor([index[tuple(row)] for row in ours["jitter_order"].tolist()])
    theirs_perm = torch.tensor([index[tuple(d["fn_idx"].tolist())] for d in draws])
    for k in range(len(perms)):
        assert_rate(ours_perm == k, 1 / 24, f"permutation {perms[k]}", other=theirs_perm == k)


def test_blur_sigma_matches_torchvision() -> None:
    ours = ba.BatchedViewAugment(FULL_SPEC, CIFAR_MEAN, CIFAR_STD).sample_params(
        20000, 32, 32, generator=torch.Generator().manual_seed(0)
    )["blur_sigma"]
    blur = v2.GaussianBlur(BLUR_KERNEL, sigma=FULL_SPEC.blur_sigma)
    torch.manual_seed(3)
    theirs = torch.tensor([tv_params(blur, [])["sigma"][0] for _ in range(10000)])
    assert ours.min() >= 0.1 and ours.max() <= 2.0
    assert_same_distribution(ours, theirs, "blur sigma")


def _tv_hits(transform: v2.Transform, image: torch.Tensor, n: int) -> torch.Tensor:
    """Whether torchvision's random transform changed the image, over n calls."""
    return torch.tensor([not torch.equal(transform(image), image) for _ in range(n)])


def test_apply_probabilities_match_torchvision() -> None:
    spec = FULL_SPEC
    ours = ba.BatchedViewAugment(spec, CIFAR_MEAN, CIFAR_STD).sample_params(
        20000, 32, 32, generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(4)
    colourful = tv_tensors.Image(smooth_images(1, 8, seed=0)[0])
    n = 3000
    theirs = {
        "flip": _tv_hits(v2.RandomHorizontalFlip(spec.horizontal_flip_prob), colourful, n),
        "jitter": _tv_hits(
            v2.RandomApply([v2.ColorJitter(brightness=(0.5, 0.5))], spec.color_jitter_prob), colourful, n
        ),
        "grayscale": _tv_hits(v2.RandomGrayscale(spec.grayscale_prob), colourful, n),
        "blur": _tv_hits(
            v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=(1.0, 2.0))], spec.blur_prob), colourful, n
        ),
        "solarize": _tv_hits(v2.RandomSolarize(128, spec.solarization_prob), colourful.new_full((3, 8, 8), 255), n),
        # Equalize leaves images with fewer than 256 non-max pixels alone: use a bigger one.
        "equalize": _tv_hits(
            v2.RandomEqualize(spec.equalization_prob), tv_tensors.Image(smooth_images(1, 32, 0)[0]), n
        ),
    }
    probs = {
        "flip": spec.horizontal_flip_prob,
        "jitter": spec.color_jitter_prob,
        "grayscale": spec.grayscale_prob,
        "blur": spec.blur_prob,
        "solarize": spec.solarization_prob,
        "equalize": spec.equalization_prob,
    }
    for key, p in probs.items():
        assert ours[key].dtype == torch.bool
        assert_rate(ours[key], p, key, other=theirs[key])
    # Independent draws: every pair of masks applies together with probability p1 * p2.
    for (key1, p1), (key2, p2) in itertools.combinations(probs.items(), 2):
        assert_rate(ours[key1] & ours[key2], p1 * p2, f"{key1} and {key2}")


def test_disabled_ops_never_apply() -> None:
    spec = ViewSpec(
        crop_size=8,
        color_jitter_prob=0.0,
        grayscale_prob=0.0,
        horizontal_flip_prob=0.0,
    )
    params = ba.BatchedViewAugment(spec, CIFAR_MEAN, CIFAR_STD).sample_params(1000, 8, 8)
    for key in ("flip", "jitter", "grayscale", "blur", "solarize", "equalize"):
        assert not params[key].any(), key


# --------------------------------------------------------------------------- ops with given parameters


@pytest.mark.parametrize(
    ("name", "ours", "theirs", "factors"),
    [
        ("brightness", ba.adjust_brightness, TF.adjust_brightness, [0.0, 0.6, 1.0, 1.4, 2.5, 0.9]),
        ("contrast", ba.adjust_contrast, TF.adjust_contrast, [0.0, 0.6, 1.0, 1.4, 2.5, 0.9]),
        ("saturation", ba.adjust_saturation, TF.adjust_saturation, [0.0, 0.6, 1.0, 1.4, 2.5, 0.9]),
        ("hue", ba.adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.05, 0.37, 0.5]),
    ],
)
def test_colour_ops_match_torchvision(name: str, ours, theirs, factors: list[float]) -> None:
    images = random_float_images(len(factors), 16, 20, seed=5)
    out = ours(images, torch.tensor(factors))
    expected = torch.stack([theirs(img, f) for img, f in zip(images, factors)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5, msg=name)


def test_grayscale_matches_torchvision() -> None:
    images = random_float_images(4, 9, 13, seed=6)
    out = ba.rgb_to_grayscale(images).expand_as(images)
    torch.testing.assert_close(out, TF.rgb_to_grayscale(images, num_output_channels=3), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (20, 28)])
def test_gaussian_blur_matches_torchvision(height: int, width: int) -> None:
    sigmas = [0.1, 0.5, 1.0, 1.7, 2.0]
    images = random_float_images(len(sigmas), height, width, seed=7)
    out = ba.gaussian_blur(images, torch.tensor(sigmas))
    expected = torch.stack([TF.gaussian_blur(img, [BLUR_KERNEL] * 2, [s, s]) for img, s in zip(images, sigmas)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_solarize_matches_torchvision_on_uint8_levels() -> None:
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    x = u8.float() / 255
    out = ba.solarize(x, 128 / 255, torch.tensor([True, False]))
    torch.testing.assert_close(out[0], TF.solarize(u8[0], 128).float() / 255, rtol=0, atol=1e-6)
    assert torch.equal(out[1], x[1])
    torch.testing.assert_close(out[0], TF.solarize(x[0], 128 / 255), rtol=0, atol=0)


def test_equalize_matches_torchvision_uint8() -> None:
    u8 = smooth_images(3, 16, seed=8)
    u8[2] = u8[2] // 64 + 100  # few levels, not the full range
    out = ba.equalize(u8.float() / 255)
    torch.testing.assert_close(out, TF.equalize(u8).float() / 255, rtol=0, atol=1e-6)


def _reference_resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor, mode):
    out = []
    for img, (top, left, h, w), f in zip(images, boxes.tolist(), flip.tolist()):
        r = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=mode, antialias=True)
        out.append(TF.horizontal_flip(r) if f else r)
    return torch.stack(out)


BOXES = torch.tensor(
    [
        [0, 0, 40, 50],  # whole image, downscale
        [3, 4, 10, 12],  # small crop, upscale
        [5, 5, 35, 20],  # mixed: down vertically, up horizontally
        [0, 10, 24, 24],  # exactly the output size: identity
        [1, 2, 3, 4],
        [39, 49, 1, 1],  # one pixel
    ]
)


@pytest.mark.parametrize(("mode", "name"), [(BICUBIC, "bicubic"), (v2.InterpolationMode.BILINEAR, "bilinear")])
def test_resized_crop_matches_torchvision_float(mode, name: str) -> None:
    images = random_float_images(len(BOXES), 40, 50, seed=9)
    flip = torch.tensor([False, True, True, False, True, False])
    out = ba.resized_crop(images, BOXES, 24, flip=flip, interpolation=name)
    expected = _reference_resized_crop(images, BOXES, 24, flip, mode)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_resized_crop_matches_torchvision_uint8_pipeline() -> None:
    # The per-image pipeline resizes the uint8 image with PyTorch's fixed-point uint8
    # kernel, which rounds and clamps to uint8 between its horizontal and vertical passes;
    # ours stays float. On smooth images: within 1.5 levels everywhere. At sharp edges the
    # clamp between passes clips bicubic overshoot: on real CIFAR crops (32 -> 32) up to
    # 7 levels on 0.03% of pixels, unbiased (mean -0.001 levels).
    u8 = smooth_images(len(BOXES), 50, seed=10)[:, :, :40, :50].contiguous()
    flip = torch.zeros(len(BOXES), dtype=torch.bool)
    out = ba.resized_crop(u8, BOXES, 24, flip=flip, value_scale=1 / 255).clamp(0, 1)
    expected = _reference_resized_crop(u8, BOXES, 24, flip, BICUBIC).float() / 255
    assert (out - expected).abs().max() <= 1.5 / 255
    assert (out - expected).abs().mean() <= 0.5 / 255


def test_apply_params_matches_torchvision_composition() -> None:
    """Whole view with given per-sample parameters == torchvision's functional ops applied
    image by image in the pipeline's order (jitter in each sample's own order)."""
    spec = FULL_SPEC
    aug = ba.BatchedViewAugment(spec, CIFAR_MEAN, CIFAR_STD)
    u8 = smooth_images(48, 32, seed=11)
    params = aug.sample_params(48, 32, 32, generator=torch.Generator().manual_seed(12))
    # Solarize and equalize compare to thresholds / histogram bins, where float rounding
    # differences of 1e-7 may flip a decision; they have their own tests above.
    params["solarize"][:] = False
    params["equalize"][:] = False
    assert params["jitter"].any() and params["grayscale"].any() and params["blur"].any() and params["flip"].any()
    out = aug.apply_params(u8, params)

    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    expected = []
    for i in range(48):
        top, left, h, w = params["crop"][i].tolist()
        x = TF.resized_crop(u8[i].float() / 255, top, left, h, w, [24, 24], interpolation=BICUBIC, antialias=True)
        x = x.clamp(0, 1)
        if params["jitter"][i]:
            for op in params["jitter_order"][i].tolist():
                x = fns[op](x, params[names[op]][i].item())
        if params["grayscale"][i]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if params["blur"][i]:
            sigma = params["blur_sigma"][i].item()
            x = TF.gaussian_blur(x, [BLUR_KERNEL] * 2, [sigma, sigma])
        if params["flip"][i]:
            x = TF.horizontal_flip(x)
        expected.append(TF.normalize(x, list(CIFAR_MEAN), list(CIFAR_STD)))
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=1e-4)


def test_solarize_and_equalize_in_pipeline_match_torchvision_uint8() -> None:
    # Without resize or colour jitter the values stay on uint8 levels, so the batched
    # solarize -> equalize equals torchvision's uint8 ops exactly.
    spec = ViewSpec(
        crop_size=16,
        color_jitter_prob=0.0,
        grayscale_prob=0.0,
        solarization_prob=0.5,
        equalization_prob=0.5,
        horizontal_flip_prob=0.0,
    )
    aug = ba.BatchedViewAugment(spec, CIFAR_MEAN, CIFAR_STD)
    u8 = smooth_images(64, 16, seed=13)
    params = aug.sample_params(64, 16, 16, generator=torch.Generator().manual_seed(14))
    assert (params["solarize"] & params["equalize"]).any() and not params["solarize"].all()
    out = aug.apply_params(u8, params, geometric=False)
    expected = []
    for i in range(64):
        x = u8[i]
        if params["solarize"][i]:
            x = TF.solarize(x, 128)
        if params["equalize"][i]:
            x = TF.equalize(x)
        expected.append(TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(CIFAR_MEAN), list(CIFAR_STD)))
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=1e-5)


def test_jitter_not_applied_is_exact_identity() -> None:
    images = random_float_images(6, 8, 8, seed=15)
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.1]]).expand(6, 4)
    order = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i)) for i in range(6)])
    out = ba.color_jitter(images, factors, order, torch.zeros(6, dtype=torch.bool))
    assert torch.equal(out, images)
    applied = ba.color_jitter(images, factors, order, torch.ones(6, dtype=torch.bool))
    assert (applied - images).abs().amax(dim=(1, 2, 3)).min() > 1e-3


# --------------------------------------------------------------------------- whole pipeline statistics


def _view_statistics(views: torch.Tensor) -> dict[str, torch.Tensor]:
    grey = views.mean(dim=1, keepdim=True)
    return {
        "mean intensity": views.mean(dim=(1, 2, 3)),
        "spatial std": views.std(dim=(2, 3)).mean(dim=1),
        "chroma": (views - grey).abs().mean(dim=(1, 2, 3)),
        "left-right balance": (views[..., : views.shape[-1] // 2].mean(dim=(1, 2, 3)))
        - views[..., views.shape[-1] // 2 :].mean(dim=(1, 2, 3)),
    }


@pytest.mark.parametrize("spec", [CIFAR_SPECS[1], FULL_SPEC], ids=["cifar-view2", "all-ops"])
def test_pipeline_statistics_match_build_view_transform(spec: ViewSpec) -> None:
    """Many views of one image from each pipeline: the per-view statistics agree in mean
    and spread. (The per-image pipeline rounds to uint8 after each op; at this sample
    size that bias is well inside the tolerance.)"""
    source = smooth_images(1, 32, seed=16)[0]
    n = 2500
    torch.manual_seed(17)
    per_image = build_view_transform(spec, CIFAR_MEAN, CIFAR_STD)
    theirs = torch.stack([per_image(source) for _ in range(n)])
    aug = ba.BatchedViewAugment(spec, CIFAR_MEAN, CIFAR_STD)
    ours = aug(source.expand(4 * n, 3, 32, 32), generator=torch.Generator().manual_seed(18))
    assert ours.shape == (4 * n, 3, spec.crop_size, spec.crop_size)
    ours_stats, theirs_stats = _view_statistics(ours), _view_statistics(theirs)
    for key in ours_stats:
        assert_same_mean(ours_stats[key], theirs_stats[key], key)
        assert_same_std(ours_stats[key], theirs_stats[key], key)


# --------------------------------------------------------------------------- behaviour


def test_shapes_dtypes_and_multiview() -> None:
    specs = [*CIFAR_SPECS, ViewSpec(crop_size=16)]
    views = ba.build_batched_views(specs, CIFAR_MEAN, CIFAR_STD)
    out = views(smooth_images(5, 32, seed=19))
    assert isinstance(out, list) and len(out) == 3
    assert [tuple(v.shape) for v in out] == [(5, 3, 32, 32), (5, 3, 32, 32), (5, 3, 16, 16)]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out)
    # Normalised [0, 1] inputs stay within the normalised range.
    lo = min((0 - m) / s for m, s in zip(CIFAR_MEAN, CIFAR_STD))
    hi = max((1 - m) / s for m, s in zip(CIFAR_MEAN, CIFAR_STD))
    assert all(v.min() >= lo - 1e-5 and v.max() <= hi + 1e-5 for v in out)
    empty = views(torch.zeros(0, 3, 32, 32, dtype=torch.uint8))
    assert [tuple(v.shape) for v in empty] == [(0, 3, 32, 32), (0, 3, 32, 32), (0, 3, 16, 16)]


def test_rrc_disabled_is_a_bilinear_resize_of_the_whole_image() -> None:
    spec = ViewSpec(crop_size=16, rrc=False, color_jitter_prob=0.0, grayscale_prob=0.0, horizontal_flip_prob=0.0)
    u8 = smooth_images(3, 40, seed=20)
    out = ba.BatchedViewAugment(spec, CIFAR_MEAN, CIFAR_STD)(u8)
    expected = torch.stack([build_view_transform(spec, CIFAR_MEAN, CIFAR_STD)(img) for img in u8])
    # The per-image pipeline resizes in uint8 (see the test above): 1.5 levels, normalised.
    assert (out - expected).abs().max() <= 1.5 / 255 / min(CIFAR_STD)


def test_geometric_false_runs_only_photometric_ops() -> None:
    u8 = smooth_images(4, 24, seed=21)
    plain = ViewSpec(crop_size=24, color_jitter_prob=0.0, grayscale_prob=0.0, horizontal_flip_prob=1.0)
    out = ba.BatchedViewAugment(plain, CIFAR_MEAN, CIFAR_STD)(u8, geometric=False)
    # No crop and no flip (although flip has p = 1): just ToDtype + Normalize.
    expected = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN, CIFAR_STD)])(u8)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    gray = ViewSpec(crop_size=24, color_jitter_prob=0.0, grayscale_prob=1.0)
    out = ba.BatchedViewAugment(gray, (0.5,) * 3, (0.5,) * 3)(u8, geometric=False)
    assert out.shape == (4, 3, 24, 24)
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="already cropped"):
        ba.BatchedViewAugment(gray, CIFAR_MEAN, CIFAR_STD)(smooth_images(2, 32, seed=0), geometric=False)


def test_same_seed_same_views_and_different_seeds_differ() -> None:
    views = ba.build_batched_views(CIFAR_SPECS, CIFAR_MEAN, CIFAR_STD)
    u8 = smooth_images(8, 32, seed=22)
    a = views(u8, generator=torch.Generator().manual_seed(0))
    b = views(u8, generator=torch.Generator().manual_seed(0))
    c = views(u8, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # The global RNG is used without a generator, and is seedable too.
    torch.manual_seed(3)
    d = views(u8)
    torch.manual_seed(3)
    assert all(torch.equal(x, y) for x, y in zip(d, views(u8)))


def test_copies_of_one_image_get_different_views() -> None:
    aug = ba.BatchedViewAugment(CIFAR_SPECS[1], CIFAR_MEAN, CIFAR_STD)
    u8 = smooth_images(1, 32, seed=23).expand(16, 3, 32, 32)
    out = aug(u8, generator=torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    distinct = {tuple(row) for row in flat[:, ::97].tolist()}
    assert len(distinct) == 16
    params = aug.sample_params(16, 32, 32, generator=torch.Generator().manual_seed(0))
    assert len({tuple(c) for c in params["crop"].tolist()}) > 8


def test_channels_last_and_non_contiguous_inputs() -> None:
    aug = ba.BatchedViewAugment(FULL_SPEC, CIFAR_MEAN, CIFAR_STD)
    u8 = smooth_images(6, 32, seed=24)
    reference = aug(u8, generator=torch.Generator().manual_seed(0))
    channels_last = u8.to(memory_format=torch.channels_last)
    hwc_view = u8.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # NHWC storage, a view
    strided = torch.zeros(6, 3, 32, 64, dtype=torch.uint8)
    strided[..., ::2] = u8
    for variant in (channels_last, hwc_view, strided[..., ::2]):
        out = aug(variant, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    cropped = ba.BatchedViewAugment(ViewSpec(crop_size=32, blur_prob=0.5), CIFAR_MEAN, CIFAR_STD)
    a = cropped(channels_last, generator=torch.Generator().manual_seed(1), geometric=False)
    b = cropped(u8, generator=torch.Generator().manual_seed(1), geometric=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(2, 3, 32, 32), "uint8"),
        (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), r"\(B, 3, H, W\)"),
        (torch.zeros(2, 4, 32, 32, dtype=torch.uint8), r"\(B, 3, H, W\)"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), r"\(B, 3, H, W\)"),
        ([[0]], "tensor"),
    ],
    ids=["float", "one-channel", "four-channels", "unbatched", "not-a-tensor"],
)
def test_bad_inputs_raise_value_error(images, message: str) -> None:
    aug = ba.BatchedViewAugment(CIFAR_SPECS[0], CIFAR_MEAN, CIFAR_STD)
    with pytest.raises(ValueError, match=message):
        aug(images)


def test_linear_evaluation_view_is_a_bilinear_crop_and_flip_like_torchvision() -> None:
    """The linear evaluation's training view: RandomResizedCrop with torchvision's default
    (bilinear) resampling and a flip, no colour ops."""
    spec = ViewSpec(crop_size=24, color_jitter_prob=0.0, grayscale_prob=0.0, rrc_interpolation="bilinear")
    aug = ba.BatchedViewAugment(spec, CIFAR_MEAN, CIFAR_STD)
    u8 = smooth_images(16, 32, seed=3)
    params = aug.sample_params(16, 32, 32, generator=torch.Generator().manual_seed(4))
    assert params["flip"].any() and not params["flip"].all()
    expected = []
    for i in range(16):
        top, left, h, w = params["crop"][i].tolist()
        x = TF.resized_crop(u8[i].float() / 255, top, left, h, w, [24, 24], antialias=True)  # bilinear
        x = TF.horizontal_flip(x.clamp(0, 1)) if params["flip"][i] else x.clamp(0, 1)
        expected.append(TF.normalize(x, list(CIFAR_MEAN), list(CIFAR_STD)))
    torch.testing.assert_close(aug.apply_params(u8, params), torch.stack(expected), rtol=0, atol=1e-4)
    per_image = build_view_transform(spec, CIFAR_MEAN, CIFAR_STD).transforms[1]
    assert per_image.interpolation == v2.InterpolationMode.BILINEAR


def test_bad_construction_raises_value_error() -> None:
    with pytest.raises(ValueError, match="mean and std"):
        ba.BatchedViewAugment(CIFAR_SPECS[0], (0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="too small"):
        ba.BatchedViewAugment(ViewSpec(crop_size=5, blur_prob=0.5), CIFAR_MEAN, CIFAR_STD)
    with pytest.raises(ValueError, match="rrc_interpolation must be bicubic or bilinear"):
        ba.BatchedViewAugment(ViewSpec(crop_size=24, rrc_interpolation="nearest"), CIFAR_MEAN, CIFAR_STD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_the_same_parameters() -> None:
    aug = ba.BatchedViewAugment(FULL_SPEC, CIFAR_MEAN, CIFAR_STD)
    u8 = smooth_images(64, 32, seed=25)
    params = aug.sample_params(64, 32, 32, generator=torch.Generator().manual_seed(0))
    params["solarize"][:] = False  # threshold decisions may flip on 1e-7 differences
    params["equalize"][:] = False
    cpu = aug.apply_params(u8, params)
    cuda = aug.to("cuda").apply_params(u8.cuda(), {k: v.cuda() for k, v in params.items()})
    # TF32 (if enabled) in the resize matmuls and blur convolutions: ~1e-3 relative.
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=2e-2)
    generated = aug(u8.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))
    assert generated.device.type == "cuda" and generated.shape == (64, 3, 24, 24)


def test_compiled_ops_match_the_eager_ops() -> None:
    """torch.compile changes float rounding only: the same draws give the same views, except
    where a threshold decision (solarize, equalize's uint8 rounding) flips on a 1e-6
    difference."""
    eager = ba.BatchedViewAugment(FULL_SPEC, CIFAR_MEAN, CIFAR_STD)
    compiled = ba.BatchedViewAugment(FULL_SPEC, CIFAR_MEAN, CIFAR_STD)
    compiled.compile_ops()
    u8 = smooth_images(32, 32, seed=31)
    for geometric, images in ((True, u8), (False, u8[..., 4:28, 4:28])):
        a = eager(images, generator=torch.Generator().manual_seed(5), geometric=geometric)
        b = compiled(images, generator=torch.Generator().manual_seed(5), geometric=geometric)
        assert compiled.compiled, "the compiled path fell back to eager"
        assert a.shape == b.shape == (32, 3, 24, 24)
        off = (a - b).abs() > 1e-4
        assert off.float().mean() < 0.01, f"{off.float().mean():.4f} of the values differ"
        assert (a - b).abs().median() < 1e-6


def test_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.exc import InductorError

    def broken_compile(fn, **kwargs):  # noqa: ANN001, ANN202
        def run(*args):  # noqa: ANN002, ANN202
            raise InductorError(RuntimeError("no C++ compiler"), None)

        return run

    monkeypatch.setattr(ba.torch, "compile", broken_compile)
    aug = ba.BatchedViewAugment(CIFAR_SPECS[1], CIFAR_MEAN, CIFAR_STD)
    aug.compile_ops()
    u8 = smooth_images(8, 32, seed=3)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        out = aug(u8, generator=torch.Generator().manual_seed(2))
    assert not aug.compiled
    expected = ba.BatchedViewAugment(CIFAR_SPECS[1], CIFAR_MEAN, CIFAR_STD)(
        u8, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_an_error_of_the_compiled_ops_that_is_not_the_compilers_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory in a compiled call is the run's error, not a reason to drop compilation."""

    def out_of_memory_compile(fn, **kwargs):  # noqa: ANN001, ANN202
        def run(*args):  # noqa: ANN002, ANN202
            raise torch.OutOfMemoryError("CUDA out of memory")

        return run

    monkeypatch.setattr(ba.torch, "compile", out_of_memory_compile)
    aug = ba.BatchedViewAugment(CIFAR_SPECS[1], CIFAR_MEAN, CIFAR_STD)
    aug.compile_ops()
    with pytest.raises(torch.OutOfMemoryError):
        aug(smooth_images(8, 32, seed=3), generator=torch.Generator().manual_seed(2))
    assert aug.compiled
