"""make animate ARGS="image=PATH pose=PATH prompt='...' output=PATH.mp4": animate a picture."""

import hydra
from omegaconf import DictConfig

from dynamictrl.animate.run import run
from dynamictrl.errors import user_errors


@hydra.main(version_base="1.3", config_path="../../conf/animate", config_name="animate")
def main(cfg: DictConfig) -> None:
    with user_errors("animate"):
        run(cfg)


if __name__ == "__main__":
    main()
