import pytest
import torch

from ivreg.norms import ViewGroups, share_view_groups
from ivreg.predictors import (
    MLPPredictor,
    RunningCorrelation,
    SpectralPredictor,
    choose_eigh_on_host,
    observe_and_predict,
    sample_correlation,
    spectrum_metrics,
)


def _views(seed: int, n: int = 2, b: int = 32, d: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 3.0, d)
    return [torch.randn(b, d, generator=gen) * scale for _ in range(n)]


def test_running_correlation_is_one_ema_update_per_view() -> None:
    corr = RunningCorrelation(8, tau=0.7)
    expected = torch.zeros(8, 8)
    for step in range(3):
        views = _views(step)
        corr.update(views)
        for z in views:
            expected = 0.7 * expected + 0.3 * (z.T @ z) / z.shape[0]
    torch.testing.assert_close(corr.C, expected)
    assert corr.C.dtype == torch.float32
    assert "C" in corr.state_dict()


def test_running_correlation_is_float32_under_half_inputs() -> None:
    corr = RunningCorrelation(8, tau=0.5)
    corr.update([v.to(torch.bfloat16) for v in _views(0)])
    assert corr.C.dtype == torch.float32 and torch.isfinite(corr.C).all()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_spectral_predictor_matrix_is_u_diag_s_alpha_ut(alpha: float, normalize: bool) -> None:
    pred = SpectralPredictor(8, alpha=alpha, normalize=normalize, eps_iso=0.0, tau=0.5, with_sqrt=True)
    pred.observe(_views(1))
    c = pred.corr.C.double()
    s, u = torch.linalg.eigh(c)
    if normalize:
        s = s.clamp_min(0) / s.max()
    else:
        s = s.clamp(0, 1e6)
    expected = (u * s.pow(alpha)) @ u.T
    w = pred.matrix().double()
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w, w.T, atol=1e-5 * w.abs().max().item(), rtol=0)
    z = torch.randn(5, 8)
    p, p_sqrt = pred(z)
    torch.testing.assert_close(p, z @ pred.matrix(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p_sqrt @ pred.matrix(0.5), p, atol=1e-4, rtol=1e-4)


def test_normalisation_puts_top_eigenvalue_at_one_plus_eps() -> None:
    pred = SpectralPredictor(8, alpha=1.0, normalize=True, eps_iso=0.1, tau=0.5, with_sqrt=False)
    pred.observe(_views(2))
    s = pred.scaled_eigvals()
    assert s.max().item() == pytest.approx(1.1, abs=1e-6)
    assert s.min().item() >= 0.1 - 1e-6


def test_directcopy_is_normalised_correlation_plus_eps_identity() -> None:
    pred = SpectralPredictor(8, alpha=1.0, normalize=True, eps_iso=0.25, tau=0.5, with_sqrt=False)
    pred.observe(_views(3))
    c = pred.corr.C
    expected = c / torch.linalg.eigvalsh(c).max() + 0.25 * torch.eye(8)
    torch.testing.assert_close(pred.matrix(), expected, atol=1e-5, rtol=1e-4)


def test_unnormalised_eigenvalues_are_clipped_and_nan_free() -> None:
    pred = SpectralPredictor(4, alpha=1.0, normalize=False, eps_iso=0.0, tau=0.5, with_sqrt=False)
    pred.corr.C.copy_(torch.diag(torch.tensor([-1.0, 0.5, 2.0, 3e6])))
    pred.decompose()
    torch.testing.assert_close(pred.scaled_eigvals(), torch.tensor([0.0, 0.5, 2.0, 1e6]))


def test_no_gradient_flows_into_the_predictor_matrix() -> None:
    pred = SpectralPredictor(8, alpha=0.5, normalize=True, eps_iso=0.0, tau=0.5, with_sqrt=True)
    pred.observe(_views(4))
    z = torch.randn(3, 8, requires_grad=True)
    p, _ = pred(z)
    p.sum().backward()
    torch.testing.assert_close(z.grad, pred.matrix().sum(1).expand(3, 8))
    assert not any(t.requires_grad for t in (pred.eigvals, pred.eigvecs, pred.corr.C))


def test_one_decomposition_serves_all_views_of_a_step() -> None:
    pred = SpectralPredictor(8, alpha=0.5, normalize=True, eps_iso=0.0, tau=0.5, with_sqrt=False)
    views = _views(5)
    pred.observe(views)
    w = pred.matrix()
    for z in views:
        torch.testing.assert_close(pred(z)[0], z @ w, atol=1e-5, rtol=1e-4)


def test_per_view_order_predicts_each_view_from_the_c_after_its_own_update() -> None:
    """The reference's order: view 1's W_p comes from C after view 1 only, view 2's after both;
    the default order predicts both from C after both."""
    views = _views(6)
    per_view = SpectralPredictor(8, alpha=0.5, normalize=True, eps_iso=0.0, tau=0.5, with_sqrt=True)
    p, p_sqrt = observe_and_predict(per_view, torch.cat(views), 2, per_view=True)
    reference = SpectralPredictor(8, alpha=0.5, normalize=True, eps_iso=0.0, tau=0.5, with_sqrt=True)
    for z, p_view, p_sqrt_view in zip(views, p.chunk(2), p_sqrt.chunk(2)):
        reference.observe([z])
        torch.testing.assert_close(p_view, z @ reference.matrix(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p_sqrt_view, z @ reference.matrix(0.5), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(per_view.corr.C, reference.corr.C, atol=0, rtol=0)

    once = SpectralPredictor(8, alpha=0.5, normalize=True, eps_iso=0.0, tau=0.5, with_sqrt=True)
    together, _ = observe_and_predict(once, torch.cat(views), 2)
    torch.testing.assert_close(once.corr.C, reference.corr.C, atol=1e-6, rtol=1e-6)  # same C at the end
    torch.testing.assert_close(together[32:], p[32:], atol=1e-5, rtol=1e-4)  # view 2 agrees
    assert not torch.allclose(together[:32], p[:32], atol=1e-3)  # view 1 does not


def test_all_views_at_once_equal_one_view_at_a_time() -> None:
    """``predict_views`` on the concatenated views gives each view's own prediction: the
    spectral predictor in one product, the MLP with BatchNorm statistics per view."""
    views = _views(7, n=3)
    spectral = SpectralPredictor(8, alpha=0.5, normalize=True, eps_iso=0.0, tau=0.5, with_sqrt=True)
    mlp = MLPPredictor(8, 16)
    for pred in (spectral, mlp):
        p, p_sqrt = observe_and_predict(pred, torch.cat(views), 3)
        for view, p_view in zip(views, p.chunk(3)):
            torch.testing.assert_close(p_view, pred(view)[0], atol=1e-5, rtol=1e-4)
        if pred is spectral:
            torch.testing.assert_close(p_sqrt, torch.cat(views) @ pred.matrix(0.5), atol=1e-5, rtol=1e-4)
        else:
            assert p_sqrt is None
    # The MLP's BatchNorm normalises each view with its own statistics: shifting one view
    # leaves the prediction of the others unchanged.
    shifted = [views[0] + 5.0, views[1], views[2]]
    p_shifted, _ = observe_and_predict(mlp, torch.cat(shifted), 3)
    torch.testing.assert_close(p_shifted[32:], mlp.predict_views(torch.cat(views), 3)[0][32:])
    # ... and so it does in one call with view groups
    groups = ViewGroups()
    share_view_groups([mlp], groups)
    together, _ = mlp.predict_views(torch.cat(shifted), 3, groups)
    torch.testing.assert_close(together, p_shifted)
    with pytest.raises(ValueError, match="3 views of equal size"):
        observe_and_predict(spectral, torch.randn(10, 8), 3)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dp_alpha"):
        SpectralPredictor(4, alpha=-0.5, normalize=True, eps_iso=0.0, tau=0.5, with_sqrt=False)
    with pytest.raises(ValueError, match="eps_iso"):
        SpectralPredictor(4, alpha=0.5, normalize=True, eps_iso=-1.0, tau=0.5, with_sqrt=False)
    with pytest.raises(ValueError, match="dp_tau"):
        RunningCorrelation(4, tau=1.0)


def test_mlp_predictor_tracks_spectrum_for_metrics() -> None:
    pred = MLPPredictor(8, 16, spectrum_tau=0.99)
    views = _views(6)
    pred.observe(views)
    p, p_sqrt = pred(views[0])
    assert p.shape == (32, 8) and p_sqrt is None
    s = pred.spectrum()
    torch.testing.assert_close(s, torch.linalg.eigvalsh(pred.corr.C).flip(0))
    assert torch.all(s[:-1] >= s[1:])


def test_spectrum_metrics() -> None:
    m = spectrum_metrics(torch.tensor([4.0, 2.0, 2.0, 0.0]))
    assert m["eigval_metrics/part_ratio"].item() == pytest.approx(64 / 24)
    assert m["eigval_metrics/eigval_max"].item() == 4.0
    assert m["eigval_metrics/eigval_min"].item() == 0.0
    assert m["eigval_metrics/eigval_mean"].item() == 2.0
    flat = spectrum_metrics(torch.ones(10))
    assert flat["eigval_metrics/part_ratio"].item() == pytest.approx(10.0)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_eigh_on_host_gives_the_same_decomposition_into_the_same_buffers(device: str) -> None:
    kwargs = {"alpha": 0.5, "normalize": True, "eps_iso": 0.0, "tau": 0.5, "with_sqrt": True}
    on_device = SpectralPredictor(64, **kwargs, eigh_on_host=False).to(device)
    on_host = SpectralPredictor(64, **kwargs, eigh_on_host=True).to(device)
    addresses = (on_host.eigvals.data_ptr(), on_host.eigvecs.data_ptr())  # read by CUDA graphs
    for step in range(3):
        views = [v.to(device) for v in _views(step, d=64, b=128)]
        on_device.observe(views)
        on_host.observe(views)
        torch.testing.assert_close(on_host.eigvals, on_device.eigvals, rtol=1e-4, atol=1e-6)
        z = torch.randn(16, 64, device=device)
        for mine, theirs in zip(on_host(z), on_device(z)):  # eigenvectors differ in sign only
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert (on_host.eigvals.data_ptr(), on_host.eigvecs.data_ptr()) == addresses
    assert on_host._host is not None and on_host._host[0].device.type == "cpu"


def test_eigh_on_host_failure_gives_the_training_error() -> None:
    from ivreg.errors import TrainingError

    pred = SpectralPredictor(16, alpha=0.5, normalize=True, eps_iso=0.0, tau=0.5, with_sqrt=True, eigh_on_host=True)
    with pytest.raises(TrainingError, match="NaN or infinite"):  # LAPACK does not converge on this one
        pred.observe([torch.full((8, 16), float("nan"))] * 2)


def test_auto_eigh_place_takes_the_faster_as_timed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ivreg.predictors as predictors

    timings = {False: 0.005, True: 0.001}  # seconds: the H100's eigh against a host's LAPACK
    calls: list[tuple[str, bool]] = []

    def fake_time(c: torch.Tensor, on_host: bool, repeats: int = 5) -> float:
        calls.append((c.device.type, on_host))
        return timings[on_host]

    monkeypatch.setattr(predictors, "time_decompose", fake_time)
    monkeypatch.setattr(predictors, "sample_correlation", lambda dim, device: torch.eye(dim))  # no GPU here
    with caplog.at_level("INFO"):
        assert choose_eigh_on_host(8, torch.device("cuda")) is True
    assert "(8x8) on the host: 1.00 ms by host LAPACK against 5.00 ms on the GPU" in caplog.text
    timings[True] = 0.009
    assert choose_eigh_on_host(8, torch.device("cuda")) is False
    assert calls == [("cpu", False), ("cpu", True)] * 2


def test_auto_eigh_place_falls_back_to_the_gpu_when_the_host_path_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ivreg.predictors as predictors

    def fake_time(c: torch.Tensor, on_host: bool, repeats: int = 5) -> float:
        if on_host:
            raise RuntimeError("CUDA error: out of memory (pinned)\nmore lines")
        return 0.005

    monkeypatch.setattr(predictors, "time_decompose", fake_time)
    monkeypatch.setattr(predictors, "sample_correlation", lambda dim, device: torch.eye(dim))  # no GPU here
    with caplog.at_level("INFO"):
        assert choose_eigh_on_host(8, torch.device("cuda")) is False
    assert "on the GPU (the host path failed: CUDA error: out of memory (pinned))" in caplog.text


def test_auto_eigh_place_on_the_cpu_times_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import ivreg.predictors as predictors

    def no_timing(*args: object, **kwargs: object) -> float:
        raise AssertionError("nothing to time on the CPU")

    monkeypatch.setattr(predictors, "time_decompose", no_timing)
    pred = SpectralPredictor(8, alpha=0.5, normalize=True, eps_iso=0.0, tau=0.5, with_sqrt=False)
    assert pred.eigh_on_host is None  # auto, the default: decided at the first decomposition
    pred.observe(_views(0))
    assert pred.eigh_on_host is False


def test_time_decompose_times_both_places_on_a_sample_correlation() -> None:
    from ivreg.predictors import time_decompose

    c = sample_correlation(32)
    torch.testing.assert_close(c, c.T)
    assert torch.linalg.eigvalsh(c).min() > 0  # 128 samples of 32 dimensions: positive definite
    for on_host in (False, True):
        seconds = time_decompose(c, on_host, repeats=3)
        assert 0 < seconds < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_eigh_place_on_cuda_decomposes_as_the_gpu_does() -> None:
    kwargs = {"alpha": 0.5, "normalize": True, "eps_iso": 0.0, "tau": 0.5, "with_sqrt": True}
    auto = SpectralPredictor(64, **kwargs).cuda()
    on_device = SpectralPredictor(64, **kwargs, eigh_on_host=False).cuda()
    views = [v.cuda() for v in _views(0, d=64, b=128)]
    auto.observe(views)
    on_device.observe(views)
    assert isinstance(auto.eigh_on_host, bool)
    torch.testing.assert_close(auto.eigvals, on_device.eigvals, rtol=1e-4, atol=1e-6)


def test_eigh_on_host_takes_only_auto_true_or_false() -> None:
    with pytest.raises(ValueError, match="eigh_on_host must be auto, True or False, got 'gpu'"):
        SpectralPredictor(8, alpha=0.5, normalize=True, eps_iso=0.0, tau=0.5, with_sqrt=False, eigh_on_host="gpu")
