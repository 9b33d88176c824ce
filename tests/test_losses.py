import pytest
import torch
import torch.nn.functional as F

from ivreg.losses import (
    cosine_loss,
    euclidean_loss,
    iso_cosine_loss,
    iso_euclidean_loss,
    select_loss,
    symmetric_loss,
)


def _spd(d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random symmetric positive definite W_p and its square root."""
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    s, u = torch.linalg.eigh(a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64))
    return (u * s) @ u.T, (u * s.sqrt()) @ u.T


@pytest.mark.parametrize("seed", range(5))
def test_iso_cosine_gradient_is_minus_two_cosine_gradient_in_p(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    b, d = 7, 12
    w, w_sqrt = _spd(d, gen)
    z = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(b, d, generator=gen, dtype=torch.float64)
    p, p_sqrt = z @ w, z @ w_sqrt
    (grad_z,) = torch.autograd.grad(iso_cosine_loss(z, p, p_sqrt, z_t), z)

    p_leaf = p.detach().clone().requires_grad_(True)
    cos = F.cosine_similarity(p_leaf, z_t, dim=-1).sum()
    (grad_cos,) = torch.autograd.grad(cos, p_leaf)
    # The loss is a batch mean: per sample, grad_z l_i = -2 d cos_i / dp_i.
    torch.testing.assert_close(grad_z * b, -2 * grad_cos, atol=1e-5, rtol=1e-5)

    # ... which is exactly the gradient of the BYOL cosine loss with respect to p.
    (grad_byol,) = torch.autograd.grad(cosine_loss(None, p_leaf, None, z_t), p_leaf)
    torch.testing.assert_close(grad_z, grad_byol, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_cosine_isoloss_grows_the_projection_norm_where_directpred_does_not(seed: int) -> None:
    """Why IsoLoss runs see ||z|| grow by orders of magnitude (and the reference's fp16 NaN):
    with the target equal to z (no EMA, similar views), DirectPred's gradient in z is W_p times
    a gradient orthogonal to p, so z . grad = p . grad_p = 0; IsoLoss's gradient is orthogonal
    to p but not to z, and z . grad = -(2/B) (||z||^2 - (p . z)^2 / ||p||^2) / (||p|| ||z||) <= 0
    per sample (Cauchy-Schwarz): every descent step lengthens z at first order."""
    gen = torch.Generator().manual_seed(seed)
    b, d = 9, 12
    w, w_sqrt = _spd(d, gen)
    z = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    z_t = z.detach().clone()
    p, p_sqrt = z @ w, z @ w_sqrt
    (grad_iso,) = torch.autograd.grad(iso_cosine_loss(z, p, p_sqrt, z_t), z)
    (grad_dp,) = torch.autograd.grad(cosine_loss(z, z @ w, None, z_t), z)

    radial_dp = (z.detach() * grad_dp).sum(dim=-1)
    # (the losses compute in float32, hence the tolerances)
    torch.testing.assert_close(radial_dp, torch.zeros_like(radial_dp), atol=1e-6, rtol=0)
    zd, pd = z.detach(), p.detach()
    z_norm, p_norm = zd.norm(dim=-1), pd.norm(dim=-1)
    expected = -(2 / b) * (z_norm**2 - (pd * zd).sum(-1) ** 2 / p_norm**2) / (p_norm * z_norm)
    radial_iso = (zd * grad_iso).sum(dim=-1)
    torch.testing.assert_close(radial_iso, expected, atol=1e-6, rtol=1e-4)
    assert (radial_iso < -1e-3).all(), radial_iso  # far from float32 noise


@pytest.mark.parametrize("seed", range(3))
def test_tangent_isoloss_is_the_isoloss_gradient_without_its_radial_part(seed: int) -> None:
    """iso_tangent: same value, gradient (I - z z^T / ||z||^2) (-2 d cos / dp): orthogonal to z
    (no norm growth at first order) and equal to IsoLoss's in every direction orthogonal to z."""
    gen = torch.Generator().manual_seed(seed)
    b, d = 9, 12
    w, w_sqrt = _spd(d, gen)
    z = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    z_t = z.detach() + 0.3 * torch.randn(b, d, generator=gen, dtype=torch.float64)
    loss_iso = iso_cosine_loss(z, z @ w, z @ w_sqrt, z_t)
    loss_tan = iso_cosine_loss(z, z @ w, z @ w_sqrt, z_t, tangent=True)
    # (the losses compute in float32, hence the tolerances)
    torch.testing.assert_close(loss_tan, loss_iso, atol=1e-6, rtol=1e-6)
    (grad_iso,) = torch.autograd.grad(loss_iso, z)
    (grad_tan,) = torch.autograd.grad(loss_tan, z)
    unit = F.normalize(z.detach(), dim=-1)
    projected = grad_iso - (grad_iso * unit).sum(-1, keepdim=True) * unit
    torch.testing.assert_close(grad_tan, projected, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close((grad_tan * unit).sum(-1), torch.zeros(b, dtype=torch.float64), atol=1e-7, rtol=0)
    assert (grad_iso * unit).sum(-1).abs().min() > 1e-3  # the radial part was really there
    # Scale invariance: the gradient at 10 z is a tenth of it (as for the cosine loss).
    z10 = (10 * z.detach()).requires_grad_(True)
    (grad_10,) = torch.autograd.grad(iso_cosine_loss(z10, z10 @ w, z10 @ w_sqrt, z_t, tangent=True), z10)
    torch.testing.assert_close(grad_10 * 10, grad_tan, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_iso_euclidean_gradient_is_two_p_minus_target(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    b, d = 5, 9
    w, _ = _spd(d, gen)
    z = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(b, d, generator=gen, dtype=torch.float64)
    p = z @ w
    (grad_z,) = torch.autograd.grad(iso_euclidean_loss(z, p, None, z_t), z)
    torch.testing.assert_close(grad_z * b, 2 * (p.detach() - z_t), atol=1e-5, rtol=1e-5)
    p_leaf = p.detach().clone().requires_grad_(True)
    (grad_l2,) = torch.autograd.grad(euclidean_loss(None, p_leaf, None, z_t), p_leaf)
    torch.testing.assert_close(grad_z, grad_l2, atol=1e-5, rtol=1e-5)


def test_standard_losses_values() -> None:
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z_t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    # cos = 1 and 0 -> mean 0.5 -> 2 - 1 = 1
    assert cosine_loss(None, p, None, z_t).item() == pytest.approx(1.0)
    # squared distances 0 and 8 -> mean 4
    assert euclidean_loss(None, p, None, z_t).item() == pytest.approx(4.0)


def test_iso_cosine_is_float32_and_finite_for_half_inputs() -> None:
    """The reference computes ||p||^3 in float16 and overflows; this must not."""
    z = (torch.randn(4, 256) * 60).half()
    loss = iso_cosine_loss(z, z, z, z)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_iso_cosine_requires_p_sqrt() -> None:
    with pytest.raises(ValueError, match="p_sqrt"):
        iso_cosine_loss(torch.ones(2, 3), torch.ones(2, 3), None, torch.ones(2, 3))


def test_select_loss() -> None:
    assert select_loss(False, False) is cosine_loss
    assert select_loss(False, True) is euclidean_loss
    assert select_loss(True, False) is iso_cosine_loss
    assert select_loss(True, True) is iso_euclidean_loss
    tangent = select_loss(True, False, iso_tangent=True)
    assert tangent.func is iso_cosine_loss and tangent.keywords == {"tangent": True}
    for iso, use_l2 in ((False, False), (False, True), (True, True)):
        with pytest.raises(ValueError, match="iso_tangent"):
            select_loss(iso, use_l2, iso_tangent=True)


@pytest.mark.parametrize("n_views", [2, 3, 4])
@pytest.mark.parametrize("loss_fn", [cosine_loss, iso_cosine_loss, iso_euclidean_loss])
def test_symmetric_loss_sums_ordered_pairs_and_no_gradient_reaches_target(n_views: int, loss_fn) -> None:
    """One call per shift of the concatenated views gives the sum over every ordered pair of
    views, value and gradient, of one call per pair."""
    gen = torch.Generator().manual_seed(n_views)
    zs = [torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(n_views)]
    w = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    targets = [torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(n_views)]

    z = torch.cat(zs)
    z_t = torch.cat(targets)
    total = symmetric_loss(loss_fn, z, z @ w, z @ (w / 2), z_t, n_views)
    (grad,) = torch.autograd.grad(total, z, retain_graph=True)

    z_ref = [v.detach().clone().requires_grad_() for v in zs]
    expected = sum(
        loss_fn(z_ref[a], z_ref[a] @ w, z_ref[a] @ (w / 2), targets[b])
        for a in range(n_views)
        for b in range(n_views)
        if a != b
    )
    expected.backward()
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch.cat([v.grad for v in z_ref]).to(grad.dtype), rtol=1e-5, atol=1e-6)
    assert grad.abs().sum() > 0
    total.backward()
    assert all(t.grad is None for t in targets)


@pytest.mark.parametrize(("n_views", "n_targets"), [(4, 2), (3, 1), (3, 3)])
def test_multi_crop_loss_predicts_every_view_towards_the_large_crops_only(n_views: int, n_targets: int) -> None:
    """solo-learn's multi-crop: the targets are the first n_targets views'; every other view's
    prediction meets each of them. With every view a target it is the rolled sum."""
    gen = torch.Generator().manual_seed(n_views)
    zs = [torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(n_views)]
    w = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    targets = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(n_targets)]
    z = torch.cat(zs)
    total = symmetric_loss(iso_cosine_loss, z, z @ w, z @ (w / 2), torch.cat(targets), n_views, n_targets)
    expected = sum(
        iso_cosine_loss(zs[a], zs[a] @ w, zs[a] @ (w / 2), targets[b])
        for b in range(n_targets)
        for a in range(n_views)
        if a != b
    )
    torch.testing.assert_close(total, expected)
    (grad,) = torch.autograd.grad(total, z)
    (grad_expected,) = torch.autograd.grad(expected, zs[-1])
    torch.testing.assert_close(grad[-4:], grad_expected)  # a small crop (or the last view) learns
    with pytest.raises(ValueError, match="one target per row of the first n_targets views"):
        symmetric_loss(cosine_loss, z, z, None, z, n_views, n_targets - 1 or 5)


def test_symmetric_loss_pairs_view_a_with_view_b() -> None:
    """With two views the prediction of view 1 meets the target of view 2 and vice versa."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # view 1: e1, view 2: e2
    z_t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # target of view 1: e2, of view 2: e1
    # Each prediction points at the other view's target: both pairs have cosine 1.
    assert symmetric_loss(cosine_loss, z, z, None, z_t, 2).item() == pytest.approx(0.0, abs=1e-6)
    # Against its own view's target each pair would have cosine 0 (loss 2 each).
    assert symmetric_loss(cosine_loss, z, z, None, z_t.roll(1, 0), 2).item() == pytest.approx(4.0)


def test_symmetric_loss_needs_two_views_of_equal_size() -> None:
    z = torch.randn(6, 3)
    with pytest.raises(ValueError, match="two views"):
        symmetric_loss(cosine_loss, z, z, None, z, 1)
    with pytest.raises(ValueError, match="equal size"):
        symmetric_loss(cosine_loss, z, z, None, z, 4)
    with pytest.raises(ValueError, match="one target per row"):
        symmetric_loss(cosine_loss, z, z, None, z[:4], 2)
