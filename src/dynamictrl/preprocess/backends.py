"""The configured models of a preprocessing run, shared by both engines: the local engine builds them
in its process, each Ray actor in its own (`dynamictrl.preprocess.ray_engine`). Neither engine
imports the other's module.
"""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from dynamictrl.errors import UserError


def build(node: DictConfig | None):
    """Instantiate a backend config (`conf/{pose,mask,caption}/*.yaml`); its `name` key is a label,
    not an argument. None when the config names no model (`_target_` absent)."""
    if node is None or "_target_" not in node:
        return None
    try:
        return instantiate({k: v for k, v in node.items() if k != "name"}, _convert_="all")
    except InstantiationException as err:  # Hydra wraps the backend's own one-line error
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


class Backends:
    """The configured models, each loaded once per worker on first need (a run over sidecar-annotated
    data never loads one)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self._made: dict[str, Any] = {}

    def _get(self, stage: str, factory):
        if stage not in self._made:
            self._made[stage] = factory()
        return self._made[stage]

    @property
    def pose(self):
        return self._get("pose", lambda: build(self.cfg.pose))

    @property
    def mask(self):
        """The configured mask model, or None: then the pose backend's own masks, else MediaPipe's
        selfie segmentation restricted to the person's box."""
        return self._get("mask", lambda: build(self.cfg.mask))

    @property
    def fallback_mask(self):
        from dynamictrl.pose.mediapipe_backend import MediaPipeSelfieMasks

        return self._get("fallback_mask", MediaPipeSelfieMasks)

    @property
    def caption(self):
        return self._get("caption", lambda: build(self.cfg.caption))

    def close(self) -> None:
        for backend in self._made.values():
            if hasattr(backend, "close"):
                backend.close()
        self._made.clear()


def caption_model_configured(cfg: DictConfig) -> bool:
    return "_target_" in cfg.caption
