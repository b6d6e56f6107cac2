"""Pose accuracy: poses re-extracted from the generated video against the driving poses.

PCK: the fraction of body keypoints visible in the driving pose whose re-extracted position lies
within `alpha` x the driving person's box size (the larger side) of it; a keypoint that the pose
backend misses counts as wrong. Mean distance: over keypoints visible in both, in box-size units.
"""

from __future__ import annotations

import numpy as np

from dynamictrl.pose import layout as L


def pck(pred: np.ndarray, target: np.ndarray, alpha: float = 0.1, threshold: float = 0.3,
        part: slice = L.BODY) -> dict[str, float]:  # fmt: skip
    """pred, target: (T, 134, 3) normalised keypoints of the same frames (x, y in one canvas)."""
    hits, total, dists = 0, 0, []
    for p, t in zip(pred, target, strict=True):
        box = L.person_box(t[None], threshold)
        if box is None:
            continue
        size = max(box[2] - box[0], box[3] - box[1], 1e-6)
        vis = t[part, 2] > threshold
        found = p[part, 2] > threshold
        d = np.linalg.norm(p[part, :2] - t[part, :2], axis=1) / size
        hits += int((vis & found & (d <= alpha)).sum())
        total += int(vis.sum())
        dists += d[vis & found].tolist()
    return {"pck": hits / total if total else float("nan"),
            "mean_distance": float(np.mean(dists)) if dists else float("nan"), "keypoints": total}  # fmt: skip
