"""Training entry: compose data, module and trainer from the config; export the transformer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from dynamictrl.data.shards import list_shards
from dynamictrl.errors import UserError
from dynamictrl.models import embedded


def model_path(cfg: DictConfig) -> str:
    """The base pipeline folder: the configured one, else the embedded tiny model (built on first use)."""
    if cfg.model.get("path"):
        path = Path(cfg.model.path)
        if not (path / "model_index.json").is_file():
            raise UserError(f"model.path={path}: not a diffusers pipeline folder (no model_index.json)")
        return str(path)
    return str(embedded.ensure())


def ensure_demo_data(cfg: DictConfig) -> None:
    """`experiment=demo`: make the synthetic dataset and its shards if they are missing."""
    if cfg.get("demo_data") is None or list_shards(cfg.data.train_shards):
        return
    from dynamictrl.demo import make_demo_data

    make_demo_data(cfg.demo_data)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train; returns paths of what was written (metrics.csv, checkpoints, exported transformer)."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    ensure_demo_data(cfg)
    base = model_path(cfg)
    module = instantiate(cfg.module, model_path=base)
    datamodule = instantiate(cfg.data)
    logger = CSVLogger(save_dir=str(out), name="", version="")
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                           every_n_train_steps=cfg.checkpoint_every)  # fmt: skip
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=[ckpt], default_root_dir=str(out))
    last = out / "checkpoints" / "last.ckpt"
    resume = str(last) if cfg.resume and last.is_file() else None
    if cfg.resume and resume is None:
        raise UserError(f"resume=true but {last} does not exist")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    trainer.save_checkpoint(last)
    export = out / "transformer"
    module.transformer.save_pretrained(export, safe_serialization=True)
    (out / "model.json").write_text(json.dumps({"base": str(Path(base).resolve()), "transformer": "transformer"}, indent=1))
    skipped = datamodule.dataset.skipped if datamodule.dataset is not None else 0
    print(f"train: {trainer.global_step} steps -> {out}/metrics.csv, {last}, {export} "
          f"({skipped} corrupt samples skipped)")  # fmt: skip
    return {"output": str(out), "metrics_csv": str(out / "metrics.csv"), "last_ckpt": str(last),
            "transformer": str(export), "steps": trainer.global_step, "skipped_samples": skipped}  # fmt: skip
