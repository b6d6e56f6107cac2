"""make preprocess ARGS="input=DIR output=DIR": raw videos -> webdataset shards."""

import hydra
from omegaconf import DictConfig

from dynamictrl.errors import user_errors
from dynamictrl.preprocess.run import run


@hydra.main(version_base="1.3", config_path="../../conf", config_name="preprocess")
def main(cfg: DictConfig) -> None:
    with user_errors("preprocess"):
        run(cfg)


if __name__ == "__main__":
    main()
