"""The pose-swap gain and the figure-region scores: the measure itself, on arrays, on ground truth and
through the demo's generation path with a stub pipeline that ignores the pose."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dynamictrl.demo import FIRST, generate_all, masks_of, swap_gains
from dynamictrl.eval import pose_swap
from dynamictrl.eval.metrics import figure_metrics, figure_region
from dynamictrl.eval.run import score
from dynamictrl.utils.video import encode_mp4, read_video, write_frames


def test_donors_are_a_derangement_and_poses_are_fitted_to_length():
    assert pose_swap.donors(4) == [1, 2, 3, 0] and pose_swap.donors(2) == [1, 0]
    assert all(i != j for i, j in enumerate(pose_swap.donors(7)))
    with pytest.raises(ValueError, match="at least 2 clips"):
        pose_swap.donors(1)
    assert pose_swap.swapped(["a", "b", "c"]) == ["b", "c", "a"]
    x = np.arange(5)[:, None] * np.ones((5, 2))
    assert pose_swap.fit_length(x, 3).tolist() == x[:3].tolist()
    assert pose_swap.fit_length(x, 7)[:, 0].tolist() == [0, 1, 2, 3, 4, 4, 4]


def test_bootstrap_interval_of_the_mean():
    assert pose_swap.bootstrap_ci([0.0] * 12) == (0.0, 0.0)
    assert pose_swap.bootstrap_ci([1.5, 1.5, 1.5]) == (1.5, 1.5)
    v = np.random.default_rng(3).normal(2.0, 1.0, 400)
    lo, hi = pose_swap.bootstrap_ci(v)
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v))  # the normal approximation, which it should agree with here
    assert lo < v.mean() < hi and lo == pytest.approx(v.mean() - half, abs=0.2 * half)
    assert hi == pytest.approx(v.mean() + half, abs=0.2 * half)
    assert pose_swap.bootstrap_ci(v) == (lo, hi)  # fixed seed: the same interval every time
    lo10, hi10 = pose_swap.bootstrap_ci(v[:10])
    assert hi10 - lo10 > 3 * (hi - lo)  # fewer clips, a wider interval
    with pytest.raises(ValueError):
        pose_swap.bootstrap_ci([])


def test_gains_are_per_clip_differences_with_their_interval():
    own = {"a": {"psnr_star": 20.0, "ssim": 0.5}, "b": {"psnr_star": 18.0, "ssim": 0.4}}
    swap = {"a": {"psnr_star": 17.0, "ssim": 0.5}, "b": {"psnr_star": 17.0, "ssim": 0.3}}
    g = pose_swap.gains(own, swap)
    assert set(g) == {"psnr_star", "ssim"}  # figure_psnr was not scored
    assert g["psnr_star"]["per_clip"] == {"a": 3.0, "b": 1.0} and g["psnr_star"]["gain"] == 2.0
    assert g["psnr_star"]["ci95"] == [1.0, 3.0] and g["ssim"]["gain"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="different clips"):
        pose_swap.gains(own, {"a": swap["a"]})


def test_figure_scores_see_only_the_figure():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    mask = np.zeros((2, 32, 48), bool)
    mask[0, 8:16, 10:20], mask[1, 10:18, 14:24] = True, True  # the person moves: the region is the union
    region = figure_region(mask)
    assert region.sum() == (mask[0] | mask[1]).sum() and region.shape == (32, 48)
    # a change far outside the figure (more than the SSIM window away) leaves the figure scores perfect
    gen = real.copy()
    gen[:, 26:, :] = 0
    f = figure_metrics(gen, real, region)
    assert f["figure_psnr"] == [float("inf")] * 2 and f["figure_ssim"] == pytest.approx([1.0, 1.0])
    # a change of 10 on every figure pixel and channel: MSE 100 inside, whatever the rest of the frame
    gen = real.astype(int)
    gen[:, region] = np.where(real[:, region] > 245, real[:, region] - 10, real[:, region] + 10)
    gen[:, ~region] = 255 - real[:, ~region]  # and anything outside
    f = figure_metrics(gen.astype(np.uint8), real, region)
    assert f["figure_psnr"] == pytest.approx([10 * np.log10(255**2 / 100)] * 2)
    assert all(s < 1 for s in f["figure_ssim"])
    empty = figure_metrics(real, real, np.zeros((32, 48), bool))
    assert all(np.isnan(v) for v in empty["figure_psnr"] + empty["figure_ssim"])


def test_score_leaves_out_the_reference_frame_and_adds_figure_scores(tmp_path):
    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    gen = real.copy()
    gen[1:, :8] = 0  # frames 1-3 wrong in the top half, where the figure is
    mask = np.zeros((4, 16, 16), bool)
    mask[:, 2:6, 4:12] = True
    write_frames(tmp_path / "gen" / "clip", gen)
    write_frames(tmp_path / "ref" / "clip", real)
    all_frames = score(tmp_path / "gen", tmp_path / "ref", progress=False)
    after = score(tmp_path / "gen", tmp_path / "ref", progress=False, first=1, masks={"clip": mask})
    assert all_frames["frames"] == 4 and after["frames"] == 3 and after["first_frame"] == 1
    assert "reference frame 0 is given" in after["reference_frame"] and "included" in all_frames["reference_frame"]
    assert after["psnr_star"] < all_frames["psnr_star"] == float("inf")  # frame 0 (exact) carried the mean
    assert after["per_video"]["clip"]["per_frame"]["psnr_star"] == all_frames["per_video"]["clip"]["per_frame"]["psnr_star"][1:]
    assert after["figure_psnr"] < after["psnr_star"] and "figure_psnr" not in all_frames


def _swap_scores(clips, own_frames, swapped_frames, tmp_path: Path) -> dict:
    for s, own, other in zip(clips, own_frames, swapped_frames, strict=True):
        write_frames(tmp_path / "ref" / s["key"], s["frames"])
        write_frames(tmp_path / "own" / s["key"], own)
        write_frames(tmp_path / "swapped" / s["key"], other)
    kw = {"progress": False, "first": FIRST, "masks": masks_of(clips)}
    own = score(tmp_path / "own", tmp_path / "ref", **kw)
    return pose_swap.gains(own["per_video"], score(tmp_path / "swapped", tmp_path / "ref", **kw)["per_video"])


def test_ground_truth_as_generated_gains_clearly(clips, tmp_path):
    """A 'model' that renders exactly the driving clip (the ground truth through an H.264 round trip,
    as a perfect model's output would be near it): own poses give its own clip, swapped ones another's."""
    def rendered(s):
        return read_video(encode_mp4(s["frames"], 8, crf=20))[0]

    n = [len(s["frames"]) for s in clips]
    own = [rendered(s) for s in clips]
    other = [pose_swap.fit_length(rendered(d), k) for d, k in zip(pose_swap.swapped(clips), n, strict=True)]
    g = _swap_scores(clips, own, other, tmp_path)
    assert set(g) == {"psnr_star", "figure_psnr", "ssim"}
    assert g["psnr_star"]["gain"] > 10 and g["figure_psnr"]["gain"] > 10 and g["ssim"]["gain"] > 0.3
    assert all(r["ci95"][0] > 0 and len(r["per_clip"]) == 3 for r in g.values())


def test_the_static_reference_gains_exactly_zero(clips, tmp_path):
    static = [np.repeat(s["frames"][:1], len(s["frames"]), 0) for s in clips]  # the same video, whatever the poses
    g = _swap_scores(clips, static, static, tmp_path)
    assert all(r["gain"] == 0 and r["ci95"] == [0.0, 0.0] for r in g.values())


class PoseBlind:
    """A pipeline that reads the reference, the prompt and the generator but ignores the pose."""

    def set_progress_bar_config(self, **_):
        pass

    def __call__(self, image, pose, prompt, num_inference_steps, guidance_scale, generator):
        t, (h, w) = len(pose), image.shape[:2]
        noise = torch.rand((t, h, w, 3), generator=generator).numpy() * 60 + len(prompt) % 7
        frames = np.clip(image[None].astype(float) * 0.7 + noise, 0, 255).astype(np.uint8)
        return SimpleNamespace(frames=[frames])


class PoseFollower(PoseBlind):
    """The stub made to follow the pose perfectly: it renders the clip whose poses drive it (so the
    demo's swap path must hand it the other clip's poses, or the gain would be 0)."""

    def __init__(self, clips):
        self.clips = clips

    def __call__(self, image, pose, prompt, num_inference_steps, guidance_scale, generator):
        (match,) = [s for s in self.clips if np.array_equal(pose_swap.fit_length(s["pose"], len(pose)), pose)]
        frames = pose_swap.fit_length(match["frames"], len(pose)).astype(float)
        frames += torch.randn(frames.shape, generator=generator).numpy() * 8
        return SimpleNamespace(frames=[np.clip(frames, 0, 255).astype(np.uint8)])


@pytest.mark.parametrize("follows", [False, True])
def test_the_demo_swap_path_gives_zero_to_a_pipeline_that_ignores_the_pose(clips, tmp_path, follows):
    pipe = PoseFollower(clips) if follows else PoseBlind()
    cfg = OmegaConf.create({"seed": 0, "steps": 2, "guidance_scale": 3.0})
    for s in clips:
        write_frames(tmp_path / "reference" / s["key"], s["frames"])
    generate_all(pipe, clips, tmp_path / "own", cfg, "stub")
    own = score(tmp_path / "own", tmp_path / "reference", progress=False, first=FIRST, masks=masks_of(clips))
    g = swap_gains(pipe, clips, tmp_path / "swapped", tmp_path / "reference", cfg, "stub", own)
    if follows:
        assert own["psnr_star"] > 25  # its own poses: its own ground truth, give or take the noise
        assert g["psnr_star"]["gain"] > 10 and g["figure_psnr"]["gain"] > 10 and g["figure_psnr"]["ci95"][0] > 0
    else:  # same reference, prompt and seed: the same frames, whatever the poses
        assert all(r["gain"] == 0 and r["ci95"] == [0.0, 0.0] for r in g.values())


def test_make_eval_dataset_mode_reports_the_pose_swap_gain_when_asked(clips, tiny_model, tmp_path):
    from dynamictrl import config
    from dynamictrl.eval.run import run
    from dynamictrl.utils.video import write_video

    data = tmp_path / "videos"
    for s in clips[:2]:
        write_video(data / f"{s['key']}.mp4", s["frames"][:9], 8)
        (data / f"{s['key']}.txt").write_text(s["caption"])
    args = ["dataset=unseen100", f"data_root={data}", f"model={tiny_model}", f"output={tmp_path / 'out'}",
            "progress=false", "side_by_side=false", "animate_overrides=['steps=2']"]  # fmt: skip
    plain = run(config.load("eval", args))
    assert "pose_swap" not in plain and not (tmp_path / "out" / "generated_swapped").exists()  # off by default
    assert plain["first_frame"] == 0 and "included" in plain["reference_frame"]  # the published rule
    result = run(config.load("eval", [*args, "pose_swap=true"]))
    names = sorted(p.name for p in (tmp_path / "out" / "generated_swapped").iterdir() if p.is_dir())
    assert names == sorted(s["key"] for s in clips[:2])
    assert set(result["pose_swap"]) == {"psnr_star", "ssim"}  # no person masks in dataset mode
    assert result["pose_swap"]["psnr_star"]["per_clip"].keys() == set(names)
    assert result["l1"] == plain["l1"]  # the own-pose videos were not generated again
    assert "Pose-swap gain" in (tmp_path / "out" / "report.md").read_text()
