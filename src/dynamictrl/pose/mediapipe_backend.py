"""Offline default pose and mask backend: MediaPipe Holistic (0.10.21, model_complexity=1).

Its tflite files ship inside the wheel, so it runs with no download. Body (BlazePose 33 points),
hands (21 each, same order as OpenPose) and face mesh (468 points, 68 of them picked to match the
iBUG layout) are mapped to the 134-point layout; the segmentation mask gives the person mask.

Holistic tracks one person. To tell a clip with several people, faces are counted with MediaPipe's
full-range face detector (also inside the wheel) on every `count_every`-th frame: a dancer seen from
behind counts as nobody there, so the count is a lower bound, and the QC takes it with that grain.
"""

from __future__ import annotations

import numpy as np

from dynamictrl.pose import layout as L
from dynamictrl.pose.base import PoseTrack

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
                 segmentation: bool = True, count_people: bool = True, count_every: int = 4,
                 face_confidence: float = 0.6):  # fmt: skip
        import mediapipe as mp

        self.count_people, self.count_every, self.face_confidence = count_people, max(1, count_every), face_confidence
        self._faces = None

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

    def count_faces(self, frame: np.ndarray) -> int:
        """Faces the full-range detector finds in one (H, W, 3) uint8 RGB frame."""
        if self._faces is None:
            self._faces = self._mp.solutions.face_detection.FaceDetection(
                model_selection=1, min_detection_confidence=self.face_confidence)  # fmt: skip
        found = self._faces.process(frame).detections
        return len(found) if found else 0

    def detect_video(self, frames: np.ndarray) -> PoseTrack:
        """(T, H, W, 3) uint8 RGB -> PoseTrack with masks. `people` is the larger of the pose (0/1) and
        the face count on counted frames, and -1 (unknown) between them."""
        self.reset()
        t, h, w = frames.shape[:3]
        kpts = L.empty(t)
        masks = np.zeros((t, h, w), bool)
        people = np.full(t, -1, np.int64)
        for i, f in enumerate(frames):
            f = np.ascontiguousarray(f)
            kpts[i], m = self(f)
            if m is not None:
                masks[i] = m
            if self.count_people and i % self.count_every == 0:
                people[i] = max(int(L.body_detected(kpts[i][None])[0]), self.count_faces(f))
        return PoseTrack(kpts=kpts, people=people, masks=masks)

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None
        if self._faces is not None:
            self._faces.close()
            self._faces = None


class MediaPipeSelfieMasks:
    """Mask backend (offline, weights in the wheel): MediaPipe selfie segmentation, kept inside the
    person's box grown by `box_margin` of its size, so that other people and clutter outside it drop out.
    The fallback when the pose backend has no segmentation of its own (DWPose)."""

    name = "mediapipe-selfie"

    def __init__(self, model_selection: int = 1, threshold: float = 0.5, box_margin: float = 0.15):
        import mediapipe as mp

        self.version = mp.__version__
        self.threshold, self.box_margin = threshold, box_margin
        self._model = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=model_selection)

    def masks(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) uint8 RGB, (T, 4) pixel boxes (NaN: no person) -> (T, H, W) bool."""
        t, h, w = frames.shape[:3]
        out = np.zeros((t, h, w), bool)
        for i, (frame, box) in enumerate(zip(frames, boxes, strict=True)):
            if np.isnan(box).any():
                continue
            prob = self._model.process(np.ascontiguousarray(frame)).segmentation_mask
            mx, my = self.box_margin * (box[2] - box[0]), self.box_margin * (box[3] - box[1])
            x0, y0 = int(max(box[0] - mx, 0)), int(max(box[1] - my, 0))
            x1, y1 = int(min(box[2] + mx, w - 1)) + 1, int(min(box[3] + my, h - 1)) + 1
            out[i, y0:y1, x0:x1] = prob[y0:y1, x0:x1] > self.threshold
        return out

    def close(self) -> None:
        self._model.close()
