"""Toy Siamese network of the paper (Figures 2, 5 and 6 of arXiv 2212.04858).

A one-layer network ``z = f(W x)`` (``W`` is ``M x N``) sees i.i.d. Gaussian inputs. As in the
reference notebook, the online view is the clean input ``x1 ~ N(0, I_N)`` and the target view is
``x2 = x1 + sigma * xi``. The predictor is the closed-form DirectPred matrix
``W_p = U diag(lambda**alpha) U^T`` built from the eigendecomposition of ``W W^T``; it never
receives a gradient. ``W`` follows gradient flow, integrated by explicit Euler steps on a freshly
sampled batch at every step (the notebook does the same with 50 000 samples per step).

Eight settings are compared: the Euclidean and the cosine loss, each as the standard
stop-gradient + predictor loss (SimSiam/DirectPred-like), without stop-gradient, without predictor
and as IsoLoss. Besides the network simulation, :func:`eigen_ode_rhs` gives the eigenvalue
dynamics of ``W W^T`` for the linear network: exact in expectation for the Euclidean losses and,
for the cosine losses, under the paper's approximation that the norms ``||p||``, ``||z'||`` and the
dot product ``p . z'`` concentrate at their expected values.

Conventions shared with the rest of the library (see docs/method-spec.md): the Euclidean loss is
``||p - z'||^2`` and the cosine loss ``2 - 2 cos(p, z')``, both averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ivreg.losses import cosine_per_sample, euclidean_per_sample, iso_cosine_per_sample, iso_euclidean_per_sample

LOSS_KINDS = ("euclidean", "cosine")
ACTIVATIONS = ("linear", "relu")
_NORM_EPS = 1e-12


@dataclass(frozen=True)
class Setting:
    """One of the eight learning rules: which loss, and which of its asymmetries are kept."""

    name: str
    loss: str
    stop_grad: bool = True
    predictor: bool = True
    iso: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"setting {self.name!r}: loss must be one of {LOSS_KINDS}, got {self.loss!r}")
        if self.iso and not (self.predictor and self.stop_grad):
            raise ValueError(f"setting {self.name!r}: IsoLoss is defined with a predictor and a stop-gradient target")

    @property
    def variant(self) -> str:
        """Short name of the rule independent of the loss ('standard', 'no_sg', 'no_pred', 'iso')."""
        if self.iso:
            return "iso"
        if not self.stop_grad:
            return "no_sg"
        if not self.predictor:
            return "no_pred"
        return "standard"

    @property
    def label(self) -> str:
        """Human-readable panel title."""
        loss = "Euclidean" if self.loss == "euclidean" else "Cosine"
        variant = {
            "standard": "standard (SG + pred.)",
            "no_sg": "no stop-grad",
            "no_pred": "no predictor",
            "iso": "IsoLoss",
        }[self.variant]
        return f"{loss}: {variant}"


def _make_settings() -> dict[str, Setting]:
    """The eight settings, ordered like the paper's panels (no SG, no predictor, standard, IsoLoss)."""
    settings: dict[str, Setting] = {}
    for prefix, loss in (("euc", "euclidean"), ("cos", "cosine")):
        for suffix, kwargs in (
            ("nosg", {"stop_grad": False}),
            ("nopred", {"predictor": False}),
            ("standard", {}),
            ("iso", {"iso": True}),
        ):
            name = f"{prefix}_{suffix}"
            settings[name] = Setting(name=name, loss=loss, **kwargs)
    return settings


SETTINGS: dict[str, Setting] = _make_settings()
SETTING_NAMES: tuple[str, ...] = tuple(SETTINGS)


def get_setting(name: str | Setting) -> Setting:
    """Look a setting up by name, failing loudly on a typo instead of running the wrong rule."""
    if isinstance(name, Setting):
        return name
    try:
        return SETTINGS[name]
    except KeyError:
        raise ValueError(f"unknown toy setting {name!r}; choose one of: {', '.join(SETTING_NAMES)}") from None


@dataclass(frozen=True)
class ToyConfig:
    """Sizes and hyperparameters of one simulation (default sizes: the paper's N=15, M=10 figure)."""

    in_dim: int = 15
    out_dim: int = 10
    sigma: float = 0.1
    alpha: float = 1.0
    lr: float = 1e-2
    steps: int = 1500
    batch_size: int = 4096
    activation: str = "linear"
    record_every: int = 1
    dtype: torch.dtype = field(default=torch.float64)

    def __post_init__(self) -> None:
        for name in ("in_dim", "out_dim", "steps", "batch_size", "record_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ToyConfig.{name} must be a positive integer, got {value!r}")
        if not np.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"ToyConfig.alpha must be a finite number >= 0, got {self.alpha!r}")
        if not np.isfinite(self.sigma) or self.sigma < 0:
            raise ValueError(f"ToyConfig.sigma must be a finite number >= 0, got {self.sigma!r}")
        if not np.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"ToyConfig.lr must be a finite number > 0, got {self.lr!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ToyConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")


# ----------------------------------------------------------------------------------------------
# Predictor and losses
# ----------------------------------------------------------------------------------------------


def _check_alpha(alpha: float) -> None:
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")


def predictor_matrix(weights: torch.Tensor, alpha: float, power: float = 1.0) -> torch.Tensor:
    """Closed-form predictor ``U diag(lambda**(alpha*power)) U^T`` of ``W W^T`` (batched, no gradient).

    ``power=0.5`` gives ``W_p^(1/2)``, needed by the cosine IsoLoss. Eigenvalues are clamped at
    zero because ``eigh`` can return tiny negative values for a rank-deficient ``W W^T``.
    """
    _check_alpha(alpha)
    w = weights.detach()
    corr = w @ w.transpose(-1, -2)
    corr = 0.5 * (corr + corr.transpose(-1, -2))
    lam, vecs = torch.linalg.eigh(corr)
    scale = lam.clamp_min(0.0).pow(alpha * power)
    return (vecs * scale.unsqueeze(-2)) @ vecs.transpose(-1, -2)


def _apply(matrix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Row-vector convention ``rows @ matrix^T`` over any leading batch dimensions."""
    return rows @ matrix.transpose(-1, -2)


def _activation(pre: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.relu(pre) if activation == "relu" else pre


def setting_loss(
    weights: torch.Tensor,
    x_online: torch.Tensor,
    x_target: torch.Tensor,
    setting: Setting,
    alpha: float,
    activation: str = "linear",
) -> torch.Tensor:
    """Per-run loss of one setting; differentiate it with respect to ``weights`` for the update.

    ``weights`` is ``(..., M, N)``, the inputs ``(B, N)`` or ``(..., B, N)``. The predictor matrix is
    recomputed from the detached weights, so it never receives a gradient.
    """
    z = _activation(_apply(weights, x_online), activation)
    target = _activation(_apply(weights, x_target), activation)
    if setting.stop_grad:
        target = target.detach()
    p = _apply(predictor_matrix(weights, alpha), z) if setting.predictor else z
    if setting.iso:
        if setting.loss == "euclidean":
            return iso_euclidean_per_sample(z, p, target).mean(-1)
        p_sqrt = _apply(predictor_matrix(weights, alpha, power=0.5), z)
        return iso_cosine_per_sample(z, p, p_sqrt, target).mean(-1)
    if setting.loss == "euclidean":
        return euclidean_per_sample(p, target).mean(-1)
    return cosine_per_sample(p, target).mean(-1)


# ----------------------------------------------------------------------------------------------
# Network simulation
# ----------------------------------------------------------------------------------------------


@dataclass
class ToyRun:
    """Recorded history of one vectorised simulation (R independent runs share the input batches)."""

    setting: Setting
    config: ToyConfig
    steps: np.ndarray  # (T,)
    eigenvalues: np.ndarray  # (T, R, M), ascending eigenvalues of W W^T
    eigen_coords: np.ndarray  # (T, R, M), diag(U0^T W W^T U0) in each run's initial eigenbasis
    representations: np.ndarray | None  # (T, R, P, M): f(W x) of the probe inputs, or None
    final_weights: np.ndarray  # (R, M, N)


def init_weights(n_runs: int, config: ToyConfig, generator: torch.Generator, scale: float = 0.25) -> torch.Tensor:
    """Gaussian initial weights ``randn / 4`` as in the reference notebook, shape ``(R, M, N)``."""
    return scale * torch.randn(n_runs, config.out_dim, config.in_dim, generator=generator, dtype=config.dtype)


def weights_with_spectrum(
    eigenvalues: torch.Tensor, in_dim: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``U diag(sqrt(lambda)) V^T`` whose ``W W^T`` has exactly the given eigenvalues.

    ``eigenvalues`` is ``(R, M)``; the eigenvectors ``U`` and the row space ``V`` are random, which
    lets the phase-plane figures start from chosen points of the eigenvalue plane. Returns the
    weights ``(R, M, N)`` and the eigenvector basis ``U`` ``(R, M, M)``, column ``m`` belonging to
    ``eigenvalues[:, m]`` (pass it as ``basis`` to :func:`simulate_settings`).
    """
    if torch.any(eigenvalues < 0):
        raise ValueError("initial eigenvalues of W W^T must be >= 0")
    n_runs, m = eigenvalues.shape
    if in_dim < m:
        raise ValueError(f"in_dim ({in_dim}) must be >= out_dim ({m}) to realise an arbitrary spectrum")
    dtype = eigenvalues.dtype
    u, _ = torch.linalg.qr(torch.randn(n_runs, m, m, generator=generator, dtype=dtype))
    v, _ = torch.linalg.qr(torch.randn(n_runs, in_dim, m, generator=generator, dtype=dtype))
    return (u * eigenvalues.sqrt().unsqueeze(-2)) @ v.transpose(-1, -2), u


def sample_views(batch_size: int, config: ToyConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean online view ``x1 ~ N(0, I)`` and noisy target view ``x2 = x1 + sigma * xi``."""
    x1 = torch.randn(batch_size, config.in_dim, generator=generator, dtype=config.dtype)
    x2 = x1 + config.sigma * torch.randn(batch_size, config.in_dim, generator=generator, dtype=config.dtype)
    return x1, x2


def simulate_settings(
    settings: Sequence[str | Setting],
    config: ToyConfig,
    initial_weights: torch.Tensor,
    generator: torch.Generator,
    probe_inputs: torch.Tensor | None = None,
    lrs: Sequence[float] | None = None,
    basis: torch.Tensor | None = None,
) -> dict[str, ToyRun]:
    """Euler-integrate gradient flow of ``W`` for several settings at once, from the same start.

    ``initial_weights`` is ``(R, M, N)``: R independent runs (starting points) per setting. All
    settings and runs see the same freshly sampled batch at every step, so sampling (the dominant
    cost) is paid once and the comparison between settings is not blurred by different noise.
    ``lrs`` optionally gives one learning rate per setting (default ``config.lr``). ``eigen_coords``
    are measured in ``basis`` (``(R, M, M)``, orthonormal columns; default: the eigenvectors of the
    initial ``W W^T``), which keeps each eigenvalue attached to its mode instead of re-sorting. Non-finite
    gradient entries (a fully collapsed cosine run has undefined gradients) are set to zero, as the
    notebook's ``nan_to_num`` does.
    """
    resolved = [get_setting(s) for s in settings]
    if not resolved:
        raise ValueError("at least one setting is required")
    names = [s.name for s in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"settings must be distinct, got {names}")
    rates = [config.lr] * len(resolved) if lrs is None else [float(lr) for lr in lrs]
    if len(rates) != len(resolved) or any(not np.isfinite(lr) or lr <= 0 for lr in rates):
        raise ValueError(f"lrs must hold one finite positive learning rate per setting, got {lrs!r}")
    w0 = initial_weights.detach().to(config.dtype)
    if w0.ndim != 3 or w0.shape[1:] != (config.out_dim, config.in_dim):
        raise ValueError(
            f"initial weights must have shape (runs, {config.out_dim}, {config.in_dim}), got {tuple(w0.shape)}"
        )
    probes = None if probe_inputs is None else probe_inputs.to(config.dtype)
    record_steps = list(range(0, config.steps + 1, config.record_every))
    if record_steps[-1] != config.steps:
        record_steps.append(config.steps)
    record_set = set(record_steps)
    if basis is None:
        _, basis0 = torch.linalg.eigh(w0 @ w0.transpose(-1, -2))
    else:
        basis0 = basis.to(config.dtype)
        if basis0.shape != (w0.shape[0], config.out_dim, config.out_dim):
            raise ValueError(f"basis must have shape {(w0.shape[0], config.out_dim, config.out_dim)}")

    weights = [w0.clone() for _ in resolved]
    history: list[dict[str, list[torch.Tensor]]] = [{"eig": [], "coord": [], "rep": []} for _ in resolved]

    def record() -> None:
        for w, hist in zip(weights, history):
            corr = w @ w.transpose(-1, -2)
            hist["eig"].append(torch.linalg.eigvalsh(corr))
            hist["coord"].append(torch.diagonal(basis0.transpose(-1, -2) @ corr @ basis0, dim1=-2, dim2=-1))
            if probes is not None:
                hist["rep"].append(_activation(_apply(w, probes), config.activation))

    record()
    for step in range(1, config.steps + 1):
        x1, x2 = sample_views(config.batch_size, config, generator)
        leaves = [w.detach().requires_grad_(True) for w in weights]
        total = sum(setting_loss(w, x1, x2, s, config.alpha, config.activation).sum() for w, s in zip(leaves, resolved))
        grads = torch.autograd.grad(total, leaves)
        weights = [
            (w.detach() - lr * torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0))
            for w, g, lr in zip(leaves, grads, rates)
        ]
        if step in record_set:
            record()

    runs: dict[str, ToyRun] = {}
    for s, w, hist in zip(resolved, weights, history):
        runs[s.name] = ToyRun(
            setting=s,
            config=config,
            steps=np.asarray(record_steps),
            eigenvalues=torch.stack(hist["eig"]).numpy(),
            eigen_coords=torch.stack(hist["coord"]).numpy(),
            representations=None if probes is None else torch.stack(hist["rep"]).numpy(),
            final_weights=w.numpy(),
        )
    return runs


def simulate_network(
    setting: str | Setting,
    config: ToyConfig,
    initial_weights: torch.Tensor,
    generator: torch.Generator,
    probe_inputs: torch.Tensor | None = None,
    basis: torch.Tensor | None = None,
) -> ToyRun:
    """Single-setting convenience wrapper around :func:`simulate_settings`."""
    setting = get_setting(setting)
    runs = simulate_settings([setting], config, initial_weights, generator, probe_inputs, basis=basis)
    return runs[setting.name]


# ----------------------------------------------------------------------------------------------
# Eigenvalue dynamics (linear network, eigenbasis of W W^T is preserved)
# ----------------------------------------------------------------------------------------------


def eigen_ode_rhs(eigenvalues: torch.Tensor, setting: str | Setting, sigma: float, alpha: float) -> torch.Tensor:
    """``d lambda / dt`` (per unit learning rate) of the eigenvalues of ``W W^T``, vectorised over modes.

    For the linear network every rule has the form ``dW/dt = h(W W^T) W`` with ``h`` a function of
    ``W W^T``, so the eigenbasis is fixed and each eigenvalue obeys ``d lambda/dt = 2 h(lambda) lambda``.
    With ``r = lambda**alpha`` the expected Euclidean gradients give exactly

    - standard: ``4 lambda r (1 - r)``;  IsoLoss: ``4 lambda (1 - r)`` (the factor ``r``, the
      eigenvalue acting as a learning-rate multiplier, is gone);
    - no stop-gradient: ``-4 lambda [(r - 1)^2 + sigma^2]`` (always negative: collapse);
    - no predictor: ``0`` (the expected gradient vanishes: the views differ by zero-mean noise).

    For the cosine losses ``||p||``, ``||z'||`` and ``p . z'`` are replaced by their expected values
    ``P = sqrt(sum lambda r^2)``, ``Z = sqrt((1 + sigma^2) sum lambda)``, ``D = sum lambda r``
    (an approximation that holds as the norms concentrate, i.e. for many dimensions; with few,
    the simulated slow modes drift away from it, while the Euclidean rules above are exact):

    - standard: ``(4 / PZ) lambda r (1 - D r / P^2)``;  IsoLoss: ``(4 / PZ) lambda (1 - D r / P^2)``;
    - no stop-gradient: ``(4 / PZ) lambda (2 r - D r^2 / P^2 - D / sum lambda)``;
    - no predictor: ``0`` to this approximation's order, not exactly: the expected drift is of
      order ``sigma^2`` (``1 / ||z'||`` correlates with the noise) and moves the eigenvalues towards
      each other at a constant trace (each sample's gradient is orthogonal to ``z``). At M = 2 it
      is large enough to see: from (0.08, 1.6), sigma 0.1, about +-0.023 per unit learning rate
      (``tests/analysis/test_toy.py``).

    Leading dimensions of ``eigenvalues`` (``(..., M)``) are independent systems.
    """
    setting = get_setting(setting)
    _check_alpha(alpha)
    lam = eigenvalues.clamp_min(0.0)
    r = lam.pow(alpha)
    if not setting.predictor:
        return torch.zeros_like(lam)
    if setting.loss == "euclidean":
        if setting.iso:
            return 4.0 * lam * (1.0 - r)
        if setting.stop_grad:
            return 4.0 * lam * r * (1.0 - r)
        return -4.0 * lam * ((r - 1.0) ** 2 + sigma**2)
    total = lam.sum(-1, keepdim=True)
    p_sq = (lam * r * r).sum(-1, keepdim=True).clamp_min(_NORM_EPS)
    dot = (lam * r).sum(-1, keepdim=True)
    pref = 4.0 / (p_sq.sqrt() * ((1.0 + sigma**2) * total).sqrt().clamp_min(_NORM_EPS))
    if setting.iso:
        return pref * lam * (1.0 - dot * r / p_sq)
    if setting.stop_grad:
        return pref * lam * r * (1.0 - dot * r / p_sq)
    return pref * lam * (2.0 * r - dot * r * r / p_sq - dot / total.clamp_min(_NORM_EPS))


def simulate_eigen_ode(
    initial_eigenvalues: torch.Tensor | np.ndarray,
    setting: str | Setting,
    config: ToyConfig,
) -> np.ndarray:
    """Euler-integrate :func:`eigen_ode_rhs` with step ``config.lr`` for ``config.steps`` steps.

    Returns ``(T, ..., M)`` with ``T = steps // record_every + 1`` (the last step is always kept).
    """
    setting = get_setting(setting)
    lam = torch.as_tensor(initial_eigenvalues, dtype=config.dtype).clone()
    if torch.any(lam < 0):
        raise ValueError("initial eigenvalues must be >= 0")
    out = [lam.clone()]
    for step in range(1, config.steps + 1):
        lam = (lam + config.lr * eigen_ode_rhs(lam, setting, config.sigma, config.alpha)).clamp_min(0.0)
        if step % config.record_every == 0 or step == config.steps:
            out.append(lam.clone())
    return torch.stack(out).numpy()


# ----------------------------------------------------------------------------------------------
# Measurements of simulated trajectories (the tests check the paper's claims with them)
# ----------------------------------------------------------------------------------------------


def convergence_steps(curves: np.ndarray, steps: np.ndarray, rel_tol: float = 0.05) -> np.ndarray:
    """First recorded step after which each curve stays within ``rel_tol`` of its final value.

    ``curves`` is ``(T, ...)``; the result has the trailing shape. Vectorised: a curve's
    convergence time is the step right after its last excursion outside the tolerance band.
    """
    if not 0 < rel_tol < 1:
        raise ValueError(f"rel_tol must lie in (0, 1), got {rel_tol!r}")
    curves = np.asarray(curves, dtype=float)
    steps = np.asarray(steps)
    final = curves[-1]
    outside = np.abs(curves - final) > rel_tol * np.abs(final)
    t = curves.shape[0]
    # index of the last time step outside the band (-1 when never outside)
    last_out = np.where(outside.any(0), t - 1 - np.argmax(outside[::-1], axis=0), -1)
    first_in = np.minimum(last_out + 1, t - 1)
    return steps[first_in]


def growth_steps(curves: np.ndarray, steps: np.ndarray, factor: float = 2.0) -> np.ndarray:
    """First recorded step at which each curve reaches ``factor`` times its initial value (inf: never).

    For modes that start well below their fixed point this is a rate measure free of the final
    value: it exposes the eigenvalue acting as a learning-rate multiplier (time ~ 1/lambda_0 with
    the standard loss, about constant with IsoLoss).
    """
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor!r}")
    curves = np.asarray(curves, dtype=float)
    reached = curves >= factor * curves[0]
    first = np.argmax(reached, axis=0)
    return np.where(reached.any(0), np.asarray(steps, dtype=float)[first], np.inf)


def log_time_spread(times: np.ndarray) -> float:
    """Standard deviation of ``log`` convergence times: 0 when every mode converges equally fast."""
    times = np.asarray(times, dtype=float)
    return float(np.std(np.log(np.maximum(times, 1.0))))


def time_ratio(times: np.ndarray) -> float:
    """Slowest over fastest convergence time across modes (1 = perfectly equal rates)."""
    times = np.maximum(np.asarray(times, dtype=float), 1.0)
    return float(times.max() / times.min())
