"""The three data pipelines, and the resident one with compiled augmentation, train the same
model to the same accuracy (CPU, digits)."""

from pathlib import Path

from ivreg.config import compose
from ivreg.train import pretrain

from ..conftest import ROOT


def _final_acc(pipeline: str, root: Path, compile_augmentation: bool = False) -> tuple[float, str]:
    overrides = [
        f"++data.pipeline={pipeline}",
        f"++performance.compile_augmentation={compile_augmentation}",
        "max_epochs=3",
        "scheduler.warmup_epochs=1",
        "backbone.name=resnet10",
        "data.num_workers=0",
        "report.compare_random_init=False",
        f"checkpoint.dir={root}",
        f"name={pipeline}-{compile_augmentation}",
        "++enable_model_summary=False",
    ]
    run = pretrain(compose(str(ROOT / "scripts" / "pretrain" / "digits"), "demo.yaml", overrides))
    batched = run.datamodule._batched
    if compile_augmentation:  # the compiled ops really ran (no silent fallback to eager)
        assert batched is not None and all(view.compiled for view in batched.views)
    return float(run.trainer.callback_metrics["val_acc1"]), run.datamodule.pipeline


def test_resident_and_hybrid_pipelines_match_the_worker_pipeline(tmp_path: Path) -> None:
    results = {p: _final_acc(p, tmp_path) for p in ("workers", "resident", "hybrid")}
    assert {p: used for p, (_, used) in results.items()} == {p: p for p in results}
    results["resident-compiled"] = _final_acc("resident", tmp_path, compile_augmentation=True)
    acc = {p: a for p, (a, _) in results.items()}
    assert acc["workers"] > 80, acc  # all of them learn, so the comparison means something
    # 360 validation images at ~90%: the standard error of a difference of two runs is about
    # 2.2 points; allow three of them.
    for pipeline in ("resident", "hybrid", "resident-compiled"):
        assert abs(acc[pipeline] - acc["workers"]) <= 7.0, acc
