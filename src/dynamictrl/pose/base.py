"""The contracts every preprocessing backend meets (pose, mask, caption), and small shared helpers.

Backends are plain classes built by Hydra from `conf/{pose,mask,caption}/*.yaml`. Each loads its model
once, in `__init__` or on first use, and works on one whole video (or a batch of clips) per call, so
that a batched model sees many frames at once. Each has `name` and `version` (recorded in the shard's
`json` under `backends`) and `close()`.

    pose:    backend.detect_video(frames (T, H, W, 3) uint8 RGB) -> PoseTrack
    mask:    backend.masks(frames (T, H, W, 3) uint8, boxes (T, 4) float pixels, NaN rows = no person)
                 -> (T, H, W) bool
    caption: backend(clips: list of (T, H, W, 3) uint8) -> list[str], one caption per clip

A backend raises `dynamictrl.errors.UserError` for a configuration problem (a weight path that does
not exist), which stops the run with one line, and any other exception for a bad input, which
rejects that input only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynamictrl.pose import layout as L


@dataclass
class PoseTrack:
    """One video's poses.

    kpts: (T, 134, 3) float32, the main person (the largest one in each frame), layout of `layout.py`.
    people: (T,) int, how many people the backend saw in each frame (-1: the backend cannot count).
    masks: (T, H, W) bool person masks when the backend segments as it detects (MediaPipe), else None.
    """

    kpts: np.ndarray
    people: np.ndarray
    masks: np.ndarray | None = None


def frame_boxes(kpts: np.ndarray, height: int, width: int, threshold: float = 0.3,
                margin: float = 0.05) -> np.ndarray:  # fmt: skip
    """(T, 134, 3) keypoints -> (T, 4) pixel boxes (x0, y0, x1, y1) around each frame's visible points
    (face included), grown by `margin` of the box size and clipped to the frame; NaN rows where no
    point is visible. The seed boxes of the mask trackers."""
    out = np.full((len(kpts), 4), np.nan, np.float32)
    for i, k in enumerate(kpts):
        pts = k[k[:, 2] > threshold, :2]
        if len(pts) < 2:
            continue
        (x0, y0), (x1, y1) = pts.min(0) * (width, height), pts.max(0) * (width, height)
        mx, my = margin * (x1 - x0), margin * (y1 - y0)
        out[i] = (max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, width - 1), min(y1 + my, height - 1))
    return out


def main_person(candidates: list[np.ndarray]) -> np.ndarray:
    """The largest (by visible-body box area) of several (134, 3) people; all-undetected if none."""
    if not candidates:
        return L.empty(1)[0]

    def area(k: np.ndarray) -> float:
        box = L.person_box(k[None])
        return 0.0 if box is None else (box[2] - box[0]) * (box[3] - box[1])

    return max(candidates, key=area)
