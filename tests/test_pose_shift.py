"""The pose-shift test: the measure on arrays, and through the demo's generation path with stub
pipelines that ignore the pose and that follow it."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dynamictrl.demo import generate_all, shift_follow, shift_sheet
from dynamictrl.eval import pose_shift
from test_pose_swap import PoseBlind


def test_shift_moves_frames_after_the_first_and_fills_with_zero():
    frames = np.arange(3 * 2 * 5, dtype=np.uint8).reshape(3, 2, 5) + 1
    right, left = pose_shift.shift(frames, 2), pose_shift.shift(frames, -2)
    assert np.array_equal(right[0], frames[0]) and np.array_equal(left[0], frames[0])
    assert np.array_equal(right[1:, :, 2:], frames[1:, :, :3]) and not right[1:, :, :2].any()
    assert np.array_equal(left[1:, :, :3], frames[1:, :, 2:]) and not left[1:, :, 3:].any()
    assert np.array_equal(pose_shift.shift(frames, 0), frames)
    with pytest.raises(ValueError, match="a shift of 5 pixels leaves nothing"):
        pose_shift.shift(frames, 5)


def test_follow_is_zero_when_blind_positive_when_following_negative_when_moving_the_wrong_way(clips):
    s = clips[0]
    noise = np.random.default_rng(0).normal(0, 6, s["frames"].shape)

    def noisy(x):
        return np.clip(x + noise, 0, 255).astype(np.uint8)

    own = noisy(s["frames"])
    for dx in pose_shift.SHIFTS:
        assert pose_shift.follow(own, own, s["frames"], s["mask"], dx) == 0
        assert pose_shift.follow(own, noisy(pose_shift.shift(s["frames"], dx)), s["frames"], s["mask"], dx) > 3
        assert pose_shift.follow(own, noisy(pose_shift.shift(s["frames"], -dx)), s["frames"], s["mask"], dx) < 0


class ShiftFollower(PoseBlind):
    """Renders the clip whose (possibly moved) poses drive it, moved the same way: a perfect follower."""

    def __init__(self, clips):
        self.clips = clips

    def __call__(self, image, pose, prompt, num_inference_steps, guidance_scale, generator):
        (frames,) = [pose_shift.shift(s["frames"], dx) for s in self.clips for dx in (0, *pose_shift.SHIFTS)
                     if np.array_equal(pose_shift.shift(s["pose"], dx), pose)]  # fmt: skip
        frames = frames.astype(float) + torch.randn(frames.shape, generator=generator).numpy() * 6
        return SimpleNamespace(frames=[np.clip(frames, 0, 255).astype(np.uint8)])


@pytest.mark.parametrize("follows", [False, True])
def test_the_demo_shift_path_scores_zero_for_a_blind_pipeline_and_clearly_above_for_a_follower(clips, tmp_path, follows):
    pipe = ShiftFollower(clips) if follows else PoseBlind()
    cfg = OmegaConf.create({"seed": 0, "steps": 2, "guidance_scale": 1.0})
    generate_all(pipe, clips, tmp_path / "own", cfg, "stub")
    r = shift_follow(pipe, clips, tmp_path / "shifted", cfg, tmp_path / "own")
    assert r["shifts"] == list(pose_shift.SHIFTS) and r["clips"] == len(clips)
    assert sorted(r["per_clip"]) == sorted(s["key"] for s in clips)
    if follows:
        assert r["gain"] > 3 and r["ci95"][0] > 0
        assert pose_shift.describe(r).endswith(f"above 0 on {len(clips)} of {len(clips)} clips")
    else:  # same reference, prompt and seed: the same frames, wherever the pose is
        assert r["gain"] == 0 and r["ci95"] == [0.0, 0.0]
    sheet = shift_sheet(clips[0], tmp_path / "shifted", tmp_path / "own")
    h, w = clips[0]["frames"].shape[1:3]
    assert sheet.shape == (h * len(range(0, len(clips[0]["frames"]), 2)), 6 * w, 3)
