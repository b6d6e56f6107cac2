"""The pose-shift test: does the figure go where the pose puts it?

Each clip is generated again from the same reference frame, prompt and seed, driven by its own poses
moved sideways by `dx` pixels from frame 1 on (frame 0's pose stays with the reference frame). The
ground truth and its person masks are moved the same way. Inside the moved figure's region (frames 1+),
the follow score is

    figure PSNR(generated with the moved poses, moved truth) - figure PSNR(generated with its own poses, moved truth)

A model that ignores the pose generates the same video both times: it scores exactly 0. A model that
moves the figure with the pose scores above 0. Unlike the pose swap (another clip's poses, which may
ask for a body shape the reference cannot give), the moved pose asks only for the same body elsewhere,
so the score reads placement. Per clip: the mean over the shifts; over clips: the mean and a 95%
bootstrap interval (`pose_swap.bootstrap_ci`). Pure computation here; the demo generates and scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dynamictrl.eval.metrics import figure_metrics, figure_region
from dynamictrl.eval.pose_swap import bootstrap_ci

SHIFTS = (-8, 8)  # pixels: an eighth of the demo's 64-pixel width, within the synthetic figures' sway


def shift(frames: np.ndarray, dx: int) -> np.ndarray:
    """(T, H, W, ...) frames with frames 1+ moved `dx` pixels to the right (left when negative), the
    uncovered strip zero (black pose canvas, no person); frame 0 unchanged."""
    if abs(dx) >= frames.shape[2]:
        raise ValueError(f"a shift of {dx} pixels leaves nothing of frames {frames.shape[2]} pixels wide")
    out = frames.copy()
    if dx:
        out[1:] = 0
        src, dst = (slice(0, -dx), slice(dx, None)) if dx > 0 else (slice(-dx, None), slice(0, dx))
        out[1:, :, dst] = frames[1:, :, src]
    return out


def figure_psnr_after_reference(gen: np.ndarray, truth: np.ndarray, masks: np.ndarray) -> float:
    """Mean figure PSNR over frames 1+ inside the union of `masks`' frames 1+ (`eval.metrics`)."""
    region = figure_region(masks[1:])
    return float(np.mean(figure_metrics(gen[1:], truth[1:], region)["figure_psnr"]))


def follow(own: np.ndarray, moved: np.ndarray, truth: np.ndarray, masks: np.ndarray, dx: int) -> float:
    """One clip, one shift: `own` generated with its own poses, `moved` with them shifted by `dx`;
    `truth` and `masks` unshifted (T, H, W, 3) uint8 and (T, H, W) bool. dB; 0 when own == moved."""
    truth_dx, masks_dx = shift(truth, dx), shift(masks.astype(bool), dx)
    return figure_psnr_after_reference(moved, truth_dx, masks_dx) - figure_psnr_after_reference(own, truth_dx, masks_dx)


def summary(per_clip: dict[str, float], shifts: tuple[int, ...] = SHIFTS) -> dict[str, Any]:
    """{"shifts": [...], "gain": mean over clips, "ci95": [lo, hi], "clips": n, "per_clip": {...}}, the
    clips whose score is not finite (no person) left out."""
    finite = {k: float(v) for k, v in per_clip.items() if np.isfinite(v)}
    if not finite:
        return {"shifts": list(shifts), "gain": None, "ci95": None, "clips": 0, "per_clip": {}}
    values = np.array(list(finite.values()))
    return {"shifts": list(shifts), "gain": float(values.mean()), "ci95": list(bootstrap_ci(values)),
            "clips": len(values), "per_clip": finite}  # fmt: skip


def describe(result: dict[str, Any]) -> str:
    """One line: `+2.59 dB [2.13, 3.11], above 0 on 12 of 12 clips` (n/a: not computed)."""
    if result["gain"] is None:
        return "n/a"
    above = sum(v > 0 for v in result["per_clip"].values())
    return f"{result['gain']:+.2f} dB [{result['ci95'][0]:.2f}, {result['ci95'][1]:.2f}], above 0 on {above} of {result['clips']} clips"
