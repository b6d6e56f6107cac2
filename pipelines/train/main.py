"""make train ARGS="experiment=demo output=DIR": train DynamiCtrl on shards."""

import hydra
from omegaconf import DictConfig

from dynamictrl.errors import require, user_errors
from dynamictrl.train.run import run

REQUIRED = {"data.train_shards": "'SHARDS/train-*.tar'"}  # the mandatory settings, with a value to suggest


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with user_errors("train", examples=REQUIRED):
        require(cfg, REQUIRED)
        run(cfg)


if __name__ == "__main__":
    main()
