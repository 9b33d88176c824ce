"""The paper's results table from run folders.

``python -m ivreg.analysis.results_table <runs_root> [--metric best|final] [--csv out.csv] [--md out.md]``

Every folder under the root that holds ``config.yaml`` and ``epochs.csv`` is a run. Runs are
grouped by (method label, dataset), e.g. ('IsoLoss (no EMA)', 'cifar10'); a cell is the
mean +- sample standard deviation of ``val_acc1`` (best or final epoch) over the runs of the
group (seeds), with the count when there are several. Rows follow the paper's order, then
any other label alphabetically; columns CIFAR-10, CIFAR-100, STL-10, Tiny ImageNet,
ImageNet-100, ImageNet, then other datasets alphabetically.

Pretraining runs (online readout) and linear-evaluation runs (``main_linear.py``, labelled
by the method of the checkpoint they evaluate) are different measurements: ``--kind`` picks
one of them, never both. A run short of its ``max_epochs`` (still training, or stopped) is
left out with a warning unless ``--include-unfinished``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ivreg.callbacks import read_complete_rows, validated_values
from ivreg.cli import exit_on_user_error
from ivreg.errors import DataError

PAPER_ROWS = (
    "BYOL",
    "SimSiam",
    "DirectPred",
    "DirectPred (no EMA)",
    "DirectCopy",
    "DirectCopy (no EMA)",
    "IsoLoss",
    "IsoLoss (no EMA)",
    "IsoLoss-DirectCopy",
    "IsoLoss-DirectCopy (no EMA)",
)
PAPER_COLUMNS = ("cifar10", "cifar100", "stl10", "tinyimagenet", "imagenet100", "imagenet")
METRICS = ("best", "final")
KINDS = ("pretrain", "linear")
EMPTY_CELL = "-"


@dataclass(frozen=True)
class RunResult:
    """One run's contribution to the table."""

    run_dir: Path
    label: str
    dataset: str
    value: float
    seed: int | None = None  # the pretraining seed (a linear run's: its checkpoint's)
    settings: Mapping[str, Any] = field(default_factory=dict)  # training options, seed aside


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for a single run
    n: int

    def format(self, digits: int = 2) -> str:
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


def is_linear_run(cfg: Mapping[str, Any]) -> bool:
    return "pretrain_cfg" in cfg or "pretrained_feature_extractor" in cfg


def _label_of_pretraining(cfg: Mapping[str, Any]) -> str:
    """``method_label`` of a pretraining config, with the defaults filling in what it leaves out."""
    from omegaconf import OmegaConf

    from ivreg.config import DEFAULTS, method_label

    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(DEFAULTS), dict(cfg)), resolve=True)
    return method_label(merged)  # type: ignore[arg-type]


def run_key(cfg: Mapping[str, Any]) -> tuple[str, str]:
    """(method label, dataset) of a run config; a linear run is labelled by what it evaluates."""
    dataset = str((cfg.get("data") or {}).get("dataset") or "cifar10")
    if is_linear_run(cfg):
        pretrain = cfg.get("pretrain_cfg")
        if not isinstance(pretrain, Mapping):
            raise DataError("a linear-evaluation config without pretrain_cfg")
        if pretrain.get("foreign_checkpoint"):  # another library's checkpoint: no method to name
            label = f"{pretrain.get('name')} (external checkpoint)"
        else:
            label = _label_of_pretraining(pretrain)
        return label + (" (fine-tuned)" if cfg.get("finetune") else ""), dataset
    return _label_of_pretraining(cfg), dataset


def find_runs(root: Path) -> list[Path]:
    """Folders at or under ``root`` holding config.yaml and epochs.csv, or config.yaml and a
    last.ckpt (a run whose epochs.csv was deleted: named, not silently left out), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    candidates = [root, *(p.parent for p in root.rglob("config.yaml"))]
    records = ("epochs.csv", "last.ckpt")
    return sorted({p for p in candidates if (p / "config.yaml").is_file() and any((p / r).is_file() for r in records)})


def run_value(rows: Sequence[Mapping[str, str]], metric: str, column: str = "val_acc1") -> float:
    """The best (maximum) or final (last finite) value of ``column`` in ``epochs.csv``'s
    ``rows``; NaN when there is none."""
    finite = [value for _, value in validated_values(list(rows), column)]
    if not finite:
        return math.nan
    return max(finite) if metric == "best" else finite[-1]


def unfinished(cfg: Mapping[str, Any], rows: Sequence[Mapping[str, str]], run_dir: Path | None = None) -> str | None:
    """Why a run (its config and ``epochs.csv``'s ``rows``) has not reached its ``max_epochs``
    (None when it has, or when a ``max_steps`` limit makes the epoch count no measure of it);
    with its folder, a ``last.ckpt`` that finished more epochs than the rows hold is named."""
    from ivreg.resume import finished_epochs

    max_steps = cfg.get("max_steps")
    if max_steps is not None and int(max_steps) >= 0:
        return None
    planned, done = int(cfg.get("max_epochs") or 0), len({r.get("epoch") for r in rows})
    if done >= planned:
        return None
    trained = finished_epochs(run_dir / "last.ckpt") if run_dir is not None else None
    if trained is not None and trained > done:
        return (
            f"missing rows: its epochs.csv holds {done} of the {trained} epochs its last.ckpt has finished; "
            "relaunch the run's command to rebuild epochs.csv from the checkpoint"
        )
    return f"unfinished ({done} of max_epochs={planned} epochs)"


def collect(
    root: Path,
    metric: str = "best",
    kind: str = "pretrain",
    column: str = "val_acc1",
    warn: Any = None,
    include_unfinished: bool = False,
) -> list[RunResult]:
    """The results of every run of ``kind`` under ``root``; unreadable runs, and runs still
    short of their ``max_epochs`` unless ``include_unfinished``, are reported to ``warn`` and
    left out."""
    from omegaconf import OmegaConf

    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    results = []
    for run_dir in find_runs(root):
        try:
            cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
            if not isinstance(cfg, Mapping):
                raise DataError("config.yaml is not a mapping")
            if is_linear_run(cfg) != (kind == "linear"):
                continue
            label, dataset = run_key(cfg)
            rows, _ = read_complete_rows(run_dir / "epochs.csv")  # (a row cut short is a lost one)
            value, short = run_value(rows, metric, column), unfinished(cfg, rows, run_dir)
        except Exception as exc:  # one broken folder must not hide the others
            warn(f"skipping {run_dir}: {exc}")
            continue
        if short and not include_unfinished:
            warn(f"skipping {run_dir}: {short}; --include-unfinished tabulates it as it stands")
            continue
        if short:
            warn(f"{run_dir} is {short}: its {metric} {column} is not the finished run's")
        if not math.isfinite(value):
            warn(f"skipping {run_dir}: no finite {column} in epochs.csv")
            continue
        settings = settings_of(cfg, recorded_world_size(run_dir / "last.ckpt"))
        results.append(RunResult(run_dir, label, dataset, value, seed_of(cfg), settings))
    return results


def recorded_world_size(checkpoint: Path) -> int | None:
    """The processes a run trained with, as its checkpoint records them (None if it does not)."""
    from ivreg.callbacks import WORLD_SIZE_KEY
    from ivreg.checkpoints import read_checkpoint

    with contextlib.suppress(Exception):
        world = read_checkpoint(checkpoint, mmap=True).get(WORLD_SIZE_KEY)
        return int(world) if world else None
    return None


# What a linear run adds to its pretraining run's settings (the trained ones of
# ivreg.eval.linear.LINEAR_RESUME_KEYS, which also holds what identifies the run).
LINEAR_SETTINGS = (
    "finetune",
    "label_smoothing",
    "mixup",
    "cutmix",
    "optimizer",
    "scheduler",
    "augmentations",
    "max_epochs",
    "data.fraction",
    "data.crop_size",
    "data.mean",
    "data.std",
)


# Trainer options that change which images or epochs a run's figures come from, with the
# values that leave them so (``limit_val_batches=1``, an int, is one batch; 1.0 is all)
VALIDATION_SETTINGS: dict[str, Any] = {"limit_val_batches": 1.0, "check_val_every_n_epoch": 1}


def _off_full(value: Any, full: Any) -> bool:
    """``value`` is set and not the ``full`` one (of its type: 1, an int, is one batch; 1.0 all)."""
    return value is not None and not (type(value) is type(full) and value == full)


def validation_settings(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The run's ``VALIDATION_SETTINGS`` that differ from a full validation every epoch."""
    return {prefix + key: cfg.get(key) for key, full in VALIDATION_SETTINGS.items() if _off_full(cfg.get(key), full)}


def settings_of(cfg: Mapping[str, Any], world_size: int | None = None) -> dict[str, Any]:
    """The options that shape a run's numbers (those resumption compares, the seed aside, and
    ``max_epochs``, and the images per optimizer step: batch x processes (``world_size``, else
    as the config counts them) x accumulation, which set the learning rate and the schedule's
    step counts, and ``VALIDATION_SETTINGS`` off their full-validation values); for a linear run
    its pretraining run's, then its own under ``linear.``."""
    from omegaconf import OmegaConf

    from ivreg.config import DEFAULTS, config_leaves
    from ivreg.eval.linear import LINEAR_DEFAULTS
    from ivreg.resume import RESUME_FREE, RESUME_KEYS, images_per_step

    def per_step(config: Mapping[str, Any], world: int | None) -> dict[str, int]:
        with contextlib.suppress(Exception):  # an incomplete hand-made config: not compared
            return {"images_per_step": images_per_step(OmegaConf.create(dict(config)), world)}
        return {}

    def pick(
        config: Mapping[str, Any], keys: Iterable[str], defaults: Mapping[str, Any], prefix: str = ""
    ) -> dict[str, Any]:
        # options a run's version of ivreg did not have yet count at their defaults
        with contextlib.suppress(Exception):  # a hand-edited config the defaults do not merge with: as it is
            config = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(dict(defaults)), dict(config)))
        out: dict[str, Any] = {}
        for key in keys:
            node: Any = config
            for part in key.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            out.update({prefix + k: v for k, v in config_leaves(node, key).items() if k not in RESUME_FREE})
        return out

    keys = [k for k in RESUME_KEYS if k != "seed"] + ["max_epochs"]
    if is_linear_run(cfg):
        pretrain = cfg.get("pretrain_cfg") if isinstance(cfg.get("pretrain_cfg"), Mapping) else {}
        linear = pick(cfg, LINEAR_SETTINGS, LINEAR_DEFAULTS, "linear.")
        linear.update({f"linear.{k}": v for k, v in per_step(cfg, world_size).items()})
        linear.update(validation_settings(cfg, "linear."))
        return {**pick(pretrain, keys, DEFAULTS), **per_step(pretrain, None), **linear}  # type: ignore[arg-type]
    return {**pick(cfg, keys, DEFAULTS), **per_step(cfg, world_size), **validation_settings(cfg)}


def _cells(results: Iterable[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    """The runs of each table cell, (method label, dataset)."""
    cells: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        cells.setdefault((r.label, r.dataset), []).append(r)
    return cells


def mixed_settings(results: Iterable[RunResult]) -> list[str]:
    """One line per cell whose runs differ in more than their seed: the cell would average
    different settings (an lr sweep, or another dataset's config run on this dataset)."""
    lines = []
    for (label, dataset), group in _cells(results).items():
        keys = sorted({k for r in group for k in r.settings})
        differ = [k for k in keys if len({repr(r.settings.get(k)) for r in group}) > 1]
        if differ:
            shown = ", ".join(
                f"{k} ({', '.join(sorted({repr(r.settings.get(k)) for r in group}))})" for k in differ[:3]
            )
            more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
            lines.append(
                f"the {len(group)} runs of {label} on {dataset} differ in {shown}{more}: the cell averages "
                "different settings; tabulate them from separate folders"
            )
    return lines


# Options that make a run train or validate on part of its data (a smoke test's settings),
# with the values that do not: ``limit_*`` 1.0 (an int counts batches), ``max_steps`` -1.
PARTIAL_SETTINGS: dict[str, Any] = {"limit_train_batches": 1.0, "limit_val_batches": 1.0, "max_steps": -1}


def partial_runs(results: Iterable[RunResult]) -> list[str]:
    """One line per cell holding runs that trained or validated on part of their data: a cell
    whose runs all share such a setting raises no "differ in" line, yet holds no full run."""
    lines = []
    for (label, dataset), group in _cells(results).items():
        partial = {
            f"{key}={value!r}"
            for r in group
            for key, value in r.settings.items()
            if key.removeprefix("linear.") in PARTIAL_SETTINGS
            and _off_full(value, PARTIAL_SETTINGS[key.removeprefix("linear.")])
        }
        if partial:
            shown = ", ".join(sorted(partial))
            lines.append(
                f"runs of {label} on {dataset} trained or validated on part of their data ({shown}): smoke-test "
                "settings, not the full protocol"
            )
    return lines


def seed_of(cfg: Mapping[str, Any]) -> int | None:
    source = cfg.get("pretrain_cfg") if is_linear_run(cfg) else cfg
    seed = source.get("seed") if isinstance(source, Mapping) else None
    return int(seed) if seed is not None else None


def shared_seeds(results: Iterable[RunResult]) -> list[str]:
    """One line per group cell in which several runs share a seed: their spread is not one
    over seeds (a rerun of the same run, or runs that differ in something else)."""
    runs: dict[tuple[str, str, int], list[RunResult]] = {}
    for r in results:
        if r.seed is not None:
            runs.setdefault((r.label, r.dataset, r.seed), []).append(r)
    return [
        f"{len(group)} runs of {label} on {dataset} share seed {seed} "
        f"({', '.join(str(r.run_dir) for r in group)}): the cell's ± is not a spread over seeds"
        for (label, dataset, seed), group in runs.items()
        if len(group) > 1
    ]


def summarize(results: Iterable[RunResult]) -> dict[tuple[str, str], Cell]:
    groups = {key: [r.value for r in group] for key, group in _cells(results).items()}
    return {
        key: Cell(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for key, v in groups.items()
    }


def ordered(names: Iterable[str], first: Sequence[str]) -> list[str]:
    """``first`` (those present, in that order), then the rest alphabetically."""
    present = set(names)
    return [n for n in first if n in present] + sorted(present - set(first))


def to_markdown(cells: Mapping[tuple[str, str], Cell], digits: int = 2) -> str:
    rows = ordered((k[0] for k in cells), PAPER_ROWS)
    cols = ordered((k[1] for k in cells), PAPER_COLUMNS)
    lines = ["| Method | " + " | ".join(cols) + " |", "| --- | " + " | ".join("---" for _ in cols) + " |"]
    for row in rows:
        values = [cells[(row, c)].format(digits) if (row, c) in cells else EMPTY_CELL for c in cols]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_csv(path: Path, cells: Mapping[tuple[str, str], Cell], metric: str, column: str) -> None:
    """Long format: one line per cell, with the numbers unformatted."""
    rows = ordered((k[0] for k in cells), PAPER_ROWS)
    cols = ordered((k[1] for k in cells), PAPER_COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "dataset", "metric", "column", "n", "mean", "std"])
        for row in rows:
            for col in cols:
                if (row, col) in cells:
                    c = cells[(row, col)]
                    writer.writerow([row, col, metric, column, c.n, repr(c.mean), repr(c.std)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ivreg.analysis.results_table",
        description="Accuracy table (method x dataset, mean ± std over seeds) from run folders.",
    )
    parser.add_argument("root", type=Path, help="folder searched (recursively) for config.yaml + epochs.csv")
    parser.add_argument("--metric", choices=METRICS, default="best", help="best epoch or final epoch per run")
    parser.add_argument("--kind", choices=KINDS, default="pretrain", help="pretraining runs or main_linear runs")
    parser.add_argument("--column", default="val_acc1", help="epochs.csv column to tabulate (default val_acc1)")
    parser.add_argument("--digits", type=int, default=2, help="decimals shown")
    parser.add_argument(
        "--include-unfinished",
        action="store_true",
        help="also tabulate runs short of their max_epochs (left out by default, with a warning)",
    )
    parser.add_argument("--csv", type=Path, help="also write the cells as CSV (one line per method and dataset)")
    parser.add_argument("--md", type=Path, help="also write the Markdown table to this file")
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = collect(args.root, args.metric, args.kind, args.column, include_unfinished=args.include_unfinished)
    for line in [*shared_seeds(results), *mixed_settings(results), *partial_runs(results)]:
        print(f"warning: {line}", file=sys.stderr)
    cells = summarize(results)
    if not cells:
        raise DataError(f"no {args.kind} runs with a finite {args.column} under {args.root}")
    table = to_markdown(cells, args.digits)
    print(table)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table + "\n")
    if args.csv:
        write_csv(args.csv, cells, args.metric, args.column)
    return 0


if __name__ == "__main__":
    sys.exit(main())
