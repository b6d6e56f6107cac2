"""Preprocessing first cut: folders and video files in, shards out; rejects; resume; partitions."""

import json
import shutil

import numpy as np
import pytest

from dynamictrl import config
from dynamictrl.data.synthetic import make_video
from dynamictrl.errors import UserError
from dynamictrl.preprocess.run import discover, partition, run
from dynamictrl.preprocess.stages import choose_bucket, crop_box
from dynamictrl.utils.video import write_video


def cfg(inp, out, *extra):
    return config.load("preprocess", [f"input={inp}", f"output={out}", "progress=false", *extra])


def test_video_files_with_sidecar_captions_and_bad_inputs(tmp_path):
    raw = tmp_path / "raw"
    v = make_video(5, 24, 192, 128, 8.0)
    write_video(raw / "dancer.mp4", v["frames"], 8.0)
    (raw / "dancer.txt").write_text(v["caption"])
    (raw / "broken.mp4").write_bytes(b"this is not a video")
    write_video(raw / "short.mp4", v["frames"][:4], 8.0)
    (raw / "short.txt").write_text("short")
    write_video(raw / "uncaptioned.mp4", v["frames"], 8.0)
    summary = run(cfg(raw, tmp_path / "out"))
    rejects = {json.loads(line)["path"].rsplit("/", 1)[1]: json.loads(line)["reason"]
               for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()}  # fmt: skip
    assert set(rejects) == {"broken.mp4", "short.mp4", "uncaptioned.mp4"}
    assert "unreadable" in rejects["broken.mp4"]
    assert "too short" in rejects["short.mp4"]
    assert "no caption" in rejects["uncaptioned.mp4"]
    assert summary["done"] == 1 and summary["clips"] == 2
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert manifest[0]["video_id"] == "dancer"


def test_rerun_is_a_no_op_and_partitions_add_up(raw_data, tmp_path):
    first = run(cfg(raw_data, tmp_path / "one"))
    before = sorted(p.name for p in (tmp_path / "one").iterdir())
    again = run(cfg(raw_data, tmp_path / "one"))
    assert again["done"] == 0 and again["skipped"] == first["done"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == before
    keys = set()
    for rank in (0, 1):
        s = run(cfg(raw_data, tmp_path / "two", f"rank={rank}", "world_size=2"))
        keys |= {k for line in (tmp_path / "two" / f"manifest-rank000{rank}.jsonl").read_text().splitlines()
                 for k in json.loads(line)["keys"]}  # fmt: skip
        assert s["done"] == 2
    one = {k for line in (tmp_path / "one" / "manifest.jsonl").read_text().splitlines() for k in json.loads(line)["keys"]}
    assert keys == one


def test_discover_splits_and_partition_union(raw_data):
    items = discover(raw_data)
    assert [i.split for i in items] == ["test", "train", "train", "train"]
    parts = [partition(items, r, 3) for r in range(3)]
    assert sorted(i.video_id for p in parts for i in p) == sorted(i.video_id for i in items)


def test_crop_box_keeps_aspect_and_stays_inside():
    x0, y0, x1, y1 = crop_box((0.4, 0.1, 0.6, 0.9), 192, 128, 64 / 96, 0.1)
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 192
    assert (x1 - x0) / (y1 - y0) == pytest.approx(64 / 96, rel=0.02)


def test_mediapipe_backend_on_a_real_photo():
    """The offline default finds the astronaut (a real photo shipped inside scikit-image)."""
    from skimage.data import astronaut

    from dynamictrl.pose.layout import body_detected
    from dynamictrl.pose.mediapipe_backend import MediaPipeHolistic

    backend = MediaPipeHolistic()
    backend.reset()
    k, mask = backend(np.ascontiguousarray(astronaut()))
    backend.close()
    assert body_detected(k[None])[0]
    assert mask is not None and 0.05 < mask.mean() < 0.9
    nose = k[0, :2] * [512, 512]
    assert 150 < nose[0] < 300 and 50 < nose[1] < 200  # her face is in the upper middle-left of the photo


def test_missing_sidecar_frames_are_rejected(raw_data, tmp_path):
    bad = tmp_path / "raw" / "train" / "broken_sidecar"
    shutil.copytree(raw_data / "train" / "synth0000", bad)
    next(iter(sorted((bad / "openpose").glob("*.json")))).unlink()
    with pytest.raises(UserError, match="no input could be processed"):  # its only input was rejected
        run(cfg(tmp_path / "raw", tmp_path / "out"))
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text()
    assert "sidecar keypoints: 19 files for 20 frames" in rejects


def test_bucket_follows_the_person_box():

    buckets = [[96, 64], [64, 96]]
    assert choose_bucket(buckets, (0.3, 0.05, 0.7, 0.95), 1024, 576, 0.1) == (96, 64)  # standing, portrait video
    assert choose_bucket(buckets, (0.1, 0.4, 0.9, 0.7), 576, 1024, 0.1) == (64, 96)  # lying down, landscape video


def resample(num_frames: int, src_fps: float, fps: float | None) -> np.ndarray:
    """The indices of source frames that sample a loaded video of `num_frames` at `fps`."""
    if not fps or abs(fps - src_fps) < 1e-3:
        return np.arange(num_frames)
    n = int(np.floor((num_frames - 1) * fps / src_fps)) + 1
    return np.minimum(np.round(np.arange(n) * src_fps / fps).astype(int), num_frames - 1)


def test_streamed_resampling_picks_the_same_frames_as_resampling_a_loaded_video():
    from dynamictrl.preprocess.stages import resampled

    for n in (1, 9, 20, 59):
        for src in (8, 24, 25, 29.97, 30, 60):
            for fps in (None, 8, 12, 16, 30, 50):
                streamed = [j for j, _ in resampled(iter(range(n)), src, fps)]
                assert streamed == resample(n, src, fps).tolist(), (n, src, fps)
