"""Pose retargeting: the first driving pose lands on the reference pose; motion is kept."""

import numpy as np
import pytest

from dynamictrl.animate.align import BODY_TREE, keypoint_error, retarget
from dynamictrl.animate.run import fit_keypoints, replace_background
from dynamictrl.data.synthetic import make_video


def synthetic_pose(seed, t=0):
    """A full 134-point pose (pixels on a 96x64 canvas) from the synthetic figure generator."""
    k = make_video(seed, 6, 96, 64, 8.0)["kpts"]
    px = k.copy()
    px[..., 0] *= 64
    px[..., 1] *= 96
    return px


def reshape_body(k, limb_scale, shift, scale):
    """Same posture, other body: each limb rescaled, then the whole figure scaled and moved."""
    out = k.copy()
    for t in range(len(k)):
        new = k[t].copy()
        for a, b in BODY_TREE:
            new[b, :2] = new[a, :2] + limb_scale[(a, b)] * (k[t, b, :2] - k[t, a, :2])
        out[t] = new
        out[t, :, :2] = (out[t, :, :2] - out[t, 1, :2]) * scale + out[t, 1, :2] + shift
    return out


def test_first_driving_pose_lands_on_the_reference():
    drv = synthetic_pose(3)
    rng = np.random.default_rng(0)
    ref = drv[0].copy()
    limb_scale = {e: float(rng.uniform(0.7, 1.4)) for e in BODY_TREE}
    other = reshape_body(drv, limb_scale, shift=np.array([9.0, -6.0]), scale=0.6)
    body = slice(0, 18)
    before = keypoint_error(other[0][body], ref[body])
    aligned = retarget(other, ref)
    after = keypoint_error(aligned[0][body], ref[body])
    assert before > 5.0  # pixels: the raw driving body does not fit the reference
    assert after < 0.05  # bound: a twentieth of a pixel on a 96x64 canvas


def test_motion_follows_the_driving_video():
    drv = synthetic_pose(4)
    aligned = retarget(drv * [1, 1, 1], drv[0])  # reference = first driving pose: nothing to change
    assert np.allclose(aligned, drv, atol=1e-3)
    moved = retarget(drv, drv[0] * [0.5, 0.5, 1])  # a reference half the size
    wrist = moved[:, 4, :2] - moved[:, 1, :2]
    assert np.allclose(wrist, 0.5 * (drv[:, 4, :2] - drv[:, 1, :2]), atol=1e-3)


def test_fit_keypoints_follows_the_centre_crop():
    k = np.array([[[0.5, 0.5, 1.0], [0.0, 0.5, 1.0]]], np.float32)  # centre and left edge of a 100x200 frame
    out = fit_keypoints(k, 100, 200, 96, 64)  # portrait target: a 100x67 window in the middle is kept
    assert out[0, 0, :2] == pytest.approx([0.5, 0.5], abs=1e-2)
    assert out[0, 1, 2] == 0  # outside the crop: undetected


def test_background_prompt_replaces_the_background_sentence():
    p = "The person in the image is wearing a red shirt. The background is a white wall."
    assert replace_background(p, "a beach at sunset") == (
        "The person in the image is wearing a red shirt. The background is a beach at sunset."
    )
    assert replace_background("A dancer.", "The background is snow.") == "A dancer. The background is snow."


def test_a_child_of_an_undetected_joint_stays_undetected_and_is_not_drawn():
    """A missing right elbow (score 0, stored at (0, 0)) leaves the wrist and the hand undetected: built
    from the elbow they would land around (0, 0) and be drawn there."""
    from dynamictrl.pose import layout as L
    from dynamictrl.pose.render import render_pose

    drv = synthetic_pose(5)
    ref = drv[0].copy()
    assert drv[:, [3, 4], 2].min() > 0.3 and drv[:, L.RIGHT_HAND, 2].max() > 0.3  # elbow, wrist, hand seen
    missing = drv.copy()
    missing[2, 3] = 0.0  # frame 2: the right elbow undetected
    out = retarget(missing, ref)
    assert out[2, 4, 2] == 0 and np.all(out[2, 4, :2] == 0)  # the wrist
    assert np.all(out[2, L.RIGHT_HAND, 2] == 0)  # the hand hangs from the wrist
    assert out[2, 7, 2] > 0 and out[1, 4, 2] > 0  # the other arm, and the other frames, are untouched
    # Drawn exactly as if the driving video had lost the wrist and the hand too.
    lost = missing.copy()
    lost[2, 4], lost[2, L.RIGHT_HAND] = 0.0, 0.0
    assert np.array_equal(render_pose(out[2] / [64, 96, 1], 96, 64), render_pose(retarget(lost, ref)[2] / [64, 96, 1], 96, 64))
