"""The offline defaults on real footage: a full-body dance video and a talking head (the media in
../shared/samples beside the repository, which CI has too; they are not ours to commit)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from dynamictrl import config
from dynamictrl.data.shards import decode_sample
from dynamictrl.pose import layout as L
from dynamictrl.preprocess.run import run

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples" / "videos"
FOOTAGE = {"dance-gen-1": "full body, dancing", "talking-1": "talking head"}
needs_samples = pytest.mark.skipif(not all((SAMPLES / f"{n}.mp4").is_file() for n in FOOTAGE),
                                   reason=f"sample footage not found under {SAMPLES}")  # fmt: skip


def body_points_in_mask(sample: dict) -> float:
    """Share of the visible body keypoints that fall on the person mask, over the clip."""
    k, mask = sample["kpts"], sample["mask"]
    h, w = mask.shape[1:]
    hits = []
    for t in range(len(k)):
        vis = k[t, L.BODY, 2] > 0.3
        xs = np.clip(np.round(k[t, L.BODY, 0][vis] * (w - 1)).astype(int), 0, w - 1)
        ys = np.clip(np.round(k[t, L.BODY, 1][vis] * (h - 1)).astype(int), 0, h - 1)
        hits += mask[t, ys, xs].tolist()
    return float(np.mean(hits))


@needs_samples
@pytest.mark.slow
def test_real_dance_and_talking_head_footage(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, what in FOOTAGE.items():
        shutil.copy(SAMPLES / f"{name}.mp4", raw / f"{name}.mp4")
        (raw / f"{name}.txt").write_text(f"The person in the image is {what}.")
    out = tmp_path / "out"
    summary = run(config.load("preprocess", [f"input={raw}", f"output={out}", "progress=false", "num_frames=17",
                                             "fps=8", "stride=null", "buckets=[[512,288],[288,512],[384,384]]"]))  # fmt: skip
    assert summary["done"] == 2, (out / "rejects.jsonl").read_text() if (out / "rejects.jsonl").is_file() else ""
    samples = [decode_sample(s) for s in wds.WebDataset(sorted(map(str, out.glob("*.tar"))), shardshuffle=False,
                                                         empty_check=False)]  # fmt: skip
    by_video = {n: [s for s in samples if s["meta"]["video_id"] == n] for n in FOOTAGE}
    assert all(by_video.values())
    for name, clips in by_video.items():
        frames = np.concatenate([s["kpts"] for s in clips])
        assert L.body_detected(frames).mean() >= 0.95, name  # body keypoints in at least 95% of frames
        for s in clips:
            assert 0.05 < s["meta"]["qc"]["mean_mask_area"] < 0.9, (name, s["meta"]["qc"])  # the person, not the frame
            assert body_points_in_mask(s) > 0.85, name  # the mask covers the body the pose found
            assert s["meta"]["qc"]["person_count"] == 1
    portrait = by_video["dance-gen-1"][0]["meta"]["size"]
    assert portrait[0] > portrait[1]  # a standing dancer gets a portrait bucket
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["video_id"] in FOOTAGE
