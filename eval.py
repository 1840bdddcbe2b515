"""Evaluate a trained model: python eval.py ckpt=PATH [split=test]. See docs/decoding.md.

The steps are lmlab.evaluation.main; this file makes them a Hydra app.
"""

import hydra
from omegaconf import DictConfig

from lmlab import evaluation
from lmlab.errors import report_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@report_user_errors
def main(cfg: DictConfig) -> dict:
    return evaluation.main(cfg)


if __name__ == "__main__":
    main()
