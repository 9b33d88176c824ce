"""Qualitative claims of the paper's toy model, checked on short CPU simulations.

Thresholds come from the eigenvalue ODEs of ``ivreg.analysis.toy.eigen_ode_rhs`` (linear network,
alpha = 1, sigma = 0.1, losses ``||p - z'||^2`` and ``2 - 2 cos``), with generous margins for the
sampling noise of the network simulations.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from ivreg.analysis import toy
from ivreg.analysis.toy_figures import main
from ivreg.losses import cosine_per_sample, euclidean_per_sample, iso_cosine_per_sample, iso_euclidean_per_sample


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensor ops run fastest on one thread; restore the caller's setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _start(spectrum: list[float], in_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lam0 = torch.tensor([spectrum], dtype=torch.float64)
    return toy.weights_with_spectrum(lam0, in_dim, generator)


def _participation_ratio(lam: np.ndarray) -> float:
    return float(lam.sum() ** 2 / (lam**2).sum())


# ----------------------------------------------------------------------------------------------
# Collapse without stop-gradient, implicit variance regularisation with it
# ----------------------------------------------------------------------------------------------


def test_euclidean_without_stop_gradient_collapses_and_standard_does_not():
    # ODE (no SG): dlam/dt = -4 lam [(lam - 1)^2 + sigma^2]. With every lam <= 0.5 at the start the
    # bracket stays >= 0.26, so lam(t) <= lam0 exp(-1.04 t); here t = lr * steps = 6, i.e. a
    # shrink by >= 500x: 0.5 -> 1e-3. We allow 20x slack (max < 0.02).
    spectrum = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5]
    weights, basis = _start(spectrum, in_dim=10, seed=0)
    config = toy.ToyConfig(in_dim=10, out_dim=6, lr=0.02, steps=300, batch_size=512, record_every=10)
    runs = toy.simulate_settings(
        ["euc_nosg", "euc_standard"], config, weights, torch.Generator().manual_seed(1), basis=basis
    )
    collapsed = runs["euc_nosg"].eigenvalues[-1, 0]
    assert collapsed.max() < 0.02, collapsed
    # Standard loss: dlam/dt = 4 lam^2 (1 - lam) >= 0 below the fixed point 1, so no eigenvalue may
    # shrink (20 % slack for sampling noise) and the smallest must grow.
    standard = runs["euc_standard"].eigenvalues[:, 0]
    assert standard[:, 0].min() > 0.8 * spectrum[0]
    assert standard[-1, 0] > 2 * spectrum[0]
    assert np.all(np.abs(standard[-1, 1:] - 1.0) < 0.1), standard[-1]


def test_cosine_without_stop_gradient_collapses_dimensionally_and_standard_stays_isotropic():
    # The cosine gradient is orthogonal to p (and to z'), so tr(W W^T) is conserved by gradient flow
    # and "collapse" is dimensional: most eigenvalues go to zero while a few carry the trace (the
    # ODE leaves 2 of 10 modes alive). We require at least half of the modes below 1e-3 of the mean
    # eigenvalue (6-8 of 10 over seeds 0-5 in this run) at a conserved trace. The standard loss
    # instead drives W W^T towards isotropy at fixed trace: no mode may shrink, and the
    # participation ratio must close at least half of its gap to M.
    config = toy.ToyConfig(in_dim=15, out_dim=10, lr=0.05, steps=400, batch_size=512, record_every=20)
    generator = torch.Generator().manual_seed(0)
    weights = toy.init_weights(1, config, generator)
    runs = toy.simulate_settings(["cos_nosg", "cos_standard"], config, weights, generator)
    start = runs["cos_nosg"].eigenvalues[0, 0]
    nosg = runs["cos_nosg"].eigenvalues[-1, 0]
    standard = runs["cos_standard"].eigenvalues[:, 0]
    assert (nosg < 1e-3 * nosg.mean()).sum() >= config.out_dim // 2, nosg
    assert abs(nosg.sum() / start.sum() - 1) < 0.05
    assert (standard[-1] < 1e-3 * standard[-1].mean()).sum() == 0
    assert standard[:, 0].min() > 0.8 * start[0]
    assert _participation_ratio(standard[-1]) > 0.5 * (_participation_ratio(start) + config.out_dim)
    assert abs(standard[-1].sum() / start.sum() - 1) < 0.05


# ----------------------------------------------------------------------------------------------
# IsoLoss equalises convergence rates
# ----------------------------------------------------------------------------------------------


def test_euclidean_isoloss_equalises_convergence_times():
    # Time to get within 5 % of the fixed point lam = 1 from lam0, from the ODEs:
    #   standard  dlam/dt = 4 lam^2 (1 - lam): t ~ 1 / (4 lam0)  -> slowest / fastest ~ 17
    #   IsoLoss   dlam/dt = 4 lam (1 - lam):   t ~ log(1/lam0)/4 -> slowest / fastest ~ 2.9
    spectrum = [0.02, 0.04, 0.08, 0.16, 0.32, 0.64]
    weights, basis = _start(spectrum, in_dim=10, seed=2)
    config = toy.ToyConfig(in_dim=10, out_dim=6, lr=0.05, steps=400, batch_size=512, record_every=2)
    runs = toy.simulate_settings(
        ["euc_standard", "euc_iso"], config, weights, torch.Generator().manual_seed(3), basis=basis
    )
    times = {}
    for name, run in runs.items():
        curves = run.eigen_coords[:, 0]
        assert np.all(np.abs(curves[-1] - 1.0) < 0.02), (name, curves[-1])  # both reached lam = 1
        times[name] = toy.convergence_steps(curves, run.steps, rel_tol=0.05)
    ratio_std, ratio_iso = toy.time_ratio(times["euc_standard"]), toy.time_ratio(times["euc_iso"])
    spread_std, spread_iso = toy.log_time_spread(times["euc_standard"]), toy.log_time_spread(times["euc_iso"])
    assert ratio_std > 8.0, times
    assert ratio_iso < 4.5, times
    assert spread_iso < 0.5 * spread_std, (spread_std, spread_iso)
    # the slow modes of the standard loss are the small-eigenvalue ones: times ordered like 1/lam0
    assert np.all(np.diff(times["euc_standard"]) <= 0), times


def test_cosine_isoloss_equalises_growth_rates():
    # For modes far below the fixed point the cosine ODEs give relative growth rates
    #   standard  dlog(lam)/dt ~ (4/PZ) lam   -> doubling time ~ 1/lam0 (8x spread over 0.02..0.16)
    #   IsoLoss   dlog(lam)/dt ~ (4/PZ)       -> about equal doubling times
    # The two large modes keep the fixed point (the mean, 0.55) above every doubled small mode.
    spectrum = [0.02, 0.04, 0.08, 0.16, 1.5, 1.5]
    weights, basis = _start(spectrum, in_dim=10, seed=4)
    config = toy.ToyConfig(in_dim=10, out_dim=6, lr=0.02, steps=600, batch_size=512, record_every=1)
    runs = toy.simulate_settings(
        ["cos_standard", "cos_iso"], config, weights, torch.Generator().manual_seed(5), basis=basis
    )
    times = {name: toy.growth_steps(run.eigen_coords[:, 0, :4], run.steps, 2.0) for name, run in runs.items()}
    assert np.all(np.isfinite(times["cos_standard"])) and np.all(np.isfinite(times["cos_iso"])), times
    ratio_std, ratio_iso = toy.time_ratio(times["cos_standard"]), toy.time_ratio(times["cos_iso"])
    assert ratio_std > 3.0, times
    assert ratio_iso < 2.5, times
    assert toy.log_time_spread(times["cos_iso"]) < 0.5 * toy.log_time_spread(times["cos_standard"])


# ----------------------------------------------------------------------------------------------
# Euclidean and cosine fixed points
# ----------------------------------------------------------------------------------------------


def test_euclidean_and_cosine_reach_different_fixed_points_from_the_same_start():
    # Euclidean (SG + predictor): every eigenvalue -> lam^alpha = 1, whatever the start.
    # Cosine: tr(W W^T) is conserved and W W^T becomes isotropic, so lam -> trace0 / M, which
    # depends on the start: 0.3 for (0.1, 0.5) and 1.5 for (0.6, 2.4).
    lam0 = torch.tensor([[0.1, 0.5], [0.6, 2.4]], dtype=torch.float64)
    weights, basis = toy.weights_with_spectrum(lam0, 6, torch.Generator().manual_seed(6))
    config = toy.ToyConfig(in_dim=6, out_dim=2, lr=0.02, steps=500, batch_size=1024, record_every=50)
    runs = toy.simulate_settings(
        ["euc_standard", "cos_standard"], config, weights, torch.Generator().manual_seed(7), basis=basis
    )
    euclid = runs["euc_standard"].eigenvalues[-1]
    cosine = runs["cos_standard"].eigenvalues[-1]
    np.testing.assert_allclose(euclid, 1.0, atol=0.05)
    expected_cos = lam0.numpy().sum(axis=1, keepdims=True) / 2
    np.testing.assert_allclose(cosine, np.broadcast_to(expected_cos, cosine.shape), rtol=0.1)
    assert np.all(np.abs(cosine - euclid) > 0.3)


# ----------------------------------------------------------------------------------------------
# IsoLoss gradient identity, ODE consistency, measurements
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_isoloss_gradient_in_z_equals_standard_gradient_in_p(alpha):
    generator = torch.Generator().manual_seed(8)
    weights = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64)
    z = torch.randn(3, 16, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 16, 5, generator=generator, dtype=torch.float64)
    w_p = toy.predictor_matrix(weights, alpha)
    w_p_sqrt = toy.predictor_matrix(weights, alpha, power=0.5)
    torch.testing.assert_close(w_p_sqrt @ w_p_sqrt, w_p)

    p = z @ w_p.transpose(-1, -2)
    p_leaf = p.detach().clone().requires_grad_(True)
    p_sqrt = z @ w_p_sqrt.transpose(-1, -2)
    cases = {
        "euclidean": (iso_euclidean_per_sample(z, p, target), euclidean_per_sample(p_leaf, target)),
        "cosine": (iso_cosine_per_sample(z, p, p_sqrt, target), cosine_per_sample(p_leaf, target)),
    }
    for name, (iso, standard) in cases.items():
        (grad_z,) = torch.autograd.grad(iso.sum(), z)
        (grad_p,) = torch.autograd.grad(standard.sum(), p_leaf)
        assert grad_p.abs().max() > 1e-3, name  # the identity is not trivially 0 == 0
        assert (grad_z - grad_p).abs().max() < 1e-5, name


def test_predictor_receives_no_gradient_and_setting_loss_matches_manual_gradient():
    # Standard Euclidean rule, linear net: dL/dW = 2 W_p^T (W_p W x1 - W x2) x1^T / B, W_p constant.
    generator = torch.Generator().manual_seed(9)
    weights = 0.3 * torch.randn(1, 3, 4, generator=generator, dtype=torch.float64)
    x1 = torch.randn(64, 4, generator=generator, dtype=torch.float64)
    x2 = x1 + 0.1 * torch.randn(64, 4, generator=generator, dtype=torch.float64)
    w = weights.clone().requires_grad_(True)
    loss = toy.setting_loss(w, x1, x2, toy.get_setting("euc_standard"), alpha=1.0).sum()
    (grad,) = torch.autograd.grad(loss, w)
    w_p = weights[0] @ weights[0].T
    err = x1 @ (w_p @ weights[0]).T - x2 @ weights[0].T
    manual = 2 * w_p.T @ err.T @ x1 / 64
    torch.testing.assert_close(grad[0], manual)


def test_eigen_ode_matches_network_for_euclidean_rules():
    # For the linear network the Euclidean ODEs are exact in expectation.
    spectrum = [0.1, 0.4, 0.8, 1.6]
    weights, basis = _start(spectrum, in_dim=8, seed=10)
    config = toy.ToyConfig(in_dim=8, out_dim=4, lr=0.02, steps=150, batch_size=2048, record_every=50)
    names = ["euc_standard", "euc_iso", "euc_nosg"]
    runs = toy.simulate_settings(names, config, weights, torch.Generator().manual_seed(11), basis=basis)
    for name in names:
        ode = toy.simulate_eigen_ode(torch.tensor(spectrum, dtype=torch.float64), name, config)
        np.testing.assert_allclose(runs[name].eigen_coords[-1, 0], ode[-1], rtol=0.05, atol=1e-3, err_msg=name)


def test_convergence_and_growth_measurements():
    steps = np.arange(101)
    fast, slow = 1 - np.exp(-steps / 5.0), 1 - np.exp(-steps / 20.0)
    times = toy.convergence_steps(np.stack([fast, slow], axis=1), steps, rel_tol=0.05)
    # |x(T) - x(t)| <= 0.05 x(T) first holds when exp(-t/tau) <= 0.05 x(T) + exp(-T/tau):
    # tau = 5: t >= 14.98 -> 15;  tau = 20: t >= 20 ln(1/0.05637) = 57.5 -> 58
    assert times.tolist() == [15, 58]
    growth = toy.growth_steps(np.stack([0.1 * np.exp(steps / 10), 0.1 * np.ones(101)], axis=1), steps, 2.0)
    assert growth[0] == 7 and np.isinf(growth[1])
    assert toy.time_ratio(np.array([10.0, 40.0])) == 4.0


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_input_raises_clear_value_errors():
    with pytest.raises(ValueError, match="unknown toy setting 'euc_simsiam'"):
        toy.get_setting("euc_simsiam")
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        toy.ToyConfig(alpha=-0.5)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        toy.predictor_matrix(torch.ones(2, 3), alpha=-1.0)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        toy.eigen_ode_rhs(torch.ones(2), "euc_standard", sigma=0.1, alpha=-1.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        toy.Setting(name="bad", loss="l1")
    with pytest.raises(ValueError, match="IsoLoss is defined with a predictor and a stop-gradient"):
        toy.Setting(name="bad", loss="cosine", stop_grad=False, iso=True)
    with pytest.raises(ValueError, match="activation must be one of"):
        toy.ToyConfig(activation="tanh")
    config = toy.ToyConfig(in_dim=4, out_dim=2, steps=2)
    with pytest.raises(ValueError, match=r"initial weights must have shape \(runs, 2, 4\)"):
        toy.simulate_network("euc_standard", config, torch.zeros(2, 4), torch.Generator())


def test_cli_rejects_bad_options(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--steps-scale", "0"]) == 2
    assert "steps_scale must be a finite number > 0" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--alpha", "-1"]) == 2
    assert "alpha must be a finite number >= 0" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["--out", str(tmp_path / "file" / "figs"), "--figure", "rates"]) == 2
    assert f"cannot create the output folder --out {tmp_path / 'file' / 'figs'}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as excinfo:
        main(["--out", str(tmp_path), "--figure", "nope"])
    assert excinfo.value.code == 2


# ----------------------------------------------------------------------------------------------
# Command line writes PNG + CSV
# ----------------------------------------------------------------------------------------------

EXPECTED_HEADERS = {
    "trajectories": ["setting", "loss", "variant", "source", "start", "step", "mode", "eigenvalue"],
    "eigenvalues": ["setting", "loss", "variant", "step", "mode", "eigenvalue"],
    "fixed_points": ["setting", "loss", "start", "step", "quantity", "index", "component", "value"],
}


@pytest.mark.parametrize("figure", sorted(EXPECTED_HEADERS))
def test_cli_writes_png_and_csv(tmp_path, capsys, figure):
    argv = ["--out", str(tmp_path), "--figure", figure, "--steps-scale", "0.02", "--batch-size", "64"]
    assert main(argv) == 0
    png, table = tmp_path / f"{figure}.png", tmp_path / f"{figure}.csv"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with table.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == EXPECTED_HEADERS[figure]
    assert len(rows) > 10
    settings = {row[0] for row in rows[1:]}
    expected = {"euc_standard", "cos_standard"} if figure == "fixed_points" else set(toy.SETTING_NAMES)
    assert settings == expected
    assert all(np.isfinite(float(row[-1])) for row in rows[1:])
    assert f"{figure}:" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{figure}.csv", f"{figure}.png"]


def test_figures_simulate_the_predictor_exponent_asked_for():
    from ivreg.analysis import toy_figures

    opts = toy_figures.FigureOptions(steps_scale=0.001, batch_size=16, alpha=0.5)
    runs, _ = toy_figures.trajectories_data(opts)
    assert {run.config.alpha for run in runs.values()} == {0.5}
    assert {run.config.alpha for run in toy_figures.eigenvalues_data(opts).values()} == {0.5}
    assert {run.config.alpha for run in toy_figures.fixed_points_data(opts)[0].values()} == {0.5}
    assert {run.config.alpha for result in toy_figures.rates_data(opts) for run in result.runs.values()} == {0.5}


def test_rates_figure_measures_the_spread_of_learning_times(tmp_path, capsys):
    """Full length (the figure's own experiments, seed 0): IsoLoss narrows the spread of the
    modes' learning times for both losses, and the printed spreads are those of the CSV."""
    assert main(["--out", str(tmp_path), "--figure", "rates", "--batch-size", "512"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rates.csv", "rates.png", "rates_times.csv"]
    with (tmp_path / "rates_times.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    times: dict[str, list[float]] = {}
    for row in rows:
        times.setdefault(row["setting"], []).append(float(row["steps"]))
    assert {name: len(t) for name, t in times.items()} == {
        "euc_standard": 6,
        "euc_iso": 6,
        "cos_standard": 4,
        "cos_iso": 4,
    }
    spreads = {name: toy.time_ratio(np.array(t)) for name, t in times.items()}
    assert spreads["euc_standard"] > 8 and spreads["euc_iso"] < 4.5, spreads
    assert spreads["cos_standard"] > 3 and spreads["cos_iso"] < 2.5, spreads
    out = capsys.readouterr().out
    for loss, standard, iso in (("euclidean", "euc_standard", "euc_iso"), ("cosine", "cos_standard", "cos_iso")):
        line = next(x for x in out.splitlines() if x.startswith(f"rates, {loss} loss"))
        assert line.endswith(f"{spreads[standard]:.1f} (standard) vs {spreads[iso]:.1f} (IsoLoss)"), line
    with (tmp_path / "rates.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header == ["setting", "loss", "step", "mode", "initial_eigenvalue", "eigenvalue"]


def test_rates_figure_reports_a_mode_that_never_doubled(tmp_path, capsys):
    """A run too short for every mode to learn: an infinite time in the CSV, an infinite
    spread printed, and still a figure."""
    assert main(["--out", str(tmp_path), "--figure", "rates", "--steps-scale", "0.01", "--batch-size", "64"]) == 0
    with (tmp_path / "rates_times.csv").open() as handle:
        steps = [float(row["steps"]) for row in csv.DictReader(handle) if row["setting"] == "cos_standard"]
    assert math.isinf(max(steps))
    assert "vs" in capsys.readouterr().out and (tmp_path / "rates.png").exists()


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_eigen_ode_matches_the_network_drift_for_cosine_rules(alpha):
    """The cosine ODEs are a large-dimension approximation (the norms concentrate): at M=64 the
    drift of the eigenvalues of W W^T under the batch gradient of the network's loss agrees
    with ``eigen_ode_rhs`` to about 6%; a dropped factor or flipped sign is off by far more."""
    generator = torch.Generator().manual_seed(3)
    spectrum = torch.linspace(0.3, 1.5, 64, dtype=torch.float64)[None]
    weights, basis = toy.weights_with_spectrum(spectrum, 80, generator)
    x1 = torch.randn(20000, 80, generator=generator, dtype=torch.float64)
    x2 = x1 + 0.1 * torch.randn(20000, 80, generator=generator, dtype=torch.float64)
    for name in ("cos_standard", "cos_iso", "cos_nosg"):
        w = weights.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(toy.setting_loss(w, x1, x2, toy.get_setting(name), alpha).sum(), w)
        drift_c = -(grad[0] @ weights[0].T + weights[0] @ grad[0].T)  # d(W W^T)/dt under gradient flow
        drift = torch.diagonal(basis[0].T @ drift_c @ basis[0])
        ode = toy.eigen_ode_rhs(spectrum[0], name, 0.1, alpha)
        assert float((drift - ode).norm() / ode.norm()) < 0.1, name


def _expected_eigen_drift(name: str, sigma: float, weights: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """d lambda / dt of W W^T (in its eigenbasis) under the network's gradient, averaged over 4 x 10^5 samples."""
    generator = torch.Generator().manual_seed(5)
    drift = torch.zeros(weights.shape[1], dtype=torch.float64)
    for _ in range(4):
        x1 = torch.randn(100_000, weights.shape[2], generator=generator, dtype=torch.float64)
        x2 = x1 + sigma * torch.randn(x1.shape, generator=generator, dtype=torch.float64)
        w = weights.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(toy.setting_loss(w, x1, x2, toy.get_setting(name), 1.0).sum(), w)
        drift_c = -(grad[0] @ weights[0].T + weights[0] @ grad[0].T)
        drift += torch.diagonal(basis[0].T @ drift_c @ basis[0]) / 4
    return drift


def test_without_predictor_only_the_cosine_loss_drifts_in_expectation():
    """The ODE's no-predictor field is 0 for both losses. For the Euclidean loss that is exact;
    for the cosine loss only to the approximation's order: the network drifts, at order sigma^2,
    towards equal eigenvalues at a constant trace (the phase-plane panel and README say so)."""
    spectrum = torch.tensor([[0.08, 1.6]], dtype=torch.float64)
    weights, basis = toy.weights_with_spectrum(spectrum, 10, torch.Generator().manual_seed(3))
    for name in ("euc_nopred", "cos_nopred"):
        assert torch.count_nonzero(toy.eigen_ode_rhs(spectrum[0], name, 0.1, 1.0)) == 0
    euclidean = _expected_eigen_drift("euc_nopred", 0.1, weights, basis)
    assert float(euclidean.abs().max()) < 0.005, euclidean  # sampling noise only
    cosine = _expected_eigen_drift("cos_nopred", 0.1, weights, basis)
    assert float(cosine[0]) > 0.015 and float(cosine[1]) < -0.015, cosine  # (measured: +-0.023)
    assert abs(float(cosine.sum())) < 1e-9
    assert float(_expected_eigen_drift("cos_nopred", 0.0, weights, basis).abs().max()) < 1e-9  # identical views


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_isoloss_weight_gradient_is_the_standard_p_gradient_through_the_weights(alpha):
    """For IsoLoss dL/dW = (dL_standard/dp)^T x1: the identity of the paper, through the toy's
    own loss (with W_p^(1/2) built from W W^T)."""
    generator = torch.Generator().manual_seed(0)
    weights = 0.4 * torch.randn(1, 4, 7, generator=generator, dtype=torch.float64)
    x1 = torch.randn(256, 7, generator=generator, dtype=torch.float64)
    x2 = x1 + 0.1 * torch.randn(256, 7, generator=generator, dtype=torch.float64)
    w_p = toy.predictor_matrix(weights, alpha)[0]
    for name, standard in (("cos_iso", cosine_per_sample), ("euc_iso", euclidean_per_sample)):
        w = weights.clone().requires_grad_(True)
        (grad_w,) = torch.autograd.grad(toy.setting_loss(w, x1, x2, toy.get_setting(name), alpha).sum(), w)
        p = (x1 @ weights[0].T @ w_p.T).requires_grad_(True)
        (grad_p,) = torch.autograd.grad(standard(p, x2 @ weights[0].T).mean(), p)
        assert (grad_p.T @ x1).abs().max() > 1e-3
        torch.testing.assert_close(grad_w[0], grad_p.T @ x1, rtol=1e-9, atol=1e-12, msg=name)
