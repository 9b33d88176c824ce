"""Figures of the paper's toy model, with the raw curves as long-format CSV beside each PNG.

Four figures (``python -m ivreg.analysis.toy_figures --out figures/toy``):

- ``trajectories``: M=2, eigenvalue phase planes of the eight settings. Solid lines are simulated
  networks (eigenvalues of ``W W^T`` measured along each run's initial eigenvectors), dashed lines
  the eigenvalue ODE from the same starts, grey streamlines the ODE's vector field.
- ``eigenvalues``: N=15, M=10, eigenvalues of ``W W^T`` over training for the eight settings
  (ReLU network as in the reference notebook; ``--activation linear`` for the analysed case).
- ``fixed_points``: two neurons (N=6, M=2) trained with the Euclidean and the cosine loss from the
  same three starts: eigenvalue phase plane and the representations of 20 probe inputs.
- ``rates``: the paper's central claim on learning dynamics, measured: from a spread initial
  spectrum, how many steps each eigenmode takes to learn with the standard loss and with IsoLoss
  (slowest over fastest mode printed per loss; the times also in ``rates_times.csv``).

Learning rates follow the reference notebook divided by two: its hand-written gradients are those
of ``0.5 ||p - z'||^2`` and ``-cos``, while the losses here are ``||p - z'||^2`` and ``2 - 2 cos``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from ivreg.analysis.toy import (  # noqa: E402
    ACTIVATIONS,
    SETTING_NAMES,
    SETTINGS,
    ToyConfig,
    ToyRun,
    _check_alpha,
    convergence_steps,
    eigen_ode_rhs,
    growth_steps,
    init_weights,
    simulate_eigen_ode,
    simulate_settings,
    time_ratio,
    weights_with_spectrum,
)

FIGURES = ("trajectories", "eigenvalues", "fixed_points", "rates")
# Settings that the notebook trains with a 10x larger learning rate (they are slow otherwise).
HIGH_LR_SETTINGS = frozenset({"euc_nopred", "cos_standard", "cos_nosg", "cos_nopred", "cos_iso"})
START_COLORS = ("#332288", "#CC6677", "#117733", "#DDCC77", "#88CCEE", "#AA4499", "#44AA99", "#999933")
# Phase-plane starting points (lambda_1, lambda_2) of the trajectories figure.
PHASE_STARTS = ((0.08, 1.6), (1.6, 0.08), (0.25, 0.25), (1.8, 1.8), (0.5, 1.2), (1.2, 0.5))
PHASE_LIMIT = 2.2


@dataclass(frozen=True)
class FigureOptions:
    """Knobs shared by all figures; ``steps_scale`` < 1 gives quick smoke runs."""

    seed: int = 0
    steps_scale: float = 1.0
    batch_size: int = 2048
    activation: str = "relu"
    alpha: float = 1.0  # W_p = (W W^T)^alpha: 1 as in the authors' toy notebook; DirectPred's runs use 0.5

    def __post_init__(self) -> None:
        if not np.isfinite(self.steps_scale) or self.steps_scale <= 0:
            raise ValueError(f"steps_scale must be a finite number > 0, got {self.steps_scale!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        _check_alpha(self.alpha)

    def steps(self, full: int) -> int:
        """Number of Euler steps after scaling (at least 2 so every curve has a start and an end)."""
        return max(2, round(full * self.steps_scale))

    def record_every(self, steps: int, points: int = 300) -> int:
        """Record about ``points`` samples per curve: enough for smooth plots, small CSVs."""
        return max(1, steps // points)


def notebook_lr(name: str, base: float = 5e-3) -> float:
    """Per-setting learning rate of the notebook's N=15, M=10 figure (halved, see module doc)."""
    return 10 * base if name in HIGH_LR_SETTINGS else base


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write one long-format table; floats keep 6 significant digits to stay readable."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])


def _long(values: np.ndarray) -> Iterable[tuple[tuple[int, ...], float]]:
    """Every entry of an array with its index tuple, for long-format tables."""
    for index in np.ndindex(values.shape):
        yield index, float(values[index])


def _predictor_label(alpha: float) -> str:
    """The predictor of every panel, for the figure titles."""
    return f"$W_p = (WW^T)^{{{alpha:g}}}$"


def _panel_grid(title: str, figsize: tuple[float, float]) -> tuple[plt.Figure, np.ndarray]:
    """2 x 4 grid: rows Euclidean / cosine, columns no SG / no predictor / standard / IsoLoss."""
    fig, axes = plt.subplots(2, 4, figsize=figsize, squeeze=False)
    fig.suptitle(title, fontsize=11)
    return fig, axes


def _panel_index(name: str) -> tuple[int, int]:
    return SETTING_NAMES.index(name) // 4, SETTING_NAMES.index(name) % 4


# ----------------------------------------------------------------------------------------------
# Figure 1: phase planes for M = 2
# ----------------------------------------------------------------------------------------------


def trajectories_data(opts: FigureOptions) -> tuple[dict[str, ToyRun], dict[str, np.ndarray]]:
    """Simulated networks and eigenvalue ODEs from the same phase-plane starts, for all settings."""
    steps = opts.steps(2000)
    config = ToyConfig(
        in_dim=10,
        out_dim=2,
        lr=1e-2,
        steps=steps,
        batch_size=opts.batch_size,
        alpha=opts.alpha,
        activation="linear",
        record_every=opts.record_every(steps),
    )
    generator = torch.Generator().manual_seed(opts.seed)
    starts = torch.tensor(PHASE_STARTS, dtype=config.dtype)
    weights, basis = weights_with_spectrum(starts, config.in_dim, generator)
    runs = simulate_settings(SETTING_NAMES, config, weights, generator, basis=basis)
    odes = {name: simulate_eigen_ode(starts, name, config) for name in SETTING_NAMES}
    return runs, odes


def _stream_field(ax: plt.Axes, name: str, sigma: float, alpha: float) -> None:
    """Grey streamlines of the eigenvalue ODE; skipped where it vanishes (no predictor: exactly for
    the Euclidean loss, only to the approximation's order for the cosine one, see ``eigen_ode_rhs``)."""
    grid = np.linspace(0.02, PHASE_LIMIT, 40)
    l1, l2 = np.meshgrid(grid, grid)
    lam = torch.tensor(np.stack([l1, l2], axis=-1), dtype=torch.float64)
    field = eigen_ode_rhs(lam, name, sigma, alpha).numpy()
    if not np.any(np.abs(field) > 1e-12):
        note = "mean field = 0"
        if SETTINGS[name].loss == "cosine":  # zero only to the approximation's order
            note = "approximate mean field = 0\n(true drift: O($\\sigma^2$), to equal $\\lambda$)"
        ax.text(0.5, 0.97, note, transform=ax.transAxes, ha="center", va="top", fontsize=7, color="grey")
        return
    ax.streamplot(l1, l2, field[..., 0], field[..., 1], color="#BBBBBB", density=0.7, linewidth=0.5, arrowsize=0.6)


def plot_trajectories(runs: dict[str, ToyRun], odes: dict[str, np.ndarray], path: Path) -> None:
    """One phase-plane panel per setting."""
    alpha = next(iter(runs.values())).config.alpha
    title = (
        f"Eigenvalue phase planes, M = 2, {_predictor_label(alpha)} (solid: network; dashed: eigenvalue ODE, "
        "for the cosine loss a large-M approximation)"
    )
    fig, axes = _panel_grid(title, (13, 6.6))
    for name, run in runs.items():
        ax = axes[_panel_index(name)]
        _stream_field(ax, name, run.config.sigma, run.config.alpha)
        coords = np.clip(run.eigen_coords, 0.0, None)
        # Without stop-gradient the cosine loss keeps the trace only in continuous time: near
        # rank one a single Euler step can multiply it, and such runs leave the plane.
        left = int(np.sum(np.any(coords[-1] > PHASE_LIMIT, axis=-1)))
        if left:
            ax.text(
                0.5,
                0.03,
                f"{left} of {coords.shape[1]} runs leave the plane",
                transform=ax.transAxes,
                ha="center",
                fontsize=7,
                color="firebrick",
            )
        for k in range(coords.shape[1]):
            color = START_COLORS[k % len(START_COLORS)]
            ax.plot(coords[:, k, 0], coords[:, k, 1], color=color, lw=2.4, alpha=0.55)
            ax.plot(odes[name][:, k, 0], odes[name][:, k, 1], color=color, lw=0.9, ls=(0, (3, 2)))
            ax.plot(coords[0, k, 0], coords[0, k, 1], "o", color=color, ms=4)
            end = coords[-1, k]
            if np.all(end <= PHASE_LIMIT):
                ax.plot(end[0], end[1], "X", color=color, ms=6, mec="black", mew=0.5)
        ax.plot([0, PHASE_LIMIT], [0, PHASE_LIMIT], color="black", lw=0.4, ls=":")
        ax.set_xlim(0, PHASE_LIMIT)
        ax.set_ylim(0, PHASE_LIMIT)
        ax.set_aspect("equal")
        ax.set_title(SETTINGS[name].label, fontsize=9)
        ax.tick_params(labelsize=7)
        row, col = _panel_index(name)
        if row == 1:
            ax.set_xlabel(r"$\lambda_1$", fontsize=9)
        if col == 0:
            ax.set_ylabel(r"$\lambda_2$", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def trajectories_rows(runs: dict[str, ToyRun], odes: dict[str, np.ndarray]) -> Iterable[list[object]]:
    """Long format: one row per (setting, source, start, step, mode)."""
    for name, run in runs.items():
        setting = SETTINGS[name]
        for source, curves in (("network", run.eigen_coords), ("ode", odes[name])):
            for (t, k, m), value in _long(curves):
                yield [name, setting.loss, setting.variant, source, k + 1, int(run.steps[t]), m + 1, value]


def make_trajectories(out_dir: Path, opts: FigureOptions) -> list[Path]:
    """Compute, plot and tabulate the phase-plane figure."""
    runs, odes = trajectories_data(opts)
    png, table = out_dir / "trajectories.png", out_dir / "trajectories.csv"
    plot_trajectories(runs, odes, png)
    header = ["setting", "loss", "variant", "source", "start", "step", "mode", "eigenvalue"]
    write_csv(table, header, trajectories_rows(runs, odes))
    return [png, table]


# ----------------------------------------------------------------------------------------------
# Figure 2: eigenvalue curves for N = 15, M = 10
# ----------------------------------------------------------------------------------------------


def eigenvalues_data(opts: FigureOptions) -> dict[str, ToyRun]:
    """All eight settings from one shared random start (the notebook's N=15, M=10 experiment)."""
    steps = opts.steps(1500)
    config = ToyConfig(
        in_dim=15,
        out_dim=10,
        steps=steps,
        batch_size=opts.batch_size,
        alpha=opts.alpha,
        activation=opts.activation,
        record_every=opts.record_every(steps),
    )
    generator = torch.Generator().manual_seed(opts.seed)
    weights = init_weights(1, config, generator)
    lrs = [notebook_lr(name) for name in SETTING_NAMES]
    return simulate_settings(SETTING_NAMES, config, weights, generator, lrs=lrs)


def plot_eigenvalues(runs: dict[str, ToyRun], lrs: dict[str, float], path: Path) -> None:
    """One log-scale panel of the ten eigenvalue curves per setting."""
    config = next(iter(runs.values())).config
    title = f"Eigenvalues of $WW^T$, N = 15, M = 10, {config.activation} network, {_predictor_label(config.alpha)}"
    fig, axes = _panel_grid(title, (13, 5.8))
    for name, run in runs.items():
        ax = axes[_panel_index(name)]
        curves = run.eigenvalues[:, 0, :]
        ax.semilogy(run.steps, np.clip(curves, 1e-4, None), color="#555555", lw=0.8)
        ax.set_ylim(1e-3, 50)
        ax.set_title(f"{SETTINGS[name].label}\n(lr {lrs[name]:g})", fontsize=9)
        ax.tick_params(labelsize=7)
        row, col = _panel_index(name)
        if row == 1:
            ax.set_xlabel("Euler step", fontsize=9)
        if col == 0:
            ax.set_ylabel(r"$\lambda$", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def eigenvalue_rows(runs: dict[str, ToyRun]) -> Iterable[list[object]]:
    """Long format: one row per (setting, step, mode)."""
    for name, run in runs.items():
        setting = SETTINGS[name]
        for (t, m), value in _long(run.eigenvalues[:, 0, :]):
            yield [name, setting.loss, setting.variant, int(run.steps[t]), m + 1, value]


def make_eigenvalues(out_dir: Path, opts: FigureOptions) -> list[Path]:
    """Compute, plot and tabulate the eigenvalue-curve figure."""
    runs = eigenvalues_data(opts)
    png, table = out_dir / "eigenvalues.png", out_dir / "eigenvalues.csv"
    plot_eigenvalues(runs, {name: notebook_lr(name) for name in runs}, png)
    write_csv(table, ["setting", "loss", "variant", "step", "mode", "eigenvalue"], eigenvalue_rows(runs))
    return [png, table]


# ----------------------------------------------------------------------------------------------
# Figure 3: Euclidean versus cosine fixed points
# ----------------------------------------------------------------------------------------------


def fixed_points_data(opts: FigureOptions) -> tuple[dict[str, ToyRun], torch.Tensor]:
    """Notebook's two-neuron comparison: N=6, starts W, 2W and a wider draw; 20 high-norm probes."""
    steps = opts.steps(1500)
    config = ToyConfig(
        in_dim=6,
        out_dim=2,
        lr=5e-3,
        steps=steps,
        batch_size=opts.batch_size,
        alpha=opts.alpha,
        activation="linear",
        record_every=opts.record_every(steps),
    )
    generator = torch.Generator().manual_seed(opts.seed)
    candidates = torch.randn(5000, config.in_dim, generator=generator, dtype=config.dtype)
    probes = candidates[torch.argsort(candidates.norm(dim=1), descending=True)[:20]]
    base = init_weights(1, config, generator)[0]
    wide = init_weights(1, config, generator, scale=0.5)[0]
    weights = torch.stack([base, 2 * base, wide])
    runs = simulate_settings(["euc_standard", "cos_standard"], config, weights, generator, probe_inputs=probes)
    return runs, probes


def plot_fixed_points(runs: dict[str, ToyRun], path: Path) -> None:
    """(a) phase plane of both losses from the same starts; (b, c) probe representations, start 0."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.9))
    ax = axes[0]
    styles = {"euc_standard": ("-", "o", "Euclidean"), "cos_standard": ("--", "s", "cosine")}
    top = max(1.3, 1.1 * max(float(run.eigen_coords.max()) for run in runs.values()))
    for name, run in runs.items():
        line, marker, label = styles[name]
        for k in range(run.eigen_coords.shape[1]):
            color = START_COLORS[k]
            c = run.eigen_coords[:, k]
            ax.plot(c[:, 0], c[:, 1], ls=line, color=color, lw=1.2)
            ax.plot(c[-1, 0], c[-1, 1], marker, color=color, ms=7, mec="black", mew=0.6)
            if name == "euc_standard":
                ax.plot(c[0, 0], c[0, 1], "^", color=color, ms=6, mec="black", mew=0.4)
        ax.plot([], [], ls=line, marker=marker, color="grey", label=f"{label} (end: {marker})")
    ax.plot([], [], "^", color="grey", label="start")
    ax.plot([0, top], [0, top], color="black", lw=0.4, ls=":")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_aspect("equal")
    ax.set_xlabel(r"$\lambda_1$")
    ax.set_ylabel(r"$\lambda_2$")
    ax.set_title("(a) eigenvalues of $WW^T$, three starts", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    reps = [runs[name].representations for name in ("euc_standard", "cos_standard")]
    lim = 1.1 * max(float(np.abs(r[:, 0]).max()) for r in reps if r is not None)
    for ax, name, title in zip(axes[1:], ("euc_standard", "cos_standard"), ("(b) Euclidean", "(c) cosine")):
        rep = runs[name].representations
        assert rep is not None
        for j in range(rep.shape[2]):
            ax.plot(rep[:, 0, j, 0], rep[:, 0, j, 1], color="#EE7733", lw=0.6, zorder=0)
        ax.scatter(rep[0, 0, :, 0], rep[0, 0, :, 1], s=8, color="#BBBBBB", label="start")
        ax.scatter(rep[-1, 0, :, 0], rep[-1, 0, :, 1], s=10, color="#332288", label="end")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel("$z_1$")
        ax.set_ylabel("$z_2$")
        lam = runs[name].eigenvalues[-1, 0]
        ax.set_title(f"{title}: 20 probe inputs, start 1\nfinal $\\lambda$ = {lam[0]:.2f}, {lam[1]:.2f}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    alpha = runs["euc_standard"].config.alpha
    fig.suptitle(
        f"Euclidean and cosine losses reach different fixed points from the same starts ({_predictor_label(alpha)})",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def fixed_point_rows(runs: dict[str, ToyRun]) -> Iterable[list[object]]:
    """Long format: eigenvalue coordinates (index = mode) and probe representations (index = probe)."""
    for name, run in runs.items():
        loss = SETTINGS[name].loss
        for (t, k, m), value in _long(run.eigen_coords):
            yield [name, loss, k + 1, int(run.steps[t]), "eigenvalue", m + 1, "", value]
        if run.representations is not None:
            for (t, k, j, c), value in _long(run.representations):
                yield [name, loss, k + 1, int(run.steps[t]), "z", j + 1, c + 1, value]


def make_fixed_points(out_dir: Path, opts: FigureOptions) -> list[Path]:
    """Compute, plot and tabulate the Euclidean-versus-cosine figure."""
    runs, _ = fixed_points_data(opts)
    png, table = out_dir / "fixed_points.png", out_dir / "fixed_points.csv"
    plot_fixed_points(runs, png)
    header = ["setting", "loss", "start", "step", "quantity", "index", "component", "value"]
    write_csv(table, header, fixed_point_rows(runs))
    return [png, table]


# ----------------------------------------------------------------------------------------------
# Figure 4: how fast each eigenmode learns, standard loss versus IsoLoss
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateExperiment:
    """One row of the rates figure: a loss, its standard and IsoLoss settings, the initial
    spectrum of ``W W^T`` and how each mode's learning time is measured."""

    loss: str
    settings: tuple[str, str]  # (standard, IsoLoss)
    spectrum: tuple[float, ...]
    lr: float
    steps: int
    # "converge": first step after which a mode stays within 5% of its final value;
    # "double": first step at which a mode reaches twice its initial value
    measure: str
    timed_modes: int  # the first ``timed_modes`` modes of ``spectrum`` are timed


# Euclidean: every mode converges to lambda = 1; the ODEs give times ~ 1/(4 lambda0) for the
# standard loss and ~ log(1/lambda0)/4 for IsoLoss. Cosine: the fixed point depends on the whole
# spectrum, so the small modes are timed by doubling (rate ~ lambda0 for the standard loss, about
# constant for IsoLoss) while two large modes hold the fixed point above them.
RATE_EXPERIMENTS = (
    RateExperiment(
        "euclidean", ("euc_standard", "euc_iso"), (0.02, 0.04, 0.08, 0.16, 0.32, 0.64), 0.05, 400, "converge", 6
    ),
    RateExperiment("cosine", ("cos_standard", "cos_iso"), (0.02, 0.04, 0.08, 0.16, 1.5, 1.5), 0.02, 600, "double", 4),
)
MEASURE_LABELS = {"converge": "steps to within 5% of the fixed point", "double": "steps to double"}


@dataclass(frozen=True)
class RateResult:
    """The runs of one :class:`RateExperiment` and each timed mode's learning time per setting."""

    experiment: RateExperiment
    runs: dict[str, ToyRun]
    times: dict[str, np.ndarray]  # setting -> (timed_modes,) steps (inf: never reached)

    def spread(self, setting: str) -> float:
        """Slowest over fastest timed mode (1: all modes learn equally fast; inf: one never did)."""
        return time_ratio(self.times[setting]) if np.all(np.isfinite(self.times[setting])) else np.inf


def rates_data(opts: FigureOptions) -> list[RateResult]:
    """Linear networks started from a spread spectrum with a random eigenbasis, trained with the
    standard loss and with IsoLoss; the same start and input batches for both settings."""
    results = []
    for exp in RATE_EXPERIMENTS:
        config = ToyConfig(
            in_dim=10,
            out_dim=len(exp.spectrum),
            lr=exp.lr,
            steps=opts.steps(exp.steps),
            batch_size=opts.batch_size,
            alpha=opts.alpha,
            activation="linear",
        )
        generator = torch.Generator().manual_seed(opts.seed)
        start = torch.tensor([exp.spectrum], dtype=config.dtype)
        weights, basis = weights_with_spectrum(start, config.in_dim, generator)
        runs = simulate_settings(exp.settings, config, weights, generator, basis=basis)
        times = {}
        for name, run in runs.items():
            curves = run.eigen_coords[:, 0, : exp.timed_modes]
            if exp.measure == "converge":
                times[name] = convergence_steps(curves, run.steps, rel_tol=0.05).astype(float)
            else:
                times[name] = growth_steps(curves, run.steps, factor=2.0)
        results.append(RateResult(exp, runs, times))
    return results


def plot_rates(results: Sequence[RateResult], path: Path) -> None:
    """Per loss: the eigenvalue curves of both settings (dots: each mode's time) and the time
    against the initial eigenvalue."""
    fig, axes = plt.subplots(len(results), 3, figsize=(13, 4.2 * len(results)), squeeze=False)
    alpha = next(iter(results[0].runs.values())).config.alpha
    fig.suptitle(
        "How fast each eigenmode of $WW^T$ learns: standard loss vs IsoLoss "
        f"(linear network, {_predictor_label(alpha)})",
        fontsize=11,
    )
    for row, result in enumerate(results):
        exp = result.experiment
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(exp.spectrum)))
        for col, name in enumerate(exp.settings):
            ax, run = axes[row, col], result.runs[name]
            for m in range(len(exp.spectrum)):
                ax.semilogy(run.steps, run.eigen_coords[:, 0, m], color=colors[m], lw=1)
            for m, t in enumerate(result.times[name]):
                if np.isfinite(t):
                    ax.plot(t, np.interp(t, run.steps, run.eigen_coords[:, 0, m]), "o", color=colors[m], ms=4)
            ax.set_title(f"{SETTINGS[name].label} (lr {exp.lr:g})", fontsize=9)
            ax.set_xlabel("Euler step", fontsize=9)
            ax.set_ylabel(r"$\lambda$ (initial eigenbasis)", fontsize=9)
        ax = axes[row, 2]
        lam0 = np.asarray(exp.spectrum[: exp.timed_modes])
        for name, marker, kind in zip(exp.settings, ("s-", "o-"), ("standard", "IsoLoss")):
            ax.loglog(lam0, result.times[name], marker, label=f"{kind}: slowest/fastest {result.spread(name):.1f}")
        ax.set_xlabel(r"initial eigenvalue $\lambda_0$", fontsize=9)
        ax.set_ylabel(MEASURE_LABELS[exp.measure], fontsize=9)
        ax.set_title(f"{exp.loss} loss", fontsize=9)
        ax.xaxis.set_minor_formatter(NullFormatter())  # (labelled minor ticks overlap)
        ax.yaxis.set_minor_formatter(NullFormatter())
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 3)  # room above the curves for the legend
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def rate_rows(results: Sequence[RateResult]) -> Iterable[list[object]]:
    """Long format: one row per (setting, step, mode)."""
    for result in results:
        for name, run in result.runs.items():
            for (t, _, m), value in _long(run.eigen_coords):
                yield [name, result.experiment.loss, int(run.steps[t]), m + 1, result.experiment.spectrum[m], value]


def rate_time_rows(results: Sequence[RateResult]) -> Iterable[list[object]]:
    """One row per (setting, timed mode): its learning time in steps (inf: not reached)."""
    for result in results:
        exp = result.experiment
        for name, times in result.times.items():
            for m, t in enumerate(times):
                yield [name, exp.loss, exp.measure, m + 1, exp.spectrum[m], float(t)]


def make_rates(out_dir: Path, opts: FigureOptions) -> list[Path]:
    """Compute, plot and tabulate the learning-rate-per-mode figure, and print each spread."""
    results = rates_data(opts)
    png, table, times = out_dir / "rates.png", out_dir / "rates.csv", out_dir / "rates_times.csv"
    plot_rates(results, png)
    write_csv(table, ["setting", "loss", "step", "mode", "initial_eigenvalue", "eigenvalue"], rate_rows(results))
    header = ["setting", "loss", "measure", "mode", "initial_eigenvalue", "steps"]
    write_csv(times, header, rate_time_rows(results))
    for result in results:
        standard, iso = result.experiment.settings
        print(
            f"rates, {result.experiment.loss} loss ({MEASURE_LABELS[result.experiment.measure]}): slowest/fastest "
            f"mode {result.spread(standard):.1f} (standard) vs {result.spread(iso):.1f} (IsoLoss)"
        )
    return [png, table, times]


MAKERS: dict[str, Callable[[Path, FigureOptions], list[Path]]] = {
    "trajectories": make_trajectories,
    "eigenvalues": make_eigenvalues,
    "fixed_points": make_fixed_points,
    "rates": make_rates,
}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ivreg.analysis.toy_figures",
        description="Simulate the paper's toy Siamese network and write its figures (PNG + CSV).",
    )
    parser.add_argument("--out", type=Path, default=Path("figures/toy"), help="output folder")
    parser.add_argument("--figure", choices=("all", *FIGURES), default="all", help="which figure to make")
    parser.add_argument("--seed", type=int, default=0, help="random seed of weights and inputs")
    parser.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="multiply every figure's number of Euler steps (e.g. 0.05 for a quick smoke run)",
    )
    parser.add_argument("--batch-size", type=int, default=2048, help="inputs sampled per Euler step")
    parser.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default="relu",
        help="nonlinearity of the N=15, M=10 eigenvalue figure (the notebook uses relu)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="exponent of the closed-form predictor W_p = (W W^T)^alpha (default 1, as the authors' toy notebook; "
        "DirectPred's published runs use 0.5)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small ops: 1 is fastest)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        opts = FigureOptions(
            seed=args.seed,
            steps_scale=args.steps_scale,
            batch_size=args.batch_size,
            activation=args.activation,
            alpha=args.alpha,
        )
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = FIGURES if args.figure == "all" else (args.figure,)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: cannot create the output folder --out {args.out}: {err}", file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for name in names:
            start = time.perf_counter()
            paths = MAKERS[name](args.out, opts)
            elapsed = time.perf_counter() - start
            print(f"{name}: {elapsed:.1f} s -> {', '.join(str(p) for p in paths)}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(previous_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
