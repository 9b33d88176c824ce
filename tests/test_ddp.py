"""DDP on the CPU (gloo): two processes train a few steps, hold the same C and report the
same epoch metrics, computed over both ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, make_image_folder


def _two_ranks(
    image_data,
    tmp_path: Path,
    config: str,
    *extra: str,
    env: dict[str, str] | None = None,
    timeout: float = 900,
    own_group: bool = False,
) -> subprocess.CompletedProcess:
    """tests/ddp_script.py on two CPU processes (gloo); ``env`` adds its fault injections.
    Its validation split has an odd number of images (15), which two ranks cannot share evenly."""
    train = image_data[0]
    val = tmp_path / "val15" if (tmp_path / "val15").exists() else make_image_folder(tmp_path / "val15", per_class=5)
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_script.py"), str(train), str(val), str(tmp_path), config, *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=own_group,  # a process group of its own, which the test may signal
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("isoloss.yaml", ["++knn.enabled=True", "++knn.k=5"]),
        # the compiled step, with C's all-reduce between its two graphs
        ("isoloss-noema.yaml", ["++performance.compile=True", "++performance.compile_scope=step"]),
        # the splits on the device: training and validation sharded by the data module itself
        # and the online 2-D map: both ranks extract, rank 0 alone draws
        (
            "byol.yaml",
            ["++data.pipeline=resident", "++knn.enabled=True", "++knn.k=5", "++umap.enabled=True", "++umap.method=pca"],
        ),
    ],
)
def test_ddp_ranks_share_the_correlation_matrix(config: str, extra: list[str], image_data, tmp_path: Path) -> None:
    proc = _two_ranks(image_data, tmp_path, config, *extra)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "sync_dist=True" not in proc.stderr  # Lightning's advice is wrong for metrics reduced already
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["steps"] == r1["steps"] == 3
    assert torch.count_nonzero(r0["C"]) > 0
    torch.testing.assert_close(r0["C"], r1["C"], rtol=0, atol=0)  # identical, not just close
    torch.testing.assert_close(r0["weight"], r1["weight"])  # DDP keeps the replicas in sync
    # Validation: every pipeline shards its split without padding, each image once overall,
    # and val_loss is the mean over the 15 images (not over 2 x the truncated mean count, 14).
    assert sorted([r0["val_images"], r1["val_images"]]) == [7, 8]
    assert r0["val_loss"] == r1["val_loss"] == pytest.approx((r0["val_loss_sum"] + r1["val_loss_sum"]) / 15, rel=1e-5)
    # The online kNN: each rank extracts its share, both hold the whole bank and agree.
    if "++knn.enabled=True" in extra:
        assert r0["knn_bank"] == r1["knn_bank"] == 48  # every labelled training image once
        assert r0["knn_acc1"] == r1["knn_acc1"] and 0 <= r0["knn_acc1"] <= 100
    if "++umap.enabled=True" in extra:
        assert len(r0["maps"]) == 1 and r1["maps"] == [], (r0["maps"], r1["maps"])
        assert Path(r0["maps"][0]).name == "pca_epoch0001.png" and Path(r0["maps"][0]).is_file()
    # The epoch's training metrics cover both ranks' shares of the batch, not rank 0's alone.
    m0, m1, l0, l1 = r0["epoch_metrics"], r1["epoch_metrics"], r0["local_sums"], r1["local_sums"]
    assert l0["train_neg_cos_sim"] != l1["train_neg_cos_sim"]  # the ranks saw different images
    for key in ("train_neg_cos_sim", "train_z_norm", "train_acc1"):
        assert m0[key] == m1[key], key
    loss = (l0["train_neg_cos_sim"] + l1["train_neg_cos_sim"]) / (l0["steps"] + l1["steps"])
    assert m0["train_neg_cos_sim"] == pytest.approx(loss, rel=1e-6)
    acc = 100 * (l0["train_hits"] + l1["train_hits"]) / (l0["train_count"] + l1["train_count"])
    assert m0["train_acc1"] == pytest.approx(acc, rel=1e-6)


def test_a_nonfinite_loss_on_one_rank_stops_every_rank(image_data, tmp_path: Path) -> None:
    """DDP broadcasts rank 0's buffers before every forward pass; the counter of non-finite
    losses must stay rank-local and be summed when read, or rank 1's NaN is forgotten."""
    proc = _two_ranks(image_data, tmp_path, "isoloss.yaml", env={"IVREG_TEST_NONFINITE_ON_RANK1": "1"})
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "the SSL loss became NaN or infinite in 1 step(s) of epoch 0" in proc.stderr
    assert "No checkpoint was written;" in proc.stderr  # epoch 0 had none to keep


def test_an_error_on_the_first_process_ends_the_others(image_data, tmp_path: Path) -> None:
    """The error reaches the command line and no process is left behind. (With NCCL the others
    would wait in a collective for the process group's timeout unless killed; gloo notices the
    closed connection, so tests/test_callbacks.py checks the killing itself.)"""
    proc = _two_ranks(image_data, tmp_path, "isoloss.yaml", env={"IVREG_TEST_FAIL_ON_RANK": "0"})
    assert proc.returncode != 0
    assert "No space left on device (simulated, rank 0 only)" in proc.stderr


def test_an_error_on_the_second_process_is_what_the_first_reports(image_data, tmp_path: Path) -> None:
    """The first process, waiting in a collective for the second, lost its connection: it says
    so in one line (and what the run folder keeps), not with gloo's traceback."""
    proc = _two_ranks(image_data, tmp_path, "isoloss.yaml", env={"IVREG_TEST_FAIL_ON_RANK": "1"})
    assert proc.returncode != 0
    assert "No space left on device (simulated, rank 1 only)" in proc.stderr
    assert "another process of this run stopped, and this one lost its connection" in proc.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_a_sigterm_to_one_process_stops_every_process_at_the_same_step(rank: int, image_data, tmp_path: Path) -> None:
    """Lightning 2.6 broadcasts inside its SIGTERM handler: a signal that reached the second
    process alone paired that broadcast with another collective, and both processes hung
    (a second SIGTERM did nothing). Every process must stop, with 143 and what is kept."""
    env = {"IVREG_TEST_SIGTERM_ON_RANK": str(rank)}
    proc = _two_ranks(image_data, tmp_path, "isoloss.yaml", "max_epochs=2", env=env, timeout=240)
    assert proc.returncode == 143, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "stopped by SIGTERM in epoch 1: " in proc.stderr and "holds 1 finished epoch(s)" in proc.stderr


def test_a_sigterm_to_the_process_group_with_workers_exits_with_143(image_data, tmp_path: Path) -> None:
    """scancel signals the DataLoader workers too: the error their death raises in a process
    whose SIGTERM was only noted (for agreement after the step) is the same stop."""
    env = {"IVREG_TEST_SIGTERM_GROUP": "1"}
    extra = ("max_epochs=2", "data.num_workers=1")
    proc = _two_ranks(image_data, tmp_path, "isoloss.yaml", *extra, env=env, timeout=240, own_group=True)
    assert proc.returncode == 143, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "stopped by SIGTERM in epoch 1: " in proc.stderr and "holds 1 finished epoch(s)" in proc.stderr


def _correlation_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from ivreg.predictors import RunningCorrelation

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(100 + rank)  # every rank sees different samples
    corr = RunningCorrelation(6, tau=0.5)
    for _ in range(2):
        corr.update([torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)])
    torch.save(corr.C, f"{out}/C{rank}.pt")
    dist.destroy_process_group()


def test_correlation_matrix_is_the_global_batch_statistic(tmp_path: Path) -> None:
    """The all-reduce makes C the correlation of the global batch, not of one rank's shard."""
    import socket

    import torch.multiprocessing as mp

    from ivreg.predictors import RunningCorrelation

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_correlation_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    c0, c1 = torch.load(tmp_path / "C0.pt"), torch.load(tmp_path / "C1.pt")
    torch.testing.assert_close(c0, c1, rtol=0, atol=0)

    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    single = RunningCorrelation(6, tau=0.5)
    for _ in range(2):
        views = [[torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)] for g in gens]
        single.update([torch.cat([views[0][v], views[1][v]]) for v in range(2)])
    torch.testing.assert_close(c0, single.C)
