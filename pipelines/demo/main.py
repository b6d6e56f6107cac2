"""make demo: the whole chain on embedded defaults."""

import hydra
from omegaconf import DictConfig

from dynamictrl.demo import run
from dynamictrl.errors import user_errors


@hydra.main(version_base="1.3", config_path="../../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    with user_errors("demo"):
        run(cfg)


if __name__ == "__main__":
    main()
