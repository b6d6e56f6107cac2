"""Training callbacks: checkpoints, throughput and memory, data-skip counts, RNG state, sample videos."""

from __future__ import annotations

import contextlib
import copy
import os
import random
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from dynamictrl.models import latents as Z


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, else the process's peak resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class StepCheckpoints(ModelCheckpoint):
    """DIR/step-NNNNNN.ckpt every `every_n_steps` optimizer steps (a file, or a folder of shards under
    FSDP2 and DeepSpeed), the newest `keep` of them kept (-1: all; 0 or 1: the newest only), and
    DIR/last.ckpt a symlink to the newest complete one, what resume reads.

    The link moves only once its checkpoint is written on every rank, and atomically: a new link renamed
    over the old one (Lightning's save_last="link" removes the old link first). A job killed at any
    moment (a 5B checkpoint takes minutes to write) leaves last.ckpt at a complete checkpoint, and pruning
    never removes the one it points at; while a checkpoint is written the previous one stays, so the
    disk holds at most `keep` + 1. Only global rank 0 touches the folder's links and deletions.
    """

    LAST = "last.ckpt"

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep: int = 2):
        super().__init__(dirpath=dirpath, filename="step-{step:06d}", auto_insert_metric_name=False, save_top_k=-1,
                         every_n_train_steps=every_n_steps, save_on_train_epoch_end=False,
                         enable_version_counter=False)  # fmt: skip
        self.keep = keep

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_start(trainer, module)
        if trainer.ckpt_path:  # resumed: this step's checkpoint is on disk (no second save of it)
            self._last_global_step_saved = trainer.global_step

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        self.save(trainer)  # Lightning's periodic save

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        pass  # last.ckpt is the link `save` moves

    def save(self, trainer: L.Trainer) -> Path:
        """Save the current step's checkpoint (unless last.ckpt points at it and it holds this state:
        saved or resumed from in this process), point last.ckpt at it and prune; a collective: every rank
        calls it. Returns last.ckpt's path."""
        folder, strategy, zero = Path(self.dirpath), trainer.strategy, trainer.is_global_zero
        last, path = folder / self.LAST, folder / f"step-{trainer.global_step:06d}.ckpt"
        current = strategy.broadcast(linked(last) if zero and last.exists() else None)
        if current != path.name or self._last_global_step_saved != trainer.global_step:
            if strategy.broadcast(os.path.lexists(path) if zero else False):  # a killed save's, or an earlier run's
                if zero:
                    if current == path.name:  # an earlier run's (resume=false): no link to it while it is rewritten
                        last.unlink()
                    remove(path)
                strategy.barrier()
            self._save_checkpoint(trainer, str(path))  # returns once every rank has written its part
            if zero:
                relink(last, path)
        if zero:
            prune(folder, self.keep, path)
        strategy.barrier()
        return last


def linked(link: Path) -> str | None:
    """The name a checkpoint link points at (None: not a link)."""
    return os.readlink(link) if link.is_symlink() else None


def relink(link: Path, target: Path) -> None:
    """Point `link` at `target` (beside it) atomically: a new link made under a temporary name, renamed over it."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    if link.is_dir() and not link.is_symlink():  # a last.ckpt folder from before links: rename cannot replace it
        shutil.rmtree(link)
    os.replace(tmp, link)


def prune(folder: Path, keep: int, newest: Path) -> None:
    """Remove the step-N.ckpt checkpoints older than the newest `keep` up to `newest` (newer ones are what a
    killed run left past the resumed step: they are overwritten when the run gets there)."""
    if keep < 0:
        return
    steps = {p: s for p in folder.iterdir() if (s := _step(p.name)) is not None and s < _step(newest.name)}
    for p in sorted(steps, key=steps.get, reverse=True)[max(keep, 1) - 1 :]:  # newest first
        remove(p)


def remove(path: Path) -> None:
    """Delete a checkpoint file or folder."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _step(name: str) -> int | None:
    m = re.fullmatch(r"step-(\d+)\.ckpt", name)
    return int(m.group(1)) if m else None


class Throughput(L.Callback):
    """Logs perf/step_s (wall time between step ends, data loading included), perf/samples_per_s and
    perf/tokens_per_s (all ranks), perf/peak_mem_gb (this rank), and data/skipped (all ranks)."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        now = time.perf_counter()
        if self._last is not None:
            dt = now - self._last
            world = trainer.world_size
            module.log("perf/step_s", dt, on_step=True)
            module.log("perf/samples_per_s", len(batch["caption"]) * world / dt, on_step=True)
            module.log("perf/tokens_per_s", getattr(module, "last_tokens", 0) * world / dt, on_step=True)
        self._last = now
        module.log("perf/peak_mem_gb", peak_memory_gb(module.device), on_step=True)
        skipped = getattr(trainer.datamodule, "skipped", None)
        if skipped is not None:
            module.log("data/skipped", float(skipped), on_step=True, reduce_fx="sum", sync_dist=trainer.world_size > 1)


class RNGState(L.Callback):
    """Saves and restores the global torch / numpy / python RNG states (the loss itself draws from a
    per-step generator; this keeps anything else that uses global randomness on the same path)."""

    def state_dict(self) -> dict[str, Any]:  # plain types and tensors only: loads with weights_only=True
        name, keys, pos, has_gauss, cached = np.random.get_state()
        return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                          int(has_gauss), float(cached)],
                "python": list(random.getstate()[1]),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate((3, tuple(state["python"]), None))
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class SampleVideo(L.Callback):
    """Every `every_n_steps` steps each rank animates the first clip of its own batch with the current
    weights, short and small (`num_frames`, `scale` of the clip's size, `num_inference_steps`), and
    writes DIR/step-NNNNNN.mp4 (rank 0; sent to wandb) or step-NNNNNN-rankR.mp4 (reference | pose |
    generated).

    Every rank samples, in lockstep: under FSDP2 and ZeRO-3 the forward passes need every rank's
    shards, and under DDP no rank idles in the next gradient all-reduce while rank 0 samples alone, so
    nobody waits past the collective timeout. Sampling uses its own generator and a copy of the
    scheduler, so training draws and results are unchanged.
    """

    def __init__(self, folder: str, every_n_steps: int = 500, num_inference_steps: int = 10, num_frames: int = 9,
                 scale: float = 0.5, guidance_scale: float = 3.0, fps: float = 8.0, seed: int = 0):  # fmt: skip
        self.folder, self.every = Path(folder), every_n_steps
        self.steps, self.num_frames, self.scale = num_inference_steps, num_frames, scale
        self.guidance_scale, self.fps, self.seed = guidance_scale, fps, seed
        self.written: list[Path] = []
        self._step_before = -1

    def _inputs(self, module: Any, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The reference (H, W, 3), the first `num_frames` poses (T, H, W, 3) and the mask (H, W), at `scale`."""
        pipe = module.pipe
        if "video" in batch:
            ref = Z.tensor_to_frames(batch["video"][0, :, :1])[0]
            pose = Z.tensor_to_frames(batch["pose"][0, :, : self.num_frames])
            mask = batch["mask"][0, 0].cpu().numpy()
        else:  # precomputed: the pose video back from its first latents only
            ref = Z.tensor_to_frames(batch["ref"][0][:, None])[0]
            n_lat = module.codec.latent_frames(self.num_frames)
            pose = Z.tensor_to_frames(module.codec.decode(batch["pose_latents"][:1, :n_lat])[0])
            mask = batch["ref_mask"][0].cpu().numpy()
        pose = pose[: self.num_frames]
        grid = pipe.vae_scale_factor_spatial * module.transformer.config.patch_size
        h, w = (max(grid, int(round(x * self.scale / grid)) * grid) for x in ref.shape[:2])
        if (h, w) != ref.shape[:2]:
            import cv2

            ref = cv2.resize(ref, (w, h), interpolation=cv2.INTER_AREA)
            pose = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in pose])
            mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        return ref, pose, mask

    @torch.no_grad()
    def sample(self, module: Any, batch: dict[str, Any], step: int, rank: int = 0,
               context: Any = None) -> Path:  # fmt: skip
        pipe = module.pipe
        pipe.set_progress_bar_config(disable=True)
        ref, pose, mask = self._inputs(module, batch)
        text: dict[str, Any] = {"prompt": batch["caption"][0]}
        if "text_embeds" in batch:  # precomputed shards: no T5 is loaded
            embeds = batch["text_embeds"][:1]
            text = {"prompt_embeds": embeds, "negative_prompt_embeds": module._empty_text.to(embeds)[None]}
        scheduler, pipe.scheduler = pipe.scheduler, copy.deepcopy(pipe.scheduler)
        was_training = module.transformer.training
        module.transformer.eval()
        try:
            # the training precision's forward context: bf16-mixed autocasts, as a LoRA's bf16 base needs
            with context if context is not None else contextlib.nullcontext():
                frames = pipe(ref, pose, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                              ofs=module.hparams.ofs, reference_mask=mask if module.hparams.mask_reference else None,
                              reference_scaling=module.codec.reference_scaling,
                              generator=torch.Generator().manual_seed(self.seed + step), **text).frames[0]  # fmt: skip
        finally:
            pipe.scheduler = scheduler
            module.transformer.train(was_training)
        from dynamictrl.animate.run import side_by_side
        from dynamictrl.utils.video import write_video

        name = f"step-{step:06d}.mp4" if rank == 0 else f"step-{step:06d}-rank{rank}.mp4"
        path = write_video(self.folder / name, side_by_side(ref, pose, frames), self.fps)
        self.written.append(path)
        return path

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step
        # once per optimizer step: with accumulate_grad_batches > 1 most batches end without one
        if not self.every or step % self.every or step == self._step_before:
            return
        path = self.sample(module, batch, step, trainer.global_rank, trainer.precision_plugin.forward_context())
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_video("samples", [str(path)], step=step, caption=[batch["caption"][0]], format=["mp4"])
