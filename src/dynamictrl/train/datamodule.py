"""Webdataset DataModule over raw or precomputed shards, with resolution buckets and an exact resume.

The stream of one split (a rank x a dataloader worker) is a function of (seed, epoch, split):

    shards (shuffled per epoch) -> raw samples (bytes) -> shuffle buffer -> bucket by (H, W) from the
    sample's json -> raw batches of `batch_size` -> decode

Shuffling and bucketing work on the raw bytes, so resuming at raw batch j of an epoch replays the
epoch's tar reads and json parses but decodes nothing before j. Each yielded batch carries its
position (split, epoch, j) and the number of samples skipped since the previous batch; the
DataModule records both for the batches the trainer actually consumes (`on_before_batch_transfer`)
and saves them in the checkpoint (`state_dict`). A corrupt sample is dropped from its batch and
counted; a batch left empty is not yielded; a broken tar stream counts once and the next shard
follows. None of it stops the run.

With W workers the DataLoader takes batches from its workers in turn, so global batch i came from
worker i % W. A resumed loader starts again at worker 0; worker w then plays logical worker
(w + consumed) % W, which keeps the global order of an uninterrupted run.

A sample is precomputed (see `dynamictrl.train.precompute`) when it has a `latents.npy` member.

`cache_mb` keeps decoded raw clips (uint8 frames, pose and mask, as cut to `num_frames`) in memory up
to that budget, so a small dataset trained for many epochs (the demo's: 360 clips, ~120 MB) decodes
each clip once; the batches are the same as without it. Each dataloader worker has its own cache.
"""

from __future__ import annotations

import io
import json
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from dynamictrl.data.shards import decode_sample, list_shards
from dynamictrl.errors import UserError


class PrecomputeMismatch(UserError):
    """Precomputed shards made for other settings: a configuration error, not a corrupt sample."""


PRECOMPUTED = ("latents.npy", "pose_latents.npy", "text.npy", "ref.npy", "ref_mask.npy", "txt", "json")


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _pixels(x: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (3, ..., H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float() / 127.5 - 1.0
    return t.movedim(-1, 0)


class ClipDataset(IterableDataset):
    """Yields batches (dicts) of clips that share a size.

    Raw: video/pose (B, 3, T, H, W) in [-1, 1], mask (B, T, H, W) bool. Precomputed: latents and
    pose_latents (B, F, C, h, w), text_embeds (B, L, D), ref (B, 3, H, W) in [-1, 1], ref_mask
    (B, H, W). Both: caption, key (lists), and `_pos`, `_skipped` for the DataModule.
    """

    def __init__(self, urls: list[str], num_frames: int, batch_size: int = 1, shuffle_buffer: int = 64,
                 seed: int = 0, loop: bool = True, cache_mb: float = 0):  # fmt: skip
        self.urls, self.num_frames, self.batch_size = list(urls), num_frames, batch_size
        self.shuffle_buffer, self.seed, self.loop = shuffle_buffer, seed, loop
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: dict[tuple[Any, Any], dict[str, Any]] = {}  # (shard, key) -> the clip cut, uint8
        self._cached_bytes = 0
        self.rank, self.world_size, self.num_workers = 0, 1, 1
        self.resume: dict[int, tuple[int, int]] = {}  # logical split -> (epoch, raw batches done)
        self.consumed = 0  # batches consumed before this loader started (sets the worker rotation)
        self._pending = 0

    # 1. Which part of the data this process reads.
    def _split(self) -> tuple[int, int]:
        worker = torch.utils.data.get_worker_info()
        w, n = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        logical = (w + self.consumed) % n
        return self.rank * n + logical, self.world_size * n

    def _count_bad_shard(self, exn: Exception) -> bool:
        self._pending += 1
        return True  # carry on with the next shard

    # 2. Raw batches: shuffled, bucketed, nothing decoded.
    def _raw_batches(self, epoch: int, split: int, n_splits: int) -> Iterator[list[dict]]:
        urls = list(self.urls)
        if self.loop:
            random.Random(f"{self.seed}-{epoch}").shuffle(urls)
        by_sample = len(urls) < n_splits  # too few shards to split by shard: split by sample
        mine = urls if by_sample else urls[split::n_splits]
        stream = wds.DataPipeline(wds.SimpleShardList(mine), wds.tarfile_to_samples(handler=self._count_bad_shard))
        rng = random.Random(f"{self.seed}-{epoch}-{split}")
        buckets: dict[tuple[int, int], list[dict]] = defaultdict(list)

        def add(raw: dict) -> Iterator[list[dict]]:
            try:
                size = tuple(json.loads(raw["json"])["size"])
            except Exception:  # noqa: BLE001 - no readable size: a corrupt sample
                self._pending += 1
                return
            buckets[size].append(raw)
            if len(buckets[size]) >= self.batch_size:
                yield buckets.pop(size)

        buffer: list[dict] = []
        for i, raw in enumerate(stream):
            if by_sample and i % n_splits != split:
                continue
            if not self.loop or self.shuffle_buffer <= 1:
                yield from add(raw)
                continue
            buffer.append(raw)
            if len(buffer) >= self.shuffle_buffer:
                yield from add(buffer.pop(rng.randrange(len(buffer))))
        rng.shuffle(buffer)
        for raw in buffer:
            yield from add(raw)
        for size in sorted(buckets):  # the epoch's partial batches
            yield buckets[size]

    # 3. Decoding.
    def decode(self, raw: dict) -> dict[str, Any]:
        """One raw sample -> tensors; raises on a corrupt sample (PrecomputeMismatch on wrong settings)."""
        if "latents.npy" in raw:
            return self._decode_precomputed(raw)
        s = self._cache.get((raw.get("__url__"), raw.get("__key__")))
        if s is None:
            s = self._decode_raw(raw)
        return {"key": s["key"], "video": _pixels(s["frames"]), "pose": _pixels(s["pose"]),
                "mask": torch.from_numpy(s["mask"]), "caption": s["caption"]}  # fmt: skip

    def _decode_raw(self, raw: dict) -> dict[str, Any]:
        s = decode_sample(raw)
        t = self.num_frames
        if len(s["frames"]) < t:
            raise ValueError(f"{s['key']}: {len(s['frames'])} frames, need {t}")
        cut = {"key": s["key"], "caption": s["caption"], "frames": np.ascontiguousarray(s["frames"][:t]),
               "pose": np.ascontiguousarray(s["pose"][:t]), "mask": np.ascontiguousarray(s["mask"][:t])}  # fmt: skip
        size = sum(cut[m].nbytes for m in ("frames", "pose", "mask"))
        ident = (raw.get("__url__"), raw.get("__key__"))
        if None not in ident and self._cached_bytes + size <= self.cache_bytes:
            self._cache[ident] = cut
            self._cached_bytes += size
        return cut

    def _decode_precomputed(self, raw: dict) -> dict[str, Any]:
        missing = [m for m in PRECOMPUTED if m not in raw]
        if missing:
            raise ValueError(f"sample {raw.get('__key__')}: missing members {missing}")
        meta = json.loads(raw["json"])
        made_for = meta.get("precompute", {}).get("num_frames")
        if made_for != self.num_frames:
            raise PrecomputeMismatch(f"{raw.get('__url__')}: precomputed for {made_for} frames, training uses "
                            f"{self.num_frames}; run make precompute again with num_frames={self.num_frames}")  # fmt: skip
        as_float = lambda m: torch.from_numpy(_npy(raw[m])).float()  # noqa: E731
        return {"key": raw["__key__"], "latents": as_float("latents.npy"), "pose_latents": as_float("pose_latents.npy"),
                "text_embeds": as_float("text.npy"), "ref": _pixels(_npy(raw["ref.npy"])),
                "ref_mask": torch.from_numpy(_npy(raw["ref_mask.npy"]).astype(bool)),
                "caption": raw["txt"].decode("utf-8")}  # fmt: skip

    def _decoded(self, raws: list[dict]) -> list[dict[str, Any]]:
        out = []
        for raw in raws:
            try:
                out.append(self.decode(raw))
            except PrecomputeMismatch:
                raise
            except Exception:  # noqa: BLE001 - a corrupt sample is skipped and counted
                self._pending += 1
        shapes = [tuple((s["video"] if "video" in s else s["ref"]).shape) for s in out]
        if len(set(shapes)) > 1:  # a sample whose json lied about its size
            keep = max(set(shapes), key=shapes.count)
            self._pending += sum(sh != keep for sh in shapes)
            out = [s for s, sh in zip(out, shapes, strict=True) if sh == keep]
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        split, n_splits = self._split()
        epoch, done = self.resume.get(split, (0, 0))
        self._pending = 0
        while True:
            for j, raws in enumerate(self._raw_batches(epoch, split, n_splits)):
                if j < done:  # replay to the saved position; its skips were counted before
                    self._pending = 0
                    continue
                samples = self._decoded(raws)
                if samples:
                    batch = collate(samples)
                    batch["_pos"], batch["_skipped"] = (split, epoch, j + 1), self._pending
                    self._pending = 0
                    yield batch
            epoch, done = epoch + 1, 0
            if not self.loop:
                return


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: torch.stack([b[k] for b in batch]) for k in batch[0] if isinstance(batch[0][k], torch.Tensor)}
    out["caption"] = [b["caption"] for b in batch]
    out["key"] = [b["key"] for b in batch]
    return out


def precomputed_dir(train_shards: Any) -> str | None:
    """The folder of the first shard when the shards are precomputed (a `latents.npy` member), else None."""
    import tarfile

    urls = list_shards(train_shards)
    if not urls:
        return None
    try:
        with tarfile.open(urls[0]) as tar:
            for _, member in zip(range(len(PRECOMPUTED) + 2), tar, strict=False):
                if member.name.endswith(".latents.npy"):
                    return str(Path(urls[0]).parent)
    except (OSError, tarfile.TarError):
        return None  # the loader reports and skips broken shards
    return None


class ShardDataModule(L.LightningDataModule):
    """Args:
        train_shards: folder, glob or list of training shards, raw or precomputed.
        num_frames: frames per training clip (8k+1).
        batch_size: clips per batch (per rank); a batch holds clips of one size only.
        shuffle_buffer: raw samples held for shuffling (memory: compressed bytes, not decoded frames).
        seed: the data order is a function of (seed, epoch, position).
        cache_mb: decoded raw clips kept in memory, up to this many MB per dataloader worker (0: off);
            for small datasets trained for many epochs. The batches are the same either way.
    """

    def __init__(self, train_shards: Any, num_frames: int = 9, batch_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 64, seed: int = 0, cache_mb: float = 0):  # fmt: skip
        super().__init__()
        if not cache_mb >= 0:
            raise UserError(f"data.cache_mb={cache_mb}: must be 0 (off) or more")
        self.cache_mb = cache_mb
        self.train_shards, self.num_frames = train_shards, num_frames
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.dataset: ClipDataset | None = None
        self.positions: dict[int, tuple[int, int]] = {}  # global split -> (epoch, raw batches done)
        self.consumed = 0  # batches consumed by the trainer on this rank
        self.skipped = 0  # corrupt samples skipped on this rank (in consumed batches)

    def setup(self, stage: str | None = None) -> None:
        urls = list_shards(self.train_shards)
        if not urls:
            raise UserError(f"data.train_shards={self.train_shards}: no shards found")
        self.dataset = ClipDataset(urls, self.num_frames, self.batch_size, self.shuffle_buffer, self.seed,
                                   cache_mb=self.cache_mb)  # fmt: skip

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup()
        ds = self.dataset
        ds.rank, ds.world_size = self._world()
        ds.num_workers = max(self.num_workers, 1)
        ds.resume, ds.consumed = dict(self.positions), self.consumed
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)  # fmt: skip

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "_pos" in batch:
            split, epoch, done = (int(x) for x in batch.pop("_pos"))
            self.positions[split] = (epoch, done)
            self.skipped += int(batch.pop("_skipped"))
            self.consumed += 1
        return batch

    # Checkpointed state: every rank's positions (gathered), so any rank resumes where it stopped.
    def state_dict(self) -> dict[str, Any]:
        rank, world = self._world()
        workers = max(self.num_workers, 1)
        local = torch.zeros(workers, 2, dtype=torch.long)
        for split, (epoch, done) in self.positions.items():
            local[split - rank * workers] = torch.tensor([epoch, done])
        counts = torch.tensor([self.consumed, self.skipped], dtype=torch.long)
        if world > 1:
            strategy = self.trainer.strategy
            local = strategy.all_gather(local.to(strategy.root_device)).cpu().reshape(world, workers, 2)
            counts = strategy.all_gather(counts.to(strategy.root_device)).cpu().reshape(world, 2)
        else:
            local, counts = local[None], counts[None]
        return {"world_size": world, "num_workers": workers, "positions": local.tolist(), "counts": counts.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world = self._world()
        workers = max(self.num_workers, 1)
        if (state["world_size"], state["num_workers"]) != (world, workers):
            raise UserError(f"resume: the checkpoint's data position is for {state['world_size']} ranks x "
                            f"{state['num_workers']} workers; this run has {world} x {workers}. "
                            "Resume with the same trainer devices/num_nodes and data.num_workers.")  # fmt: skip
        self.positions = {rank * workers + w: (int(e), int(d)) for w, (e, d) in enumerate(state["positions"][rank])}
        self.consumed, self.skipped = (int(x) for x in state["counts"][rank])
