"""The shard contract (DESIGN.md §2): members, dtypes, shapes, keys."""

import io
import json
import tarfile

import numpy as np
import webdataset as wds

from dynamictrl.data.shards import MEMBERS, decode_sample, sample_key
from dynamictrl.pose.layout import NUM_KEYPOINTS


def test_every_sample_has_every_member_with_the_contract_types(shards):
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    assert urls, "preprocessing wrote no shards"
    raw = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(raw) == 8  # 4 videos of 20 frames at 8 fps, clips of 9 frames every 9: 2 each
    for s in raw:
        assert set(MEMBERS) <= set(s), s.keys()
        assert "." not in s["__key__"]
        with np.load(io.BytesIO(s["mask.npz"]), allow_pickle=False) as z:
            assert list(z.keys()) == ["mask"] and z["mask"].dtype == bool
        kpts = np.load(io.BytesIO(s["kpts.npy"]), allow_pickle=False)
        assert kpts.dtype == np.float32 and kpts.shape == (9, NUM_KEYPOINTS, 3)
        assert kpts[..., :2].min() >= 0 and kpts[..., :2].max() <= 1 and kpts[..., 2].max() <= 1
        meta = json.loads(s["json"])
        for field in ("source", "sha256", "fps", "frame_indices", "original_size", "crop_box", "backends", "qc", "split"):
            assert field in meta, field
        d = decode_sample(s)
        assert d["frames"].shape == (9, 96, 64, 3) and d["frames"].dtype == np.uint8
        assert d["pose"].shape == d["frames"].shape
        assert d["mask"].shape == (9, 96, 64)
        assert d["caption"].startswith("The person in the image is wearing")
        assert 0.05 < d["mask"].mean() < 0.8  # the person, not the frame
        assert meta["qc"]["pose_detected_ratio"] == 1.0


def test_shards_hold_no_pickles(shards):
    for tar in shards.glob("*.tar"):
        with tarfile.open(tar) as t:
            for name in t.getnames():
                assert not name.endswith((".pyd", ".pickle", ".pkl", ".pth")), name


def test_keys_have_no_dots():
    assert sample_key("my.video v2", 3) == "my_video_v2-0003"


def test_manifest_lists_each_video_with_its_keys(shards, raw_data):
    rows = [json.loads(line) for line in (shards / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["video_id"] for r in rows) == ["test_synth0003", "train_synth0000", "train_synth0001", "train_synth0002"]
    assert {r["split"] for r in rows} == {"train", "test"}
    assert all(len(r["keys"]) == 2 for r in rows)
