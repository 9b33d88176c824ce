"""Prediction losses between an online prediction ``p`` and a target projection ``z_t``.

Every loss has the signature ``loss(z, p, p_sqrt, z_t) -> scalar`` so that a method can swap
them without knowing which inputs each one reads: ``z`` is the online projection, ``p`` the
prediction, ``p_sqrt`` the prediction through ``W_p^(1/2)`` (only the IsoLosses read it) and
``z_t`` the target projection, which never receives a gradient. All are averaged over the
batch and computed in float32, whatever the autocast dtype of their inputs: elementwise
products such as ``p * z_t`` stay in float16 under autocast, and the projections of these
methods grow to norms of several hundred, where float16 (largest value 65504) runs out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------- per-sample forms
# Loss per sample over the last axis, in the dtype of the inputs and for any leading axes: the
# training losses below average them over a batch in float32, the toy model of
# ``ivreg.analysis.toy`` over the sample axis of many runs at once (in float64).


def cosine_per_sample(p: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z_t); the caller decides whether z_t is a stop-gradient target."""
    return 2 - 2 * F.cosine_similarity(p, z_t, dim=-1)


def euclidean_per_sample(p: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """||p - z_t||^2; the caller decides whether z_t is a stop-gradient target."""
    return (p - z_t).pow(2).sum(dim=-1)


def iso_cosine_per_sample(z: torch.Tensor, p: torch.Tensor, p_sqrt: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """Cosine IsoLoss: its gradient in ``z`` equals the cosine loss's gradient in ``p``.

    l = -2 [ (z . z_t) A - 0.5 (p . z_t) A3 ||p_sqrt||^2 ] with A = 1 / (||p|| ||z_t||) and
    (p . z_t) A3 = (p . z_t) / (||p||^3 ||z_t||) held constant. Differentiating gives
    -2 [ z_t A - (p . z_t) A3 p ] = -2 d cos(p, z_t) / dp, because d ||z W^(1/2)||^2 / dz
    = 2 z W = 2 p. The eigenvalues of W_p therefore no longer scale the learning signal.
    """
    z_t = z_t.detach()
    with torch.no_grad():
        p_norm = p.norm(dim=-1).clamp_min(1e-12)
        t_norm = z_t.norm(dim=-1).clamp_min(1e-12)
        a = 1.0 / (p_norm * t_norm)
        b = (p * z_t).sum(dim=-1) / (p_norm.pow(3) * t_norm)
    return -2 * ((z * z_t).sum(dim=-1) * a - 0.5 * b * p_sqrt.pow(2).sum(dim=-1))


def iso_euclidean_per_sample(z: torch.Tensor, p: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """Euclidean IsoLoss ||z - stopgrad(z_t + z - p)||^2: gradient 2 (p - z_t) in ``z``."""
    return (z - (z_t + z - p).detach()).pow(2).sum(dim=-1)


# ---------------------------------------------------------------- training losses


def cosine_loss(z: torch.Tensor, p: torch.Tensor, p_sqrt: torch.Tensor | None, z_t: torch.Tensor) -> torch.Tensor:
    """BYOL's loss, 2 - 2 cos(p, z_t), averaged over the batch."""
    return cosine_per_sample(p.float(), z_t.detach().float()).mean()


def euclidean_loss(z: torch.Tensor, p: torch.Tensor, p_sqrt: torch.Tensor | None, z_t: torch.Tensor) -> torch.Tensor:
    """Squared distance ||p - z_t||^2, averaged over the batch."""
    return euclidean_per_sample(p.float(), z_t.detach().float()).mean()


def iso_cosine_loss(
    z: torch.Tensor, p: torch.Tensor, p_sqrt: torch.Tensor | None, z_t: torch.Tensor, tangent: bool = False
) -> torch.Tensor:
    """Cosine IsoLoss (:func:`iso_cosine_per_sample`), averaged over the batch.

    Unlike the cosine loss it stands in for, its gradient has a radial part:
    z . grad = -(2 / (||p|| ||z||)) (||z||^2 - (p . z)^2 / ||p||^2) <= 0 when z_t = z, so
    every step lengthens z at first order. ``tangent=True`` removes the radial part (an
    ablation, see the body); the value and the gradient's component orthogonal to z are
    unchanged.
    """
    if p_sqrt is None:
        raise ValueError("iso_cosine_loss needs p_sqrt (the prediction through W_p^(1/2))")
    z, p, p_sqrt, z_t = z.float(), p.float(), p_sqrt.float(), z_t.float()
    if tangent:
        # Scale z, p and p_sqrt (all linear in z) by 1 / ||z|| with the gradient flowing
        # through the norm: the value is unchanged (it is homogeneous of degree 0 in z) and
        # the gradient becomes (I - z z^T / ||z||^2) (-2 d cos / dp), the IsoLoss gradient
        # without its radial part.
        norm = z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        z, p, p_sqrt = z / norm, p / norm, p_sqrt / norm
    return iso_cosine_per_sample(z, p, p_sqrt, z_t).mean()


def iso_euclidean_loss(
    z: torch.Tensor, p: torch.Tensor, p_sqrt: torch.Tensor | None, z_t: torch.Tensor
) -> torch.Tensor:
    """Euclidean IsoLoss (:func:`iso_euclidean_per_sample`), averaged over the batch."""
    return iso_euclidean_per_sample(z.float(), p.float(), z_t.float()).mean()


def select_loss(iso: bool, use_l2: bool, iso_tangent: bool = False) -> LossFn:
    """The loss for the flags of the seed's config (``iso``, ``use_l2``) and
    ``iso_tangent`` (cosine IsoLoss without the radial part of its gradient)."""
    if iso_tangent and not (iso and not use_l2):
        raise ValueError("method_kwargs.iso_tangent applies to the cosine IsoLoss only (iso: True, use_l2: False)")
    if iso:
        if use_l2:
            return iso_euclidean_loss
        return functools.partial(iso_cosine_loss, tangent=True) if iso_tangent else iso_cosine_loss
    return euclidean_loss if use_l2 else cosine_loss


def symmetric_loss(
    loss_fn: LossFn,
    z: torch.Tensor,
    p: torch.Tensor,
    p_sqrt: torch.Tensor | None,
    z_t: torch.Tensor,
    n_views: int,
    n_targets: int | None = None,
) -> torch.Tensor:
    """Sum of ``loss_fn`` over every ordered pair of views (a, b), a != b: view a's prediction
    against view b's target.

    The arguments hold ``n_views`` views of equal size concatenated in view order. Rolling the
    targets by k views pairs every view a with view a + k (mod n_views), so one call of
    ``loss_fn`` per shift k covers n_views pairs at once: the same sum as one call per pair,
    with 1/n_views as many ops. ``loss_fn`` averages over all rows, hence the factor n_views.

    Multi-crop (solo-learn's): with ``n_targets`` < ``n_views``, only the first ``n_targets``
    views (the large crops) are targets and ``z_t`` holds just theirs; the sum runs over the
    pairs (a, b), b < n_targets, one call per pair: a small crop is predicted towards every
    large one and is never a target itself.
    """
    rows = z.shape[0]
    n_targets = n_views if n_targets is None else n_targets
    target_rows = rows // n_views * n_targets if n_views else 0
    if (
        n_views < 2
        or rows % n_views
        or not 1 <= n_targets <= n_views
        or any(t is not None and t.shape[0] != rows for t in (p, p_sqrt))
        or z_t.shape[0] != target_rows
    ):
        raise ValueError(
            "the symmetric loss needs at least two views of equal size, with one prediction per row and one "
            "target per row of the first n_targets views"
        )
    batch = rows // n_views
    if n_targets < n_views:
        zs, ps, targets = z.split(batch), p.split(batch), z_t.split(batch)
        roots = p_sqrt.split(batch) if p_sqrt is not None else [None] * n_views
        pairs = [(a, b) for b in range(n_targets) for a in range(n_views) if a != b]
        return torch.stack([loss_fn(zs[a], ps[a], roots[a], targets[b]) for a, b in pairs]).sum()
    total = loss_fn(z, p, p_sqrt, z_t.roll(-batch, dims=0))
    for shift in range(2, n_views):
        total = total + loss_fn(z, p, p_sqrt, z_t.roll(-shift * batch, dims=0))
    return total * n_views
