from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ivreg.config import PaperSettingWarning, UnreadConfigKeyWarning, compose, method_label, prepare_config, uses_ema
from ivreg.data.datasets import dataset_info
from ivreg.errors import ConfigError
from ivreg.method import SSLMethod
from ivreg.predictors import MLPPredictor, SpectralPredictor
from ivreg.targets import EMATarget, StopGradTarget

from .conftest import ROOT

CONFIG_FILES = sorted((ROOT / "scripts" / "pretrain").glob("*/*.yaml"))


def test_config_tree_is_complete() -> None:
    names = {"byol", "byol-noema", "directpred", "directpred-noema", "isoloss", "isoloss-noema"}
    for folder in ("cifar", "stl-10", "tinyimagenet", "imagenet"):
        assert {p.stem for p in (ROOT / "scripts/pretrain" / folder).glob("*.yaml")} == names
        for group, files in (
            ("augmentations", {"asymmetric", "symmetric", "symmetric_weak"}),
            ("logger", {"default", "wandb", "wandb_offline", "csv"}),
        ):
            assert {p.stem for p in (ROOT / "scripts/pretrain" / folder / group).glob("*.yaml")} == files


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_composes_and_builds(path: Path) -> None:
    cfg = prepare_config(compose(str(path.parent), path.name))
    cfg.data.num_classes = dataset_info(cfg.data.dataset).num_classes or 10
    model = SSLMethod(OmegaConf.to_container(cfg, resolve=True))
    noema = not uses_ema(cfg)
    assert isinstance(model.target, StopGradTarget if noema else EMATarget)
    assert isinstance(model.predictor, MLPPredictor if cfg.method == "byol" else SpectralPredictor)
    if path.parent.name == "digits":
        return
    assert noema == path.stem.endswith("noema")
    assert cfg.method == ("byol" if path.stem.startswith("byol") else "directpred")
    if path.stem.startswith("isoloss"):
        assert cfg.method_kwargs.iso and model.predictor.with_sqrt
    if isinstance(model.predictor, SpectralPredictor):
        assert cfg.method_kwargs.dp_tau == (0.5 if noema else 0.998)
    assert cfg.optimizer.name == ("sgd" if noema else "lars")
    if path.parent.name in ("cifar", "stl-10", "tinyimagenet"):
        expected_wd = 1e-5 if path.stem.startswith("byol") else 1e-4
        assert cfg.optimizer.weight_decay == pytest.approx(expected_wd)
        assert len(cfg.augmentations) == 2 and cfg.max_epochs == 1000


def test_seed_command_line_overrides() -> None:
    cfg = compose(
        str(ROOT / "scripts/pretrain/cifar"),
        "isoloss.yaml",
        [
            "data.dataset=cifar100",
            "name=isoloss_cifar100",
            "optimizer.weight_decay=1e-4",
            "++method_kwargs.new_key=3",
            "method_kwargs.dp_alpha=1",
            "method_kwargs.eps_iso=0.25",
        ],
    )
    with pytest.warns(UnreadConfigKeyWarning, match="method_kwargs.new_key is not read by ivreg"):
        cfg = prepare_config(cfg)
    assert cfg.data.dataset == "cifar100" and cfg.name == "isoloss_cifar100"
    assert cfg.method_kwargs.new_key == 3  # the seed's ++new_key=value still works
    assert method_label(cfg) == "IsoLoss-DirectCopy"


@pytest.mark.parametrize(
    ("config", "overrides", "label"),
    [
        ("byol.yaml", [], "BYOL"),
        ("byol-noema.yaml", [], "SimSiam"),
        ("directpred.yaml", [], "DirectPred"),
        ("directpred-noema.yaml", [], "DirectPred (no EMA)"),
        ("directpred.yaml", ["method_kwargs.dp_alpha=1", "method_kwargs.eps_iso=0.25"], "DirectCopy"),
        ("isoloss.yaml", [], "IsoLoss"),
        ("isoloss-noema.yaml", ["method_kwargs.use_l2=True"], "IsoLoss L2 (no EMA)"),
    ],
)
def test_method_labels(config: str, overrides: list[str], label: str) -> None:
    cfg = prepare_config(compose(str(ROOT / "scripts/pretrain/cifar"), config, overrides))
    assert method_label(cfg) == label
    assert uses_ema(cfg) == ("noema" not in config)


def _cifar(overrides: list[str], config: str = "isoloss.yaml"):
    return compose(str(ROOT / "scripts/pretrain/cifar"), config, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=simclr"], "unknown method 'simclr'.*non-contrastive methods; for others, such as SimCLR, use solo"),
        (
            ["method=simsiam"],
            r"unknown method .simsiam.; choose one of .* \(simsiam is method=byol \+\+momentum.base_tau=0 "
            r"\+\+momentum.final_tau=0, or byol-noema.yaml: the paper's SimSiam",
        ),
        (["method=BYOL"], r"\(BYOL is method=byol: names are lower case\)"),
        (["++data.fraction=-1"], r"data.fraction must be in \(0, 1\], got -1.0 \(solo-learn's -1, all images, is 1.0"),
        (["method=IsoLoss"], r"\(IsoLoss is method=directpred with method_kwargs.iso=True"),
        (["backbone.name=vgg16"], "unknown backbone.name 'vgg16'.*or timm:<model>"),
        (["momentum.base_tau=1.5"], r"momentum.base_tau must be in \[0, 1\]"),
        (["momentum.final_tau=-0.1"], r"momentum.final_tau must be in \[0, 1\]"),
        (["method_kwargs.dp_alpha=-0.5"], "dp_alpha must be >= 0"),
        (["method_kwargs.eps_iso=-1"], "eps_iso must be >= 0"),
        (["method_kwargs.dp_tau=1.0"], r"dp_tau must be in \[0, 1\)"),
        (["precision=8"], "precision '8' is not supported"),
        (["optimizer.lr=-1"], "optimizer.lr must be >= 0"),
        (["optimizer.batch_size=1"], "batch_size must be >= 2"),
        (["data.num_workers=-1"], r"data.num_workers must be >= 0 \(0: load in the main process\), got -1"),
        (["data.format=lmdb"], "data.format 'lmdb' is not supported; choose one of \\['image_folder', 'h5'\\]"),
        (["++performance.compile_augmentation=yes"], "performance.compile_augmentation must be auto, True or False"),
        (["++performance.batch_views=sometimes"], "performance.batch_views must be auto, True or False"),
        (["++checkpoint.async_write=later"], "checkpoint.async_write must be auto, True or False"),
        (["++method_kwargs.eigh_on_host=gpu"], "method_kwargs.eigh_on_host must be auto, True or False"),
        (["++performance.compile_mode=fast"], "performance.compile_mode must be one of default, reduce-overhead"),
        (["++optimizer.lr_scaling=sqrt"], "optimizer.lr_scaling 'sqrt' is not supported"),
        (["++method_kwargs.iso_tangent=True", "method_kwargs.use_l2=True"], "iso_tangent=True applies to the cosine"),
        (["++method_kwargs.iso_tangent=True", "method_kwargs.iso=False"], "iso_tangent=True applies to the cosine"),
        (["optimizer.name=adam"], "unknown optimizer.name 'adam'"),
        (
            ["optimizer.name=adamw"],  # isoloss.yaml's LARS options stay behind
            r"optimizer.kwargs \['clip_lr', 'eta', 'exclude_bias_n_norm'\] are not options of adamw .*"
            r"~optimizer.kwargs",
        ),
        (["max_epochs=5"], r"scheduler.warmup_epochs \(10\) must be shorter than max_epochs \(5\)"),
        (["scheduler.name=exponential"], "unknown scheduler.name 'exponential'"),
        (["scheduler.name=step"], "scheduler.name=step needs scheduler.lr_decay_steps"),
        # normalisation on the 0-1 scale of the images, three channels, no zero std
        (["++data.mean=[123.675,116.28,103.53]"], r"data.mean must be three numbers in \[0, 1\] .*got \[123.675"),
        (["++data.std=[0,0.5,0.5]"], r"data.std must be three numbers in \(0, 1\]"),
        (["++data.mean=[0.5]"], r"data.mean must be three numbers"),
        # a switch is True or False ("no" would count as True), a count a whole number, a rate a number
        (["method_kwargs.iso=no"], "method_kwargs.iso must be True or False, got 'no'"),
        (["method_kwargs.use_l2=off"], "method_kwargs.use_l2 must be True or False, got 'off'"),
        (["auto_resume.enabled=no"], "auto_resume.enabled must be True or False, got 'no'"),
        (["max_epochs=2.5"], "max_epochs must be a whole number, got 2.5"),
        (["max_epochs=abc"], "max_epochs must be a whole number, got 'abc'"),
        (["optimizer.batch_size=16.5"], "optimizer.batch_size must be a whole number, got 16.5"),
        (["++method_kwargs.proj_output_dim=16.5"], "proj_output_dim must be a whole number"),
        (["++seed=abc"], "seed must be a whole number, got 'abc'"),
        (["optimizer.lr=abc"], "optimizer.lr must be a number, got 'abc'"),
        (
            ["method=byol", "method_kwargs.iso=False", "method_kwargs.eps_iso=0.25"],
            "method_kwargs eps_iso shape the closed-form predictor",
        ),
    ],
)
def test_bad_config_values_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        prepare_config(_cifar(overrides))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("++method_kwargs.eps_isos=0.25", r"method_kwargs.eps_isos .*did you mean method_kwargs.eps_iso\?"),
        ("++performance.compile_scopes=step", r"did you mean performance.compile_scope\?"),
        ("++optimizer.exclude_bias_n_norm=True", r"optimizer.exclude_bias_n_norm is not read"),
        ("++max_epoch=3", r"max_epoch is not read by ivreg .*did you mean max_epochs\?"),
        ("++limit_train_batchs=3", r"did you mean limit_train_batches\?"),
    ],
)
def test_keys_nothing_reads_are_named_in_a_warning(override: str, message: str) -> None:
    with pytest.warns(UnreadConfigKeyWarning, match=message):
        prepare_config(_cifar([override]))


def test_flexible_keys_take_their_other_kinds() -> None:
    cfg = prepare_config(_cifar(["devices=auto", "precision=bf16", "scheduler.warmup_epochs=0.5", "optimizer.lr=2"]))
    assert (cfg.devices, cfg.precision, cfg.scheduler.warmup_epochs, cfg.optimizer.lr) == ("auto", "bf16", 0.5, 2)


def test_values_from_environment_variables_are_converted_and_null_passes(monkeypatch) -> None:
    """${oc.env:...} resolves to a string: one that spells the key's kind is taken as that kind
    (a SLURM array's seed, an epoch count); null is left to the key's reader."""
    monkeypatch.setenv("IVREG_TEST_EPOCHS", "12")
    monkeypatch.setenv("IVREG_TEST_ISO", "False")
    overrides = ["max_epochs=${oc.env:IVREG_TEST_EPOCHS}", "method_kwargs.iso=${oc.env:IVREG_TEST_ISO}"]
    cfg = prepare_config(_cifar([*overrides, "++benchmark=null", "++log_every_n_steps=null"]))
    assert cfg.max_epochs == 12 and cfg.method_kwargs.iso is False and cfg.benchmark is None
    monkeypatch.setenv("IVREG_TEST_ISO", "no")
    with pytest.raises(ConfigError, match="method_kwargs.iso must be True or False, got 'no'"):
        prepare_config(_cifar(overrides))


def test_trainer_arguments_and_resume_keys_are_read() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadConfigKeyWarning)
        prepare_config(_cifar(["++limit_train_batches=3", "++gradient_clip_val=1.0", "++resume_from_checkpoint=null"]))


def test_shipped_configs_and_run_keys_warn_of_nothing() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadConfigKeyWarning)
        warnings.simplefilter("error", PaperSettingWarning)
        for path in CONFIG_FILES:
            cfg = prepare_config(compose(str(path.parent), path.name, []))
            cfg.data.num_classes = 10  # as build_run writes it
            prepare_config(cfg)
            for logger in sorted(p.stem for p in (path.parent / "logger").glob("*.yaml")):
                prepare_config(compose(str(path.parent), path.name, [f"logger={logger}"]))


def test_an_unknown_timm_model_is_named_before_the_run() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match="timm has no model 'vit_nope'"):
        prepare_config(_cifar(["backbone.name=timm:vit_nope"]))


def test_iso_needs_the_closed_form_predictor() -> None:
    cfg = compose(str(ROOT / "scripts/pretrain/cifar"), "byol.yaml", ["++method_kwargs.iso=True"])
    with pytest.raises(ConfigError, match="use method=directpred"):
        prepare_config(cfg)


def test_seed_wandb_group_maps_to_logger() -> None:
    base = _cifar([])
    OmegaConf.set_struct(base, False)
    cfg = prepare_config(OmegaConf.merge(base, {"wandb": {"enabled": True, "project": "p"}}))
    assert cfg.logger.wandb.enabled and cfg.logger.wandb.project == "p" and "wandb" not in cfg


def test_switching_the_optimizer_with_its_options_dropped() -> None:
    cfg = prepare_config(_cifar(["optimizer.name=adamw", "~optimizer.kwargs"]))
    assert cfg.optimizer.name == "adamw" and len(cfg.optimizer.kwargs) == 0
    cfg = prepare_config(_cifar(["optimizer.name=sgd", "~optimizer.kwargs", "++optimizer.kwargs.momentum=0.8"]))
    assert cfg.optimizer.kwargs.momentum == 0.8


def test_turning_off_the_ema_of_an_ema_config_warns_of_the_slow_correlation_average() -> None:
    off = ["momentum.base_tau=0", "momentum.final_tau=0"]
    with pytest.warns(PaperSettingWarning, match=r"dp_tau=0.998 .* without an EMA target .* use dp_tau=0.5"):
        prepare_config(_cifar(off, "directpred.yaml"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PaperSettingWarning)
        prepare_config(_cifar([*off, "method_kwargs.dp_tau=0.5"], "directpred.yaml"))  # chosen: no warning
        prepare_config(_cifar(off, "byol.yaml"))  # SimSiam has no C to average


def test_solo_learns_auto_umap_section_is_the_online_map() -> None:
    with pytest.warns(UnreadConfigKeyWarning, match=r"auto_umap.dir is not read .* <run folder>/umap/"):
        cfg = prepare_config(_cifar(["++auto_umap.enabled=True", "++auto_umap.frequency=5", "++auto_umap.dir=maps"]))
    assert cfg.umap.enabled is True and cfg.umap.every_n_epochs == 5 and "auto_umap" not in cfg


def test_solo_learns_knn_eval_section_is_the_online_knn() -> None:
    overrides = ["++knn_eval.enabled=True", "++knn_eval.k=5", "++knn_eval.distance_func=euclidean", "++knn_eval.x=1"]
    with pytest.warns(UnreadConfigKeyWarning, match=r"knn_eval.x is not read .* knn_eval takes \['T', 'distance_func'"):
        cfg = prepare_config(_cifar(overrides))
    assert (cfg.knn.enabled, cfg.knn.k, cfg.knn.distance) == (True, 5, "euclidean") and "knn_eval" not in cfg
    # without distance_func, solo-learn's default (euclidean), not ivreg's knn.distance (cosine)
    assert prepare_config(_cifar(["++knn_eval.enabled=True"])).knn.distance == "euclidean"
    assert prepare_config(_cifar(["++knn.enabled=True"])).knn.distance == "cosine"
    with pytest.raises(ConfigError, match=r"unknown kNN distance 'manhattan'"):
        prepare_config(_cifar(["++knn.enabled=True", "++knn.distance=manhattan"]))


def test_solo_learns_momentum_classifier_is_the_momentum_readout() -> None:
    cfg = prepare_config(_cifar(["++momentum.classifier=True"], "byol.yaml"))
    assert cfg.report.momentum_readout is True and "classifier" not in cfg.momentum
    noema = ["++report.momentum_readout=True"]
    with pytest.raises(ConfigError, match=r"momentum_readout=True reads the EMA copy's backbone.*\*-noema"):
        prepare_config(_cifar(noema, "isoloss-noema.yaml"))


def test_solo_learn_keys_of_another_name_get_advice_not_the_closest_name() -> None:
    with pytest.warns(UnreadConfigKeyWarning, match=r"opposite sense: performance.channels_last=False") as caught:
        prepare_config(_cifar(["++performance.disable_channel_last=True"]))
    assert not any("did you mean" in str(w.message) for w in caught)


def test_solo_learn_keys_read_elsewhere_are_named_with_their_ivreg_keys() -> None:
    """Top-level solo-learn keys (and main_knn's flags) get advice, not 'did you mean' guesses."""
    from ivreg.config import unread_keys
    from ivreg.eval.knn import KNN_DEFAULTS

    given = OmegaConf.create({"pretrained_checkpoint_dir": "d", "feature_type": ["backbone"], "num_workers": 4})
    lines = unread_keys(given, defaults=KNN_DEFAULTS, closed=("data",), top_level={*KNN_DEFAULTS})
    assert any("pretrained_checkpoint_dir" in line and "pretrained_feature_extractor=" in line for line in lines)
    assert any("feature_type" in line and "features=[backbone,projector]" in line for line in lines)
    assert any("num_workers" in line and "data.num_workers" in line for line in lines)
    lines = unread_keys(OmegaConf.create({"no_validation": True, "auto_augment": "rand-m9"}))
    assert any("no_validation" in line and "data.val_path unset" in line for line in lines)
    assert any("auto_augment" in line and "no RandAugment" in line for line in lines)
