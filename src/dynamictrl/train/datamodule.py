"""Webdataset DataModule over preprocessed shards.

Samples are decoded with `dynamictrl.data.shards.decode_sample` (no pickle). A corrupt sample is
skipped and counted, never fatal. Training iterates forever over shuffled shards (Lightning stops at
`max_steps`); the order is a function of the seed and the epoch.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from dynamictrl.data.shards import decode_sample, list_shards
from dynamictrl.errors import UserError


class ClipDataset(IterableDataset):
    """Yields dicts of tensors: video/pose (3, T, H, W) in [-1, 1], mask (T, H, W) bool, caption."""

    def __init__(self, urls: list[str], num_frames: int, shuffle_buffer: int = 64, seed: int = 0,
                 loop: bool = True):  # fmt: skip
        self.urls, self.num_frames, self.shuffle_buffer = urls, num_frames, shuffle_buffer
        self.seed, self.loop = seed, loop
        self.skipped = 0

    def _samples(self, epoch: int):
        rng = random.Random(self.seed * 7919 + epoch)
        urls = list(self.urls)
        if self.loop:
            rng.shuffle(urls)
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            urls = urls[worker.id :: worker.num_workers]
        stream = wds.WebDataset(urls, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False)
        buffer: list[dict] = []
        for raw in stream:
            try:
                sample = self._to_tensors(decode_sample(raw))
            except Exception:  # noqa: BLE001 - a corrupt sample is skipped and counted
                self.skipped += 1
                continue
            if not self.loop or self.shuffle_buffer <= 1:
                yield sample
                continue
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _to_tensors(self, s: dict[str, Any]) -> dict[str, Any]:
        t = self.num_frames
        if len(s["frames"]) < t:
            raise ValueError(f"{s['key']}: {len(s['frames'])} frames, need {t}")
        def video(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x[:t])).permute(3, 0, 1, 2).float() / 127.5 - 1.0
        return {"key": s["key"], "video": video(s["frames"]), "pose": video(s["pose"]),
                "mask": torch.from_numpy(s["mask"][:t]), "caption": s["caption"]}  # fmt: skip

    def __iter__(self):
        epoch = 0
        while True:
            yield from self._samples(epoch)
            epoch += 1
            if not self.loop:
                return


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: torch.stack([b[k] for b in batch]) for k in ("video", "pose", "mask")}
    out["caption"] = [b["caption"] for b in batch]
    out["key"] = [b["key"] for b in batch]
    return out


class ShardDataModule(L.LightningDataModule):
    """Args:
        train_shards: folder, glob or list of training shards.
        num_frames: frames per training clip (8k+1).
    """

    def __init__(self, train_shards: Any, num_frames: int = 9, batch_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 64, seed: int = 0):  # fmt: skip
        super().__init__()
        self.train_shards, self.num_frames = train_shards, num_frames
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.dataset: ClipDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        urls = list_shards(self.train_shards)
        if not urls:
            raise UserError(f"data.train_shards={self.train_shards}: no shards found")
        self.dataset = ClipDataset(urls, self.num_frames, self.shuffle_buffer, self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          collate_fn=collate, persistent_workers=self.num_workers > 0)  # fmt: skip
