"""The demo's synthetic dataset: raw videos and their shards, shared by `make demo`, `make ablation`
and `make train ARGS=experiment=demo` (kept apart from `dynamictrl.demo`, which imports training)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dynamictrl import config
from dynamictrl.data.shards import list_shards
from dynamictrl.data.synthetic import generate


def make_demo_data(cfg: DictConfig | dict) -> Path:
    """Synthetic videos under ROOT/raw and their shards under ROOT/shards (skipped when present and made
    by the same recipe, which ROOT/demo_data.json records; made again from nothing when the recipe
    differs); `preprocess_overrides` (optional) go to the preprocess config (e.g. `num_frames=17`)."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    root = Path(cfg.root)
    recipe = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "root"}
    record = root / "demo_data.json"
    made = any((root / part).exists() for part in ("raw", "shards"))
    if made and (not record.is_file() or json.loads(record.read_text()) != recipe):
        # Another recipe's data (or one from before the record): a test video of one recipe can be a
        # training video of another (same seed, same index), so nothing of it is kept.
        print(f"{root}: made with another recipe than {recipe}; making it again")
        for part in ("raw", "shards"):
            shutil.rmtree(root / part, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    if not record.is_file() or json.loads(record.read_text()) != recipe:
        # Atomically, and only when it changes: runs sharing the data (the ablation beside a demo) read it.
        tmp = record.with_name(f".{record.name}.{os.getpid()}")
        tmp.write_text(json.dumps(recipe, indent=1))
        os.replace(tmp, record)
    generate(root / "raw", num_train=cfg.num_train, num_test=cfg.num_test, num_frames=27, seed=cfg.seed)
    shards = root / "shards"
    if not list_shards(str(shards / "train-*.tar")):
        from dynamictrl.preprocess.run import run as preprocess

        overrides = list(cfg.get("preprocess_overrides") or [])
        preprocess(config.load("preprocess", [f"input={root / 'raw'}", f"output={shards}", *overrides]))
    return shards
