"""The preprocessing stages, shared by both engines (`engine=local` runs them in one process,
`engine=ray` as a Ray Data streaming pipeline; `dynamictrl.preprocess.ray_engine`).

A video flows through as clip windows, so memory holds one window of full-resolution frames, never
the whole source:

    decode (CPU)   input -> Window x N (num_frames resampled frames each), then End
    pose   (GPU)   Window + keypoints and people per frame (sidecar OpenPose wins)
    mask   (GPU)   Window + person masks, then cropped around the person and resized to its bucket:
                   from here on frames and masks are at clip resolution
    caption (GPU)  + caption (sidecar .txt wins; the model captions clips in batches)
    encode (CPU)   + the webdataset sample (mp4s, mask, keypoints, caption, metadata)

and `Assembler` (in the driver) collects a video's clips until its End, applies the video-level checks
(no person, several people, no caption) and hands back its samples or its reject reason. A stage that
fails on a window turns into a `Failed` for that window (the video is rejected with the reason); a
UserError (a configuration problem, e.g. a missing weight file) is `Failed(fatal=True)` and stops the run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from omegaconf import DictConfig

from dynamictrl.data.shards import encode_sample, sample_key
from dynamictrl.errors import Reject, UserError
from dynamictrl.pose import layout as L
from dynamictrl.pose.base import frame_boxes, main_person
from dynamictrl.pose.render import render_video
from dynamictrl.utils.video import IMAGE_SUFFIXES, VideoStream, iter_frames_dir


@dataclass(frozen=True)
class Item:
    path: Path
    video_id: str
    split: str

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()


@dataclass
class Window:
    """One clip of one input on its way through the stages. Arrays are filled stage by stage."""

    video: int  # the input's position in the run's list
    index: int  # clip index within the input (the sample key's suffix)
    start: int  # first frame, counted in resampled frames
    src: np.ndarray  # (T,) source frame indices
    info: dict[str, Any]  # per input: fps, sha256, original size, sidecar caption, video_id, ...
    frames: np.ndarray | None = None  # (T, H, W, 3) uint8: full resolution, then the clip's
    kpts: np.ndarray | None = None  # (T, 134, 3): normalised to the frame, then to the crop
    people: np.ndarray | None = None  # (T,) people per frame (-1: not counted)
    masks: np.ndarray | None = None  # (T, H, W) bool: full resolution, then the clip's
    frame_detected: np.ndarray | None = None  # (T,) body found, per frame of the window (video QC)
    stages: dict[str, Any] = field(default_factory=dict)  # backend labels and the tracker's QC
    crop: list[int] | None = None  # x0, y0, x1, y1 in source pixels (None: nobody in this window)
    caption: str | None = None
    sample: dict[str, Any] | None = None  # the encoded webdataset sample
    staged: list[str] | None = None  # Ray engine: [key, file] of the sample staged for the shard writers
    seconds: dict[str, float] = field(default_factory=dict)  # time spent in each backend


@dataclass
class End:
    """The decode stage's last word on an input: how many windows it sent, or why it is rejected."""

    video: int
    windows: int
    reject: str | None = None
    frames: int = 0  # resampled frames decoded
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failed:
    """A stage failed on one window (`index`); `fatal`: a configuration problem that stops the run."""

    video: int
    index: int
    reason: str
    fatal: bool = False


# --------------------------------------------------------------------------------------------- decode


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's image files in name order (streamed)."""
    h = hashlib.sha256()
    files = sorted(p for p in (path / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def resampled(frames: Iterator[np.ndarray], src_fps: float, fps: float | None) -> Iterator[tuple[int, np.ndarray]]:
    """(source index, frame) at `fps` as the frames arrive (all of them when fps is None or the source's).
    Sample k is source frame round(k * src_fps / fps) while k * src_fps / fps is at most the last
    frame's index (repeated frames when fps > src_fps); a sample just past a frame is held back until
    the next frame shows the video goes on, and dropped at the end."""
    if not fps or abs(fps - src_fps) < 1e-3:
        yield from enumerate(frames)
        return
    step, k, held, previous = src_fps / fps, 0, 0, None
    for j, frame in enumerate(frames):
        for _ in range(held):
            yield j - 1, previous
        held = 0
        while round(k * step) == j:  # Python's and numpy's round both round half to even
            if k * step <= j:
                yield j, frame
            else:
                held += 1
            k += 1
        previous = frame


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


def sidecar_mask_files(item: Item) -> list[Path] | None:
    folder = item.path / "masks" if item.is_folder else None
    if folder is None or not folder.is_dir():
        return None
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_masks(files: list[Path], indices: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image, ImageOps

    if not files or len(files) <= indices.max():
        raise Reject(f"sidecar masks: {len(files)} files for {indices.max() + 1} frames")
    # upright as the frames are read (utils.video.read_image applies the EXIF orientation)
    masks = [np.asarray(ImageOps.exif_transpose(Image.open(files[i])).convert("L")) > 127 for i in indices]
    return np.stack([m if m.shape == (height, width) else cv2.resize(m.astype(np.uint8), (width, height)) > 0
                     for m in masks])  # fmt: skip


def sidecar_caption(item: Item) -> str | None:
    """`caption.txt` in a frame folder, or `<video>.txt` beside a video file."""
    c = item.path / "caption.txt" if item.is_folder else item.path.with_suffix(".txt")
    text = c.read_text().strip() if c.is_file() else ""
    return text or None


def _open(item: Item, default_fps: float) -> tuple[Iterator[np.ndarray], float]:
    """(frames one at a time, frame rate). Raises Reject."""
    if item.path.is_file() and item.path.stat().st_size == 0:
        raise Reject("empty file")
    try:
        if item.is_folder:
            meta = item.path / "meta.json"
            fps = json.loads(meta.read_text()).get("fps", default_fps) if meta.is_file() else default_fps
            return iter_frames_dir(item.path / "images"), float(fps)
        stream = VideoStream(item.path, strict=True)
        return iter(stream), stream.fps
    except UserError as err:
        raise Reject(str(err).split(": ", 1)[-1]) from None


def decode(item: Item, video: int, cfg: DictConfig, caption_model: bool) -> Iterator[Window | End]:
    """One input -> its clip windows at full resolution (resampled to `fps` as the frames arrive, one
    window of frames in memory), then End. `caption_model`: a caption model is configured (else an
    input without a sidecar caption is rejected before any model runs)."""
    length, stride = int(cfg.num_frames), int(cfg.stride or cfg.num_frames)
    sent, count = 0, 0
    try:
        frames, src_fps = _open(item, cfg.default_fps)
        caption = sidecar_caption(item) if cfg.use_sidecars else None
        if caption is None and not caption_model:  # before any model runs
            name = "caption.txt" if item.is_folder else item.path.stem + ".txt"
            raise Reject(f"no caption: no sidecar {name} and no caption model configured "
                         "(caption=qwen2vl caption.path=DIR)")  # fmt: skip
        fps = float(cfg.fps or src_fps)
        info: dict[str, Any] = {"video_id": item.video_id, "source": str(item.path), "split": item.split,
                                "fps": fps, "caption": caption, "sha256": file_sha256(item.path)}  # fmt: skip
        side_k = side_masks = None
        buffer: list[tuple[int, np.ndarray]] = []  # (source index, frame) from position `first` on
        first, start = 0, 0
        try:
            for pos, (j, frame) in enumerate(resampled(frames, src_fps, cfg.fps)):
                count = pos + 1
                if pos == 0:
                    info["original_size"] = list(frame.shape[:2])
                    if cfg.use_sidecars and item.is_folder:
                        side_k = _sidecar_k(item, *frame.shape[:2])
                        side_masks = sidecar_mask_files(item)
                if pos >= start:
                    buffer.append((j, frame))
                if pos == start + length - 1:  # a full window
                    chunk = buffer[start - first : start - first + length]
                    src = np.array([i for i, _ in chunk])
                    w = Window(video, sent, start, src, info, frames=np.stack([f for _, f in chunk]))
                    H, W = w.frames.shape[1:3]
                    if side_k is not None:
                        w.kpts, w.people = side_k[0][src], side_k[1][src]
                        w.stages["pose"] = "sidecar-openpose"
                    if side_masks is not None:
                        w.masks = read_masks(side_masks, src, H, W)
                        w.stages["mask"] = "sidecar-png"
                    yield w
                    sent += 1
                    start += stride
                    drop = start - first
                    buffer, first = buffer[drop:] if drop < len(buffer) else [], start
        except UserError as err:  # the stream found damage (strict): a truncated file
            raise Reject(str(err).split(": ", 1)[-1]) from None
        if count < length:
            raise Reject(f"too short: {count} frames at {fps:g} fps, a clip needs {length}")
        yield End(video, sent, None, count, info)
    except Reject as why:
        yield End(video, sent, str(why), count)


def _sidecar_k(item: Item, height: int, width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Sidecar keypoints of a frame folder (source frames; the folder's image count is the length)."""
    n = sum(1 for p in (item.path / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return sidecar_keypoints(item, n, height, width)


# ------------------------------------------------------------------------------------- pose and masks


def pose(w: Window, backends) -> Window:
    """Keypoints and people per frame of the window (unless the sidecar gave them), and the pose
    backend's own masks when it has them (the mask stage's fallback)."""
    if w.kpts is None:
        model = backends.pose
        t0 = time.perf_counter()
        track = model.detect_video(w.frames)
        w.seconds["pose"] = time.perf_counter() - t0
        w.kpts, w.people = track.kpts, track.people
        w.stages["pose"] = f"{model.name}-{model.version}"
        if w.masks is None:  # the mask stage's fallback; sidecar masks (they set stages["mask"]) win
            w.masks = track.masks
    w.frame_detected = L.body_detected(w.kpts)
    return w


def mask_and_crop(w: Window, cfg: DictConfig, backends) -> Window:
    """Person masks (sidecar, else the mask model, else the pose backend's, else MediaPipe selfie
    segmentation in the person's box), then the crop around the person over the clip, resized to the
    nearest-aspect bucket. Afterwards frames and masks are at clip resolution; `crop` is None (and the
    arrays dropped) when no person is visible in the window."""
    H, W = w.frames.shape[1:3]
    from_pose = w.masks is not None and "mask" not in w.stages  # not a sidecar's: the pose backend's
    if w.masks is None or from_pose:
        model = backends.mask
        if model is not None:
            t0 = time.perf_counter()
            w.masks = model.masks(w.frames, frame_boxes(w.kpts, H, W))
            w.seconds["mask"] = time.perf_counter() - t0
            w.stages["mask"] = f"{model.name}-{model.version}"
            if hasattr(model, "reseeds"):
                w.stages["mask_reseeds"] = int(model.reseeds)
        elif from_pose:
            w.stages["mask"] = w.stages["pose"]
        else:
            fallback = backends.fallback_mask
            t0 = time.perf_counter()
            w.masks = fallback.masks(w.frames, frame_boxes(w.kpts, H, W))
            w.seconds["mask"] = time.perf_counter() - t0
            w.stages["mask"] = f"{fallback.name}-{fallback.version}"
    box = clip_box(w.kpts, w.masks)
    if box is None:
        w.frames = w.masks = None
        return w
    bh, bw = choose_bucket(cfg.buckets, box, H, W, cfg.crop_margin)
    x0, y0, x1, y1 = crop_box(box, H, W, bw / bh, cfg.crop_margin)
    w.frames = np.stack([cv2.resize(f[y0:y1, x0:x1], (bw, bh), interpolation=cv2.INTER_AREA) for f in w.frames])
    w.masks = np.stack([cv2.resize(m[y0:y1, x0:x1].astype(np.uint8), (bw, bh), interpolation=cv2.INTER_NEAREST) > 0
                        for m in w.masks])  # fmt: skip
    k = w.kpts.copy()
    k[..., 0] = (k[..., 0] * W - x0) / (x1 - x0)
    k[..., 1] = (k[..., 1] * H - y0) / (y1 - y0)
    outside = (k[..., 0] < 0) | (k[..., 0] > 1) | (k[..., 1] < 0) | (k[..., 1] > 1) | (k[..., 2] <= 0)
    k[outside] = 0.0
    w.kpts, w.crop = k.astype(np.float32), [x0, y0, x1, y1]
    return w


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


# ------------------------------------------------------------------------------------ caption, encode


def caption(windows: list[Window], backends) -> list[Window]:
    """Captions for a batch of windows (of any inputs): the input's sidecar caption, else the caption
    model's (one batch over the windows that need it). Windows without a person are passed through."""
    need = [w for w in windows if w.crop is not None and w.info.get("caption") is None]
    for w in windows:
        if w.crop is not None and w.info.get("caption") is not None:
            w.caption, w.stages["caption"] = w.info["caption"], "sidecar-txt"
    if need:
        model = backends.caption
        t0 = time.perf_counter()
        found = [c.strip() for c in model([w.frames for w in need])]
        seconds = (time.perf_counter() - t0) / len(need)
        for w, text in zip(need, found, strict=True):
            w.caption, w.stages["caption"] = text, f"{model.name}-{model.version}"
            w.seconds["caption"] = seconds
            if not text:
                w.stages["caption_empty"] = model.name
    return windows


def person_count(people: np.ndarray, ratio: float) -> int:
    """The clip's person count for QC: 2 or more when at least `ratio` of the counted frames (people
    >= 0) show several people, else the most frequent count (0 or 1)."""
    counted = people[people >= 0]
    if len(counted) == 0:
        return 1
    if (counted >= 2).mean() >= ratio:
        return int(np.median(counted[counted >= 2]))
    return int(np.bincount(np.minimum(counted, 1)).argmax())


def encode(w: Window, cfg: DictConfig) -> Window:
    """The webdataset sample of a window with a person and a caption; the clip arrays are dropped."""
    if w.crop is None or not w.caption:
        w.frames = w.masks = None
        return w
    bh, bw = w.frames.shape[1:3]
    det = L.body_detected(w.kpts)
    stages = {k: w.stages[k] for k in ("pose", "mask", "caption")}
    qc = {"pose_detected_ratio": float(det.mean()), "mean_mask_area": float(w.masks.mean()),
          "person_count": person_count(w.people, cfg.several_people_ratio)}  # fmt: skip
    if "mask_reseeds" in w.stages:
        qc["mask_reseeds"] = w.stages["mask_reseeds"]
    meta = {
        "source": w.info["source"], "sha256": w.info["sha256"], "video_id": w.info["video_id"],
        "clip_index": w.index, "fps": w.info["fps"], "frame_indices": w.src.tolist(),
        "num_frames": int(cfg.num_frames), "original_size": w.info["original_size"], "crop_box": w.crop,
        "size": [bh, bw], "backends": stages, "split": w.info["split"], "qc": qc,
    }  # fmt: skip
    key = sample_key(w.info["video_id"], w.index)
    pose_video = render_video(w.kpts, bh, bw)
    w.sample = encode_sample(key, w.frames, pose_video, w.masks, w.kpts, w.caption, meta, w.info["fps"])
    w.frames = w.masks = None
    return w


def guarded(step, w: Window) -> Window | Failed:
    """Run one stage (a function of a window) on a window; an error becomes the window's `Failed` (its
    input is rejected with the reason, the run goes on), a UserError a fatal one (the run stops with
    its line)."""
    try:
        return step(w)
    except UserError as err:
        return Failed(w.video, w.index, str(err), fatal=True)
    except Exception as err:  # noqa: BLE001 - a long run survives any bad item; it is recorded
        return Failed(w.video, w.index, f"failed: {type(err).__name__}: {err}")


# ------------------------------------------------------------------------------------------ assembler


@dataclass
class Outcome:
    """A finished input: its samples in clip order, or the reason it is rejected."""

    video: int
    samples: list[dict[str, Any]] | None
    reject: str | None
    seconds: dict[str, float]
    staged: list[list[str]] | None = None  # Ray engine: [key, file] per sample, staged for the writers

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.staged] if self.staged is not None else [s["__key__"] for s in self.samples]


def manifest_row(item: Item, outcome: Outcome, shard: str) -> dict[str, Any]:
    """The manifest line of a finished input, written once its shard is in place."""
    return {"source": str(item.path), "video_id": item.video_id, "split": item.split, "shard": shard,
            "keys": outcome.keys}  # fmt: skip


class Assembler:
    """Collects the windows of each input until its End has come and every window it announced is
    back; then applies the input-level checks. Windows may arrive in any order and interleaved."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self._windows: dict[int, list[Window]] = {}
        self._failed: dict[int, list[Failed]] = {}
        self._end: dict[int, End] = {}

    def add(self, obj: Window | End | Failed) -> Outcome | None:
        if isinstance(obj, Failed):
            if obj.fatal:
                raise UserError(obj.reason)
            self._failed.setdefault(obj.video, []).append(obj)
        elif isinstance(obj, End):
            self._end[obj.video] = obj
        else:
            self._windows.setdefault(obj.video, []).append(obj)
        v = obj.video
        end = self._end.get(v)
        if end is None or len(self._windows.get(v, [])) + len(self._failed.get(v, [])) < end.windows:
            return None
        return self._finish(v, end, sorted(self._windows.pop(v, []), key=lambda w: w.index),
                            self._failed.pop(v, []))  # fmt: skip

    def _finish(self, v: int, end: End, windows: list[Window], failed: list[Failed]) -> Outcome:
        del self._end[v]
        seconds: dict[str, float] = {}
        for w in windows:
            for k, s in w.seconds.items():
                seconds[k] = seconds.get(k, 0.0) + s
        reject = end.reject or (min(failed, key=lambda f: f.index).reason if failed else None) or self._check(windows)
        if reject is not None:
            return Outcome(v, None, reject, seconds)
        staged = [w.staged for w in windows if w.staged is not None]
        return Outcome(v, [w.sample for w in windows if w.sample is not None], None, seconds, staged or None)

    def _check(self, windows: list[Window]) -> str | None:
        detected: dict[int, bool] = {}  # by resampled frame (overlapping windows count once)
        people: dict[int, int] = {}
        for w in windows:
            for i, (d, p) in enumerate(zip(w.frame_detected, w.people, strict=True)):
                detected[w.start + i], people[w.start + i] = bool(d), int(p)
        ratio = float(np.mean(list(detected.values())))
        if ratio < self.cfg.min_pose_ratio:
            return f"no person: body found in {ratio:.0%} of frames"
        counts = np.array(list(people.values()))
        count = person_count(counts, self.cfg.several_people_ratio)
        if count >= 2:
            return f"several people: {count} people in {(counts >= 2).sum()} of {(counts >= 0).sum()} counted frames"
        with_person = [w for w in windows if w.crop is not None]
        if not with_person:
            return "no person in any clip"
        empty = [w for w in with_person if not w.caption]
        if empty:
            return f"no caption: {empty[0].stages.get('caption_empty', 'the caption model')} returned an empty caption"
        return None


# ------------------------------------------------------------------- rows (the Ray engine's transport)

ROW_ARRAYS = ("src", "frames", "kpts", "people", "masks", "frame_detected")  # a Window's array fields


def to_row(obj: Window | End | Failed) -> dict[str, Any]:
    """A stage object as a flat row: {kind, video, meta (JSON), a_<field> (the raw bytes of each array
    field; empty when absent)}. One schema for every row, no pickle and no container format: the arrays
    travel as their own bytes (boolean masks packed 8 pixels to a byte), their dtype and shape in meta.
    An encoded sample does not travel in a row (the Ray engine stages it on the shared output)."""
    meta: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, np.ndarray):
            arrays[f.name] = value
        elif f.name == "sample" and value is not None:
            raise ValueError("an encoded sample does not travel in a row: stage it (ray_engine.stage_sample)")
        else:
            meta[f.name] = value
    meta["arrays"] = {k: [a.dtype.str, list(a.shape)] for k, a in arrays.items()}
    row: dict[str, Any] = {"kind": type(obj).__name__, "video": int(obj.video), "meta": json.dumps(meta)}
    for name in ROW_ARRAYS:
        a = arrays.get(name)
        row[f"a_{name}"] = b"" if a is None else (np.packbits(a).tobytes() if a.dtype.kind == "b" else a.tobytes())
    return row


def from_row(row: dict[str, Any]) -> Window | End | Failed:
    cls = {"Window": Window, "End": End, "Failed": Failed}[str(row["kind"])]
    kwargs: dict[str, Any] = json.loads(row["meta"])
    for name, (dtype, shape) in kwargs.pop("arrays", {}).items():
        buf, dtype = row[f"a_{name}"], np.dtype(dtype)
        if dtype.kind == "b":
            a = np.unpackbits(np.frombuffer(buf, np.uint8), count=int(np.prod(shape))).astype(bool)
        else:
            a = np.frombuffer(buf, dtype).copy()  # writable, as the local engine's arrays are
        kwargs[name] = a.reshape(shape)
    return cls(**kwargs)
