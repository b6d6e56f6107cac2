"""make precompute ARGS="input=SHARDS output=DIR": VAE latents and T5 embeddings into shards."""

import hydra
from omegaconf import DictConfig

from dynamictrl.errors import require, user_errors
from dynamictrl.train.precompute import run

REQUIRED = {"input": "'SHARDS/train-*.tar'", "output": "DIR"}  # the mandatory settings, with a value to suggest


@hydra.main(version_base="1.3", config_path="../../conf", config_name="precompute")
def main(cfg: DictConfig) -> None:
    with user_errors("precompute", examples=REQUIRED):
        require(cfg, REQUIRED)
        run(cfg)


if __name__ == "__main__":
    main()
