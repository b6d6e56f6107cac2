"""The shard format: the contract between preprocessing, training and evaluation (DESIGN.md §2).

One sample per clip, key `<video-id>-<clip-index>` (no dots):

    mp4       the clip, RGB, at its bucket resolution
    pose.mp4  the DWPose-style rendered skeleton, same frames and size
    mask.npz  np.savez_compressed(mask=bool T×H×W)
    kpts.npy  float32 T×134×3 (x, y in [0,1], score in [0,1])
    txt       the caption
    json      provenance, clip geometry and QC figures

Decoding never unpickles: `.npy`/`.npz` load with allow_pickle=False and no other member is
interpreted, so shards from others are safe to read.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from dynamictrl.pose.layout import NUM_KEYPOINTS
from dynamictrl.utils.video import encode_mp4, read_video

MEMBERS = ("mp4", "pose.mp4", "mask.npz", "kpts.npy", "txt", "json")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(video_id: str, clip_index: int) -> str:
    """`<video-id>-<clip-index>` with dots and other unsafe characters replaced (webdataset splits at dots)."""
    return f"{_KEY_SAFE.sub('_', video_id)}-{clip_index:04d}"


def encode_sample(
    key: str,
    frames: np.ndarray,
    pose: np.ndarray,
    mask: np.ndarray,
    kpts: np.ndarray,
    caption: str,
    meta: dict[str, Any],
    fps: float,
) -> dict[str, Any]:
    """Pack one clip into webdataset members, checking the contract's shapes and dtypes."""
    t, h, w = frames.shape[:3]
    if frames.dtype != np.uint8 or frames.shape != (t, h, w, 3):
        raise ValueError(f"{key}: frames must be (T, H, W, 3) uint8; got {frames.shape} {frames.dtype}")
    if pose.shape != frames.shape:
        raise ValueError(f"{key}: pose video {pose.shape} does not match the clip {frames.shape}")
    if mask.shape != (t, h, w):
        raise ValueError(f"{key}: mask {mask.shape} does not match the clip ({t}, {h}, {w})")
    if kpts.shape != (t, NUM_KEYPOINTS, 3):
        raise ValueError(f"{key}: keypoints {kpts.shape}; expected ({t}, {NUM_KEYPOINTS}, 3)")
    mask_buf = io.BytesIO()
    np.savez_compressed(mask_buf, mask=mask.astype(bool))
    kpts_buf = io.BytesIO()
    np.save(kpts_buf, kpts.astype(np.float32), allow_pickle=False)
    return {
        "__key__": key,
        "mp4": encode_mp4(frames, fps),
        "pose.mp4": encode_mp4(pose, fps),
        "mask.npz": mask_buf.getvalue(),
        "kpts.npy": kpts_buf.getvalue(),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw webdataset members (bytes) -> arrays. Raises ValueError on a malformed sample."""
    missing = [m for m in MEMBERS if m not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('__key__')}: missing members {missing}")
    frames, _ = read_video(sample["mp4"])
    pose, _ = read_video(sample["pose.mp4"])
    with np.load(io.BytesIO(sample["mask.npz"]), allow_pickle=False) as npz:
        mask = npz["mask"]
    kpts = np.load(io.BytesIO(sample["kpts.npy"]), allow_pickle=False)
    meta = json.loads(sample["json"])
    n = min(len(frames), len(pose), len(mask), len(kpts))
    if n < meta.get("num_frames", n):
        raise ValueError(f"sample {sample['__key__']}: {n} frames decoded, {meta['num_frames']} expected")
    return {
        "key": sample["__key__"],
        "frames": frames[:n],
        "pose": pose[:n],
        "mask": mask[:n],
        "kpts": kpts[:n],
        "caption": sample["txt"].decode("utf-8"),
        "meta": meta,
        "url": sample.get("__url__"),
    }


class ShardSink:
    """Write samples into `<folder>/<prefix>-NNNNN.tar` shards of about `max_count` samples.

    A shard is written under a temporary name and renamed when complete, so a killed run never
    leaves a partial shard visible. `commit()` closes the current shard at a safe point (between
    videos) and returns the names of shards finished since the last call.
    """

    def __init__(self, folder: str | Path, prefix: str, max_count: int = 64):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_count = max_count
        existing = sorted(self.folder.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9].tar"))
        self.index = int(existing[-1].stem.rsplit("-", 1)[1]) + 1 if existing else 0
        self.writer = None  # a webdataset.TarWriter while a shard is open
        self.count = 0
        self.finished: list[str] = []

    @property
    def current_name(self) -> str:
        return f"{self.prefix}-{self.index:05d}.tar"

    def write(self, sample: dict[str, Any]) -> str:
        """Add a sample; returns the name of the shard it will land in."""
        if self.writer is None:
            self._tmp = self.folder / f".{self.current_name}.tmp"
            import webdataset as wds  # here, not at the top: it imports torch, which decode/encode workers need not

            self.writer = wds.TarWriter(str(self._tmp))
        self.writer.write(sample)
        self.count += 1
        return self.current_name

    def commit(self, force: bool = False) -> list[str]:
        """Close the current shard if it is full (or `force`); return the shards finished so far."""
        if self.writer is not None and (force or self.count >= self.max_count):
            self.writer.close()
            os.replace(self._tmp, self.folder / self.current_name)
            self.finished.append(self.current_name)
            self.writer, self.count = None, 0
            self.index += 1
        done, self.finished = self.finished, []
        return done

    def close(self) -> list[str]:
        return self.commit(force=True)


def list_shards(spec: str | Path | list) -> list[str]:
    """Shard paths from a folder, a glob, a brace pattern or a list; sorted and checked to exist."""
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in list_shards(s)]
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
    elif any(c in spec for c in "*?["):
        urls = sorted(str(p) for p in Path(path.anchor or ".").glob(str(path.relative_to(path.anchor or "."))))
    elif "{" in spec:
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
    else:
        urls = [spec] if path.is_file() else []
    return urls


def clip_settings(urls: list[str]) -> dict[str, Any]:
    """The clip sizes and frame rate of shards (raw or precomputed), from their `json` members only.

    Tar headers are read and the media members skipped (seeked over), so this costs one pass over the
    headers, not a decode. Returns `buckets` ([h, w] sizes, most frequent first) and `fps` (the most
    frequent rate; None if no sample records one)."""
    import tarfile
    from collections import Counter

    sizes: Counter = Counter()
    rates: Counter = Counter()
    for url in urls:
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    if not member.name.endswith(".json"):
                        continue
                    try:
                        meta = json.load(tar.extractfile(member))
                        sizes[tuple(int(x) for x in meta["size"])] += 1
                    except Exception:  # noqa: BLE001 - a corrupt sample says nothing about the settings
                        continue
                    if meta.get("fps"):
                        rates[float(meta["fps"])] += 1
        except (OSError, tarfile.TarError):  # a corrupt shard: training skipped its samples too
            continue
    return {"buckets": [list(s) for s, _ in sizes.most_common()],
            "fps": rates.most_common(1)[0][0] if rates else None}  # fmt: skip
