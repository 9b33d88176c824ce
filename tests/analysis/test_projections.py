"""The projection-geometry diagnostic: its statistics on constructed projections, and the
command line on a checkpoint of a real (tiny) SSLMethod."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ivreg.analysis.projections import batch_geometry, main
from ivreg.predictors import SpectralPredictor

from ..eval_helpers import make_colour_folder, pretrain_config


def _identity_method(predictor: nn.Module) -> SimpleNamespace:
    """Backbone and projector that pass the 'views' through: the views *are* the projections."""
    return SimpleNamespace(backbone=nn.Identity(), projector=nn.Identity(), predictor=predictor)


def _collapsed_bulk_with_outliers(batch: int = 100, dim: int = 8, big: float = 1000.0) -> torch.Tensor:
    """80% of the samples near one vector of norm ~1, 20% along e_0 with norm ``big``."""
    g = torch.Generator().manual_seed(0)
    bulk = torch.ones(dim) / dim**0.5 + 1e-4 * torch.randn(batch * 4 // 5, dim, generator=g)
    outliers = torch.zeros(batch // 5, dim)
    outliers[:, 0] = big * (1 + 0.01 * torch.rand(batch // 5, generator=g))
    return torch.cat([bulk, outliers])


def test_geometry_of_a_collapsed_bulk_with_outliers() -> None:
    z = _collapsed_bulk_with_outliers()
    predictor = SpectralPredictor(8, alpha=0.5, normalize=True, eps_iso=0.0, tau=0.5, with_sqrt=True)
    predictor.observe([z])  # a C dominated by the outliers, as after a collapse
    c_before = predictor.corr.C.clone()
    g = batch_geometry(_identity_method(predictor), z, z)
    assert torch.equal(predictor.corr.C, c_before)  # measuring does not move the run's C
    assert g["bulk_cos"] > 0.9999
    energy_outliers = 20 * 1000.0**2
    assert g["outlier_share"] == pytest.approx(energy_outliers / (energy_outliers + 80), rel=1e-3)
    assert g["z_norm"].shape == (100,) and g["z_norm"].max() == pytest.approx(1010, rel=1e-2)
    # The outliers lie along C's top eigenvector (||p|| = ||z||); the bulk's share of e_0 is
    # 1/sqrt(8) of its norm and the rest of C's eigenvalues are ~0 against 1e6.
    assert g["p_over_z"][-20:].min() == pytest.approx(1.0, abs=1e-3)
    assert g["p_over_z"][:80].max() < 0.4
    assert g["max_zz"] == pytest.approx(1010.0**2, rel=2e-2)  # over float16's 65,504
    assert float(g["max_gram"]) == pytest.approx(float((z[:, 0] ** 2).sum()) / 100, rel=1e-5)


def test_command_line_on_a_tiny_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ivreg.method import SSLMethod

    train = make_colour_folder(tmp_path / "train", per_class=4)
    cfg = pretrain_config(train, train)
    cfg["method"] = "directpred"
    cfg["method_kwargs"].update(iso=True, dp_tau=0.5, proj_hidden_dim=32, proj_output_dim=16)
    cfg["data"]["num_classes"] = 3
    torch.manual_seed(0)
    method = SSLMethod(cfg)
    method.predictor.observe([torch.randn(12, 16)])
    path = tmp_path / "run" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": method.state_dict(), "hyper_parameters": {"cfg": cfg}, "epoch": 3}, path)

    assert main([str(path.parent), "--batches", "2", "--batch-size", "6"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "after epoch 3, 2 batches of 6 (training mode)"
    quantiles = [float(x) for x in out[1].split(": ")[1].split(" / ")]
    assert len(quantiles) == 5 and quantiles == sorted(quantiles) and quantiles[0] > 0
    assert out[5].startswith("largest |z_i z'_i|: ") and "float16's 65504" in out[5]

    with pytest.raises(SystemExit) as too_big:  # 12 images cannot fill one batch of 64
        main([str(path), "--batch-size", "64"])
    assert too_big.value.code == 2
    assert "fewer than --batch-size 64 images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as missing:
        main([str(tmp_path / "nothing")])
    assert missing.value.code == 2
