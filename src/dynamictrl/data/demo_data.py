"""The demo's synthetic dataset: raw videos and their shards, shared by `make demo`, `make ablation`
and `make train ARGS=experiment=demo` (kept apart from `dynamictrl.demo`, which imports training)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dynamictrl import config
from dynamictrl.data.shards import list_shards
from dynamictrl.data.synthetic import generate


def make_demo_data(cfg: DictConfig | dict) -> Path:
    """Synthetic videos under ROOT/raw and their shards under ROOT/shards (skipped when present);
    `preprocess_overrides` (optional) go to the preprocess config (e.g. `num_frames=17`)."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    root = Path(cfg.root)
    generate(root / "raw", num_train=cfg.num_train, num_test=cfg.num_test, num_frames=27, seed=cfg.seed)
    shards = root / "shards"
    if not list_shards(str(shards / "train-*.tar")):
        from dynamictrl.preprocess.run import run as preprocess

        overrides = list(cfg.get("preprocess_overrides") or [])
        preprocess(config.load("preprocess", [f"input={root / 'raw'}", f"output={shards}", *overrides]))
    return shards
