"""One renderer for every backend: DWPose-style skeletons on black, at the clip's resolution."""

from __future__ import annotations

import math

import cv2
import numpy as np

from dynamictrl.pose import layout as L


def render_pose(
    kpts: np.ndarray,
    height: int,
    width: int,
    threshold: float = 0.3,
    draw_hands: bool = True,
    draw_face: bool = True,
) -> np.ndarray:
    """Draw one frame's skeleton.

    Args:
        kpts: (134, 3) normalised keypoints, or (P, 134, 3) for several people.
        height, width: canvas size in pixels.

    Returns:
        (H, W, 3) uint8 RGB image.
    """
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    people = kpts.reshape(-1, L.NUM_KEYPOINTS, 3)
    scale = max(height, width) / 512.0
    # DWPose's widths at 512 px, scaled; at least 2 px, because a 1-px stick covers a quarter of a
    # latent pixel under a 4x VAE (a real 768x1360 render under CogVideoX's 8x VAE covers 1.5).
    stick = max(2, round(4 * scale))
    dot = max(2, round(4 * scale))
    for person in people:
        xy = person[:, :2] * np.array([width, height], dtype=np.float32)
        ok = person[:, 2] > threshold
        _draw_body(canvas, xy, ok, stick, dot)
        if draw_hands:
            for part in (L.LEFT_HAND, L.RIGHT_HAND):
                _draw_hand(canvas, xy[part], ok[part], max(1, round(2 * scale)), max(1, round(3 * scale)))
        if draw_face:
            for (x, y), v in zip(xy[L.FACE], ok[L.FACE], strict=True):
                if v:
                    cv2.circle(canvas, (round(x), round(y)), max(1, round(2 * scale)), (255, 255, 255), -1)
    return canvas


def render_video(kpts: np.ndarray, height: int, width: int, **kwargs) -> np.ndarray:
    """(T, [P,] 134, 3) keypoints -> (T, H, W, 3) uint8 pose video."""
    return np.stack([render_pose(k, height, width, **kwargs) for k in kpts])


def _draw_body(canvas: np.ndarray, xy: np.ndarray, ok: np.ndarray, stick: int, dot: int) -> None:
    overlay = canvas.copy()
    for (a, b), color in zip(L.BODY_LIMBS, L.BODY_COLORS, strict=False):
        if ok[a] and ok[b]:
            _limb(overlay, xy[a], xy[b], stick, color)
    for (a, b), color in zip(L.FEET_LIMBS, L.BODY_COLORS[12:], strict=False):
        if ok[a] and ok[18 + b]:
            _limb(overlay, xy[a], xy[18 + b], max(1, stick // 2), color)
    # Limbs at 60% opacity over the canvas, as DWPose draws them.
    cv2.addWeighted(overlay, 0.6, canvas, 0.4, 0, dst=canvas)
    for i in range(L.NUM_BODY):
        if ok[i]:
            cv2.circle(canvas, (round(xy[i, 0]), round(xy[i, 1])), dot, L.BODY_COLORS[i], -1, cv2.LINE_AA)


def _limb(canvas: np.ndarray, p: np.ndarray, q: np.ndarray, width: int, color: tuple[int, int, int]) -> None:
    center = (p + q) / 2
    length = float(np.hypot(*(p - q)))
    angle = math.degrees(math.atan2(q[1] - p[1], q[0] - p[0]))
    poly = cv2.ellipse2Poly(
        (round(center[0]), round(center[1])), (max(1, round(length / 2)), width), round(angle), 0, 360, 1
    )
    cv2.fillConvexPoly(canvas, poly, color, cv2.LINE_AA)


def _draw_hand(canvas: np.ndarray, xy: np.ndarray, ok: np.ndarray, line: int, dot: int) -> None:
    for k, (a, b) in enumerate(L.HAND_EDGES):
        if ok[a] and ok[b]:
            hue = k / len(L.HAND_EDGES)
            rgb = cv2.cvtColor(np.uint8([[[int(hue * 179), 255, 255]]]), cv2.COLOR_HSV2RGB)[0, 0]
            cv2.line(canvas, _pt(xy[a]), _pt(xy[b]), tuple(int(c) for c in rgb), line, cv2.LINE_AA)
    for p, v in zip(xy, ok, strict=True):
        if v:
            cv2.circle(canvas, _pt(p), dot, (0, 0, 255), -1, cv2.LINE_AA)


def _pt(p: np.ndarray) -> tuple[int, int]:
    return round(float(p[0])), round(float(p[1]))


def overlay(frame: np.ndarray, pose: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend a rendered pose over its frame (both (H, W, 3) uint8), keeping the skeleton opaque."""
    out = frame.copy()
    drawn = pose.max(-1) > 40  # decoded pose videos carry faint compression noise on black
    out[drawn] = (alpha * pose[drawn] + (1 - alpha) * frame[drawn]).astype(np.uint8)
    return out
