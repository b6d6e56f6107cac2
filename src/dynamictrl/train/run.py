"""Training entry: compose data, module, loggers and trainer from the config; export the transformer."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from dynamictrl.data.shards import clip_settings, list_shards
from dynamictrl.errors import UserError
from dynamictrl.models import embedded
from dynamictrl.train import build
from dynamictrl.train.callbacks import RNGState, SampleVideo, Throughput
from dynamictrl.train.datamodule import precomputed_dir
from dynamictrl.train.plan import check_fits


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


def resume_path(cfg: DictConfig, last: Path) -> str | None:
    """resume=true: last.ckpt must exist; resume=auto: use it when it exists (SLURM requeue)."""
    mode = str(cfg.resume).lower()
    if mode in ("false", "none", "0"):
        return None
    if last.exists():
        return str(last)
    if mode == "auto":
        return None
    raise UserError(f"resume=true but {last} does not exist")


def wandb_resume(logger: DictConfig, out: Path) -> dict[str, Any]:
    """For a wandb logger: the run id kept in OUTPUT/wandb-run-id.txt (made on the first start), with
    resume="allow", so that a resumed or requeued run continues the same wandb run instead of starting
    a new one. Nothing for other loggers or when the config names an id itself."""
    if not str(logger.get("_target_", "")).endswith("WandbLogger") or logger.get("id"):
        return {}
    path = out / "wandb-run-id.txt"
    if not path.is_file() and int(os.environ.get("RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        import wandb

        tmp = path.with_suffix(".tmp")
        tmp.write_text(wandb.util.generate_id())
        os.replace(tmp, path)
    # Other ranks log nothing to wandb (Lightning's rank-zero experiment); they may not see the file yet.
    return {"id": path.read_text().strip(), "resume": "allow"} if path.is_file() else {}


def finish_wandb(loggers: list) -> None:
    """Close the wandb run of this training. Lightning leaves it open, and the next training in the same
    process (make ablation, the demo, tests) would then log into it instead of a run of its own."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def merge_metrics(csv_path: Path, previous: Path) -> None:
    """After a resume: the earlier run's rows (before the resumed run's first step), then the new ones.
    (Lightning's CSV logger starts a fresh file; the earlier one was moved to `previous`.)"""
    if not previous.is_file():
        return
    new = list(csv.DictReader(open(csv_path))) if csv_path.is_file() else []
    first = min((int(r["step"]) for r in new), default=None)
    old = [r for r in csv.DictReader(open(previous)) if first is None or int(r["step"]) < first]
    fields = list(dict.fromkeys(k for r in old + new for k in r))
    tmp = csv_path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(old + new)
    os.replace(tmp, csv_path)
    previous.unlink()


def full_transformer_state(trainer: L.Trainer, module: Any) -> dict[str, torch.Tensor] | None:
    """The transformer's full state dict on rank 0 (None elsewhere): gathered from FSDP2 shards or
    DeepSpeed ZeRO-3 partitions (a collective: every rank calls it)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if isinstance(trainer.strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(module.transformer, options=opts)
        return state if trainer.is_global_zero else None
    if getattr(trainer.strategy, "zero_stage_3", False):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.transformer.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.transformer.state_dict().items()}
        return state if trainer.is_global_zero else None
    return module.transformer.state_dict()


def export(trainer: L.Trainer, module: Any, folder: Path, state: dict[str, torch.Tensor]) -> None:
    """The transformer in diffusers layout (config.json + safetensors), loadable by from_pretrained;
    under LoRA the adapters and the pose branch only (`models/lora.py`: the base stays where it is)."""
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

    if getattr(module, "lora", None):
        from dynamictrl.models.lora import save_lora

        save_lora(folder, module.transformer, state)
        return

    with torch.device("meta"):
        model = DynamiCtrlTransformer3DModel.from_config(module.transformer.config)
    model.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, assign=True)
    model.save_pretrained(folder, safe_serialization=True)


def export_settings(module: Any, datamodule: Any, base: str) -> dict[str, Any]:
    """What animate needs to run the export as it was trained (`OUTPUT/dynamictrl.json`)."""
    data = clip_settings(list_shards(datamodule.train_shards))
    return {"num_frames": int(datamodule.num_frames), "buckets": data["buckets"], "fps": data["fps"],
            "reference_scaling": module.codec.reference_scaling, "base": str(Path(base).resolve()),
            "control": module.transformer.config.control}  # fmt: skip


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train; returns paths of what was written (metrics.csv, checkpoints, exported transformer)."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    ensure_demo_data(cfg)
    base = model_path(cfg)  # a wrong model.path is the first thing to report
    check_fits(cfg)
    datamodule = instantiate(cfg.data)
    try:  # the clip length must suit the model version's frame policy (models/latents.py), before any loading
        build.frame_policy(base).check_frames(int(datamodule.num_frames), "data.num_frames")
    except ValueError as err:
        raise UserError(str(err)) from None
    module = instantiate(cfg.module, model_path=base, precomputed_dir=precomputed_dir(cfg.data.train_shards))
    last = out / "checkpoints" / "last.ckpt"
    resume = resume_path(cfg, last)
    metrics, previous = out / "metrics.csv", out / "metrics-before-resume.csv"
    if resume and metrics.is_file() and not previous.is_file() and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        os.replace(metrics, previous)
    loggers = [instantiate(c, **wandb_resume(c, out)) for c in (cfg.get("logger") or {}).values() if c]
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="step-{step:06d}", auto_insert_metric_name=False,
                           save_last=bool(cfg.get("final_save", True)), save_top_k=cfg.keep_checkpoints, every_n_train_steps=cfg.checkpoint_every,
                           save_on_train_epoch_end=False)  # fmt: skip
    callbacks = [ckpt, Throughput(), RNGState()]
    if cfg.samples.every_n_steps:
        callbacks.append(SampleVideo(str(out / "samples"), seed=cfg.seed, **cfg.samples))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(out))
    if trainer.is_global_zero:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # weights_only: resuming unpickles nothing but tensors and plain containers (a checkpoint is data)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    finally:
        finish_wandb(loggers)
    kind = "lora" if getattr(module, "lora", None) else "transformer"  # what the export holds
    folder = out / kind
    if not cfg.get("final_save", True):  # the GPU check: a 5B checkpoint would not fit its disk
        if trainer.is_global_zero:
            merge_metrics(metrics, previous)
        return {"output": str(out), "metrics_csv": str(metrics), "steps": trainer.global_step}
    trainer.save_checkpoint(last)
    state = full_transformer_state(trainer, module)
    ema = module.ema.full_state() if module.ema is not None else None
    if trainer.is_global_zero:
        merge_metrics(metrics, previous)
        if ema is not None:  # the EMA weights are the export; the trained ones sit beside them
            export(trainer, module, out / f"{kind}_raw", state)
            state = {k: ema.get(k, v) for k, v in state.items()}
        export(trainer, module, folder, state)
        info = {"base": str(Path(base).resolve()), kind: kind, "ema": module.ema is not None}
        (out / "model.json").write_text(json.dumps(info, indent=1))
        (out / "dynamictrl.json").write_text(json.dumps(export_settings(module, datamodule, base), indent=1))
        print(f"train: {trainer.global_step} steps -> {out}/metrics.csv, {last}, {folder} "
              f"({datamodule.skipped} corrupt samples skipped)")  # fmt: skip
    return {"output": str(out), "metrics_csv": str(metrics), "last_ckpt": str(last),
            kind: str(folder), "steps": trainer.global_step, "skipped_samples": datamodule.skipped,
            "samples": [str(p) for c in callbacks if isinstance(c, SampleVideo) for p in c.written]}  # fmt: skip
