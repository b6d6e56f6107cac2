"""The 134-point whole-body layout shared by every pose backend (DESIGN.md §2).

Order: 18 OpenPose body points, 6 feet, 68 face, 21 left hand, 21 right hand.
Arrays are float32 (..., 134, 3): x, y normalised to [0, 1], score in [0, 1]; an undetected
point has score 0.
"""

from __future__ import annotations

import numpy as np

NUM_BODY, NUM_FEET, NUM_FACE, NUM_HAND = 18, 6, 68, 21
NUM_KEYPOINTS = NUM_BODY + NUM_FEET + NUM_FACE + 2 * NUM_HAND  # 134

BODY = slice(0, 18)
FEET = slice(18, 24)
FACE = slice(24, 92)
LEFT_HAND = slice(92, 113)
RIGHT_HAND = slice(113, 134)

BODY_NAMES = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
FEET_NAMES = ("left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel")

# OpenPose-18 index -> COCO-17 index (the neck, 1, is the mean of the shoulders).
OPENPOSE_FROM_COCO = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# OpenPose BODY_25 -> OpenPose-18 body indices, and BODY_25's foot points in our feet order.
BODY25_TO_18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
BODY25_FEET = (19, 20, 21, 22, 23, 24)

# Limbs as pairs of OpenPose-18 indices, and the colour each is drawn in (DWPose / ControlNet style).
BODY_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
    (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
BODY_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
# Feet: ankle -> big toe, ankle -> small toe, ankle -> heel, in feet-local indices (ankles are body 13 / 10).
FEET_LIMBS = ((13, 0), (13, 1), (13, 2), (10, 3), (10, 4), (10, 5))
# Hand: wrist (0) to each finger's four joints.
HAND_EDGES = tuple(
    (0 if j == 0 else 1 + 4 * f + j - 1, 1 + 4 * f + j) for f in range(5) for j in range(4)
)


def empty(num_frames: int) -> np.ndarray:
    """All-undetected keypoints, (T, 134, 3) float32."""
    return np.zeros((num_frames, NUM_KEYPOINTS, 3), dtype=np.float32)


def from_coco_wholebody(kpts: np.ndarray, scores: np.ndarray, width: int, height: int) -> np.ndarray:
    """COCO-WholeBody 133 points in pixels (DWPose's native output) -> our 134-point layout.

    Args:
        kpts: (133, 2) pixel coordinates.
        scores: (133,) confidences in [0, 1].
    """
    out = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    xy = kpts.astype(np.float32) / np.array([width, height], dtype=np.float32)
    for i, j in enumerate(OPENPOSE_FROM_COCO):
        if j is None:  # neck
            s = min(scores[5], scores[6])
            out[i] = (*((xy[5] + xy[6]) / 2), s)
        else:
            out[i] = (*xy[j], scores[j])
    out[18:134, :2] = xy[17:133]
    out[18:134, 2] = scores[17:133]
    return _clean(out)


def from_openpose_json(doc: dict, width: int | None = None, height: int | None = None) -> list[np.ndarray]:
    """An OpenPose JSON document (one frame) -> one (134, 3) array per person.

    Accepts BODY_25 or COCO-18 bodies and the optional face/hand arrays. Coordinates are in pixels
    unless all lie within [0, 1]; the canvas size comes from the document
    (`canvas_width`/`canvas_height`) or from the arguments.
    """
    width = doc.get("canvas_width", width)
    height = doc.get("canvas_height", height)
    people = []
    for person in doc.get("people", []):
        out = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
        body = np.asarray(person.get("pose_keypoints_2d", []), dtype=np.float32).reshape(-1, 3)
        if len(body) == 25:
            out[BODY] = body[list(BODY25_TO_18)]
            out[FEET] = body[list(BODY25_FEET)]
        elif len(body) == 18:
            out[BODY] = body
        elif len(body):
            raise ValueError(f"OpenPose body has {len(body)} points; expected 18 or 25")
        for key, part in (("face_keypoints_2d", FACE), ("hand_left_keypoints_2d", LEFT_HAND),
                          ("hand_right_keypoints_2d", RIGHT_HAND)):  # fmt: skip
            arr = np.asarray(person.get(key, []), dtype=np.float32).reshape(-1, 3)
            n = part.stop - part.start
            if len(arr) >= n:
                out[part] = arr[:n]
        if "foot_keypoints_2d" in person:
            out[FEET] = np.asarray(person["foot_keypoints_2d"], dtype=np.float32).reshape(-1, 3)[:6]
        visible = out[:, 2] > 0
        if visible.any() and out[visible, :2].max() > 1.0 + 1e-6:
            if not width or not height:
                raise ValueError("OpenPose keypoints are in pixels but the canvas size is unknown")
            out[:, 0] /= width
            out[:, 1] /= height
        people.append(_clean(out))
    return people


def to_openpose_json(kpts: np.ndarray, width: int, height: int) -> dict:
    """One person's (134, 3) keypoints -> an OpenPose JSON document in pixels (COCO-18 body)."""
    px = kpts.copy()
    px[:, 0] *= width
    px[:, 1] *= height
    px[px[:, 2] <= 0] = 0.0
    person = {
        "pose_keypoints_2d": px[BODY].reshape(-1).round(3).tolist(),
        "foot_keypoints_2d": px[FEET].reshape(-1).round(3).tolist(),
        "face_keypoints_2d": px[FACE].reshape(-1).round(3).tolist(),
        "hand_left_keypoints_2d": px[LEFT_HAND].reshape(-1).round(3).tolist(),
        "hand_right_keypoints_2d": px[RIGHT_HAND].reshape(-1).round(3).tolist(),
    }
    return {"version": 1.3, "canvas_width": width, "canvas_height": height, "people": [person]}


def _clean(out: np.ndarray) -> np.ndarray:
    """Zero the coordinates of undetected points and clip scores to [0, 1]."""
    out[:, 2] = np.clip(out[:, 2], 0.0, 1.0)
    out[out[:, 2] <= 0, :2] = 0.0
    return out


def person_box(kpts: np.ndarray, threshold: float = 0.3) -> tuple[float, float, float, float] | None:
    """Normalised (x0, y0, x1, y1) box around the visible body, feet and hand points of (..., 134, 3)."""
    pts = kpts.reshape(-1, NUM_KEYPOINTS, 3)[:, : FACE.start].reshape(-1, 3)
    hands = kpts.reshape(-1, NUM_KEYPOINTS, 3)[:, LEFT_HAND.start :].reshape(-1, 3)
    pts = np.concatenate([pts, hands])
    pts = pts[pts[:, 2] > threshold]
    if len(pts) == 0:
        return None
    x0, y0 = pts[:, :2].min(0)
    x1, y1 = pts[:, :2].max(0)
    return float(x0), float(y0), float(x1), float(y1)


def body_detected(kpts: np.ndarray, threshold: float = 0.3, min_points: int = 4) -> np.ndarray:
    """(T,) bool: frames where at least `min_points` body points are detected."""
    return (kpts[..., BODY, 2] > threshold).sum(-1) >= min_points
