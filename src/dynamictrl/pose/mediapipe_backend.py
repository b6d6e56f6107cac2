"""Offline default pose and mask backend: MediaPipe Holistic (0.10.21, model_complexity=1).

Its tflite files ship inside the wheel, so it runs with no download. Body (BlazePose 33 points),
hands (21 each, same order as OpenPose) and face mesh (468 points, 68 of them picked to match the
iBUG layout) are mapped to the 134-point layout; the segmentation mask gives the person mask.
"""

from __future__ import annotations

import numpy as np

from dynamictrl.pose import layout as L

# BlazePose index for each OpenPose-18 point (None: the neck, mean of the shoulders).
_BODY = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
# Feet: left big toe, left small toe, left heel, right big toe, right small toe, right heel.
# BlazePose has one toe point per foot ("foot index"); the small toe is left undetected.
_FEET = (31, None, 29, 32, None, 30)
# Face-mesh indices approximating the 68 iBUG landmarks (jaw, brows, nose, eyes, mouth).
_FACE68 = (
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87,
)  # fmt: skip


class MediaPipeHolistic:
    """Per-video tracker: call `reset()` between videos, then `__call__` on each frame in order."""

    name = "mediapipe-holistic"

    def __init__(self, model_complexity: int = 1, min_detection_confidence: float = 0.5,
                 segmentation: bool = True):  # fmt: skip
        import mediapipe as mp

        self.version = mp.__version__
        self._mp = mp
        self._kwargs = dict(
            static_image_mode=False, model_complexity=model_complexity, enable_segmentation=segmentation,
            min_detection_confidence=min_detection_confidence, min_tracking_confidence=0.5,
        )  # fmt: skip
        self._model = None

    def reset(self) -> None:
        """Start a new video (tracking state is per video)."""
        if self._model is not None:
            self._model.close()
        self._model = self._mp.solutions.holistic.Holistic(**self._kwargs)

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(H, W, 3) uint8 RGB -> ((134, 3) keypoints, (H, W) bool mask or None when no person)."""
        if self._model is None:
            self.reset()
        res = self._model.process(frame)
        k = np.zeros((L.NUM_KEYPOINTS, 3), np.float32)
        if res.pose_landmarks is None:
            return k, None
        pts = np.array([(p.x, p.y, p.visibility) for p in res.pose_landmarks.landmark], np.float32)
        for i, j in enumerate(_BODY):
            if j is None:
                k[i] = (*((pts[11, :2] + pts[12, :2]) / 2), min(pts[11, 2], pts[12, 2]))
            else:
                k[i] = pts[j]
        for i, j in enumerate(_FEET):
            if j is not None:
                k[18 + i] = pts[j]
        if res.face_landmarks is not None:
            face = np.array([(p.x, p.y) for p in res.face_landmarks.landmark], np.float32)
            k[L.FACE, :2] = face[list(_FACE68)]
            k[L.FACE, 2] = 1.0
        for hand, part in ((res.left_hand_landmarks, L.LEFT_HAND), (res.right_hand_landmarks, L.RIGHT_HAND)):
            if hand is not None:
                k[part, :2] = [(p.x, p.y) for p in hand.landmark]
                k[part, 2] = 1.0
        outside = (k[:, 0] < 0) | (k[:, 0] > 1) | (k[:, 1] < 0) | (k[:, 1] > 1)
        k[outside, 2] = 0.0
        k[k[:, 2] <= 0, :2] = 0.0
        mask = None if res.segmentation_mask is None else res.segmentation_mask > 0.5
        return k, mask

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None
