"""Production pose backend: DWPose (YOLOX person detector + dw-ll_ucoco_384 whole-body) through rtmlib.

Both ONNX files come from local paths (DWPose's release: `yolox_l.onnx`, `dw-ll_ucoco_384.onnx`) and
run on onnxruntime; rtmlib supplies the letterbox and YOLOX decode + NMS, the bbox -> affine crop and
the SimCC decode, so the numbers are those of rtmlib's `Wholebody` on the same files. Frames go in as
given, RGB, with no channel swap: ControlNet's DWPose annotator likewise passes its RGB input unconverted
(rtmlib's examples feed OpenCV BGR).

Per frame: every person box over `det_score_threshold` is counted, the largest one is cropped and its
133 COCO-WholeBody points are mapped to the 134-point layout (`layout.from_coco_wholebody`). Frames
are processed `batch_size` at a time: one onnxruntime call per batch where a graph's batch axis is
dynamic, one per frame where it is fixed at 1 (as in the public files).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from dynamictrl.errors import UserError
from dynamictrl.pose import layout as L
from dynamictrl.pose.base import PoseTrack

log = logging.getLogger(__name__)
PERSON = 0  # COCO class index


class DWPose:
    """DWPose whole-body pose from local ONNX files.

    Args:
        det_model: YOLOX detector .onnx (raw (N, anchors, 5 + classes) predictions, as DWPose's yolox_l).
        pose_model: DWPose / RTMPose SimCC .onnx with outputs simcc_x (N, 133, 2W), simcc_y (N, 133, 2H).
        det_input_size: detector input (H, W).
        pose_input_size: pose input (W, H), rtmlib's order: (288, 384) for dw-ll_ucoco_384.
        device: "auto" (CUDA when onnxruntime has it, else CPU), "cpu", "cuda" or "cuda:N".
        batch_size: frames per onnxruntime call on graphs with a dynamic batch axis.
        det_score_threshold: objectness x person score a box needs to count as a person.
        nms_threshold: IoU above which YOLOX boxes are merged.
    """

    name = "dwpose-rtmlib"

    def __init__(self, det_model: str = "/models/dwpose/yolox_l.onnx",
                 pose_model: str = "/models/dwpose/dw-ll_ucoco_384.onnx",
                 det_input_size: Sequence[int] = (640, 640), pose_input_size: Sequence[int] = (288, 384),
                 device: str = "auto", batch_size: int = 8, det_score_threshold: float = 0.5,
                 nms_threshold: float = 0.45):  # fmt: skip
        from rtmlib import YOLOX, RTMPose

        if batch_size < 1:
            raise UserError(f"pose.batch_size={batch_size}: must be at least 1")
        self.det_path, self.pose_path = _existing(det_model, "det_model"), _existing(pose_model, "pose_model")
        self.det_input_size = tuple(int(v) for v in det_input_size)
        self.pose_input_size = tuple(int(v) for v in pose_input_size)
        self.batch_size = batch_size
        self.device = _resolve_device(device)
        # det_mode "human" would keep boxes of every class: take them all with their class, keep persons
        self._det = _load("det_model", self.det_path, YOLOX, model_input_size=self.det_input_size,
                          det_mode="multiclass", nms_thr=nms_threshold, score_thr=det_score_threshold,
                          device=self.device)  # fmt: skip
        self._pose = _load("pose_model", self.pose_path, RTMPose, model_input_size=self.pose_input_size,
                           device=self.device)  # fmt: skip
        self._det_batched = _check_graph(self._det.session, "det_model", self.det_path, self.det_input_size,
                                         "det_input_size")  # fmt: skip
        self._pose_batched = _check_graph(self._pose.session, "pose_model", self.pose_path,
                                          self.pose_input_size[::-1], "pose_input_size")  # fmt: skip
        out = self._det.session.get_outputs()[0].shape
        if isinstance(out[-1], int) and out[-1] <= 5:
            # graphs with NMS inside (mmdeploy end2end: dets (N, 100, 5) + labels) are another format
            raise UserError(f"pose.det_model={self.det_path}: outputs {out}; expected raw YOLOX predictions "
                            "(N, anchors, 5 + classes) as in DWPose's yolox_l.onnx")  # fmt: skip

    @property
    def det_batch_size(self) -> int:
        """Frames per detector call: `batch_size` on a dynamic-batch graph, else 1."""
        return self.batch_size if self._det_batched else 1

    @property
    def pose_batch_size(self) -> int:
        """Person crops per pose-model call: `batch_size` on a dynamic-batch graph, else 1."""
        return self.batch_size if self._pose_batched else 1

    @cached_property
    def version(self) -> str:
        """rtmlib and onnxruntime versions and each model file's name and sha256 prefix."""
        from importlib.metadata import version

        files = ", ".join(f"{p.name} sha256:{_sha256(p)[:12]}" for p in (self.det_path, self.pose_path))
        return f"rtmlib {version('rtmlib')}, onnxruntime {version('onnxruntime')}, {files}"

    def detect_video(self, frames: np.ndarray) -> PoseTrack:
        """(T, H, W, 3) uint8 RGB -> PoseTrack: kpts (T, 134, 3) of the largest person, people (T,)
        boxes over the score threshold, masks None. A frame with no person has all points undetected."""
        self._check_open()
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
        t, h, w = frames.shape[:3]
        kpts, people = L.empty(t), np.zeros(t, np.int64)
        for start in range(0, t, self.batch_size):
            chunk = frames[start : start + self.batch_size]
            boxes = self._detect(chunk)
            people[start : start + len(chunk)] = [len(b) for b in boxes]
            found = [i for i, b in enumerate(boxes) if len(b)]
            if not found:
                continue
            main = [max(boxes[i], key=lambda b: (b[2] - b[0]) * (b[3] - b[1])) for i in found]
            points, scores = self._estimate([chunk[i] for i in found], main)
            for i, p, s in zip(found, points, scores, strict=True):
                kpts[start + i] = _to_layout(p, s, w, h)
        return PoseTrack(kpts=kpts, people=people, masks=None)

    def _detect(self, frames: np.ndarray) -> list[np.ndarray]:
        """(B, H, W, 3) uint8 -> per frame, (n, 4) person boxes (x0, y0, x1, y1) in frame pixels."""
        prepared = [self._det.preprocess(f) for f in frames]  # letterbox to det_input_size, 114 padding
        x = np.stack([img for img, _ in prepared]).transpose(0, 3, 1, 2)  # (B, 3, h, w), pixels 0-255
        (pred,) = _run(self._det.session, x, self.det_batch_size)  # (B, anchors, 85)
        boxes = []
        for i, (_, ratio) in enumerate(prepared):
            b, cls = self._det.postprocess(pred[i : i + 1], ratio)  # grid decode + NMS, rtmlib's
            # float64 as rtmlib keeps them: float32 moves the crop by a fraction of a pixel
            boxes.append(np.asarray(b, np.float64).reshape(-1, 4)[np.asarray(cls) == PERSON])
        return boxes

    def _estimate(self, frames: list[np.ndarray], boxes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One box per frame -> (n, 133, 2) pixel points and (n, 133) SimCC scores."""
        crops = [self._pose.preprocess(f, b) for f, b in zip(frames, boxes, strict=True)]  # 1.25x padded
        x = np.stack([img for img, _, _ in crops]).transpose(0, 3, 1, 2)  # (n, 3, H, W), normalised
        simcc = _run(self._pose.session, x, self.pose_batch_size)  # (n, 133, 2W), (n, 133, 2H)
        center = np.stack([c for _, c, _ in crops])[:, None]  # (n, 1, 2): broadcasts over the points
        scale = np.stack([s for _, _, s in crops])[:, None]
        return self._pose.postprocess(simcc, center, scale)

    def reset(self) -> None:
        """Start a new video: nothing to do, every frame is detected afresh."""

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, None]:
        """(H, W, 3) uint8 RGB -> ((134, 3) keypoints of the largest person, None: no mask)."""
        return self.detect_video(np.asarray(frame)[None]).kpts[0], None

    def close(self) -> None:
        """Release both onnxruntime sessions (GPU memory included)."""
        self._det = self._pose = None

    def _check_open(self) -> None:
        if self._det is None:
            raise RuntimeError("DWPose backend is closed")


def _existing(path: str, key: str) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise UserError(f"pose.{key}={path}: no such file")
    return p


def _resolve_device(device: str) -> str:
    """pose.device (auto, cpu, cuda, cuda:N) -> the rtmlib device onnxruntime can serve."""
    import onnxruntime

    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not has_cuda:
            raise UserError(f"pose.device={device}: onnxruntime has no CUDAExecutionProvider "
                            "(install onnxruntime-gpu), or set pose.device=cpu")  # fmt: skip
        return device if device != "cuda" else f"cuda:{_local_gpu()}"
    if device != "auto":
        raise UserError(f"pose.device={device}: expected auto, cpu, cuda or cuda:N")
    visible = _gpu_visible()
    if has_cuda and visible:  # the GPU build lists its CUDA provider on machines without a GPU too
        return f"cuda:{_local_gpu()}"  # rtmlib passes N to the CUDA provider as device_id
    if visible:
        _loud("a GPU is visible but onnxruntime has no CUDAExecutionProvider (is onnxruntime-gpu "
              "installed?): DWPose runs on the CPU, many times slower")  # fmt: skip
    return "cpu"


def _local_gpu() -> int:
    """This rank's GPU index (LOCAL_RANK / SLURM_LOCALID), wrapped around the GPUs torch sees."""
    from dynamictrl.utils.device import local_rank

    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        count = 0
    return local_rank() % count if count else local_rank()


def _gpu_visible() -> bool:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return env.strip() not in ("", "-1")
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _loud(message: str) -> None:
    # both: warnings reach interactive users and pytest, the log reaches cluster job logs
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    log.warning(message)


def _load(key: str, path: Path, tool, device: str, **kwargs):
    """An rtmlib tool on onnxruntime, with its "load ..." print kept off stdout."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = tool(str(path), backend="onnxruntime", device=device, **kwargs)
    except Exception as err:  # onnxruntime's errors for a corrupt or non-ONNX file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"pose.{key}={path}: cannot load it as an ONNX model ({first})") from err
    if device.startswith("cuda") and "CUDAExecutionProvider" not in model.session.get_providers():
        # onnxruntime falls back to CPU when the CUDA libraries do not load
        _loud(f"pose.{key}: onnxruntime could not start CUDA (see its log above): DWPose runs on the CPU")
    log.info("pose: loaded %s on %s", path, model.session.get_providers()[0])
    return model


def _check_graph(session, key: str, path: Path, size_hw: tuple[int, int], size_key: str) -> bool:
    """Check the graph's (N, 3, H, W) input against the configured size; True when N is dynamic."""
    shape = session.get_inputs()[0].shape
    if len(shape) != 4:
        raise UserError(f"pose.{key}={path}: input shape {shape}, expected (N, 3, H, W)")
    fixed_hw = tuple(d for d in shape[2:] if isinstance(d, int))
    if len(fixed_hw) == 2 and fixed_hw != tuple(size_hw):
        raise UserError(f"pose.{key}={path}: the graph takes H, W = {fixed_hw}, but pose.{size_key} "
                        f"gives H, W = {tuple(size_hw)}")  # fmt: skip
    if isinstance(shape[0], int) and shape[0] != 1:
        raise UserError(f"pose.{key}={path}: fixed batch size {shape[0]}; expected 1 or dynamic")
    return not isinstance(shape[0], int)


def _run(session, x: np.ndarray, batch: int) -> list[np.ndarray]:
    """Run `session` on (N, ...) inputs `batch` at a time -> its outputs, each (N, ...)."""
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(x, np.float32)
    parts = [session.run(None, {name: x[i : i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate(outs) for outs in zip(*parts, strict=True)]


def _to_layout(points: np.ndarray, scores: np.ndarray, width: int, height: int) -> np.ndarray:
    """(133, 2) pixels + (133,) scores -> (134, 3) normalised; points outside the frame (the crop is
    padded past the box) are undetected, as the layout keeps x, y in [0, 1]."""
    k = L.from_coco_wholebody(points, scores, width, height)
    outside = ((k[:, :2] < 0) | (k[:, :2] > 1)).any(1)
    k[outside] = 0.0
    return k


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
