"""The loader: batches share a size (buckets); corrupt samples are skipped, counted and logged."""

import csv
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from dynamictrl import config
from dynamictrl.data.shards import encode_sample
from dynamictrl.errors import UserError
from dynamictrl.pose.layout import NUM_KEYPOINTS
from dynamictrl.train.datamodule import ShardDataModule
from dynamictrl.train.run import run


def clip(key, h, w, t=9):
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    frames = rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8)
    meta = {"num_frames": t, "size": [h, w], "fps": 8}
    return encode_sample(key, frames, frames, np.ones((t, h, w), bool), np.zeros((t, NUM_KEYPOINTS, 3), np.float32),
                         "a person", meta, 8.0)  # fmt: skip


def test_batches_share_a_size_and_every_clip_comes_once_per_epoch(tmp_path):
    with wds.TarWriter(str(tmp_path / "mixed-00000.tar")) as sink:
        for i in range(10):
            sink.write(clip(f"c{i:02d}", *((64, 48) if i % 3 else (48, 64))))
    dm = ShardDataModule(str(tmp_path), num_frames=9, batch_size=3, shuffle_buffer=4)
    dm.setup()
    dm.dataset.loop = False  # one epoch
    seen = []
    for batch in dm.train_dataloader():
        assert len({tuple(v.shape) for v in batch["video"]}) == 1
        seen += batch["key"]
    assert sorted(seen) == [f"c{i:02d}" for i in range(10)]


def test_a_shard_with_corrupt_samples_trains_on_and_counts_them(tiny_model, shards, tmp_path, monkeypatch):
    good = list(wds.DataPipeline(wds.SimpleShardList([str(next(shards.glob("train-*.tar")))]), wds.tarfile_to_samples()))
    bad_video = {k: v for k, v in good[0].items() if not k.startswith("__")} | {"__key__": "bad-video", "mp4": b"\x00" * 64}
    bad_json = {k: v for k, v in good[1].items() if not k.startswith("__")} | {"__key__": "bad-json", "json": b"{no"}
    missing = {k: v for k, v in good[2].items() if not k.startswith("__") and k != "pose.mp4"} | {"__key__": "missing"}
    with wds.TarWriter(str(tmp_path / "train-00000.tar")) as sink:
        for s in [bad_json, bad_video, missing] + [{k: v for k, v in g.items() if k not in ("__url__", "__local_path__")} for g in good]:
            sink.write(s)
    (tmp_path / "train-00001.tar").write_bytes(b"not a tar file at all")
    monkeypatch.setenv("DYNAMICTRL_DATA", str(tmp_path / "data"))
    cfg = config.load("train", [f"data.train_shards={tmp_path}/train-*.tar", f"output={tmp_path / 'out'}",
                                f"model.path={tiny_model}", "debug=default", "trainer.max_steps=3",
                                "data.batch_size=2", "data.shuffle_buffer=1"])  # fmt: skip
    result = run(cfg)
    assert result["steps"] == 3
    assert result["skipped_samples"] >= 3  # bad json, undecodable mp4, missing member (+ the broken tar)
    rows = list(csv.DictReader(open(result["metrics_csv"])))
    assert float(rows[-1]["data/skipped"]) == result["skipped_samples"]
    assert json.loads((tmp_path / "out" / "model.json").read_text())["transformer"] == "transformer"


def test_the_decoded_clip_cache_decodes_each_clip_once_and_yields_the_same_batches(tmp_path, monkeypatch):
    from dynamictrl.train import datamodule

    with wds.TarWriter(str(tmp_path / "train-00000.tar")) as sink:
        for i in range(6):
            sink.write(clip(f"c{i:02d}", 48, 32))
    calls = []
    real = datamodule.decode_sample
    monkeypatch.setattr(datamodule, "decode_sample", lambda raw: calls.append(raw["__key__"]) or real(raw))

    def two_epochs(cache_mb):
        dm = ShardDataModule(str(tmp_path), num_frames=9, batch_size=2, shuffle_buffer=4, cache_mb=cache_mb)
        dm.setup()
        calls.clear()
        batches = [b for _, b in zip(range(6), dm.train_dataloader(), strict=False)]  # 3 batches an epoch
        return batches, list(calls)

    plain, plain_calls = two_epochs(0)
    cached, cached_calls = two_epochs(10)
    assert len(plain_calls) == 12 and sorted(cached_calls) == [f"c{i:02d}" for i in range(6)]
    for a, b in zip(plain, cached, strict=True):
        assert a["key"] == b["key"] and all(torch.equal(a[k], b[k]) for k in ("video", "pose", "mask"))
    _, small_calls = two_epochs(0.2)  # room for two 48x32 clips (0.09 MB each): four decoded each epoch
    assert len(small_calls) == 10


def test_a_negative_cache_budget_is_named():
    with pytest.raises(UserError, match=r"data\.cache_mb=-1: must be 0 \(off\) or more"):
        ShardDataModule("unused", num_frames=9, cache_mb=-1)
