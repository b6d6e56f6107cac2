"""Training entry: compose data, module, loggers and trainer from the config; export the transformer."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dynamictrl.data.demo_data import make_demo_data
from dynamictrl.data.shards import clip_settings, list_shards
from dynamictrl.errors import UserError
from dynamictrl.models import embedded
from dynamictrl.train import build
from dynamictrl.train.callbacks import RNGState, SampleVideo, StepCheckpoints, Throughput
from dynamictrl.train.datamodule import precomputed_dir
from dynamictrl.train.export import SHARD_BYTES, Named, gathered, write_weights, zero3_gathered
from dynamictrl.train.plan import check_fits
from dynamictrl.utils.device import global_rank


def model_path(cfg: DictConfig) -> str:
    """The base pipeline folder: the configured one, else the embedded tiny model (built on first use)."""
    if OmegaConf.is_missing(cfg.model, "path"):  # a real model named without its folder: never the tiny one
        raise UserError(f"model.path is not set: model={cfg.model.get('name', '?')} needs its local diffusers "
                        "folder (e.g. model.path=/models/CogVideoX1.5-5B-I2V)")  # fmt: skip
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
    make_demo_data(cfg.demo_data)


def resume_path(cfg: DictConfig, last: Path) -> str | None:
    """resume=true: last.ckpt must exist; resume=auto: use it when it exists (SLURM requeue). It is a link
    to the newest complete checkpoint (`callbacks.StepCheckpoints`); the checkpoint it points at is returned."""
    mode = str(cfg.resume).lower()
    if mode in ("false", "none", "0"):
        return None
    if last.is_symlink() and not last.exists():
        raise UserError(f"resume={mode}: {last} points at {os.readlink(last)}, which is missing; point it at a complete "
                        f"checkpoint (ln -sfn step-NNNNNN.ckpt {last}) or remove it to start over")  # fmt: skip
    if last.exists():
        return str(last.resolve())
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
    if global_rank() == 0:
        if not path.is_file():
            import wandb

            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(wandb.util.generate_id())
            os.replace(tmp, path)
    else:  # the others take rank 0's id (they log nothing, but every rank names the same run)
        wait_for(path, "the wandb run id")
    return {"id": path.read_text().strip(), "resume": "allow"}


def wait_for(path: Path, what: str, timeout: float = 300.0) -> None:
    """Wait for a file global rank 0 writes before any process group exists (no barrier yet)."""
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise UserError(f"{path}: {what} from rank 0 did not appear in {timeout:.0f} s "
                            "(is the output folder on a file system every node sees?)")  # fmt: skip
        time.sleep(0.2)


def release_process_group() -> None:
    """Wait for every rank, then tear the process group down. Left to the interpreter's exit, a gloo
    group can abort a rank after a finished run ("terminate called without an active exception",
    SIGABRT), and the launcher then fails the job although its work is done (seen once in make
    rehearse's fsdp resume)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finish_wandb(loggers: list) -> None:
    """Close the wandb run of this training. Lightning leaves it open, and the next training in the same
    process (make ablation, the demo, tests) would then log into it instead of a run of its own."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge_metrics(csv_path: Path, previous: Path) -> None:
    """After a resume: the earlier run's rows (before the resumed run's first step), then the new ones.
    (Lightning's CSV logger starts a fresh file; the earlier one was moved to `previous`.)"""
    if not previous.is_file():
        return
    new = _read_csv(csv_path) if csv_path.is_file() else []
    first = min((int(r["step"]) for r in new), default=None)
    old = [r for r in _read_csv(previous) if first is None or int(r["step"]) < first]
    fields = list(dict.fromkeys(k for r in old + new for k in r))
    tmp = csv_path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(old + new)
    os.replace(tmp, csv_path)
    previous.unlink()


def _is_deepspeed(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(trainer.strategy, DeepSpeedStrategy)


def deepspeed_fp32(checkpoint: Path, keep: bool, names: set[str] | None = None) -> Named:
    """The transformer's fp32 master weights from a DeepSpeed checkpoint folder (ZeRO-2 or 3), read one
    tensor at a time by DeepSpeed's own converter in lazy mode, on rank 0 only (no collective). The
    engine's module holds bf16 copies: exporting those would round away what the fp32 optimizer keeps."""
    if not keep:
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), lazy_mode=True)
    for key, value in lazy.items():
        name = key.removeprefix("_forward_module.")  # Lightning's wrapper
        if name.startswith("transformer."):
            name = name.removeprefix("transformer.")
            if names is None or name in names:
                yield name, value.contiguous()  # materialised here, dropped once written


def transformer_tensors(trainer: L.Trainer, module: Any, names: set[str] | None = None, ema: bool = False,
                        checkpoint: Path | None = None) -> Named:  # fmt: skip
    """The transformer's state entries (those in `names`; with `ema` the EMA's averages in place of the
    trained weights) one at a time, each whole on rank 0's CPU and None on the other ranks: gathered from
    FSDP2 shards or DeepSpeed ZeRO-3 partitions as they come (collectives: every rank iterates). Under
    DeepSpeed, given the final `checkpoint`, the fp32 master weights from it (`deepspeed_fp32`)."""
    keep = trainer.is_global_zero
    if checkpoint is not None and not ema and _is_deepspeed(trainer):
        return deepspeed_fp32(checkpoint, keep, names)
    if getattr(trainer.strategy, "zero_stage_3", False):  # (no EMA under ZeRO-3)
        return zero3_gathered(module.transformer, keep, names)
    averaged = dict(module.ema.named_tensors()) if ema else {}
    state = module.transformer.state_dict()  # FSDP2: DTensor shards, nothing gathered yet
    return gathered(((k, averaged.get(k, v)) for k, v in state.items() if names is None or k in names), keep)


def export(trainer: L.Trainer, module: Any, folder: Path, ema: bool = False, shard_bytes: int = SHARD_BYTES,
           checkpoint: Path | None = None) -> None:  # fmt: skip
    """The transformer in diffusers layout (config.json + safetensors files of at most `shard_bytes`),
    loadable by from_pretrained; with `ema` its EMA weights. Rank 0 writes each file as its tensors
    arrive and holds no more than one; a collective: every rank calls it. Under LoRA the adapters and the
    pose branch only (`models/lora.py`: the base stays where it is, and is not gathered)."""
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

    lora = getattr(module, "lora", None)
    tensors = transformer_tensors(trainer, module, {n for n, _ in module.trainable()} if lora else None, ema,
                                  checkpoint)  # fmt: skip
    if not trainer.is_global_zero:
        for _ in tensors:  # the gathers are collectives
            pass
        return
    if lora:
        from dynamictrl.models.lora import save_lora

        save_lora(folder, module.transformer, dict(tensors))
        return
    write_weights(folder, tensors, shard_bytes)
    with torch.device("meta"):  # the config as save_pretrained writes it (the class name: not FSDP's wrapper)
        DynamiCtrlTransformer3DModel.from_config(module.transformer.config).save_config(folder)


def export_settings(module: Any, datamodule: Any, base: str) -> dict[str, Any]:
    """What animate needs to run the export as it was trained (`OUTPUT/dynamictrl.json`)."""
    data = clip_settings(list_shards(datamodule.train_shards))
    return {"num_frames": int(datamodule.num_frames), "buckets": data["buckets"], "fps": data["fps"],
            "reference_scaling": module.codec.reference_scaling, "base": str(Path(base).resolve()),
            "control": module.transformer.config.control}  # fmt: skip


def run(cfg: DictConfig, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Train; returns paths of what was written (metrics.csv, checkpoints, exported transformer) and
    the wandb run id this rank named. `extra_callbacks` join the run's own (make rehearse kills a run)."""
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
    if resume and metrics.is_file() and not previous.is_file() and global_rank() == 0:
        os.replace(metrics, previous)
    logger_args = [(c, wandb_resume(c, out)) for c in (cfg.get("logger") or {}).values() if c]
    loggers = [instantiate(c, **kw) for c, kw in logger_args]
    wandb_id = next((kw["id"] for _, kw in logger_args if "id" in kw), None)
    ckpt = StepCheckpoints(last.parent, every_n_steps=cfg.checkpoint_every, keep=cfg.keep_checkpoints)
    callbacks = [ckpt, Throughput(), RNGState(), *(extra_callbacks or [])]
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
        release_process_group()
        return {"output": str(out), "metrics_csv": str(metrics), "steps": trainer.global_step, "wandb_id": wandb_id}
    ckpt.save(trainer)  # step-N.ckpt (unless this step's is there) and last.ckpt pointing at it
    saved = last.resolve()
    if module.ema is not None:  # the EMA weights are the export; the trained ones sit beside them
        export(trainer, module, out / f"{kind}_raw", checkpoint=saved)
    export(trainer, module, folder, ema=module.ema is not None, checkpoint=saved)
    if trainer.is_global_zero:
        merge_metrics(metrics, previous)
        info = {"base": str(Path(base).resolve()), kind: kind, "ema": module.ema is not None}
        (out / "model.json").write_text(json.dumps(info, indent=1))
        (out / "dynamictrl.json").write_text(json.dumps(export_settings(module, datamodule, base), indent=1))
        print(f"train: {trainer.global_step} steps -> {out}/metrics.csv, {last}, {folder} "
              f"({datamodule.skipped} corrupt samples skipped)")  # fmt: skip
    release_process_group()
    return {"output": str(out), "metrics_csv": str(metrics), "last_ckpt": str(last), "wandb_id": wandb_id,
            kind: str(folder), "steps": trainer.global_step, "skipped_samples": datamodule.skipped,
            "samples": [str(p) for c in callbacks if isinstance(c, SampleVideo) for p in c.written]}  # fmt: skip
