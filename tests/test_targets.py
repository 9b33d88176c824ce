import math

import pytest
import torch
from torch import nn

from ivreg.targets import EMATarget, StopGradTarget, cosine_tau


def test_cosine_tau_schedule() -> None:
    assert cosine_tau(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_tau(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert cosine_tau(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine_tau(25, 100, 0.99, 1.0) == pytest.approx(1.0 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    # Beyond the end it stays at the final value; the no-EMA schedule is zero throughout.
    assert cosine_tau(150, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert all(cosine_tau(k, 10, 0.0, 0.0) == 0.0 for k in range(11))
    values = [cosine_tau(k, 100, 0.9, 1.0) for k in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_ema_update_formula_and_no_gradients() -> None:
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    target = EMATarget(online)
    assert all(not p.requires_grad for p in target.parameters())
    before = [p.detach().clone() for p in target.net.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    target.update(list(online.parameters()), tau=0.9)
    for t, b, o in zip(target.net.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    views = [torch.randn(5, 3), torch.randn(5, 3)]
    out = target(views, torch.empty(0), 2)
    assert out.shape == (10, 2) and not out.requires_grad
    torch.testing.assert_close(out, torch.cat([target.net(v) for v in views]))


def test_ema_with_tau_one_keeps_and_tau_zero_copies() -> None:
    online = nn.Linear(3, 3)
    target = EMATarget(online)
    start = target.net.weight.detach().clone()
    with torch.no_grad():
        online.weight.mul_(2.0)
    target.update(list(online.parameters()), 1.0)
    torch.testing.assert_close(target.net.weight, start)
    target.update(list(online.parameters()), 0.0)
    torch.testing.assert_close(target.net.weight, online.weight)


def test_stop_gradient_target_is_the_online_network() -> None:
    online = nn.Linear(3, 2)
    views = [torch.randn(4, 3), torch.randn(4, 3)]
    z = torch.cat([online(v) for v in views])
    target = StopGradTarget()
    z_t = target(views, z, 2)
    torch.testing.assert_close(z_t, z.detach())
    assert not z_t.requires_grad
    assert not StopGradTarget.has_copy and len(list(target.parameters())) == 0
