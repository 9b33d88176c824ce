"""Weighted kNN accuracy of a pretrained backbone's features, for several k in one pass.

    python3 main_knn.py pretrained_feature_extractor=trained_models/isoloss_cifar10/last.ckpt \
        k=[10,20,100,200] temperature=0.07 distance=cosine out=knn.csv

The bank is the non-augmented training split, the queries the test split; both come from
the checkpoint's config unless ``data.*`` keys override them.
"""

import sys

import hydra
from omegaconf import DictConfig

from ivreg.cli import exit_after_sweep, exit_on_user_error, multirun_flag_first
from ivreg.eval.knn import run_knn


@hydra.main(version_base="1.2", config_path="scripts/knn", config_name="knn.yaml")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_knn(cfg)


if __name__ == "__main__":
    sys.argv = multirun_flag_first(sys.argv)
    main()
    exit_after_sweep()  # a sweep (-m) whose jobs failed exits with 1, naming them
