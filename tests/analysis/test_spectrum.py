"""The spectrum figure from hand-written eigvals.csv / epochs.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from ivreg.analysis.spectrum import (
    load_spectrum,
    main,
    numerical_rank,
    participation_ratio,
    spectrum_figure,
)
from ivreg.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _fake_run(root: Path, name: str, spectra: list[list[float]], part_ratio: list[float] | None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    d = len(spectra[0])
    _write(run / "eigvals.csv", ["epoch"] + [f"eigval_{i}" for i in range(d)], [[e, *s] for e, s in enumerate(spectra)])
    if part_ratio is not None:
        _write(
            run / "epochs.csv", ["epoch", "val_acc1", "part_ratio"], [[e, 50.0, p] for e, p in enumerate(part_ratio)]
        )
    cfg = {"method": "directpred", "momentum": {"base_tau": 0.0, "final_tau": 0.0}, "data": {"dataset": "cifar10"}}
    cfg["method_kwargs"] = {"iso": True}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


# Eigenvalues in ascending order in the file (the reader sorts them), with a round-off zero.
SPECTRA = [[0.0, 0.5, 1.0, 2.0, 4.0], [0.1, 0.2, 0.5, 1.0, 8.0], [0.01, 0.02, 0.1, 1.0, 16.0]]


def test_participation_ratio_bounds():
    assert participation_ratio(np.ones((1, 4)))[0] == pytest.approx(4.0)
    assert participation_ratio(np.array([[3.0, 0.0, 0.0]]))[0] == pytest.approx(1.0)


def test_figure_has_one_curve_per_epoch_and_the_participation_ratio(tmp_path: Path):
    iso = _fake_run(tmp_path, "iso", SPECTRA, [3.0, 2.0, 1.5])
    bare = _fake_run(tmp_path, "no-epochs-csv", SPECTRA[:2], None)
    epochs, eig = load_spectrum(iso)
    assert epochs.tolist() == [0, 1, 2] and eig[0].tolist() == [4.0, 2.0, 1.0, 0.5, 0.0]

    fig = spectrum_figure([iso, bare])
    top, bottom = fig.axes[0], fig.axes[2]  # subplots first (row-major), colour bars after
    assert top.get_yscale() == "log"
    assert len(top.get_lines()) == 3
    assert np.isnan(top.get_lines()[0].get_ydata()[-1])  # the zero eigenvalue is not drawn on a log axis
    assert top.get_title() == "iso: IsoLoss (no EMA), cifar10"
    assert bottom.get_lines()[0].get_ydata().tolist() == [3.0, 2.0, 1.5]
    assert "epochs.csv" in bottom.get_title()
    fallback = fig.axes[3]  # no epochs.csv: the ratio comes from the spectrum itself
    assert "from eigvals.csv" in fallback.get_title()
    np.testing.assert_allclose(fallback.get_lines()[0].get_ydata(), participation_ratio(eig[:2]))
    assert len(fig.axes) == 6  # 2 x 2 panels and two colour bars
    fig.canvas.draw()
    for axis in (bottom.xaxis, fig.axes[4].yaxis):  # epochs are whole numbers on both axes
        ticks = [t for t in axis.get_ticklocs() if 0 <= t <= 2]
        assert ticks and all(float(t).is_integer() for t in ticks)

    capped = spectrum_figure([iso], normalize="max", max_curves=2)
    assert len(capped.axes[0].get_lines()) == 2  # first and last epoch
    assert capped.axes[0].get_lines()[-1].get_ydata()[0] == pytest.approx(1.0)


def test_cli_writes_png(tmp_path: Path, capsys):
    a = _fake_run(tmp_path, "a", SPECTRA, [3.0, 2.0, 1.5])
    b = _fake_run(tmp_path, "b", SPECTRA, [3.0, 2.5, 2.0])
    assert main([str(a)]) == 0
    assert (a / "spectrum.png").read_bytes()[:8] == PNG_MAGIC
    (a / "spectrum.png").unlink()
    (a / "last.ckpt").write_bytes(b"")  # a checkpoint stands for its run folder, as in the other tools
    assert main([str(a / "last.ckpt")]) == 0
    assert (a / "spectrum.png").read_bytes()[:8] == PNG_MAGIC
    out = tmp_path / "figs" / "both.png"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and capsys.readouterr().out.strip().endswith("both.png")


def test_numerical_rank_sees_a_collapse_the_participation_ratio_hides():
    collapsed = np.array([[1.0, 0.1, 0.07, 1e-5, 0.0, -1e-9]])
    assert numerical_rank(collapsed)[0] == 3 and numerical_rank(collapsed, rel=1e-6)[0] == 4
    assert participation_ratio(collapsed)[0] == pytest.approx(1.17**2 / (1 + 0.01 + 0.0049), rel=1e-4)
    assert numerical_rank(np.ones((1, 5)))[0] == 5


def test_cli_summary_prints_one_line_per_epoch(tmp_path: Path, capsys):
    run = _fake_run(tmp_path, "a", SPECTRA, [3.0, 2.0, 1.5])
    assert main([str(run), "--summary", "--rank-threshold", "0.02"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = [line.split() for line in lines if line[:1] == " " or line[:1].isdigit()]
    assert [int(t[0]) for t in table] == [0, 1, 2]
    # eigenvalues above 0.02 x largest: (4, 2, 1, .5 | 0), (8, 1, .5, .2 | .1), (16, 1 | .1, .02, .01)
    assert [int(t[2]) for t in table] == [4, 4, 2]
    assert [float(t[3]) for t in table] == [1.0, 1.0, 1.0]


def test_missing_eigvals_is_a_clear_error(tmp_path: Path, capsys):
    with pytest.raises(DataError, match="has no eigvals.csv"):
        load_spectrum(tmp_path)
    with pytest.raises(DataError, match="nope is not a folder; pass a run folder"):
        load_spectrum(tmp_path / "nope")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
