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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from dynamictrl.data.shards import ShardSink, encode_sample, sample_key
from dynamictrl.errors import Reject, UserError
from dynamictrl.pose import layout as L
from dynamictrl.pose.base import frame_boxes, main_person
from dynamictrl.pose.render import render_video
from dynamictrl.utils.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_frames_dir, read_video

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    path: Path
    video_id: str
    split: str

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()


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
    """rank/world_size from config, else SLURM array or torchrun variables, else 0/1."""
    if cfg.get("rank") is not None and cfg.get("world_size") is not None:
        return int(cfg.rank), int(cfg.world_size)
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        return int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env["SLURM_ARRAY_TASK_COUNT"])
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return 0, 1


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's image files in name order."""
    h = hashlib.sha256()
    files = sorted(p for p in (path / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def build(node: DictConfig | None):
    """Instantiate a backend config (`conf/{pose,mask,caption}/*.yaml`); its `name` key is a label,
    not an argument. None when the config names no model (`_target_` absent)."""
    if node is None or "_target_" not in node:
        return None
    try:
        return instantiate({k: v for k, v in node.items() if k != "name"}, _convert_="all")
    except InstantiationException as err:  # Hydra wraps the backend's own one-line error
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


class Backends:
    """The configured models, each loaded once per worker on first need (a run over sidecar-annotated
    data never loads one)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self._made: dict[str, Any] = {}

    def _get(self, stage: str, factory):
        if stage not in self._made:
            self._made[stage] = factory()
        return self._made[stage]

    @property
    def pose(self):
        return self._get("pose", lambda: build(self.cfg.pose))

    @property
    def mask(self):
        """The configured mask model, or None: then the pose backend's own masks, else MediaPipe's
        selfie segmentation restricted to the person's box."""
        return self._get("mask", lambda: build(self.cfg.mask))

    @property
    def fallback_mask(self):
        from dynamictrl.pose.mediapipe_backend import MediaPipeSelfieMasks

        return self._get("fallback_mask", MediaPipeSelfieMasks)

    @property
    def caption(self):
        return self._get("caption", lambda: build(self.cfg.caption))

    def close(self) -> None:
        for backend in self._made.values():
            if hasattr(backend, "close"):
                backend.close()
        self._made.clear()


def load_input(item: Item, default_fps: float) -> tuple[np.ndarray, float]:
    """Frames and frame rate of one input. Raises Reject for an empty, unreadable, truncated or
    non-video input."""
    if item.path.is_file() and item.path.stat().st_size == 0:
        raise Reject("empty file")
    try:
        if item.is_folder:
            frames = read_frames_dir(item.path / "images")
            meta = item.path / "meta.json"
            fps = json.loads(meta.read_text()).get("fps", default_fps) if meta.is_file() else default_fps
            return frames, float(fps)
        return read_video(item.path, strict=True)
    except UserError as err:
        raise Reject(str(err).split(": ", 1)[-1]) from None


def resample(num_frames: int, src_fps: float, fps: float | None) -> np.ndarray:
    """Indices of source frames that sample the video at `fps` (all frames if fps is None)."""
    if not fps or abs(fps - src_fps) < 1e-3:
        return np.arange(num_frames)
    n = int(np.floor((num_frames - 1) * fps / src_fps)) + 1
    return np.minimum(np.round(np.arange(n) * src_fps / fps).astype(int), num_frames - 1)


def sidecar_keypoints(item: Item, num_frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """OpenPose JSON per frame (`openpose/*.json`) -> ((T, 134, 3) keypoints of the largest person,
    (T,) people per frame), or None without a sidecar."""
    folder = item.path / "openpose" if item.is_folder else None
    if folder is None or not folder.is_dir():
        return None
    files = sorted(folder.glob("*.json"))
    if len(files) != num_frames:
        raise Reject(f"sidecar keypoints: {len(files)} files for {num_frames} frames")
    out = L.empty(num_frames)
    people = np.zeros(num_frames, np.int64)
    for i, f in enumerate(files):
        try:
            found = L.from_openpose_json(json.loads(f.read_text()), width, height)
        except (ValueError, json.JSONDecodeError) as err:
            raise Reject(f"sidecar keypoints {f.name}: {err}") from None
        people[i] = len(found)
        out[i] = main_person(found)
    return out, people


def sidecar_masks(item: Item, indices: np.ndarray, height: int, width: int) -> np.ndarray | None:
    folder = item.path / "masks" if item.is_folder else None
    if folder is None or not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files or len(files) <= indices.max():
        raise Reject(f"sidecar masks: {len(files)} files for {indices.max() + 1} frames")
    masks = [np.asarray(Image.open(files[i]).convert("L")) > 127 for i in indices]
    return np.stack([m if m.shape == (height, width) else cv2.resize(m.astype(np.uint8), (width, height)) > 0
                     for m in masks])  # fmt: skip


def sidecar_caption(item: Item) -> str | None:
    """`caption.txt` in a frame folder, or `<video>.txt` beside a video file."""
    c = item.path / "caption.txt" if item.is_folder else item.path.with_suffix(".txt")
    text = c.read_text().strip() if c.is_file() else ""
    return text or None


def person_count(people: np.ndarray, ratio: float) -> int:
    """The clip's person count for QC: 2 or more when at least `ratio` of the counted frames (people
    >= 0) show several people, else the most frequent count (0 or 1)."""
    counted = people[people >= 0]
    if len(counted) == 0:
        return 1
    if (counted >= 2).mean() >= ratio:
        return int(np.median(counted[counted >= 2]))
    return int(np.bincount(np.minimum(counted, 1)).argmax())


def crop_box(box: tuple[float, float, float, float], height: int, width: int, aspect: float,
             margin: float) -> tuple[int, int, int, int]:  # fmt: skip
    """Pixel crop (x0, y0, x1, y1) around a normalised person box, grown by `margin` of its height and
    to the target aspect (w/h), kept inside the frame (shrunk about its centre if it cannot fit)."""
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    h = (y1 - y0) * (1 + 2 * margin)
    w = (x1 - x0) + 2 * margin * (y1 - y0)
    h, w = max(h, w / aspect), max(w, h * aspect)
    scale = min(1.0, height / h, width / w)
    h, w = h * scale, w * scale
    x0 = min(max(cx - w / 2, 0), width - w)
    y0 = min(max(cy - h / 2, 0), height - h)
    return round(x0), round(y0), round(x0 + w), round(y0 + h)


def choose_bucket(buckets: list[list[int]], box: tuple[float, float, float, float], height: int, width: int,
                  margin: float) -> tuple[int, int]:  # fmt: skip
    """The (height, width) bucket whose aspect ratio is closest (in log ratio) to the person box's,
    margins included, so a standing person gets a portrait bucket and a wide pose a landscape one."""
    bw = (box[2] - box[0]) * width + 2 * margin * (box[3] - box[1]) * height
    bh = (box[3] - box[1]) * height * (1 + 2 * margin)
    aspect = max(bw, 1.0) / max(bh, 1.0)
    return min(((int(h), int(w)) for h, w in buckets), key=lambda hw: abs(np.log(hw[1] / hw[0] / aspect)))


def clip_box(kpts: np.ndarray, masks: np.ndarray, threshold: float = 0.3,
             mask_share: float = 0.1) -> tuple[float, float, float, float] | None:  # fmt: skip
    """Normalised (x0, y0, x1, y1) box of the person over a clip: every visible keypoint (face
    included) and the pixels masked in at least `mask_share` of the frames, so that hair, clothes and a
    face that fills the frame are inside. None when no body point is visible."""
    if L.person_box(kpts, threshold) is None:
        return None
    pts = kpts.reshape(-1, 3)
    pts = pts[pts[:, 2] > threshold, :2]
    x0, y0 = pts.min(0)
    x1, y1 = pts.max(0)
    h, w = masks.shape[1:]
    ys, xs = np.nonzero(masks.mean(0) >= mask_share)
    if len(xs):
        x0, y0 = min(x0, xs.min() / w), min(y0, ys.min() / h)
        x1, y1 = max(x1, (xs.max() + 1) / w), max(y1, (ys.max() + 1) / h)
    return float(x0), float(y0), float(min(x1, 1.0)), float(min(y1, 1.0))


def make_clips(frames, kpts, masks, cfg: DictConfig) -> list[dict[str, Any]]:
    """Cut, crop and resize clips; returns one dict of arrays and geometry per clip."""
    n, H, W = frames.shape[:3]
    length = int(cfg.num_frames)
    stride = int(cfg.stride or length)
    clips = []
    for ci, start in enumerate(range(0, n - length + 1, stride)):
        sl = slice(start, start + length)
        box = clip_box(kpts[sl], masks[sl])
        if box is None:
            continue
        bh, bw = choose_bucket(cfg.buckets, box, H, W, cfg.crop_margin)
        x0, y0, x1, y1 = crop_box(box, H, W, bw / bh, cfg.crop_margin)
        clip = np.stack([cv2.resize(f[y0:y1, x0:x1], (bw, bh), interpolation=cv2.INTER_AREA) for f in frames[sl]])
        mask = np.stack([cv2.resize(m[y0:y1, x0:x1].astype(np.uint8), (bw, bh), interpolation=cv2.INTER_NEAREST) > 0
                         for m in masks[sl]])  # fmt: skip
        k = kpts[sl].copy()
        k[..., 0] = (k[..., 0] * W - x0) / (x1 - x0)
        k[..., 1] = (k[..., 1] * H - y0) / (y1 - y0)
        outside = (k[..., 0] < 0) | (k[..., 0] > 1) | (k[..., 1] < 0) | (k[..., 1] > 1) | (k[..., 2] <= 0)
        k[outside] = 0.0
        clips.append({"index": ci, "start": start, "frames": clip, "mask": mask, "kpts": k.astype(np.float32),
                      "crop": [x0, y0, x1, y1], "size": [bh, bw]})  # fmt: skip
    return clips


def annotate(item: Item, frames: np.ndarray, idx: np.ndarray, cfg: DictConfig, backends: Backends):
    """Keypoints, people per frame and masks of the resampled frames `frames[idx]`: sidecars where
    present (`use_sidecars`), else the configured backends. Returns (kpts, people, masks, stages, qc)
    with the backends' own QC figures in `qc` (the tracker's re-seeds)."""
    H, W = frames.shape[1:3]
    use = cfg.use_sidecars
    side_k = sidecar_keypoints(item, len(frames), H, W) if use else None
    masks = sidecar_masks(item, idx, H, W) if use else None
    stages = {"pose": "sidecar-openpose" if side_k is not None else None,
              "mask": "sidecar-png" if masks is not None else None}  # fmt: skip
    frames = frames[idx]
    track, qc = None, {}
    if side_k is not None:
        kpts, people = side_k[0][idx], side_k[1][idx]
    else:
        pose = backends.pose
        track = pose.detect_video(frames)
        kpts, people = track.kpts, track.people
        stages["pose"] = f"{pose.name}-{pose.version}"
    if masks is None:
        boxes = frame_boxes(kpts, H, W)
        model = backends.mask
        if model is not None:
            masks = model.masks(frames, boxes)
            stages["mask"] = f"{model.name}-{model.version}"
            if hasattr(model, "reseeds"):
                qc["mask_reseeds"] = int(model.reseeds)
        elif track is not None and track.masks is not None:
            masks = track.masks
            stages["mask"] = stages["pose"]
        else:
            fallback = backends.fallback_mask
            masks = fallback.masks(frames, boxes)
            stages["mask"] = f"{fallback.name}-{fallback.version}"
    return kpts, people, masks, stages, qc


def captions_for(item: Item, clips: list[dict[str, Any]], cfg: DictConfig, backends: Backends) -> tuple[list[str], str]:
    """One caption per clip: the sidecar's for all, else the caption model's (clips in one batch)."""
    text = sidecar_caption(item) if cfg.use_sidecars else None
    if text is not None:
        return [text] * len(clips), "sidecar-txt"
    model = backends.caption
    if model is None:
        raise Reject(f"no caption: no sidecar {'caption.txt' if item.is_folder else item.path.stem + '.txt'} "
                     "and no caption model configured (caption=qwen2vl caption.path=DIR)")  # fmt: skip
    found = [c.strip() for c in model([c["frames"] for c in clips])]
    if not all(found):
        raise Reject(f"no caption: {model.name} returned an empty caption")
    return found, f"{model.name}-{model.version}"


def process(item: Item, cfg: DictConfig, backends: Backends) -> list[dict[str, Any]]:
    """One input -> encoded samples. Raises Reject with a reason for an unusable input."""
    frames, src_fps = load_input(item, cfg.default_fps)
    H, W = frames.shape[1:3]
    idx = resample(len(frames), src_fps, cfg.fps)
    fps = float(cfg.fps or src_fps)
    if len(idx) < cfg.num_frames:
        raise Reject(f"too short: {len(idx)} frames at {fps:g} fps, a clip needs {cfg.num_frames}")
    if "_target_" not in cfg.caption and not (cfg.use_sidecars and sidecar_caption(item)):
        captions_for(item, [], cfg, backends)  # rejects before any model runs
    kpts, people, masks, stages, video_qc = annotate(item, frames, idx, cfg, backends)
    frames = frames[idx]
    detected = L.body_detected(kpts)
    if detected.mean() < cfg.min_pose_ratio:
        raise Reject(f"no person: body found in {detected.mean():.0%} of frames")
    count = person_count(people, cfg.several_people_ratio)
    if count >= 2:
        raise Reject(f"several people: {count} people in {(people >= 2).sum()} of {(people >= 0).sum()} counted frames")
    clips = make_clips(frames, kpts, masks, cfg)
    if not clips:
        raise Reject("no person in any clip")
    captions, stages["caption"] = captions_for(item, clips, cfg, backends)
    sha = file_sha256(item.path)
    samples = []
    for c, caption in zip(clips, captions, strict=True):
        bh, bw = c["size"]
        pose = render_video(c["kpts"], bh, bw)
        det = L.body_detected(c["kpts"])
        clip_people = people[c["start"] : c["start"] + cfg.num_frames]
        meta = {
            "source": str(item.path), "sha256": sha, "video_id": item.video_id, "clip_index": c["index"],
            "fps": fps, "frame_indices": idx[c["start"] : c["start"] + cfg.num_frames].tolist(),
            "num_frames": int(cfg.num_frames), "original_size": [H, W], "crop_box": c["crop"], "size": [bh, bw],
            "backends": stages, "split": item.split,
            "qc": {"pose_detected_ratio": float(det.mean()), "mean_mask_area": float(c["mask"].mean()),
                   "person_count": person_count(clip_people, cfg.several_people_ratio), **video_qc},
        }  # fmt: skip
        key = sample_key(item.video_id, c["index"])
        samples.append(encode_sample(key, c["frames"], pose, c["mask"], c["kpts"], caption, meta, fps))
    return samples


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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Preprocess `cfg.input` into shards under `cfg.output`. Returns the run summary."""
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
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = resolve_rank(cfg)
    items = partition(discover(cfg.input), rank, world)
    # One manifest and rejects file per rank: array tasks never append to the same file (not safe on
    # network file systems); every rank reads all of them, so a re-split run still skips finished work.
    suffix = "" if world == 1 else f"-rank{rank:04d}"
    manifest, rejects = out / f"manifest{suffix}.jsonl", out / f"rejects{suffix}.jsonl"
    done = ({r["source"] for p in sorted(out.glob("manifest*.jsonl")) for r in _read_jsonl(p)}
            | {r["path"] for p in sorted(out.glob("rejects*.jsonl")) for r in _read_jsonl(p)})  # fmt: skip
    todo = [it for it in items if str(it.path) not in done]
    backends = Backends(cfg)
    sinks: dict[str, ShardSink] = {}
    pending: dict[str, list[dict]] = {}
    stats: Counter = Counter(skipped=len(items) - len(todo))
    reasons: Counter = Counter()
    frames_done, start = 0, time.perf_counter()

    def flush(split: str, force: bool = False) -> None:
        if sinks[split].commit(force) and pending.get(split):
            with open(manifest, "a") as f:
                for row in pending.pop(split):
                    f.write(json.dumps(row) + "\n")

    bar = tqdm(todo, desc=f"preprocess (rank {rank}/{world})", unit="video", disable=not cfg.progress)
    frame_bar = tqdm(desc="clip frames written", unit="frame", disable=not cfg.progress, position=1)
    for item in bar:
        try:
            samples = process(item, cfg, backends)
        except UserError:
            raise  # a configuration problem (a weight file that is not there) stops the run
        except Exception as err:  # noqa: BLE001 - a long run survives any bad item; it is recorded
            why = err if isinstance(err, Reject) else Reject(f"failed: {type(err).__name__}: {err}")
            reasons[re.split(r"[:(]", str(why))[0].strip()] += 1
            with open(rejects, "a") as f:
                f.write(json.dumps({"path": str(item.path), "reason": str(why)}) + "\n")
            continue
        sink = sinks.setdefault(item.split, ShardSink(out, f"{item.split}-{rank:04d}", int(cfg.shard_size)))
        for s in samples:
            shard = sink.write(s)
        pending.setdefault(item.split, []).append(
            {"source": str(item.path), "video_id": item.video_id, "split": item.split, "shard": shard,
             "keys": [s["__key__"] for s in samples]}  # fmt: skip
        )
        stats["done"] += 1
        stats["clips"] += len(samples)
        frames_done += len(samples) * int(cfg.num_frames)
        frame_bar.update(len(samples) * int(cfg.num_frames))
        flush(item.split)
        bar.set_postfix(done=stats["done"], rejected=sum(reasons.values()))
    for split in sinks:
        flush(split, force=True)
    frame_bar.close()
    backends.close()
    seconds = time.perf_counter() - start
    summary = {"rank": rank, "world_size": world, "inputs": len(items), "done": stats["done"],
               "skipped": stats["skipped"], "clips": stats["clips"], "rejected": dict(reasons),
               "frames_per_s": frames_done / max(seconds, 1e-9), "output": str(out)}  # fmt: skip
    print(f"preprocess: {summary['done']} done, {summary['skipped']} skipped, "
          f"{sum(reasons.values())} rejected {dict(reasons) or ''}, {summary['clips']} clips, "
          f"{summary['frames_per_s']:.1f} frames/s -> {out}")  # fmt: skip
    if items and not stats["done"] and not stats["skipped"]:
        raise UserError(f"no input could be processed; see {rejects}")
    return summary
