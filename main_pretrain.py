"""Pretrain a backbone with BYOL, SimSiam, DirectPred, DirectCopy or IsoLoss.

    python3 main_pretrain.py --config-path scripts/pretrain/cifar/ --config-name isoloss.yaml \
        data.dataset=cifar10 name=isoloss_cifar10 optimizer.weight_decay=1e-4

Without arguments it runs the offline demo on the digits set that ships with scikit-learn.
"""

import sys

import hydra
from omegaconf import DictConfig

from ivreg.cli import exit_after_sweep, exit_on_user_error, multirun_flag_first
from ivreg.train import pretrain


@hydra.main(version_base="1.2", config_path="scripts/pretrain/digits", config_name="demo.yaml")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    pretrain(cfg)


if __name__ == "__main__":
    sys.argv = multirun_flag_first(sys.argv)
    main()
    exit_after_sweep()  # a sweep (-m) whose jobs failed exits with 1, naming them
