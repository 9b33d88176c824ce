"""ivreg.norms: BatchNorm without the training-time num_batches_tracked increment, and with
per-view statistics for all views in one call."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ivreg.backbones import build_backbone
from ivreg.heads import mlp
from ivreg.norms import (
    BatchNorm1d,
    BatchNorm2d,
    ViewGroups,
    follows_view_groups,
    run_views,
    share_view_groups,
    uncount_batchnorms,
)


class _CountAdds(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.adds = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.adds += func.overloadpacket is torch.ops.aten.add_
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("ours", "theirs", "shape"), [(BatchNorm2d, nn.BatchNorm2d, (8, 4, 5, 5)), (BatchNorm1d, nn.BatchNorm1d, (8, 4))]
)
def test_same_outputs_and_running_statistics_without_the_counter(ours, theirs, shape) -> None:
    torch.manual_seed(0)
    a, b = ours(4), theirs(4)
    with torch.no_grad():
        for m in (a, b):
            m.weight.copy_(torch.linspace(0.5, 2, 4))
            m.bias.copy_(torch.linspace(-1, 1, 4))
    for _ in range(3):
        x = torch.randn(shape) * 3 + 1
        assert torch.equal(a(x), b(x))
    assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    assert int(a.num_batches_tracked) == 0 and int(b.num_batches_tracked) == 3
    assert a.state_dict().keys() == b.state_dict().keys()
    a.eval(), b.eval()
    x = torch.randn(shape)
    assert torch.equal(a(x), b(x))


def test_one_launch_fewer_per_training_call() -> None:
    x = torch.randn(8, 4, 5, 5)
    counts = []
    for bn in (BatchNorm2d(4), nn.BatchNorm2d(4)):
        with _CountAdds() as mode:
            bn(x)
        counts.append(mode.adds)
    assert counts == [0, 1]


def test_momentum_none_keeps_the_cumulative_average() -> None:
    """With momentum=None the counter is what the running average divides by: parent behaviour."""
    a, b = BatchNorm2d(4, momentum=None), nn.BatchNorm2d(4, momentum=None)
    for _ in range(3):
        x = torch.randn(8, 4, 5, 5)
        a(x), b(x)
    assert int(a.num_batches_tracked) == 3 and torch.equal(a.running_mean, b.running_mean)


def test_backbone_and_heads_use_them_and_keep_torchvision_keys() -> None:
    from torchvision.models import resnet18

    net = build_backbone("resnet18", cifar_stem=True)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20 and all(isinstance(m, BatchNorm2d) for m in norms)
    assert isinstance(mlp(8, 16, 4)[1], BatchNorm1d)
    reference = {k for k in resnet18().state_dict() if not k.startswith("fc.")}
    assert set(net.state_dict()) == reference
    net(torch.randn(2, 3, 32, 32))
    assert all(int(m.num_batches_tracked) == 0 for m in norms)


def _twins(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    net = build_backbone("resnet10", cifar_stem=True)
    twin = build_backbone("resnet10", cifar_stem=True)
    twin.load_state_dict(net.state_dict())
    return net, twin


@pytest.mark.parametrize("n_views", [2, 3])
def test_all_views_in_one_call_equal_one_call_per_view(n_views: int) -> None:
    """With view groups a ResNet on the concatenated views gives each view's features, the
    running statistics and the weight gradients of one call per view, in view order."""
    batched, per_view = _twins()
    groups = ViewGroups()
    share_view_groups([batched], groups)
    views = [torch.randn(4, 3, 16, 16, dtype=torch.float64) + v for v in range(n_views)]  # views differ in mean
    batched.double()
    per_view.double()
    out = run_views(batched, torch.cat(views), n_views, groups)
    expected = run_views(per_view, views, n_views, None)
    torch.testing.assert_close(out, expected)
    assert groups.count == 1  # reset after the call
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, a), b in zip(batched.named_parameters(), per_view.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(batched.named_buffers(), per_view.buffers()):
        torch.testing.assert_close(a, b, msg=name)  # running statistics: n_views updates each
    # Without the groups the same call would normalise all views together: different features.
    assert not torch.allclose(batched(torch.cat(views)), expected)


def test_view_groups_apply_in_training_only_and_are_found_or_missed() -> None:
    net, _ = _twins(1)
    groups = ViewGroups()
    heads = mlp(512, 32, 8)
    share_view_groups([net, heads], groups)
    assert follows_view_groups([net, heads], groups) and not follows_view_groups([net], ViewGroups())
    net.eval()
    x = torch.randn(6, 3, 16, 16)
    groups.count = 2
    torch.testing.assert_close(net(x), torch.cat([net(x[:3]), net(x[3:])]))  # eval: running statistics
    groups.count = 1
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(heads)
    assert not follows_view_groups([net, synced], groups)  # Lightning's sync BatchNorm: view by view


def test_uncount_batchnorms_swaps_plain_layers_only_and_keeps_their_state() -> None:
    class BatchNormAct(nn.BatchNorm2d):  # like timm's BatchNormAct2d: adds to the layer
        pass

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(BatchNormAct(4), nn.BatchNorm1d(2)))
    net[1].running_mean.uniform_()
    net[1].weight.data.uniform_()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    uncount_batchnorms(net)
    assert type(net[1]) is BatchNorm2d and type(net[2][0]) is BatchNormAct and type(net[2][1]) is BatchNorm1d
    assert net.state_dict().keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)
    groups = ViewGroups()
    share_view_groups([net], groups)
    assert not follows_view_groups([net], groups)  # the subclass would mix the views' statistics
    assert follows_view_groups([net[:2]], groups)
