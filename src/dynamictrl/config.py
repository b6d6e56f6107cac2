"""Composing the project's Hydra configs from library code (the demo composes the train config)."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig


def conf_dir() -> Path:
    """$DYNAMICTRL_CONF, else the repository's conf/ (the package is installed editable)."""
    return Path(os.environ.get("DYNAMICTRL_CONF", Path(__file__).resolve().parents[2] / "conf"))


def load(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/<name>.yaml`, or `conf/<name>/<name>.yaml` for the apps whose config has a
    folder of its own (animate, eval), with Hydra overrides, as the command line would.

    Inside a running Hydra app (whose search path is conf/) the app's Hydra instance is used.
    """
    from hydra.core.global_hydra import GlobalHydra

    own_folder = (conf_dir() / name / f"{name}.yaml").is_file()
    if GlobalHydra.instance().is_initialized() and not own_folder:
        return compose(config_name=name, overrides=overrides or [])
    if GlobalHydra.instance().is_initialized():
        raise RuntimeError(f"config {name} has its own folder; compose it outside a running Hydra app")
    folder = conf_dir() / name if own_folder else conf_dir()
    with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])
