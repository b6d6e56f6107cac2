"""Preprocessing on bad inputs and under faults: every kind of bad input is a reject with its reason and
the run completes; a SIGKILLed run leaves no partial shard and resumes to the same shards as an
uninterrupted run; the SLURM array launcher config composes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from dynamictrl import config
from dynamictrl.preprocess.run import run
from dynamictrl.utils.video import read_video, write_video

ROOT = Path(__file__).resolve().parents[1]


def cfg(inp, out, *extra):
    return config.load("preprocess", [f"input={inp}", f"output={out}", "progress=false", *extra])


def astronaut_video(n: int = 20, size: int = 192) -> np.ndarray:
    """A real photo of a person (inside scikit-image), drifting a few pixels a frame: MediaPipe finds her."""
    import cv2
    from skimage.data import astronaut

    img = cv2.resize(astronaut(), (size, size), interpolation=cv2.INTER_AREA)
    return np.stack([np.roll(img, 2 * i, axis=1) for i in range(n)])


def write_faststart(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """An mp4 with its index in front, so that cutting its tail leaves a readable but truncated file."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_audio_only(path: Path) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)


def test_every_kind_of_bad_input_is_a_reject_with_its_reason(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    person = astronaut_video()

    def add(name: str, frames: np.ndarray | None = None) -> None:
        if frames is not None:
            write_video(raw / f"{name}.mp4", frames, 8)
        (raw / f"{name}.txt").write_text("The person in the image is wearing a space suit.")

    add("good", person)
    add("short", person[:5])
    add("nobody", np.random.default_rng(0).integers(0, 255, (20, 192, 192, 3), dtype=np.uint8))
    add("crowd", np.concatenate([person, person], axis=2))  # two people side by side
    add("uncaptioned", person)
    (raw / "uncaptioned.txt").unlink()
    add("empty")
    (raw / "empty.mp4").write_bytes(b"")
    add("garbage")
    (raw / "garbage.mp4").write_bytes(os.urandom(4096))
    add("sound")
    write_audio_only(raw / "sound.mp4")
    add("cut")
    write_faststart(raw / "cut.mp4", person)
    data = (raw / "cut.mp4").read_bytes()
    (raw / "cut.mp4").write_bytes(data[: len(data) * 9 // 10])

    summary = run(cfg(raw, tmp_path / "out"))
    rejects = {Path(r["path"]).stem: r["reason"] for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())}
    expected = {"short": "too short", "nobody": "no person", "crowd": "several people", "uncaptioned": "no caption",
                "empty": "empty file", "garbage": "unreadable", "sound": "not a video", "cut": "truncated"}  # fmt: skip
    assert set(rejects) == set(expected)
    for name, reason in expected.items():
        assert rejects[name].startswith(reason), (name, rejects[name])
    assert summary["done"] == 1 and summary["clips"] == 2
    assert sum(summary["rejected"].values()) == len(expected)  # the summary counts rejects by reason
    assert all(any(k.startswith(r) for r in expected.values()) for k in summary["rejected"])
    sample = next(iter(wds.WebDataset(str(tmp_path / "out" / "train-0000-00000.tar"), shardshuffle=False, empty_check=False)))
    meta = json.loads(sample["json"])
    assert meta["qc"]["person_count"] == 1 and meta["qc"]["pose_detected_ratio"] == 1.0
    assert meta["backends"] == {"pose": "mediapipe-holistic-0.10.21", "mask": "mediapipe-holistic-0.10.21",
                                "caption": "sidecar-txt"}  # fmt: skip


def test_a_caption_or_mask_model_is_only_loaded_when_needed(tmp_path, raw_data):
    """Sidecar-annotated data (poses, masks, captions) runs with backends that cannot even load."""
    summary = run(cfg(raw_data, tmp_path / "out", "pose.model_complexity=99"))
    assert summary["done"] == 4


def members(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard in a folder, by key: member name -> bytes."""
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
            out[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
    return out


@pytest.mark.slow
def test_a_killed_run_leaves_no_partial_shard_and_resumes_to_the_same_shards(tmp_path, raw_data):
    whole = tmp_path / "whole"
    run(cfg(raw_data, whole, "shard_size=1"))
    killed = tmp_path / "killed"
    args = [sys.executable, str(ROOT / "pipelines" / "preprocess" / "main.py"), f"input={raw_data}",
            f"output={killed}", "shard_size=1", "progress=false", f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = killed / "manifest.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = {json.loads(line)["shard"] for line in manifest.read_text().splitlines()}
    visible = {p.name for p in killed.glob("*.tar")}
    assert visible == listed  # every visible shard is finished and recorded; partial ones are hidden
    assert len(listed) < len(list(whole.glob("*.tar")))
    resumed = run(cfg(raw_data, killed, "shard_size=1"))
    assert resumed["skipped"] == len(listed) and resumed["done"] == 4 - len(listed)
    assert sorted(p.name for p in killed.glob("*.tar")) == sorted(p.name for p in whole.glob("*.tar"))
    a, b = members(whole), members(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        for name in a[key]:
            if name.endswith("mp4"):  # libx264 here is not bit-reproducible from run to run: compare pixels
                x, y = (read_video(s[key][name])[0].astype(np.int16) for s in (a, b))
                assert x.shape == y.shape and np.abs(x - y).mean() < 1.5, (key, name)
            else:  # metadata, keypoints, masks and captions are the same bytes
                assert a[key][name] == b[key][name], (key, name)


def test_slurm_array_launcher_composes():
    """`-m hydra/launcher=slurm rank='range(0,N)' world_size=N` submits N array tasks through submitit."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = compose("preprocess", ["hydra/launcher=slurm", "input=x", "output=y", "rank=3", "world_size=8"], return_hydra_config=True)
    launcher = c.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.array_parallelism > 0 and launcher.timeout_min > 0
    assert c.hydra.sweep.subdir == "rank3"  # one output folder per array task


def test_a_missing_weight_file_stops_the_run_with_one_line(tmp_path):
    """A configuration error is not a bad input: it stops the run (not one reject per video)."""
    from dynamictrl.errors import UserError

    write_video(tmp_path / "raw" / "a.mp4", astronaut_video(10), 8)
    (tmp_path / "raw" / "a.txt").write_text("a caption")
    with pytest.raises(UserError, match=r"^pose.det_model=/no/such.onnx: no such file"):
        run(cfg(tmp_path / "raw", tmp_path / "out", "pose=dwpose", "pose.det_model=/no/such.onnx"))
    assert not (tmp_path / "out" / "rejects.jsonl").exists()


@pytest.mark.parametrize("bad, message", [("num_frames=20", r"num_frames=20: clips need 4k\+1 frames for the VAE; nearest 17 or 21"),
                                          ("stride=0", "stride=0: must be at least 1")])
def test_clip_settings_are_checked_before_any_work(tmp_path, bad, message):
    from dynamictrl.errors import UserError

    with pytest.raises(UserError, match=message):
        run(cfg(tmp_path, tmp_path / "out", bad))
