"""Predictors: the learned MLP of BYOL and the closed-form spectral predictor of DirectPred.

Both keep a running correlation matrix C of the online projections: the spectral predictor
builds W_p from it, the MLP predictor tracks it only to report the spectrum. Every
predictor has the same interface: ``observe(zs)`` once per training step with the detached
projections of all views, ``forward(z) -> (p, p_sqrt)`` for projections (of one view or of
several concatenated: W_p is applied row by row),
``predict_views(z, n_views)`` for all views of a step concatenated, and ``spectrum()``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ivreg.errors import DivergedError, TrainingError, first_line
from ivreg.heads import mlp
from ivreg.norms import ViewGroups, run_views
from ivreg.timing import time_runs


def _no_autocast(t: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=t.device.type, enabled=False)


class RunningCorrelation(nn.Module):
    """C <- tau C + (1 - tau) Z^T Z / B, one update per view, in float32.

    Under DDP the per-view Gram matrices and the sample count are summed over ranks in one
    all-reduce before the update, so every rank holds the same C (the correlation of the
    global batch). C starts at zero and is saved in checkpoints.
    """

    def __init__(self, dim: int, tau: float):
        super().__init__()
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"the correlation EMA factor dp_tau must be in [0, 1), got {tau}")
        self.tau = tau
        self.register_buffer("C", torch.zeros(dim, dim, dtype=torch.float32))

    @torch.no_grad()
    def update(self, zs: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """``zs``: the views' projections, as a (views, B, d) tensor or a list of (B, d)."""
        with _no_autocast(self.C):
            z = zs.detach().float() if isinstance(zs, torch.Tensor) else torch.stack([v.detach().float() for v in zs])
            grams = torch.bmm(z.transpose(1, 2), z)  # (views, d, d)
            batch: torch.Tensor | int = z.shape[1]
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                packed = torch.cat([grams.flatten(), z.new_full((1,), z.shape[1])])
                dist.all_reduce(packed)
                grams, batch = packed[:-1].view_as(grams), packed[-1:]
            # The per-view updates in one: C <- tau^n C + (1 - tau) sum_k tau^(n-1-k) G_k / B
            # (Horner's scheme over the views, in view order; 4 ops for two views instead of 9)
            weighted = grams[0]
            for gram in grams[1:]:
                weighted = torch.add(gram, weighted, alpha=self.tau)
            self.C.mul_(self.tau ** len(grams)).add_(weighted * ((1.0 - self.tau) / batch))


def decomposition_failed(exc: BaseException) -> DivergedError:
    """The error for an eigendecomposition of C that failed (C holds NaN or inf)."""
    return DivergedError(
        f"the eigendecomposition of the projection correlation matrix C failed ({first_line(exc)}); "
        "the projections have become NaN or infinite. Try a lower optimizer.lr or precision=32"
    )


def spectrum_metrics(eigvals: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summary of C's eigenvalues, under the names the paper's tooling logs."""
    s = eigvals.float()
    pos = s.clamp_min(0)
    part_ratio = pos.sum().pow(2) / pos.pow(2).sum().clamp_min(1e-30)
    return {
        "eigval_metrics/eigval_min": s.min(),
        "eigval_metrics/eigval_max": s.max(),
        "eigval_metrics/eigval_mean": s.mean(),
        "eigval_metrics/eigval_std": s.std(),
        "eigval_metrics/part_ratio": part_ratio,
    }


class MLPPredictor(nn.Module):
    """BYOL's learned predictor q(z); C (EMA factor ``spectrum_tau``) is only for metrics."""

    def __init__(self, dim: int, hidden_dim: int, spectrum_tau: float = 0.99):
        super().__init__()
        self.net = mlp(dim, hidden_dim, dim)
        self.corr = RunningCorrelation(dim, spectrum_tau)

    def observe(self, zs: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """``zs``: the views' detached projections, a sequence or a ``(views, B, d)`` tensor."""
        self.corr.update(zs)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.net(z), None

    def predict_views(
        self, z: torch.Tensor, n_views: int, groups: ViewGroups | None = None
    ) -> tuple[torch.Tensor, None]:
        """All views through the MLP, its BatchNorm normalising each view on its own: in one
        call with ``groups`` (shared by its BatchNorm), else one call per view."""
        return run_views(self.net, z, n_views, groups), None

    @torch.no_grad()
    def spectrum(self) -> torch.Tensor:
        """Eigenvalues of C in descending order (computed on demand: BYOL does not need them
        in its step)."""
        with _no_autocast(self.corr.C):
            try:
                return torch.linalg.eigvalsh(self.corr.C).flip(0)
            except RuntimeError as exc:  # C holds NaN: on a logging step before the loss guard looks
                raise decomposition_failed(exc) from exc


class SpectralPredictor(nn.Module):
    """DirectPred's closed-form predictor W_p = U diag(f(s) ** alpha) U^T of C = U diag(s) U^T.

    f(s) = clamp(s, 0) / max(s) + eps_iso with ``normalize``, else s with NaN -> 0 and clipped
    to [0, 1e6]. C is decomposed with ``eigh`` once per training step, after all views have
    been observed, and that decomposition serves every view of the step (the reference
    decomposes again after each view, as ``decompose_per_view=True`` does here). No gradient
    flows into W_p.
    """

    def __init__(
        self,
        dim: int,
        alpha: float,
        normalize: bool,
        eps_iso: float,
        tau: float,
        with_sqrt: bool,
        eigh_on_host: bool | str = "auto",
    ):
        super().__init__()
        if alpha < 0:
            raise ValueError(f"dp_alpha must be >= 0, got {alpha}")
        if eps_iso < 0:
            raise ValueError(f"eps_iso must be >= 0, got {eps_iso}")
        self.alpha = alpha
        self.normalize = normalize
        self.eps_iso = eps_iso
        self.with_sqrt = with_sqrt
        self.corr = RunningCorrelation(dim, tau)
        # The decomposition of the current step; recomputed, so not saved in checkpoints.
        self.register_buffer("eigvals", torch.zeros(dim), persistent=False)
        self.register_buffer("eigvecs", torch.eye(dim), persistent=False)
        self._decomposed = False
        if not (isinstance(eigh_on_host, bool) or eigh_on_host == "auto"):
            raise ValueError(f"eigh_on_host must be auto, True or False, got {eigh_on_host!r}")
        # None ("auto"): chosen by timing both at the first decomposition (choose_eigh_on_host)
        self.eigh_on_host: bool | None = None if eigh_on_host == "auto" else eigh_on_host
        self._host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # C, eigvals, eigvecs

    def observe(self, zs: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """``zs``: the views' detached projections, a sequence or a ``(views, B, d)`` tensor."""
        self.corr.update(zs)
        self.decompose()

    @torch.no_grad()
    def decompose(self) -> None:
        with _no_autocast(self.corr.C):
            try:
                # Into the same buffers every step: a compiled step replayed as CUDA graphs
                # reads them at fixed addresses. Predictions made from an earlier decomposition
                # (with ``per_view``) are safe: their backward keeps W_p, not these buffers.
                if self.eigh_on_host is None:
                    self.eigh_on_host = choose_eigh_on_host(len(self.corr.C), self.corr.C.device)
                if self.eigh_on_host:
                    self._eigh_on_host()
                else:
                    torch.linalg.eigh(self.corr.C, out=(self.eigvals, self.eigvecs))
            except RuntimeError as exc:
                # eigh fails to converge on some C holding NaN or inf; on others it returns NaN
                # eigenvalues, and NonFiniteLossGuard stops the run
                raise decomposition_failed(exc) from exc
        self._decomposed = True

    def _eigh_on_host(self) -> None:
        """``eigh`` by LAPACK on the host, through page-locked copies of C and of the result.

        For one small matrix, cuSOLVER's ``eigh`` on the GPU is slow (the speed issue measured
        5 ms for 256x256 on an H100; LAPACK took 1.4 ms on this project's 2-core CPU machine;
        ``choose_eigh_on_host`` picks the faster), and the step waits for the
        decomposition either way (``eigh`` checks its result on the host). The copy of C
        waits for C; the copies back are queued on the stream, so the next step's copy of C,
        which follows them in stream order, cannot overwrite the host buffers before they are
        read."""
        if self._host is None:
            pin = self.corr.C.is_cuda
            self._host = tuple(
                torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in (self.corr.C, self.eigvals, self.eigvecs)
            )
        c, s, u = self._host
        c.copy_(self.corr.C)
        torch.linalg.eigh(c, out=(s, u))
        self.eigvals.copy_(s, non_blocking=True)
        self.eigvecs.copy_(u, non_blocking=True)

    def scaled_eigvals(self) -> torch.Tensor:
        """f(s), the eigenvalues W_p raises to the power alpha."""
        s = self.eigvals
        if self.normalize:
            pos = s.clamp_min(0)
            return pos / pos.max().clamp_min(1e-30) + self.eps_iso
        return torch.nan_to_num(s, nan=0.0).clamp(0.0, 1e6)

    def matrix(self, power: float = 1.0) -> torch.Tensor:
        """W_p ** power as an explicit matrix."""
        if not self._decomposed:
            self.decompose()
        return self._matrix(self.scaled_eigvals(), power)

    def _matrix(self, scaled: torch.Tensor, power: float) -> torch.Tensor:
        u = self.eigvecs
        return (u * scaled.pow(self.alpha * power)) @ u.T

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``p = z W_p`` and, for the IsoLoss, ``p_sqrt = z W_p^(1/2)``, in float32 (rows are
        independent, so ``z`` may hold any number of views)."""
        if not self._decomposed:  # e.g. validation before the first training step
            self.decompose()
        with _no_autocast(z):
            scaled = self.scaled_eigvals()
            z = z.float()
            p = z @ self._matrix(scaled, 1.0)
            p_sqrt = z @ self._matrix(scaled, 0.5) if self.with_sqrt else None
        return p, p_sqrt

    def predict_views(
        self, z: torch.Tensor, n_views: int, groups: ViewGroups | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All views in one product with W_p (the rows do not interact)."""
        return self(z)

    def spectrum(self) -> torch.Tensor:
        """Eigenvalues of C (not normalised) in descending order, from the last decomposition."""
        if not self._decomposed:
            self.decompose()
        return self.eigvals.flip(0)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._decomposed = False  # C changed: decompose again before the next prediction


def time_decompose(c: torch.Tensor, on_host: bool, repeats: int = 5) -> float:
    """Median seconds of one ``SpectralPredictor.decompose`` of the correlation matrix ``c``
    (on its device; with ``on_host`` through the host's LAPACK), after one warm-up call. Each
    call is timed to the end of its result: the step waits for it too."""
    predictor = SpectralPredictor(
        len(c), alpha=0.5, normalize=True, eps_iso=0.0, tau=0.5, with_sqrt=True, eigh_on_host=on_host
    ).to(c.device)
    predictor.corr.C.copy_(c)
    predictor.decompose()  # warm-up: workspaces, page-locked buffers, libraries
    return statistics.median(time_runs(predictor.decompose, repeats, c.device))


def sample_correlation(dim: int, device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """A (dim, dim) float32 correlation matrix of 4 dim Gaussian samples: a stand-in for C
    when timing its decomposition (C itself may still be all zeros)."""
    z = torch.randn(4 * dim, dim, generator=torch.Generator().manual_seed(seed))
    return (z.T @ z / len(z)).to(device)


@torch.compiler.disable
def choose_eigh_on_host(dim: int, device: torch.device) -> bool:
    """``method_kwargs.eigh_on_host=auto``: whether the host's LAPACK decomposes a matrix of
    C's size (``dim``) faster than the GPU does, timed once on a stand-in matrix (a few ms).

    Which is faster depends on the machine (an H100 took 5 ms for ``eigh`` of 256x256; LAPACK
    on a 2-core host 1.4 ms), so it is measured rather than assumed. Both give the same W_p to
    float rounding. On the CPU there is nothing to choose. Under DDP each rank times for itself.
    """
    if device.type != "cuda":
        return False
    sample = sample_correlation(dim, device)
    on_device = time_decompose(sample, False)
    try:
        on_host = time_decompose(sample, True)
    except (RuntimeError, TrainingError) as exc:  # e.g. page-locked memory refused: auto must not fail a run
        rank_zero_info(f"spectral predictor: eigh of C on the GPU (the host path failed: {first_line(exc)})")
        return False
    rank_zero_info(
        f"spectral predictor: eigh of C ({dim}x{dim}) on the {'host' if on_host < on_device else 'GPU'}: "
        f"{1e3 * on_host:.2f} ms by host LAPACK against {1e3 * on_device:.2f} ms on the GPU, timed "
        "(method_kwargs.eigh_on_host=True or False fixes the choice)"
    )
    return on_host < on_device


@torch.compiler.disable  # eager inside a compiled step: C may be all-reduced and eigh checks on the host
def observe_views(predictor: MLPPredictor | SpectralPredictor, z: torch.Tensor, n_views: int) -> None:
    """``predictor.observe`` of the detached projections ``z`` of ``n_views`` views of equal
    size concatenated in view order. Called from a compiled step, this is where the step's
    forward graph splits in two (``SSLMethod.forward_step`` calls it directly, so that all that
    follows it is one graph)."""
    _check_views(z, n_views)
    predictor.observe(z.detach().unflatten(0, (n_views, -1)))


def _check_views(z: torch.Tensor, n_views: int) -> None:
    if z.shape[0] % n_views:
        raise ValueError(f"{z.shape[0]} projections cannot be {n_views} views of equal size")


def observe_and_predict(
    predictor: MLPPredictor | SpectralPredictor, z: torch.Tensor, n_views: int, per_view: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(p, p_sqrt)`` of all views, after feeding the detached views to ``predictor.observe``.

    ``z`` holds the projections of ``n_views`` views of equal size concatenated in view order
    (view-major, as ``torch.cat`` of the views gives); ``p`` and ``p_sqrt`` come in the same
    order. By default all views update C first and one decomposition serves them all, in one
    product for all views. With ``per_view`` each view updates C and is predicted from the
    decomposition that follows its own update, the reference's order (one ``eigh`` per view):
    view 1 then sees a C without view 2's Gram matrix, which matters with the no-EMA
    ``dp_tau`` of 0.5.
    """
    if not per_view:
        observe_views(predictor, z, n_views)
        return predictor.predict_views(z, n_views)
    _check_views(z, n_views)
    ps, p_sqrts = [], []
    for view in z.chunk(n_views):
        observe_views(predictor, view, 1)
        p, p_sqrt = predictor(view)
        ps.append(p)
        p_sqrts.append(p_sqrt)
    return torch.cat(ps), None if p_sqrts[0] is None else torch.cat(p_sqrts)
