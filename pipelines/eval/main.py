"""make eval ARGS="generated=DIR reference=DIR output=DIR": score generated videos."""

import hydra
from omegaconf import DictConfig

from dynamictrl.errors import user_errors
from dynamictrl.eval.run import run


@hydra.main(version_base="1.3", config_path="../../conf/eval", config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors("eval"):
        run(cfg)


if __name__ == "__main__":
    main()
