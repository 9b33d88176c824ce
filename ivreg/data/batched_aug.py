"""Batched, on-device augmentation with per-sample random parameters.

Draws from the same distributions as the per-image torchvision pipeline that
``ivreg.data.augment.build_view_transform`` builds from the same ``ViewSpec``, but
transforms a whole uint8 batch with a fixed number of tensor ops per augmentation (no
Python loop over images), so it can run on the GPU next to the model instead of in
DataLoader workers.

Library pieces and hand-written parts:

* ``torchvision.transforms.v2`` transforms called on a batched tensor draw ONE set of
  random parameters per call and apply it to every image of the batch (v2 treats leading
  dimensions as a batch of identical treatment), so they cannot give per-sample crops,
  jitter factors or blur sigmas. The parameter sampling is vectorised here, reproducing the
  ``make_params`` logic of ``RandomResizedCrop``, ``ColorJitter``, ``GaussianBlur`` and
  the ``RandomApply``/``Random*`` probabilities; the tests compare the distributions.
* torchvision's functional kernels take scalar parameters. ``equalize`` has none and is
  already batched (per image and channel histograms with ``scatter_add``), so it is used
  as it is. Brightness, contrast, saturation, hue and blur are written here per sample
  with torchvision's formulas for float images (blend then clamp, ITU-R 601-2 grey
  weights, Pillow's RGB -> HSV, the same Gaussian kernel and reflect padding); the tests
  compare them with ``torchvision.transforms.v2.functional``.
* kornia is not used: it is not installed on our GPU image, and its colour functions are
  not torchvision's (in ``kornia.enhance``, as read in its source: ``adjust_brightness`` is
  additive and documented as "aligns OpenCV, not PIL. Hence, the output differs from
  TorchVision", ``adjust_saturation`` scales S in HSV instead of blending with the grey
  image, ``adjust_hue`` takes radians), so it would need the same checking as these ops.

Resize: separable resampling as two batched matrix products. Per sample and axis, an
(out, in) matrix holds PyTorch's antialias filter (Keys cubic with a = -0.5 for bicubic,
the triangle for bilinear), stretched by the scale factor when downscaling, zero outside
the crop box and normalised per row. That is what ``interpolate(..., antialias=True)``
computes on the cropped image, i.e. what ``RandomResizedCrop(interpolation=BICUBIC,
antialias=True)`` does (with ``antialias=True`` PyTorch uses the a = -0.5 cubic also when
upscaling), so crop-then-resize is reproduced to float rounding, in both directions and
with the same border handling inside the crop. Rejected: ``F.grid_sample(mode="bicubic")``
(a = -0.75, no antialias, samples across the crop border) and ``torchvision.ops.roi_align``
(bilinear only, also samples across the crop border). For the GPU-resident datasets
(CIFAR 32->32, STL-10 96->96, Tiny ImageNet 64->64) crops are always upscaled and the
dense (out, in) matrices are small. The horizontal flip is folded into the column weights
(rows reversed): exact, since every later op of the pipeline commutes with a flip.

Numerics: the batch goes to float32 in [0, 1] once and stays float. The per-image pipeline
works on uint8 and rounds (resize) or truncates (colour ops) back to uint8 after each op;
here nothing is re-quantised between ops, except that ``equalize`` (a histogram op) sees the
image rounded to uint8. The resized crop is clamped to [0, 1], as the uint8 pipeline's clamp
after bicubic overshoot; PyTorch's CPU uint8 resize also rounds and clamps between its two
passes, so at sharp edges the per-image pipeline differs by up to 7 levels on about 0.03% of
pixels (real CIFAR crops, unbiased; on CUDA torchvision resizes in float, as here). The
uint8 colour ops truncate (as Pillow's blends, which the reference used, do), so the
per-image pipeline's jittered images come out darker by about half a level per op: with the
same sampled parameters this pipeline is brighter by 1.3 levels on average over the jittered
images (CIFAR view 2; 1.6 for STL-10 view 1 with blur) and by 0.1 over the others, about
0.02 standard deviations after normalisation (measured on smooth synthetic images against
``torchvision.transforms.v2.functional`` on uint8).
On CUDA, TF32 settings (``torch.backends.cuda.matmul``
for the resize, ``torch.backends.cudnn`` for the blur) apply if enabled; their error,
about 1e-3 relative, is below one uint8 level. Move the module to the images' device so
its few constants do not cross the bus on every call.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch._dynamo.exc import TorchDynamoException
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from ivreg.data.augment import BLUR_KERNEL, SOLARIZE_THRESHOLD, ViewSpec
from ivreg.errors import first_line

RRC_ATTEMPTS = 10  # as torchvision's RandomResizedCrop
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, the constants torchvision uses
# Jitter op ids, the same as torchvision ColorJitter's ``fn_idx``.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

# Column layout of the single uniform draw per batch (one RNG launch for all parameters).
_U_AREA = slice(0, RRC_ATTEMPTS)
_U_RATIO = slice(RRC_ATTEMPTS, 2 * RRC_ATTEMPTS)
_U_TOP, _U_LEFT = 2 * RRC_ATTEMPTS, 2 * RRC_ATTEMPTS + 1
_U_FLIP, _U_JITTER, _U_GRAY, _U_BLUR, _U_SOLARIZE, _U_EQUALIZE = range(2 * RRC_ATTEMPTS + 2, 2 * RRC_ATTEMPTS + 8)
_U_FACTORS = slice(2 * RRC_ATTEMPTS + 8, 2 * RRC_ATTEMPTS + 12)
_U_ORDER = slice(2 * RRC_ATTEMPTS + 12, 2 * RRC_ATTEMPTS + 16)
_U_SIGMA = 2 * RRC_ATTEMPTS + 16
_N_UNIFORMS = 2 * RRC_ATTEMPTS + 17


# --------------------------------------------------------------------------- parameters


def sample_crop_boxes(
    uniforms_area: Tensor,
    uniforms_ratio: Tensor,
    uniforms_top: Tensor,
    uniforms_left: Tensor,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> Tensor:
    """``RandomResizedCrop.make_params`` for a batch: (B, 4) long boxes (top, left, h, w).

    The ten attempts are drawn at once and the first valid one is taken per sample; the
    fallback is torchvision's centre crop with the ratio clamped. Arithmetic is in float64,
    as torchvision's Python floats; ``round`` is half-to-even in both.
    """
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    # float32 draws as torchvision's ``torch.empty(1).uniform_``, then double arithmetic.
    area_frac = (uniforms_area * (scale[1] - scale[0]) + scale[0]).double()
    log_ratio = (uniforms_ratio * (log_hi - log_lo) + log_lo).double()
    target_area = area_frac * float(height * width)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # first True (first max)
    found = valid.any(dim=1)
    w = w.gather(1, first).squeeze(1).long()
    h = h.gather(1, first).squeeze(1).long()

    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    h = torch.where(found, h, fh)
    w = torch.where(found, w, fw)
    # randint(0, n) as floor(u * n); the clamp guards against float rounding up to n.
    n_top, n_left = height - h + 1, width - w + 1
    top = torch.minimum((uniforms_top.double() * n_top).floor().long(), n_top - 1)
    left = torch.minimum((uniforms_left.double() * n_left).floor().long(), n_left - 1)
    top = torch.where(found, top, (height - fh) // 2)
    left = torch.where(found, left, (width - fw) // 2)
    return torch.stack((top, left, h, w), dim=1)


# --------------------------------------------------------------------------- geometry


def _aa_filter(x: Tensor, interpolation: str) -> Tensor:
    """PyTorch's antialias filters: Keys cubic with a = -0.5, or the triangle."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1.0 - x).clamp_min_(0.0)
    a = -0.5
    # near(x) for |x| < 1 plus far(x) = a (x-1)(x-2)^2 for 1 <= |x| < 2: near(1) = far(1) =
    # far(2) = 0, so clamping the argument into each piece's interval and adding is exact.
    n = x.clamp(max=1.0)
    f = x.clamp(1.0, 2.0)
    return (((a + 2.0) * n - (a + 3.0)) * n * n + 1.0) + a * (f - 1.0) * (f - 2.0).square()


def resample_weights(start: Tensor, length: Tensor, in_size: int, out_size: int, interpolation: str) -> Tensor:
    """(B, out, in) matrices resampling the segment [start, start+length) to out_size.

    Same weights as ``interpolate(..., align_corners=False, antialias=True)`` applied to
    the cropped segment: centre ``scale * (o + 0.5)``, filter stretched by the scale when
    downscaling, zero outside the segment, rows normalised to sum 1.
    """
    length_f = length.to(torch.float32)[:, None, None]
    scale = length_f / out_size
    stretch = scale.clamp_min(1.0)
    out_pos = torch.arange(out_size, device=start.device, dtype=torch.float32)[None, :, None]
    local = (
        torch.arange(in_size, device=start.device, dtype=torch.float32)[None, None, :]
        - start.to(torch.float32)[:, None, None]
    )
    center = scale * (out_pos + 0.5)
    weights = _aa_filter((local - center + 0.5) / stretch, interpolation)
    weights = weights * ((local >= 0) & (local < length_f))  # the filter is 0 beyond its support
    return weights / weights.sum(dim=2, keepdim=True)


def resized_crop(
    images: Tensor,
    boxes: Tensor,
    size: int,
    flip: Tensor | None = None,
    interpolation: str = "bicubic",
    value_scale: float = 1.0,
) -> Tensor:
    """Crop each image to its box and resize to (size, size), optionally mirrored.

    Equals torchvision's ``resized_crop(..., antialias=True)`` (then ``horizontal_flip``
    where ``flip``) on float images; ``value_scale`` multiplies the result (used to fold
    the uint8 -> [0, 1] scaling into the weights). Two batched matmuls, no clamping.
    """
    batch, _, height, width = images.shape
    top, left, h, w = boxes.unbind(dim=1)
    if height == width:  # both axes in one call
        wy, wx = resample_weights(torch.cat([top, left]), torch.cat([h, w]), height, size, interpolation).split(batch)
    else:
        wy = resample_weights(top, h, height, size, interpolation)
        wx = resample_weights(left, w, width, size, interpolation)
    if value_scale != 1.0:
        wy = wy * value_scale
    if flip is not None:
        wx = select(flip.view(-1, 1, 1), wx.flip(1), wx)
    x = images.to(torch.float32)
    rows = torch.matmul(wy.unsqueeze(1), x)  # (B, C, size, W)
    return torch.matmul(rows, wx.transpose(1, 2).unsqueeze(1))  # (B, C, size, size)


# --------------------------------------------------------------------------- colour


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """(B, 1, H, W) luma with torchvision's weights."""
    r, g, b = images.unbind(dim=-3)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(-3)


def _per_sample(values: Tensor) -> Tensor:
    return values.reshape(-1, 1, 1, 1)


def select(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``torch.where(mask, a, b)`` for a per-sample (broadcast) mask, as ``lerp`` with a
    0/1 weight: exact for finite values (PyTorch's lerp returns ``b`` at 0 and ``a`` at 1),
    and several times faster than ``where`` on CPU."""
    return torch.lerp(b, a, mask.to(b.dtype))


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``adjust_brightness``: multiply, clamp to [0, 1]."""
    return (images * _per_sample(factor)).clamp_(0.0, 1.0)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    # torchvision's _blend: factor * image + (1 - factor) * other, clamped.
    return torch.lerp(other, images, _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``adjust_contrast``: blend with the mean of the grey image."""
    mean = rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``adjust_saturation``: blend with the grey image."""
    return _blend(images, rgb_to_grayscale(images), factor)


def _hue_sextant(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hue in units of 60 degrees (not yet wrapped), max and chroma, as torchvision's
    ``_rgb_to_hsv`` (Pillow's algorithm, same tie-breaking between channels)."""
    r, g, b = images.unbind(dim=-3)
    maxc, minc = images.amax(dim=-3), images.amin(dim=-3)
    chroma = maxc - minc
    # chroma == 0 means r == g == b: every numerator below is 0, so any finite divisor works.
    inv = chroma.clamp_min(torch.finfo(images.dtype).tiny).reciprocal_()
    # Disjoint 0/1 masks (R wins ties, then G), summed: exact, and much faster than nested
    # torch.where on CPU.
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~(is_r | is_g)
    hue6 = (g - b).mul_(inv).mul_(is_r)
    hue6 += (b - r).mul_(inv).add_(2.0).mul_(is_g)
    hue6 += (r - g).mul_(inv).add_(4.0).mul_(is_b)
    return hue6, maxc, chroma


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``adjust_hue`` (factor in [-0.5, 0.5] turns): RGB -> HSV, shift, -> RGB.

    The HSV -> RGB step uses the closed form ``v - v*s*clamp(min(k, 4-k), 0, 1)`` with
    ``k = (n + 6h) mod 6``, n = 5, 3, 1 for R, G, B, which is algebraically torchvision's
    sector table (and ``v*s`` is the chroma); it saves the stack/gather.
    """
    hue6, maxc, chroma = _hue_sextant(images)
    hue6 = hue6.add_(_per_sample(factor).squeeze(1) * 6.0).remainder_(6.0)
    # n = 5, 3, 1, made on the device (a host tensor would cost a synchronising copy on CUDA).
    offsets = torch.arange(5.0, 0.0, -2.0, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = (hue6.unsqueeze(-3) + offsets).remainder_(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(-3) - chroma.unsqueeze(-3) * ramp


def color_jitter(images: Tensor, factors: Tensor, order: Tensor, apply: Tensor, use_hue: bool = True) -> Tensor:
    """Per-sample ``ColorJitter``: factors (B, 4) = brightness, contrast, saturation, hue;
    order (B, 4) a permutation of the op ids per sample; apply (B,) bool.

    Brightness, contrast and saturation are all "blend with a reference, clamp" (reference
    0, mean grey, grey), so one slot computes whichever of them a sample has at that
    position; a factor of 1 is an exact identity. Hue, the expensive op, runs once: the
    slots before each sample's hue position go first, then hue, then the slots after it.
    """
    positions = torch.arange(4, device=order.device)
    # Per sample and position: the factor to use (1 = identity where the op at that
    # position is hue or the jitter is not applied) and which reference to blend with.
    blend = apply[:, None] & (order != HUE)
    factor = torch.where(blend, factors.gather(1, order), torch.ones_like(factors))
    is_contrast = (order == CONTRAST).to(images.dtype)
    is_saturation = (order == SATURATION).to(images.dtype)
    if not use_hue:
        return _jitter_slots(images, factor, is_contrast, is_saturation, range(4))
    hue_pos = (order == HUE).to(torch.uint8).argmax(dim=1, keepdim=True)
    before = torch.where(positions < hue_pos, factor, torch.ones_like(factor))
    after = torch.where(positions > hue_pos, factor, torch.ones_like(factor))
    out = _jitter_slots(images, before, is_contrast, is_saturation, range(3))
    out = select(_per_sample(apply), adjust_hue(out, factors[:, HUE]), out)
    return _jitter_slots(out, after, is_contrast, is_saturation, range(1, 4))


def _jitter_slots(
    images: Tensor, factor: Tensor, is_contrast: Tensor, is_saturation: Tensor, positions: range
) -> Tensor:
    """Blend slots: at position k, blend each sample with 0 (brightness), its mean grey
    (contrast) or its grey image (saturation) by ``factor[:, k]``, then clamp."""
    out = images
    for k in positions:
        gray = rgb_to_grayscale(out)
        mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
        reference = torch.addcmul(mean * _per_sample(is_contrast[:, k]), gray, _per_sample(is_saturation[:, k]))
        out = _blend(out, reference, factor[:, k])
    return out


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int = BLUR_KERNEL) -> Tensor:
    """Per-sample ``gaussian_blur``: torchvision's kernel, reflect padding, separable
    grouped convolutions (one launch per direction for the whole batch)."""
    batch, channels, height, width = images.shape
    half = kernel_size // 2
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    pos = torch.linspace(-lim, lim, steps=kernel_size, device=images.device, dtype=images.dtype)
    kernel = torch.softmax(-(pos[None, :] / sigma[:, None].to(images.dtype)).pow(2), dim=1)  # (B, k)
    kernel = kernel.repeat_interleave(channels, dim=0)  # (B*C, k)
    x = images.reshape(1, batch * channels, height, width)
    x = F.pad(x, [half, half, half, half], mode="reflect")
    x = F.conv2d(x, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    x = F.conv2d(x, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return x.view(batch, channels, height, width)


def solarize(images: Tensor, threshold: float, apply: Tensor | None = None) -> Tensor:
    """``solarize`` (x >= threshold -> 1 - x) on the samples where ``apply``."""
    # A 0/1 float mask without bool tensors (comparisons and where are slow on CPU): x - t is
    # exact near t (Sterbenz), so (x - t) * 2**60 + 1 clamped to [0, 1] is 1 exactly where
    # x >= t, for any threshold above 2**-35.
    hit = (images - threshold).mul_(2.0**60).add_(1.0).clamp_(0.0, 1.0)
    if apply is not None:
        hit = hit.mul_(_per_sample(apply))
    return torch.lerp(images, 1.0 - images, hit)


def equalize(images: Tensor) -> Tensor:
    """torchvision's ``equalize`` (per image and channel, Pillow's LUT) on the batch rounded
    to uint8, the dtype the per-image pipeline equalizes in; back to float in [0, 1]."""
    quantised = images.mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
    return TF.equalize(quantised).to(images.dtype).mul_(1.0 / 255.0)


# --------------------------------------------------------------------------- modules


class BatchedViewAugment(nn.Module):
    """One augmented view of a uint8 batch, with per-sample parameters, on its device.

    Draws from the same distributions as ``build_view_transform(spec, mean, std)``; see the
    module docstring for where the numerics differ (float throughout, no re-quantisation).
    """

    def __init__(self, spec: ViewSpec, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        if spec.rrc_interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"rrc_interpolation must be bicubic or bilinear, got {spec.rrc_interpolation!r}")
        if spec.blur_prob > 0 and spec.crop_size <= BLUR_KERNEL // 2:
            raise ValueError(f"crop_size {spec.crop_size} is too small for the {BLUR_KERNEL}-pixel blur")
        self.spec = spec
        self.register_buffer("scale", 1.0 / torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer(
            "shift", -torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1) * self.scale, False
        )
        # ColorJitter's ranges: U(max(0, 1 - x), 1 + x) for b, c, s and U(-h, h) for hue.
        ranges = [(max(0.0, 1.0 - x), 1.0 + x) for x in (spec.brightness, spec.contrast, spec.saturation)]
        ranges.append((-spec.hue, spec.hue))
        low = torch.tensor([r[0] for r in ranges], dtype=torch.float32)
        self.register_buffer("jitter_low", low, False)
        self.register_buffer("jitter_span", torch.tensor([r[1] for r in ranges], dtype=torch.float32) - low, False)
        self._jitter_on = spec.color_jitter_prob > 0 and any(
            x > 0 for x in (spec.brightness, spec.contrast, spec.saturation, spec.hue)
        )
        self._compiled: tuple[Callable[..., Any], Callable[..., Any]] | None = None

    def extra_repr(self) -> str:
        return repr(self.spec)

    @torch.no_grad()
    def sample_params(
        self,
        batch_size: int,
        height: int,
        width: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """All random parameters of one batch, drawn with one RNG call on ``device``.

        Keys: ``crop`` (B, 4) long (top, left, height, width); ``flip``, ``jitter``,
        ``grayscale``, ``blur``, ``solarize``, ``equalize`` (B,) bool; ``brightness``,
        ``contrast``, ``saturation``, ``hue``, ``blur_sigma`` (B,) float, drawn for every
        sample (used only where the op applies); ``jitter_order`` (B, 4) long, a random
        permutation of 0..3 per sample (ids as torchvision's ``ColorJitter.fn_idx``).
        """
        device = torch.device("cpu") if device is None else torch.device(device)
        u = torch.rand(batch_size, _N_UNIFORMS, device=device, generator=generator)
        return self.params_from_uniforms(u, height, width)

    def params_from_uniforms(self, u: Tensor, height: int, width: int) -> dict[str, Tensor]:
        """The parameters of ``sample_params`` as a deterministic function of its uniform draw
        ``u`` (B, N_UNIFORMS), so that this arithmetic can be compiled while the draw itself
        stays an eager call on the caller's generator."""
        spec = self.spec
        batch_size, device = u.shape[0], u.device
        if spec.rrc:
            crop = sample_crop_boxes(
                u[:, _U_AREA],
                u[:, _U_RATIO],
                u[:, _U_TOP],
                u[:, _U_LEFT],
                height,
                width,
                (spec.crop_min_scale, spec.crop_max_scale),
                spec.ratio,
            )
        else:
            crop = torch.zeros(batch_size, 4, dtype=torch.long, device=device)
            crop[:, 2], crop[:, 3] = height, width
        factors = torch.addcmul(self.jitter_low.to(device), u[:, _U_FACTORS], self.jitter_span.to(device))
        s_lo, s_hi = spec.blur_sigma
        return {
            "crop": crop,
            "flip": u[:, _U_FLIP] < spec.horizontal_flip_prob,
            "jitter": u[:, _U_JITTER] < spec.color_jitter_prob,
            "brightness": factors[:, BRIGHTNESS],
            "contrast": factors[:, CONTRAST],
            "saturation": factors[:, SATURATION],
            "hue": factors[:, HUE],
            "jitter_order": u[:, _U_ORDER].argsort(dim=1),
            "grayscale": u[:, _U_GRAY] < spec.grayscale_prob,
            "blur": u[:, _U_BLUR] < spec.blur_prob,
            "blur_sigma": u[:, _U_SIGMA] * (s_hi - s_lo) + s_lo,
            "solarize": u[:, _U_SOLARIZE] < spec.solarization_prob,
            "equalize": u[:, _U_EQUALIZE] < spec.equalization_prob,
        }

    def compile_ops(self, **compile_kwargs: Any) -> None:
        """Run the parameter arithmetic and the ops through ``torch.compile`` from now on.

        Eager, a view is a few hundred small kernels; compiled, inductor fuses the
        elementwise chains into a handful, which removes most of the launch overhead on a
        GPU (and halves the time on a CPU). The random draw stays eager on the caller's
        generator, so seeding works as before; outputs agree with the eager ops to float
        rounding (about 1e-6). Shapes are static (``dynamic=False`` unless given): a new batch
        size compiles again. If compilation fails at the first call (no compiler, an
        unsupported backend), a warning is printed and the eager ops are used.
        """
        compile_kwargs.setdefault("dynamic", False)
        self._compiled = (
            torch.compile(self.params_from_uniforms, **compile_kwargs),
            torch.compile(self._transform, **compile_kwargs),
        )

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def _run(self, name: str, index: int, *args: Any) -> Any:
        """Call the compiled function ``index`` if there is one, else the eager ``name``."""
        if self._compiled is not None:
            try:
                return self._compiled[index](*args)
            except TorchDynamoException as exc:  # a compiler failure (Inductor's too): fall back, once
                warnings.warn(
                    f"torch.compile of the batched augmentation failed ({type(exc).__name__}: "
                    f"{first_line(exc)}); using the eager ops",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._compiled = None
        return getattr(self, name)(*args)

    def _check(self, images: Tensor, generator: torch.Generator | None, geometric: bool) -> None:
        if not isinstance(images, Tensor):
            raise ValueError(f"expected a tensor batch, got {type(images).__name__}")
        if images.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 image batch, got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) RGB batch, got shape {tuple(images.shape)}")
        size = self.spec.crop_size
        if not geometric and tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"geometric=False needs images already cropped to {size}x{size}, "
                f"got {images.shape[-2]}x{images.shape[-1]}"
            )
        if min(images.shape[-2:]) < 1:
            raise ValueError(f"empty images of shape {tuple(images.shape)}")
        if generator is not None and generator.device.type != images.device.type:
            raise ValueError(f"generator is on {generator.device}, images on {images.device}")

    @torch.no_grad()
    def forward(self, images: Tensor, generator: torch.Generator | None = None, geometric: bool = True) -> Tensor:
        """uint8 (B, 3, H, W) -> normalised float32 (B, 3, crop, crop).

        ``geometric=False`` skips crop/resize and flip, for batches a CPU worker already
        cropped to ``crop_size``; only the photometric ops and normalisation run.
        """
        self._check(images, generator, geometric)
        if images.shape[0] == 0:
            return self._empty(images)
        u = torch.rand(images.shape[0], _N_UNIFORMS, device=images.device, generator=generator)
        params = self._run("params_from_uniforms", 0, u, images.shape[2], images.shape[3])
        return self._run("_transform", 1, images, params, geometric)

    @torch.no_grad()
    def apply_params(self, images: Tensor, params: dict[str, Tensor], geometric: bool = True) -> Tensor:
        """The deterministic part of ``forward``: apply given parameters to a uint8 batch."""
        self._check(images, None, geometric)
        if images.shape[0] == 0:
            return self._empty(images)
        return self._run("_transform", 1, images, params, geometric)

    def _empty(self, images: Tensor) -> Tensor:
        size = self.spec.crop_size
        return images.new_empty((0, 3, size, size), dtype=torch.float32)

    def _transform(self, images: Tensor, params: dict[str, Tensor], geometric: bool) -> Tensor:
        spec = self.spec
        if geometric:
            x = resized_crop(
                images,
                params["crop"],
                spec.crop_size,
                flip=params["flip"] if spec.horizontal_flip_prob > 0 else None,
                interpolation=spec.rrc_interpolation if spec.rrc else "bilinear",
                value_scale=1.0 / 255.0,
            ).clamp_(0.0, 1.0)
        else:
            x = images.contiguous().to(torch.float32).mul_(1.0 / 255.0)
        if self._jitter_on:
            factors = torch.stack(
                [params["brightness"], params["contrast"], params["saturation"], params["hue"]], dim=1
            )
            x = color_jitter(x, factors, params["jitter_order"], params["jitter"], use_hue=spec.hue > 0)
        if spec.grayscale_prob > 0:
            x = select(_per_sample(params["grayscale"]), rgb_to_grayscale(x).expand_as(x), x)
        if spec.blur_prob > 0:
            x = select(_per_sample(params["blur"]), gaussian_blur(x, params["blur_sigma"]), x)
        if spec.solarization_prob > 0:
            x = solarize(x, SOLARIZE_THRESHOLD / 255.0, params["solarize"])
        if spec.equalization_prob > 0:
            x = select(_per_sample(params["equalize"]), equalize(x), x)
        return torch.addcmul(self.shift.to(x.device), x, self.scale.to(x.device))


class BatchedMultiView(nn.Module):
    """All views of one uint8 batch: one ``BatchedViewAugment`` per ``ViewSpec``."""

    def __init__(self, specs: Sequence[ViewSpec], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if not specs:
            raise ValueError("need at least one ViewSpec")
        self.views = nn.ModuleList(BatchedViewAugment(spec, mean, std) for spec in specs)

    def forward(self, images: Tensor, generator: torch.Generator | None = None, geometric: bool = True) -> list[Tensor]:
        return [view(images, generator=generator, geometric=geometric) for view in self.views]

    def compile_ops(self, **compile_kwargs: Any) -> None:
        """``BatchedViewAugment.compile_ops`` for every view."""
        for view in self.views:
            view.compile_ops(**compile_kwargs)


def build_batched_views(specs: Sequence[ViewSpec], mean: Sequence[float], std: Sequence[float]) -> BatchedMultiView:
    """Batched counterpart of ``MultiViewTransform([build_view_transform(s, ...) ...])``."""
    return BatchedMultiView(specs, mean, std)
