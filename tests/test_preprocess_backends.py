"""The production backends inside the preprocessing stage: DWPose poses, SAM 2 masks and Qwen2-VL
captions from tiny random-weight models saved in their real formats, driven through the configs a
user points at real weights. Model outputs are never faked: the test checks the stage stores what the
backends return."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import webdataset as wds

from dynamictrl import config
from dynamictrl.data.shards import decode_sample
from dynamictrl.preprocess.run import build, run
from dynamictrl.testing import tiny_dwpose, tiny_qwen2vl, tiny_sam2
from dynamictrl.utils.video import write_video


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    det, pose = tiny_dwpose.build(root / "dwpose", dynamic_batch=True)
    sam_config, sam_ckpt = tiny_sam2.build_sam2(root / "sam2")
    return {"det": det, "pose": pose, "sam_config": sam_config, "sam_ckpt": sam_ckpt,
            "qwen": tiny_qwen2vl.build(root / "qwen")}  # fmt: skip


def overrides(w, raw, out):
    return [f"input={raw}", f"output={out}", "progress=false", "num_frames=9", "fps=null",
            "pose=dwpose", f"pose.det_model={w['det']}", f"pose.pose_model={w['pose']}", "pose.device=cpu",
            "mask=sam2", f"mask.checkpoint={w['sam_ckpt']}", f"mask.config={w['sam_config']}", "mask.device=cpu",
            "caption=qwen2vl", f"caption.path={w['qwen']}", "caption.max_new_tokens=6", "caption.device=cpu",
            "caption.min_pixels=3136", "caption.max_pixels=12544", "caption.num_frames=2"]  # fmt: skip


def test_dwpose_sam2_and_qwen2vl_through_the_stage(weights, tmp_path):
    from skimage.data import astronaut

    img = cv2.resize(astronaut(), (160, 160), interpolation=cv2.INTER_AREA)
    write_video(tmp_path / "raw" / "clip.mp4", np.stack([np.roll(img, 2 * i, axis=1) for i in range(9)]), 8)
    cfg = config.load("preprocess", overrides(weights, tmp_path / "raw", tmp_path / "out"))
    summary = run(cfg)
    assert summary["done"] == 1, (tmp_path / "out" / "rejects.jsonl").read_text()
    [raw] = list(wds.WebDataset(str(tmp_path / "out" / "train-0000-00000.tar"), shardshuffle=False, empty_check=False))
    sample = decode_sample(raw)
    meta = json.loads(raw["json"])
    assert meta["backends"]["pose"].startswith("dwpose-rtmlib-")
    assert meta["backends"]["mask"].startswith("sam2-video-")
    assert meta["backends"]["caption"].startswith("qwen2-vl-")
    assert meta["qc"]["person_count"] == 1  # the tiny detector plants one confident person box
    assert isinstance(meta["qc"]["mask_reseeds"], int)  # the tracker's own QC figure is kept

    # The stored caption is the captioner's own output on the stored clip.
    captioner = build(cfg.caption)
    assert sample["caption"] == captioner([sample["frames"]])[0].strip()
    captioner.close()

    # A sidecar caption still wins over the model; the model is then never loaded.
    (tmp_path / "raw" / "clip.txt").write_text("The person in the image is wearing a space suit.")
    again = run(config.load("preprocess", [*overrides(weights, tmp_path / "raw", tmp_path / "out2"),
                                           "caption.path=/no/such/folder"]))  # fmt: skip
    assert again["done"] == 1
    [raw2] = list(wds.WebDataset(str(tmp_path / "out2" / "train-0000-00000.tar"), shardshuffle=False, empty_check=False))
    assert raw2["txt"].decode() == "The person in the image is wearing a space suit."


def test_animate_feeds_a_batched_pose_backend_whole_videos(weights):
    """extract_poses gives a batched backend the whole video, with the same poses as frame by frame."""
    from skimage.data import astronaut

    from dynamictrl.animate.run import extract_poses
    from dynamictrl.pose.dwpose_backend import DWPose

    img = cv2.resize(astronaut(), (160, 160), interpolation=cv2.INTER_AREA)
    frames = np.stack([np.roll(img, 5 * i, axis=1) for i in range(5)])
    batched = DWPose(det_model=str(weights["det"]), pose_model=str(weights["pose"]), device="cpu", batch_size=4)
    calls = []
    batched.detect_video = lambda f, inner=batched.detect_video: calls.append(len(f)) or inner(f)
    single = DWPose(det_model=str(weights["det"]), pose_model=str(weights["pose"]), device="cpu", batch_size=1)
    a, b = extract_poses(frames, batched, progress=False), extract_poses(frames, single, progress=False)
    assert calls == [5]
    assert (a[..., 2] > 0).any()  # real keypoints, not two empty results
    np.testing.assert_allclose(a, b, atol=1e-5)
