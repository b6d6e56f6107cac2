"""Retargeting a driving skeleton to the reference person (the pose alignment users ask for most).

Limb directions come from the driving video; limb lengths, overall scale and position come from the
reference. Each body limb is rescaled by (reference length / first-frame driving length) and the
skeleton is rebuilt outward from the neck, whose path is the driving neck's path, scaled and shifted
so that it starts at the reference's neck. Hands follow their wrists, feet their ankles and the face
its nose, scaled like the limb they hang from. A driving body whose first pose has the reference's
posture therefore lands exactly on the reference's own keypoints.

An undetected point (score 0, stored at (0, 0)) has no position to build from: its children in the
tree (and the parts attached to it) stay undetected and are not drawn. A missing neck is replaced by
the centre of the visible points as the root the skeleton is built from.

All coordinates here are pixels of one canvas (the output frame); callers convert from normalised.
"""

from __future__ import annotations

import numpy as np

from dynamictrl.pose import layout as L

# Body tree over OpenPose-18, as (parent, child) in build order from the neck (1).
BODY_TREE = (
    (1, 0), (0, 14), (0, 15), (14, 16), (15, 17),  # head
    (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7),  # arms
    (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),  # legs
)  # fmt: skip
# Parts that move rigidly with a body point, scaled like the limb that ends there.
ATTACHED = ((L.LEFT_HAND, 7, (6, 7)), (L.RIGHT_HAND, 4, (3, 4)), (slice(18, 21), 13, (12, 13)),
            (slice(21, 24), 10, (9, 10)), (L.FACE, 0, (1, 0)))  # fmt: skip


def _length(k: np.ndarray, a: int, b: int, threshold: float) -> float | None:
    if k[a, 2] <= threshold or k[b, 2] <= threshold:
        return None
    return float(np.linalg.norm(k[a, :2] - k[b, :2]))


def body_height(k: np.ndarray, threshold: float = 0.3) -> float | None:
    """Neck-to-ankle-ish extent of the visible body points, in pixels."""
    pts = k[L.BODY][k[L.BODY, 2] > threshold, :2]
    return float(np.ptp(pts[:, 1]) + 1e-6) if len(pts) >= 2 else None


def retarget(driving: np.ndarray, reference: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """Map driving keypoints onto the reference person.

    Args:
        driving: (T, 134, 3) driving keypoints in canvas pixels (x, y, score).
        reference: (134, 3) the reference's keypoints in the same canvas.

    Returns:
        (T, 134, 3) retargeted keypoints; scores are the driving ones (a point hidden in the driving
        video stays hidden).
    """
    first = driving[0]
    # Overall scale: the ratio of limb lengths over all limbs visible in both, robust to a few.
    ratios = {}
    for a, b in BODY_TREE:
        lr, ld = _length(reference, a, b, threshold), _length(first, a, b, threshold)
        if lr and ld and ld > 1e-6:
            ratios[(a, b)] = lr / ld
    if ratios:
        scale = float(np.median(list(ratios.values())))
    else:
        hr, hd = body_height(reference, threshold), body_height(first, threshold)
        scale = hr / hd if hr and hd else 1.0
    root_ref = reference[1, :2] if reference[1, 2] > threshold else _centre(reference, threshold)
    root_drv0 = first[1, :2] if first[1, 2] > threshold else _centre(first, threshold)

    out = driving.copy()
    for t, frame in enumerate(driving):
        frame, new = frame.copy(), frame.copy()
        root = frame[1, :2] if frame[1, 2] > threshold else _centre(frame, threshold)
        frame[1, :2] = root  # the position the neck's children are measured from
        new[1, :2] = root_ref + scale * (root - root_drv0)
        known = new[:, 2] > 0
        known[1] = True  # the root always has a position (the neck, or the centre standing in for it)
        for a, b in BODY_TREE:
            if not known[a]:  # nothing to hang this point from: it stays undetected
                new[b, 2], known[b] = 0.0, False
                continue
            r = ratios.get((a, b), scale)
            new[b, :2] = new[a, :2] + r * (frame[b, :2] - frame[a, :2])
        for part, anchor, limb in ATTACHED:
            if not known[anchor]:
                new[part, 2] = 0.0
                continue
            r = ratios.get(limb, scale)
            new[part, :2] = new[anchor, :2] + r * (frame[part, :2] - frame[anchor, :2])
        new[new[:, 2] <= 0, :2] = 0.0
        out[t] = new
    return out


def _centre(k: np.ndarray, threshold: float) -> np.ndarray:
    pts = k[k[:, 2] > threshold, :2]
    return pts.mean(0) if len(pts) else np.zeros(2, np.float32)


def keypoint_error(a: np.ndarray, b: np.ndarray, threshold: float = 0.3) -> float:
    """Mean distance between two (134, 3) poses over points visible in both (same units as input)."""
    ok = (a[:, 2] > threshold) & (b[:, 2] > threshold)
    return float(np.linalg.norm(a[ok, :2] - b[ok, :2], axis=1).mean()) if ok.any() else float("inf")
