"""Continue prompts with a trained model: python generate.py ckpt=PATH prompt="...". See docs/decoding.md.

The steps are lmlab.generation.main; this file makes them a Hydra app.
"""

import hydra
from omegaconf import DictConfig

from lmlab import generation
from lmlab.errors import report_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    generation.main(cfg)


if __name__ == "__main__":
    main()
