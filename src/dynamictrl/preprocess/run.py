"""Preprocessing: raw videos and TikTok-style folders -> webdataset shards (DESIGN.md §2-3).

Per input: frames (resampled to `fps`), keypoints and people per frame (sidecar OpenPose JSON, else
the pose backend: MediaPipe Holistic offline, DWPose), person masks (sidecar PNGs, else the mask
backend: SAM 2 tracking, segment-anything, else the pose backend's own segmentation), then clips of
`num_frames` every `stride` frames, cropped around the person's box over the whole clip and resized
to the nearest-aspect resolution bucket, each with its rendered pose video and a caption (sidecar
.txt, else the caption model: Qwen2-VL). Backend contracts: `dynamictrl.pose.base`.

The run is resumable (finished inputs are listed in `manifest.jsonl` once their shard is renamed into
place; rejected ones in `rejects.jsonl`; `manifest-rankR.jsonl` and `rejects-rankR.jsonl` when split)
and splittable: rank r of N takes inputs r, r+N, ...

Two engines run the same stages (`dynamictrl.preprocess.stages`), streaming each input window by
window so memory holds one clip window of source frames: `engine=local` in this process (tests, a
laptop, one SLURM array task per GPU), `engine=ray` as a Ray Data pipeline with a CPU task pool for
decoding/encoding and actor pools for the models (`dynamictrl.preprocess.ray_engine`). Both keep the
manifest and rejects here, in the driver, with the same resume semantics; the local engine writes its
shards here too, the Ray engine through writer tasks (the samples' bytes never reach its driver).
"""

from __future__ import annotations

import json
import os
import re
import resource
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from dynamictrl.data.shards import ShardSink
from dynamictrl.errors import UserError
from dynamictrl.preprocess.backends import Backends, build, caption_model_configured  # noqa: F401 - build: API
from dynamictrl.preprocess.stages import (
    Assembler,
    Failed,
    Item,
    Outcome,
    Window,
    caption,
    decode,
    encode,
    guarded,
    manifest_row,
    mask_and_crop,
    pose,
)
from dynamictrl.utils.device import launcher_world
from dynamictrl.utils.video import VIDEO_SUFFIXES

SPLITS = ("train", "val", "test")


def discover(root: str | Path) -> list[Item]:
    """Video files and frame folders under `root`, sorted. A folder with `images/` is one video; the
    split is the first path component below `root` when it is train/val/test, else train."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"input {root}: no such file or folder")
    if root.is_file():
        return [Item(root, root.stem, "train")]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if "images" in dirnames:
            found.append(here)
            dirnames[:] = []
            continue
        dirnames.sort()
        found += [here / f for f in filenames if Path(f).suffix.lower() in VIDEO_SUFFIXES]
    items = []
    for path in sorted(found):
        rel = path.relative_to(root)
        split = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in SPLITS else "train"
        video_id = "_".join(rel.with_suffix("").parts) if path.is_file() else "_".join(rel.parts)
        items.append(Item(path, video_id or path.stem, split))
    return items


def partition(items: list[Item], rank: int, world_size: int) -> list[Item]:
    """Deterministic round-robin split; the union over ranks is every item exactly once."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world_size {world_size}")
    return items[rank::world_size]


def resolve_rank(cfg: DictConfig) -> tuple[int, int]:
    """rank/world_size from config, else the launcher's (SLURM array, torchrun, srun), else 0/1."""
    if cfg.get("rank") is not None and cfg.get("world_size") is not None:
        return int(cfg.rank), int(cfg.world_size)
    return launcher_world()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill; its input is simply redone
    return rows


def local_engine(todo: list[Item], cfg: DictConfig) -> Iterator[Outcome]:
    """The stages in this process, one window at a time (`engine=local`)."""
    backends = Backends(cfg)
    assembler = Assembler(cfg)
    has_model = caption_model_configured(cfg)

    def window(w: Window) -> Window:
        w = mask_and_crop(pose(w, backends), cfg, backends)
        return encode(caption([w], backends)[0], cfg)

    try:
        for v, item in enumerate(todo):
            failed = False
            for obj in decode(item, v, cfg, has_model):
                if isinstance(obj, Window):  # after a failure, the input's other windows are not worth running
                    obj = Failed(v, obj.index, "skipped") if failed else guarded(window, obj)
                    failed = failed or isinstance(obj, Failed)
                outcome = assembler.add(obj)
                if outcome is not None:
                    yield outcome
    finally:
        backends.close()


PATH_KEYS = ("det_model", "pose_model", "checkpoint", "config", "path", "tmp_dir")  # of conf/{pose,mask,caption}


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` with `input`, `output` and the models' relative file paths made absolute from this
    process's working directory: Ray workers (and array tasks) run from other directories. A model
    path is changed only when it exists here (a SAM 2 config may name one shipped in the package)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in ("input", "output"):
        cfg[key] = os.path.abspath(os.path.expanduser(str(cfg[key])))
    for stage in ("pose", "mask", "caption"):
        node = cfg.get(stage) or {}
        for key in PATH_KEYS:
            value = node.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value) and os.path.exists(value):
                node[key] = os.path.abspath(value)
    return cfg


class LocalShards:
    """Shard writing in this process (`engine=local`): samples go into one `ShardSink` per split;
    `add` and `finish` return the manifest rows of inputs whose shard has been renamed into place."""

    def __init__(self, out: Path, rank: int, shard_size: int):
        self.out, self.rank, self.shard_size = out, rank, shard_size
        self.sinks: dict[str, ShardSink] = {}
        self.pending: dict[str, list[dict]] = {}

    def add(self, item: Item, outcome: Outcome) -> list[dict]:
        sink = self.sinks.setdefault(item.split, ShardSink(self.out, f"{item.split}-{self.rank:04d}", self.shard_size))
        for s in outcome.samples:
            shard = sink.write(s)
        self.pending.setdefault(item.split, []).append(manifest_row(item, outcome, shard))
        return self._flush(item.split)

    def _flush(self, split: str, force: bool = False) -> list[dict]:
        if self.sinks[split].commit(force) and self.pending.get(split):
            return self.pending.pop(split)
        return []

    def finish(self) -> list[dict]:
        return [row for split in list(self.sinks) for row in self._flush(split, force=True)]


def remove_orphan_shards(out: Path, rank: int, listed: set[str]) -> list[str]:
    """Delete this rank's shards that no manifest lists: a run killed between a shard's rename and its
    manifest lines leaves one, and its inputs are redone (into a new shard) by this run."""
    orphans = [p for p in out.glob(f"*-{rank:04d}-[0-9][0-9][0-9][0-9][0-9].tar") if p.name not in listed]
    for p in orphans:
        p.unlink()
    return sorted(p.name for p in orphans)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Preprocess `cfg.input` into shards under `cfg.output` with the configured engine. Returns the
    run summary (with `backend_seconds`, the time spent inside the models, and `peak_rss_mb`)."""
    if not cfg.get("input"):
        raise UserError("input is not set: make preprocess ARGS=\"input=DIR output=DIR\"")
    if not cfg.get("output"):
        raise UserError("output is not set: make preprocess ARGS=\"input=DIR output=DIR\"")
    if int(cfg.num_frames) % 4 != 1:  # the CogVideoX VAE encodes 4k+1 frames; which of them a model
        k = (int(cfg.num_frames) - 1) // 4  # version takes (8k+1 on 1.0) is checked by training (models/latents.py)
        near = f"{4 * k + 1} or {4 * k + 5}" if k >= 0 else "1"
        raise UserError(f"num_frames={cfg.num_frames}: clips need 4k+1 frames for the VAE; nearest {near}")
    if cfg.get("stride") is not None and int(cfg.stride) < 1:
        raise UserError(f"stride={cfg.stride}: must be at least 1 (or null: one clip every num_frames)")
    engine = str(cfg.engine.name)
    if engine not in ("local", "ray"):
        raise UserError(f"engine={engine}: choose local or ray")
    cfg = absolute_paths(cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = resolve_rank(cfg)
    items = partition(discover(cfg.input), rank, world)
    # One manifest and rejects file per rank: array tasks never append to the same file (not safe on
    # network file systems); every rank reads all of them, so a re-split run still skips finished work.
    suffix = "" if world == 1 else f"-rank{rank:04d}"
    manifest, rejects = out / f"manifest{suffix}.jsonl", out / f"rejects{suffix}.jsonl"
    listed = [r for p in sorted(out.glob("manifest*.jsonl")) for r in _read_jsonl(p)]
    # paths recorded relative (before paths were made absolute) are read from this working directory
    done = ({os.path.abspath(r["source"]) for r in listed}
            | {os.path.abspath(r["path"]) for p in sorted(out.glob("rejects*.jsonl")) for r in _read_jsonl(p)})  # fmt: skip
    orphans = remove_orphan_shards(out, rank, {r["shard"] for r in listed})
    if orphans:
        print(f"preprocess: removed {len(orphans)} shard(s) no manifest lists (a run killed while writing them): "
              f"{', '.join(orphans)}; their inputs are redone")  # fmt: skip
    todo = [it for it in items if str(it.path) not in done]
    stats: Counter = Counter(skipped=len(items) - len(todo))
    reasons: Counter = Counter()
    backend_seconds: Counter = Counter()
    frames_done, start, cpu0 = 0, time.perf_counter(), _cpu_seconds()

    def record(rows: list[dict]) -> None:
        if rows:
            with open(manifest, "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")

    if engine == "ray" and todo:
        from dynamictrl.preprocess.ray_engine import RayEngine

        runner = RayEngine(todo, cfg, out, rank)
        outcomes, shards = runner.outcomes(), runner.shards
    else:
        runner = None
        outcomes, shards = local_engine(todo, cfg), LocalShards(out, rank, int(cfg.shard_size))
    bar = tqdm(total=len(todo), desc=f"preprocess {engine} (rank {rank}/{world})", unit="video", disable=not cfg.progress)
    frame_bar = tqdm(desc="clip frames written", unit="frame", disable=not cfg.progress, position=1)
    try:
        for outcome in outcomes:
            item = todo[outcome.video]
            backend_seconds.update(outcome.seconds)
            bar.update(1)
            if outcome.reject is not None:
                reasons[re.split(r"[:(]", outcome.reject)[0].strip()] += 1
                with open(rejects, "a") as f:
                    f.write(json.dumps({"path": str(item.path), "reason": outcome.reject}) + "\n")
                bar.set_postfix(done=stats["done"], rejected=sum(reasons.values()))
                continue
            clips = len(outcome.keys)
            record(shards.add(item, outcome))
            stats["done"] += 1
            stats["clips"] += clips
            frames_done += clips * int(cfg.num_frames)
            frame_bar.update(clips * int(cfg.num_frames))
            bar.set_postfix(done=stats["done"], rejected=sum(reasons.values()))
        record(shards.finish())
    finally:
        if runner is not None:
            ray_summary = runner.summary  # before close: it asks the cluster
            runner.close()
    bar.close()
    frame_bar.close()
    seconds = time.perf_counter() - start
    summary = {"rank": rank, "world_size": world, "engine": engine, "inputs": len(items), "done": stats["done"],
               "skipped": stats["skipped"], "clips": stats["clips"], "rejected": dict(reasons),
               "frames_per_s": frames_done / max(seconds, 1e-9), "seconds": seconds,
               "backend_seconds": dict(backend_seconds), "peak_rss_mb": peak_rss_mb(), "output": str(out),
               "driver_cpu_s": _cpu_seconds() - cpu0}  # fmt: skip
    if runner is not None:
        summary["ray"] = ray_summary
    print(f"preprocess: {summary['done']} done, {summary['skipped']} skipped, "
          f"{sum(reasons.values())} rejected {dict(reasons) or ''}, {summary['clips']} clips, "
          f"{summary['frames_per_s']:.1f} frames/s -> {out}")  # fmt: skip
    if summary.get("ray", {}).get("worker_deaths"):
        print(f"preprocess: {summary['ray']['worker_deaths']} Ray worker(s) died while working (retried up to "
              f"engine.max_retries={cfg.engine.max_retries} times; inputs that still failed are in {rejects.name})")  # fmt: skip
    if items and not stats["done"] and not stats["skipped"]:
        raise UserError(f"no input could be processed; see {rejects}")
    return summary


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process so far: the driver's own work, not its workers'."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
