"""SSLMethod's readouts and metric bookkeeping, without a trainer."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from ivreg.config import compose, prepare_config
from ivreg.method import SSLMethod, metric_means

from .conftest import CIFAR_CONFIGS


def _model(*overrides: str, config: str = "isoloss-noema.yaml") -> SSLMethod:
    small = [
        "backbone.name=resnet10",
        "++method_kwargs.proj_hidden_dim=32",
        "++method_kwargs.pred_hidden_dim=32",
        "++method_kwargs.proj_output_dim=16",
        "data.dataset=cifar10",
    ]
    cfg = prepare_config(compose(str(CIFAR_CONFIGS), config, [*small, *overrides]))
    cfg.data.num_classes = 10
    torch.manual_seed(0)
    return SSLMethod(OmegaConf.to_container(cfg, resolve=True))


def test_metric_means_divides_losses_by_steps_and_hits_by_labelled_images() -> None:
    sums = {
        "train_neg_cos_sim": torch.tensor(-3.0),
        "train_class_loss": torch.tensor(6.0),
        "train_hits": torch.tensor(15.0),
        "train_hits_raw": torch.tensor(5.0),
        "train_count": torch.tensor(20.0),
    }
    means = metric_means(sums, torch.tensor(3.0))
    assert set(means) == {"train_neg_cos_sim", "train_class_loss", "train_acc1", "train_acc1_raw"}
    assert float(means["train_neg_cos_sim"]) == -1.0 and float(means["train_class_loss"]) == 2.0
    assert float(means["train_acc1"]) == 75.0 and float(means["train_acc1_raw"]) == 25.0
    unlabelled = metric_means({**sums, "train_count": torch.tensor(0.0), "train_hits": torch.tensor(0.0)}, 1)
    assert math.isnan(float(unlabelled["train_acc1"]))  # no labelled image: no accuracy, not 0


def test_every_readout_is_trained_beside_the_ssl_loss_and_the_random_backbone_stays_frozen() -> None:
    model = _model("++report.raw_readout=True", "++report.compare_random_init=True")
    assert [r.suffix for r in model.readouts()] == ["", "_raw", "_random"]
    views = [torch.rand(6, 3, 32, 32), torch.rand(6, 3, 32, 32)]
    labels = torch.tensor([0, 1, 2, 3, -1, 5])
    loss, metrics = model.forward_step(views, labels)
    assert float(metrics["train_count"]) == 10  # 5 labelled images, 2 views
    class_losses = sum(metrics[f"train_class_loss{s}"] for s in ("", "_raw", "_random"))
    assert float(loss.detach()) == pytest.approx(float(metrics["train_neg_cos_sim"] + class_losses), rel=1e-5)
    for suffix in ("", "_raw", "_random"):
        assert 0 <= float(metrics[f"train_hits{suffix}"]) <= 10
        assert not metrics[f"train_class_loss{suffix}"].requires_grad  # recorded detached
    loss.backward()
    assert all(r.module.linear.weight.grad is not None for r in model.readouts())
    assert all(p.grad is None for p in model.random_backbone.parameters())


def test_validation_reports_every_readout_under_its_suffix(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("++report.raw_readout=True", "++report.compare_random_init=True").eval()
    logged: dict[str, float] = {}
    monkeypatch.setattr(model, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    images, labels = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5, -1, -1])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.validation_step((images, labels), 0)
        model.on_validation_epoch_end()
    assert set(logged) == {"val_acc1", "val_acc1_raw", "val_acc1_random", "val_acc5", "val_loss"}
    # the random-init readout sees the random backbone: its logits, not the online ones
    feats_random = model.random_backbone(images[:6])
    expected = (model.random_readout(feats_random).argmax(-1) == labels[:6]).float().mean() * 100
    assert logged["val_acc1_random"] == pytest.approx(float(expected))
    expected_online = (model.readout(model.backbone(images[:6])).argmax(-1) == labels[:6]).float().mean() * 100
    assert logged["val_acc1"] == pytest.approx(float(expected_online))


def test_without_report_options_only_the_standardised_readout_exists() -> None:
    model = _model()
    assert [r.suffix for r in model.readouts()] == [""]
    assert model.raw_readout is None and model.random_backbone is None
    _, metrics = model.forward_step([torch.rand(4, 3, 32, 32)] * 2, torch.tensor([0, 1, 2, 3]))
    assert set(metrics) == {
        "train_neg_cos_sim",
        "train_z_std",
        "train_z_norm",
        "train_class_loss",
        "train_hits",
        "train_count",
    }


def test_multi_crop_targets_and_readouts_see_only_the_large_crops() -> None:
    """solo-learn's multi-crop: two 32 px views then two 16 px ones. The EMA copy runs on the
    large crops only, the loss pairs every view with each large crop's target (2 x 3 pairs),
    and the readouts train on the large crops' features."""
    model = _model("++report.momentum_readout=True", config="byol.yaml")
    seen: list[tuple[int, ...]] = []
    model.target.net[0].register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    gen = torch.Generator().manual_seed(0)
    views = [torch.rand(4, 3, s, s, generator=gen) for s in (32, 32, 16, 16)]
    labels = torch.tensor([0, 1, 2, 3])
    model.train()
    loss, metrics = model.forward_step(views, labels)
    assert seen and all(shape[-1] == 32 for shape in seen)
    assert float(metrics["train_count"]) == 8  # 2 large crops x 4 images
    model.eval()  # the same BatchNorm statistics for the recomputation below
    with torch.no_grad():
        loss, _ = model.forward_step(views, labels)
        z = [model.projector(model.backbone(v)) for v in views]
        p = [model.predictor(v)[0] for v in z]
        z_t = [model.target.net(v) for v in views[:2]]
        ssl = sum(model.loss_fn(z[a], p[a], None, z_t[b]) for b in range(2) for a in range(4) if a != b)
        classes = sum(r.module.loss_and_hits(f, labels.repeat(2))[0] for r, f in _readout_features(model, views))
    torch.testing.assert_close(loss, ssl + classes, rtol=1e-4, atol=1e-5)


def _readout_features(model: SSLMethod, views: list[torch.Tensor]) -> list:
    large = torch.cat(views[:2])
    return [(r, (model.backbone if r.features == "online" else model.target.net[0])(large)) for r in model.readouts()]


def test_the_momentum_readout_reads_the_ema_copys_backbone() -> None:
    model = _model("++report.momentum_readout=True", config="byol.yaml")
    assert [r.suffix for r in model.readouts()] == ["", "_momentum"]
    with torch.no_grad():  # make the copy differ from the online network
        for p in model.target.net.parameters():
            p.mul_(0.5)
    views, labels = [torch.rand(4, 3, 32, 32)] * 2, torch.tensor([0, 1, 2, 3])
    loss, metrics = model.forward_step(views, labels)
    copy_feats = model.target.net[0](torch.cat(views))
    expected, _, _ = model.momentum_readout.loss_and_hits(copy_feats, labels.repeat(2))
    assert float(metrics["train_class_loss_momentum"]) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert model.momentum_readout.linear.weight.grad is not None
    assert all(p.grad is None for p in model.target.net.parameters())  # the copy follows by EMA only
