"""Loading backbones from checkpoints, and one clear error for each way a checkpoint can be wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ivreg
from ivreg.backbones import build_backbone
from ivreg.checkpoints import load_backbone, load_config
from ivreg.errors import CheckpointError

from .conftest import ROOT
from .eval_helpers import pretrain_config, write_checkpoint


@pytest.fixture(scope="module")
def resnet18_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    net = build_backbone("resnet18")
    with torch.no_grad():  # non-default statistics, so that loading them is checked too
        net.bn1.running_mean.uniform_()
    path = write_checkpoint(
        tmp_path_factory.mktemp("r18") / "run" / "last.ckpt", pretrain_config(None, None, "resnet18"), net
    )
    return path, net


def test_load_backbone_returns_the_pretrained_resnet_in_eval_mode(resnet18_ckpt):
    path, net = resnet18_ckpt
    loaded = ivreg.load_backbone(path)
    assert ivreg.load_backbone is load_backbone and ivreg.__version__ == "0.1.0"
    assert not loaded.training and loaded.num_features == 512
    assert isinstance(loaded.fc, torch.nn.Identity)
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    same = load_backbone(path.parent, arch="resnet18")  # a run folder stands for its last.ckpt
    assert torch.equal(same.bn1.running_mean, net.bn1.running_mean)
    assert load_config(path)["backbone"]["name"] == "resnet18"


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint .*nowhere\.ckpt does not exist"):
        load_backbone(tmp_path / "nowhere.ckpt")
    with pytest.raises(CheckpointError, match="is a folder without last.ckpt"):
        load_backbone(tmp_path)


def test_corrupt_and_foreign_files(tmp_path, resnet18_ckpt):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.ckpt is not a PyTorch checkpoint; pass a run's last.ckpt"):
        load_backbone(garbage)
    config = tmp_path / "config.yaml"  # the run folder's other file, given by mistake
    config.write_text("name: run\nseed: 5\n")
    with pytest.raises(CheckpointError, match="config.yaml is not a PyTorch checkpoint; pass a run's last.ckpt"):
        load_backbone(config)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(resnet18_ckpt[0].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"not a readable PyTorch checkpoint \(corrupt or truncated\?\): ") as e:
        load_backbone(truncated)
    assert "internal" not in str(e.value)  # torch's first sentence only, not its paragraph
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.ckpt is empty \\(0 bytes\\): its write never happened"):
        load_backbone(empty)
    plain = tmp_path / "weights.pt"
    torch.save(build_backbone("resnet10").state_dict(), plain)  # a bare state dict, not Lightning's
    with pytest.raises(CheckpointError, match="is a bare state_dict, not a Lightning checkpoint written by ivreg; to"):
        load_backbone(plain)
    torch.save({"weights": [1, 2]}, plain)
    with pytest.raises(CheckpointError, match="is not a Lightning checkpoint: it has no 'state_dict'"):
        load_backbone(plain)


def test_checkpoint_without_backbone_weights(tmp_path):
    path = write_checkpoint(
        tmp_path / "heads.ckpt", pretrain_config(None, None), None, extra={"projector.0.weight": torch.zeros(4, 4)}
    )
    with pytest.raises(CheckpointError, match=r"holds no backbone weights \(no 'backbone\.\*' entries"):
        load_backbone(path)


def test_checkpoint_without_config(tmp_path):
    path = write_checkpoint(tmp_path / "nocfg.ckpt", None, build_backbone("resnet10"))
    with pytest.raises(CheckpointError, match=r"has no run config \(hyper_parameters.cfg\).*backbone.name=resnet18"):
        load_backbone(path)


SOLO_CIFAR = {"backbone": {"name": "resnet18"}, "data": {"dataset": "cifar10"}}


@pytest.mark.parametrize("layout", ["solo-learn", "solo-learn-0.x", "ddp", "bare"])
def test_another_librarys_checkpoint_loads_when_described(tmp_path, layout):
    """solo-learn's (backbone.*, next to its projector, momentum copy and classifier; encoder.*
    before 1.0), a DDP module's and a bare torchvision state_dict: the weights are the same, the
    architecture comes from the description (CIFAR-10: the 3x3 stem with padding 2, as solo-learn's)."""
    torch.manual_seed(0)
    source = build_backbone("resnet18", cifar_stem=True)
    weights = source.state_dict()
    heads = {"projector.0.weight": torch.zeros(4, 512), "momentum_backbone.conv1.weight": torch.zeros(64, 3, 3, 3)}
    prefix = {"solo-learn": "backbone.", "solo-learn-0.x": "encoder.", "ddp": "module.", "bare": ""}[layout]
    state = {f"{prefix}{k}": v for k, v in weights.items()}
    path = tmp_path / f"{layout}.ckpt"
    if layout == "bare":
        torch.save(state, path)
    else:
        torch.save({"state_dict": state | (heads if prefix != "module." else {}), "epoch": 999}, path)
    with pytest.raises(CheckpointError, match=r"not .*written by ivreg.*name its architecture and data"):
        load_backbone(path)
    net = load_backbone(path, foreign=SOLO_CIFAR)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.padding == (2, 2)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0, msg=key)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(net(x), source.eval()(x))


def test_a_whole_torchvision_classifier_state_dict_loads_as_its_backbone(tmp_path):
    """torchvision's resnet18().state_dict(): its fc layer is dropped, and BatchNorm step
    counters missing from a file (some libraries drop them) are no reason to refuse it."""
    import torchvision

    torch.manual_seed(0)
    full = torchvision.models.resnet18()
    state = {k: v for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    net = load_backbone(path, foreign={"backbone": {"name": "resnet18"}, "data": {"dataset": "imagenet100"}})
    full.fc = torch.nn.Identity()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(net(x), full.eval()(x))


def test_a_described_foreign_checkpoint_of_another_architecture_is_named(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(build_backbone("resnet50").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"do not fit a resnet18 \(backbone.name and backbone.kwargs; .*CIFAR"):
        load_backbone(path, foreign=SOLO_CIFAR)
    mixed = tmp_path / "mixed.ckpt"  # the weights split over two prefixes: the error says which it read
    weights = build_backbone("resnet18", cifar_stem=True).state_dict()
    state = {(f"backbone.{k}" if k.startswith("conv1") else f"encoder.{k}"): v for k, v in weights.items()}
    torch.save({"state_dict": state}, mixed)
    with pytest.raises(CheckpointError, match=r"the weights read are those under 'backbone.'\)"):
        load_backbone(mixed, foreign=SOLO_CIFAR)
    with pytest.raises(CheckpointError, match="name its architecture and data"):
        load_backbone(path, foreign={"backbone": {"name": "resnet50"}})  # no dataset: the stem is unknown


def test_weights_of_another_architecture(tmp_path):
    path = write_checkpoint(tmp_path / "r50.ckpt", pretrain_config(None, None, "resnet18"), build_backbone("resnet50"))
    with pytest.raises(CheckpointError, match=r"do not fit a resnet18 .*shape mismatch.*unexpected weight") as err:
        load_backbone(path)
    assert "conv3" in str(err.value) or "layer1.0.conv1.weight" in str(err.value)  # names an offending weight


def test_explicit_arch_that_disagrees(resnet18_ckpt):
    with pytest.raises(CheckpointError, match="arch='resnet50' was requested but the checkpoint's config names"):
        load_backbone(resnet18_ckpt[0], arch="resnet50")


def test_cli_reports_a_bad_checkpoint_in_one_line_and_exits_2(tmp_path):
    path = write_checkpoint(tmp_path / "r50.ckpt", pretrain_config(None, None, "resnet18"), build_backbone("resnet50"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main_linear.py"), f"pretrained_feature_extractor={path}", "accelerator=cpu"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the backbone weights in {path} do not fit a resnet18")
    assert not (tmp_path / "trained_models").exists()  # nothing written before the check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is visible")
def test_map_location_cuda_without_a_gpu_is_named(resnet18_ckpt):
    with pytest.raises(CheckpointError, match="map_location='cuda' but no CUDA GPU is visible"):
        load_backbone(resnet18_ckpt[0], map_location="cuda")
