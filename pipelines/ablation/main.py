"""make ablation: the paper's Tables 3 and 4 in miniature (pose control structures, text)."""

import hydra
from omegaconf import DictConfig

from dynamictrl.ablation import run
from dynamictrl.errors import user_errors


@hydra.main(version_base="1.3", config_path="../../conf", config_name="ablation")
def main(cfg: DictConfig) -> None:
    with user_errors("ablation"):
        run(cfg)


if __name__ == "__main__":
    main()
