"""The three data pipelines train the same model to the same accuracy (CPU, digits)."""

from pathlib import Path

from ivreg.config import compose
from ivreg.train import pretrain

from ..conftest import ROOT


def _final_acc(pipeline: str, root: Path) -> tuple[float, str]:
    overrides = [
        f"++data.pipeline={pipeline}",
        "max_epochs=3",
        "scheduler.warmup_epochs=1",
        "backbone.name=resnet10",
        "data.num_workers=0",
        "report.compare_random_init=False",
        f"checkpoint.dir={root}",
        f"name={pipeline}",
        "++enable_model_summary=False",
    ]
    run = pretrain(compose(str(ROOT / "scripts" / "pretrain" / "digits"), "demo.yaml", overrides))
    return float(run.trainer.callback_metrics["val_acc1"]), run.datamodule.pipeline


def test_resident_and_hybrid_pipelines_match_the_worker_pipeline(tmp_path: Path) -> None:
    results = {p: _final_acc(p, tmp_path) for p in ("workers", "resident", "hybrid")}
    assert {p: used for p, (_, used) in results.items()} == {p: p for p in results}
    acc = {p: a for p, (a, _) in results.items()}
    assert acc["workers"] > 80, acc  # all of them learn, so the comparison means something
    # 360 validation images at ~90%: the standard error of a difference of two runs is about
    # 2.2 points; allow three of them.
    for pipeline in ("resident", "hybrid"):
        assert abs(acc[pipeline] - acc["workers"]) <= 7.0, acc
