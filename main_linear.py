"""Linear evaluation (or fine-tuning) of a pretrained backbone.

    python3 main_linear.py --config-path scripts/linear/cifar/ --config-name linear.yaml \
        pretrained_feature_extractor=trained_models/isoloss_cifar10/last.ckpt

The dataset, its paths and the crop size come from the checkpoint's config; any ``data.*``
key overrides them. Without --config-path it uses the CPU settings of scripts/linear/digits/.
"""

import sys

import hydra
from omegaconf import DictConfig

from ivreg.cli import exit_after_sweep, exit_on_user_error, multirun_flag_first
from ivreg.eval.linear import linear_eval


@hydra.main(version_base="1.2", config_path="scripts/linear/digits", config_name="linear.yaml")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    linear_eval(cfg)


if __name__ == "__main__":
    sys.argv = multirun_flag_first(sys.argv)
    main()
    exit_after_sweep()  # a sweep (-m) whose jobs failed exits with 1, naming them
