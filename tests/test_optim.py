import math

import pytest
import torch
from torch import nn

from ivreg.errors import ConfigError
from ivreg.optim import LARS, build_optimizer, build_scheduler, optimizers_with_schedule, warmup_cosine_factor


def _reference_lars_step(params, grads, bufs, lr, wd, eta, clip, exclude, momentum=0.9, eps=1e-8):
    """solo-learn's LARS update, one tensor at a time (the update the paper used)."""
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g.clone()
        if p.ndim != 1 or not exclude:
            pn, gn = p.norm(), g.norm()
            if pn != 0 and gn != 0:
                ratio = eta * pn / (gn + pn * wd + eps)
                if clip:
                    ratio = min(ratio / lr, 1.0)
                d = (d + wd * p) * ratio
        bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
        out.append(p - lr * bufs[i])
    return out


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("exclude", [True, False])
def test_lars_matches_reference(clip: bool, exclude: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    params = list(model.parameters())
    opt = LARS(params, lr=0.5, weight_decay=1e-3, eta=0.02, clip_lr=clip, exclude_bias_n_norm=exclude)
    ref = [p.detach().clone() for p in params]
    bufs = [None] * len(params)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref = _reference_lars_step(ref, grads, bufs, 0.5, 1e-3, 0.02, clip, exclude)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r, atol=1e-6, rtol=1e-5)


def test_lars_zero_norm_parameter_is_plain_sgd() -> None:
    w = nn.Parameter(torch.zeros(3, 3))
    opt = LARS([w], lr=0.1, weight_decay=0.1, eta=0.02, momentum=0.0)
    w.grad = torch.ones(3, 3)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3, 3), -0.1))


def test_classifier_group_has_its_lr_and_no_weight_decay() -> None:
    ssl, clf = nn.Linear(4, 4), nn.Linear(4, 2)
    opt = build_optimizer(
        "lars",
        list(ssl.parameters()),
        list(clf.parameters()),
        1.0,
        0.1,
        1e-5,
        {"eta": 0.02, "clip_lr": True, "exclude_bias_n_norm": True},
    )
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["ssl"]["lr"] == 1.0 and groups["ssl"]["weight_decay"] == 1e-5
    assert groups["classifier"]["lr"] == 0.1 and groups["classifier"]["weight_decay"] == 0.0
    sgd = build_optimizer("sgd", list(ssl.parameters()), list(clf.parameters()), 0.1, 0.1, 1e-4, {"momentum": 0.9})
    assert isinstance(sgd, torch.optim.SGD)
    with pytest.raises(ConfigError, match="unknown optimizer.name 'adam'"):
        build_optimizer("adam", [], [], 0.1, 0.1, 0.0, {})
    with pytest.raises(ConfigError, match="not options of sgd"):
        build_optimizer("sgd", list(ssl.parameters()), [], 0.1, 0.1, 0.0, {"eta": 0.1})


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_exclude_bias_n_norm_wd_leaves_biases_and_norms_undecayed(name: str) -> None:
    """solo-learn's optimizer.exclude_bias_n_norm_wd: one step on the same gradient moves the
    biases and normalisation parameters as without weight decay, the weight matrices not."""
    copies = []
    for wd, exclude in ((0.1, True), (0.0, False)):
        torch.manual_seed(0)
        ssl, clf = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2)
        opt = build_optimizer(name, list(ssl.parameters()), list(clf.parameters()), 0.5, 0.1, wd, {}, exclude)
        for p in ssl.parameters():
            p.grad = torch.linspace(-1, 1, p.numel()).reshape(p.shape)
        opt.step()
        copies.append((opt, ssl.state_dict()))
    (excluded, after), (_, undecayed) = copies
    assert [g["name"] for g in excluded.param_groups] == ["ssl", "classifier", "ssl_no_weight_decay"]
    assert len(excluded.param_groups[2]["params"]) == 3 and excluded.param_groups[2]["weight_decay"] == 0.0
    assert not torch.allclose(after["0.weight"], undecayed["0.weight"])
    for key in ("0.bias", "1.weight", "1.bias"):
        torch.testing.assert_close(after[key], undecayed[key], rtol=0, atol=0, msg=key)
    default = build_optimizer(name, list(ssl.parameters()), list(clf.parameters()), 0.5, 0.1, 0.1, {})
    assert [g["name"] for g in default.param_groups] == ["ssl", "classifier"]


@pytest.mark.parametrize(("name", "kwargs"), [("sgd", {"momentum": 0.9}), ("adamw", {})])
def test_multi_tensor_optimizers_match_the_per_tensor_loop(name: str, kwargs: dict) -> None:
    """build_optimizer asks for torch's foreach implementation on every device; on the CPU it
    gives the same parameters, bit for bit, as the per-tensor loop torch would pick there."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    ours = build_optimizer(name, list(nets[0].parameters()), [], 0.1, 0.1, 1e-4, kwargs)
    cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    loop = cls(list(nets[1].parameters()), lr=0.1, weight_decay=1e-4, foreach=False, **kwargs)
    assert ours.defaults["foreach"] is True
    for _ in range(4):
        x = torch.randn(8, 6)
        for net, opt in zip(nets, (ours, loop)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


def _solo_learn_warmup_cosine(step: int, warmup: int, total: int, base: float, start: float, eta_min: float) -> float:
    """Transcription of the closed form of pl_bolts' LinearWarmupCosineAnnealingLR (solo-learn's
    scheduler, stepped once per optimizer step)."""
    if step < warmup:
        return start + step * (base - start) / max(1, warmup - 1)
    return eta_min + 0.5 * (base - eta_min) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_warmup_cosine_values() -> None:
    f = lambda k: 1.0 * warmup_cosine_factor(k, 11, 111, 1.0, 3e-5, 0.0)  # noqa: E731
    assert f(0) == pytest.approx(3e-5)
    assert f(5) == pytest.approx(3e-5 + (1 - 3e-5) * 0.5)
    assert f(10) == f(11) == pytest.approx(1.0)  # the warmup's last step reaches the base rate
    assert f(61) == pytest.approx(0.5)
    assert f(111) == pytest.approx(0.0, abs=1e-12)
    assert f(36) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("warmup", [0, 1, 2, 7])
def test_warmup_cosine_is_solo_learns_schedule(warmup: int) -> None:
    for step in range(40):
        expected = _solo_learn_warmup_cosine(step, warmup, 40, 0.8, 3e-5, 1e-3)
        assert 0.8 * warmup_cosine_factor(step, warmup, 40, 0.8, 3e-5, 1e-3) == pytest.approx(expected, rel=1e-12)


def test_scheduler_steps_every_group_from_its_own_base_lr() -> None:
    ssl, clf = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = build_optimizer("sgd", list(ssl.parameters()), list(clf.parameters()), 1.0, 0.1, 0.0, {})
    sched = build_scheduler("warmup_cosine", opt, steps_per_epoch=10, max_epochs=11, warmup_epochs=1)
    lrs = []
    for _ in range(110):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([3e-5, 3e-5])
    assert lrs[10] == pytest.approx([1.0, 0.1])
    assert lrs[60] == pytest.approx([0.5, 0.05])
    with pytest.raises(ConfigError, match="warmup_epochs"):
        build_scheduler("warmup_cosine", opt, steps_per_epoch=10, max_epochs=1, warmup_epochs=10)
    with pytest.raises(ConfigError, match="unknown scheduler"):
        build_scheduler("exponential", opt, steps_per_epoch=10, max_epochs=1)


def test_step_schedule_multiplies_by_gamma_at_its_epochs_as_multisteplr() -> None:
    """solo-learn's linear-probe schedule: x0.1 at epochs 6 and 8 of 10, per step; every
    group from its own rate; equal to torch's MultiStepLR stepped per epoch."""
    ssl, clf = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = build_optimizer("sgd", list(ssl.parameters()), list(clf.parameters()), 1.0, 0.1, 0.0, {})
    sched = build_scheduler("step", opt, steps_per_epoch=5, max_epochs=10, warmup_epochs=0, lr_decay_steps=[6, 8])
    reference_opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    reference = torch.optim.lr_scheduler.MultiStepLR(reference_opt, milestones=[6, 8], gamma=0.1)
    for step in range(50):
        if step % 5 == 0:
            assert opt.param_groups[0]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"]), step
            reference_opt.step()
            reference.step()
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.001])
    # with a warmup: linear from warmup_start_lr, then the steps
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched = build_scheduler("step", opt, 10, 10, warmup_epochs=2, warmup_start_lr=0.0, lr_decay_steps=[5], gamma=0.5)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(10 / 19) and lrs[19] == lrs[49] == 1.0 and lrs[50] == 0.5
    for steps, match in (
        (None, "needs scheduler.lr_decay_steps"),
        ([8, 6], "must increase"),
        ([1, 6], "begin after the warmup"),
        ([6, 10], "end before max_epochs"),
    ):
        with pytest.raises(ConfigError, match=match):
            build_scheduler("step", opt, 10, 10, warmup_epochs=2, lr_decay_steps=steps)
    with pytest.raises(ConfigError, match="applies to scheduler.name=step"):
        build_scheduler("cosine", opt, 10, 10, lr_decay_steps=[6])
    # one milestone may be given as a number (lr_decay_steps=6 on the command line)
    section = {"name": "step", "warmup_epochs": 0, "lr_decay_steps": 6, "gamma": 0.5}
    sched = optimizers_with_schedule(opt, section, total_steps=100, max_epochs=10)["lr_scheduler"]["scheduler"]
    assert sched.lr_lambdas[0](59) == 1.0 and sched.lr_lambdas[0](60) == 0.5


def test_optimizers_with_schedule_reads_the_scheduler_section() -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    section = {"name": "warmup_cosine", "warmup_epochs": 2, "warmup_start_lr": 0.1, "min_lr": 0.01}
    out = optimizers_with_schedule(opt, section, total_steps=100, max_epochs=10)  # 10 steps per epoch
    assert out["optimizer"] is opt and out["lr_scheduler"]["interval"] == "step"
    sched = out["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.1 + 0.9 * 10 / 19)
    assert lrs[19] == lrs[20] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the cosine, towards min_lr
    assert optimizers_with_schedule(opt, {**section, "name": "none"}, 100, 10) == {"optimizer": opt}


def _lars_net() -> nn.Module:
    """Convolutions in channels_last (as on GPUs), BatchNorm vectors, a linear layer."""
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )
    return net.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("exclude", [True, False])
def test_lars_flat_update_matches_reference_with_channels_last_and_two_groups(exclude: bool) -> None:
    torch.manual_seed(1)
    net = _lars_net()
    ssl, clf = list(net[:3].parameters()), list(net[4].parameters())
    assert ssl[0].is_contiguous(memory_format=torch.channels_last) and not ssl[0].is_contiguous()
    opt = build_optimizer("lars", ssl, clf, 0.3, 0.1, 1e-4, {"eta": 0.02, "exclude_bias_n_norm": exclude})
    refs = [[p.detach().clone() for p in ps] for ps in (ssl, clf)]
    bufs = [[None] * len(ps) for ps in (ssl, clf)]
    for _ in range(3):
        net.zero_grad()
        net(torch.randn(5, 3, 6, 6).contiguous(memory_format=torch.channels_last)).square().mean().backward()
        grads = [[p.grad.clone() for p in ps] for ps in (ssl, clf)]
        opt.step()
        for i, (lr, wd) in enumerate(((0.3, 1e-4), (0.1, 0.0))):
            refs[i] = _reference_lars_step(refs[i], grads[i], bufs[i], lr, wd, 0.02, False, exclude)
    for ps, ref in zip((ssl, clf), refs):
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p.detach(), r, atol=1e-6, rtol=1e-5)


def test_lars_resumes_from_its_state_dict_exactly() -> None:
    """Momentum buffers saved and loaded continue the run bit for bit; a tensor without a
    gradient keeps its value and its buffer."""
    import io

    torch.manual_seed(2)
    nets = [_lars_net(), _lars_net()]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [LARS(net.parameters(), lr=0.2, weight_decay=1e-4, exclude_bias_n_norm=True) for net in nets]
    xs = [torch.randn(5, 3, 6, 6).contiguous(memory_format=torch.channels_last) for _ in range(5)]

    def step(i: int, x: torch.Tensor, freeze_last: bool = False) -> None:
        nets[i].zero_grad(set_to_none=True)
        nets[i](x).square().mean().backward()
        if freeze_last:
            nets[i][4].bias.grad = None
        opts[i].step()

    for x in xs[:2]:
        step(0, x)
        step(1, x)
    saved = io.BytesIO()
    torch.save(opts[1].state_dict(), saved)
    saved.seek(0)
    opts[1] = LARS(nets[1].parameters(), lr=0.2, weight_decay=1e-4, exclude_bias_n_norm=True)
    opts[1].load_state_dict(torch.load(saved))
    bias, buf = nets[0][4].bias.detach().clone(), opts[0].state[nets[0][4].bias]["momentum_buffer"].clone()
    step(0, xs[2], freeze_last=True)
    step(1, xs[2], freeze_last=True)
    assert torch.equal(nets[0][4].bias, bias) and torch.equal(opts[0].state[nets[0][4].bias]["momentum_buffer"], buf)
    for x in xs[3:]:
        step(0, x)
        step(1, x)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


def test_lars_defaults_are_solo_learns() -> None:
    """A solo-learn LARS config without eta trains with solo-learn's 1e-3 (the paper's CIFAR
    configs write their 0.02 out)."""
    opt = build_optimizer("lars", [torch.nn.Parameter(torch.ones(2, 2))], [], 0.1, 0.1, 0.0, {})
    assert opt.param_groups[0]["eta"] == 1e-3 and opt.param_groups[0]["momentum"] == 0.9
    assert not opt.param_groups[0]["clip_lr"] and not opt.param_groups[0]["exclude_bias_n_norm"]


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_lars_gathered_factors_equal_the_per_tensor_products(momentum: float) -> None:
    """The GPU path (trust ratios gathered to one per element, one flat multiply) and the CPU
    path (one product per tensor) update the parameters bit for bit alike."""
    torch.manual_seed(3)
    nets = [_lars_net(), _lars_net()]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = []
    for net, gather in zip(nets, (True, False)):
        ssl, clf = list(net[:3].parameters()), list(net[4].parameters())
        kwargs = {"eta": 0.02, "exclude_bias_n_norm": True, "clip_lr": True, "momentum": momentum}
        opts.append(build_optimizer("lars", ssl, clf, 0.3, 0.1, 1e-4, kwargs))
        opts[-1]._gather = gather
    for _ in range(3):
        x = torch.randn(5, 3, 6, 6).contiguous(memory_format=torch.channels_last)
        for net, opt in zip(nets, opts):
            net.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.equal(a, b)
    assert any(flat.segments is not None for flat in opts[0]._flat.values())
    assert all(flat.segments is None for flat in opts[1]._flat.values())


def test_lars_pickled_whole_continues_from_its_momentum() -> None:
    import io

    torch.manual_seed(5)
    w = nn.Parameter(torch.randn(3, 3))
    opt = LARS([w], lr=0.1, weight_decay=1e-4)
    w.grad = torch.randn(3, 3)
    opt.step()
    saved = io.BytesIO()
    torch.save(opt, saved)
    saved.seek(0)
    copy = torch.load(saved, weights_only=False)
    twin = copy.param_groups[0]["params"][0]
    twin.grad = w.grad.clone()
    opt.step()
    copy.step()
    assert torch.equal(twin, w) and torch.equal(copy.state[twin]["momentum_buffer"], opt.state[w]["momentum_buffer"])


def test_lars_momentum_buffers_are_views_of_one_flat_buffer_per_group() -> None:
    """The state holds one buffer per tensor, shaped and strided as the tensor, all sharing
    one storage per group: ``torch.save`` writes each group's momentum once."""
    torch.manual_seed(4)
    net = _lars_net()
    params = list(net.parameters())
    opt = LARS(params, lr=0.1, weight_decay=1e-4)
    net(torch.randn(5, 3, 6, 6).contiguous(memory_format=torch.channels_last)).square().mean().backward()
    opt.step()
    bufs = [opt.state[p]["momentum_buffer"] for p in params]
    assert len({b.untyped_storage().data_ptr() for b in bufs}) == 1
    for p, b in zip(params, bufs):
        assert b.shape == p.shape and b.stride() == p.stride()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lars_on_cuda_gathers_its_ratios_and_updates_as_on_the_cpu() -> None:
    """The gathered path is the default on CUDA; given the same gradients it updates as the CPU
    path does (to float rounding)."""
    torch.manual_seed(6)
    nets = [_lars_net(), _lars_net().cuda()]
    nets[1].load_state_dict(nets[0].state_dict())
    kwargs = {"lr": 0.3, "weight_decay": 1e-4, "eta": 0.02, "clip_lr": True, "exclude_bias_n_norm": True}
    opts = [LARS(net.parameters(), **kwargs) for net in nets]
    for _ in range(3):
        nets[0].zero_grad()
        nets[0](torch.randn(5, 3, 6, 6).contiguous(memory_format=torch.channels_last)).square().mean().backward()
        for p, q in zip(nets[0].parameters(), nets[1].parameters()):
            q.grad = p.grad.to("cuda", memory_format=torch.preserve_format)
        for opt in opts:
            opt.step()
    assert all(flat.segments is not None for flat in opts[1]._flat.values())
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(q.cpu(), p.detach(), atol=1e-6, rtol=1e-5)
