"""engine=ray as a cluster user runs it (issue 21): `ray start` nodes working in another directory, a
driver given relative paths that joins with `engine.address=auto`, a pose pool that needs a (fake) GPU
node which joins while the driver waits, a SIGKILLed driver and its resumed run; the result equals the
local engine's. Also: a window that kills its worker is retried a bounded number of times and then
rejected, an output the workers cannot see is refused with one line, and the two engines share their
backends without importing each other."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dynamictrl.preprocess.cluster import RehearsalCluster, env
from dynamictrl.preprocess.run import run
from dynamictrl.utils.video import write_video
from test_preprocess_faults import astronaut_video, cfg
from test_preprocess_ray import assert_each_key_once, assert_same_members, manifest, mixed, rejects  # noqa: F401 - mixed is a fixture

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "pipelines" / "preprocess" / "main.py")
CAPTION = "The person in the image is wearing a space suit."


def driver(cwd: Path, log: Path, *args: str) -> subprocess.Popen:
    """`make preprocess` as a user types it on a cluster node, from `cwd`, its output to `log`."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, MAIN, *args, "progress=false", f"hydra.run.dir={cwd / 'hydra'}"],
                            cwd=cwd, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the driver ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


def test_the_engines_share_their_backends_without_importing_each_other():
    code = ("import sys; from omegaconf import OmegaConf; from dynamictrl import config; "
            "from dynamictrl.preprocess.ray_engine import Stage; "
            "Stage(OmegaConf.to_container(config.load('preprocess', [])), 'pose', None, 2); "
            "print('dynamictrl.preprocess.run' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # an actor builds its backends without the driver's module


@pytest.mark.slow
def test_a_multi_node_cluster_run_with_relative_paths_equals_the_local_engine_and_resumes(mixed, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(mixed, data)
    for i in range(3):  # slower inputs at the end keep the run busy after its first shard
        write_video(data / "train" / f"zz_slow{i}.mp4", np.roll(astronaut_video(40), 9 * i, axis=2), 8)
        (data / "train" / f"zz_slow{i}.txt").write_text(CAPTION)
    total = 9 + 3
    local = tmp_path / "local"
    run(cfg(data, local, "shard_size=2"))

    # the nodes work two levels down: "../data" from there is not the data (a sibling would resolve alike)
    node_dir, driver_dir = tmp_path / "nodes" / "work", tmp_path / "driver"
    out = driver_dir / "shards"
    args = ["input=../data", "output=shards", "shard_size=2", "engine=ray", "engine.address=auto",
            "engine.pose.num_gpus=1", "engine.pose.concurrency=1", "engine.wait_for_resources_s=300"]  # fmt: skip
    with RehearsalCluster(node_dir) as cluster:
        cluster.start_head(num_cpus=2)  # no GPU: the pose actor cannot be placed until the GPU node joins
        log = tmp_path / "driver1.log"
        proc = driver(driver_dir, log, *args)
        try:
            wait_for(lambda: "waiting up to 300s" in log.read_text(), proc, log, 120, "wait for a GPU node")
            assert "engine.pose: one actor asks for 1 GPU; the largest node has 0" in log.read_text()
            cluster.add_node(num_cpus=1, num_gpus=1)  # "autoscaling": a (fake) GPU node joins
            wait_for(lambda: lines(out / "manifest.jsonl") >= 1, proc, log, 300, "first manifest line")
            os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; the cluster lives on
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        listed = {row["shard"] for row in manifest(out)}
        assert listed <= {p.name for p in out.glob("*.tar")}  # every listed shard is in place (an unlisted one,
        # renamed just before the kill, is removed by the resumed run and its inputs redone)
        finished = lines(out / "manifest.jsonl") + lines(out / "rejects.jsonl")
        assert finished < total, "the run finished before it could be killed"

        log = tmp_path / "driver2.log"
        resumed = driver(driver_dir, log, *args)
        assert resumed.wait(timeout=600) == 0, log.read_text()[-3000:]
        summary = log.read_text()
        assert f", {finished} skipped," in summary, summary[-2000:]  # nothing finished is redone
    assert {r["source"] for r in manifest(out)} == {r["source"] for r in manifest(local)}  # no input lost
    assert len(manifest(out)) + len(rejects(out)) == total
    assert rejects(out) == rejects(local)
    assert all(Path(r["source"]).is_absolute() for r in manifest(out))
    assert_same_members(local, out)
    assert_each_key_once(out)
    assert not list(out.glob(".staging-*"))  # staged samples cleaned up
    assert not (node_dir / "shards").exists()  # nothing went to the workers' own directory


@pytest.mark.slow
def test_a_window_that_kills_its_worker_is_retried_then_its_input_rejected(tmp_path):
    raw = tmp_path / "raw"
    for name, size in (("a_good", 160), ("b_crash", 120), ("c_good", 160)):
        write_video(raw / f"{name}.mp4", astronaut_video(10, size), 8)
        (raw / f"{name}.txt").write_text(CAPTION)
    log = tmp_path / "driver.log"
    proc = driver(tmp_path / "driver", log, f"input={raw}", "output=out", "engine=ray", "engine.num_cpus=2",
                  "pose._target_=dynamictrl.testing.crashing_pose.CrashingPose", "+pose.crash_height=120")  # fmt: skip
    try:
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]  # unbounded retries never end
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = tmp_path / "driver" / "out"
    reasons = rejects(out)
    assert list(reasons) == ["b_crash.mp4"], reasons
    # engine.max_retries defaults to 2: the first attempt and 2 retries die, the input is rejected
    assert reasons["b_crash.mp4"].startswith("failed: the pose worker died 3 times on its clip 0 (last: pid ")
    assert [Path(r["source"]).name for r in manifest(out)] == ["a_good.mp4", "c_good.mp4"]
    assert "preprocess: 3 Ray worker(s) died while working" in log.read_text()  # said, not only in rejects


def mount_namespaces() -> bool:
    """`unshare -m` works here (root, or unprivileged user namespaces): a process can get a private mount."""
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-m", "true"]).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not mount_namespaces(), reason="needs unshare -m to give the driver a folder the workers cannot see")
def test_an_output_the_workers_cannot_see_is_refused_with_one_line(mixed, tmp_path):  # noqa: F811
    """The driver alone mounts a private folder over its output's parent (a mount namespace), as a local
    disk on the driver's node would be: the workers, outside it, cannot see the output."""
    private = tmp_path / "private"
    private.mkdir()
    with RehearsalCluster(tmp_path / "cluster") as cluster:
        cluster.start_head(num_cpus=2)
        script = (f"mount -t tmpfs none {private} && exec {sys.executable} {MAIN} input={mixed} "
                  f"output={private / 'out'} engine=ray engine.address=auto progress=false "
                  f"hydra.run.dir={tmp_path / 'hydra'}")  # fmt: skip
        done = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env(), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr  # user_errors: one line, exit status 2
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("preprocess: error:")]
    assert len(errors) == 1 and "not visible from Ray node" in errors[0] and "Traceback" not in done.stderr, errors


def test_paths_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from dynamictrl import config
    from dynamictrl.preprocess.run import absolute_paths

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "det.onnx").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    c = absolute_paths(config.load("preprocess", ["input=raw", "output=out", "pose=dwpose",
                                                  "pose.det_model=models/det.onnx", "mask=sam2"]))  # fmt: skip
    assert (c.input, c.output) == (str(tmp_path / "raw"), str(tmp_path / "out"))
    assert c.pose.det_model == str(tmp_path / "models" / "det.onnx")
    assert c.mask.config == "configs/sam2.1/sam2.1_hiera_l.yaml"  # not a file here: a config shipped in sam2
    assert json.dumps(OmegaConf.to_container(c.pose)).count(str(tmp_path)) == 1  # only the file that exists


def test_rows_carry_raw_arrays_and_never_a_sample():
    """Between Ray stages a window is its arrays' own bytes (masks bit-packed), not an npz container,
    and an encoded sample never travels in a row: it is staged for the writers, not sent to the driver."""
    from dynamictrl.preprocess.stages import Window, from_row, to_row

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (9, 64, 48, 3), dtype=np.uint8)
    masks = rng.random((9, 64, 48)) > 0.5
    kpts = rng.random((9, 134, 3)).astype(np.float32)
    w = Window(3, 1, 4, np.arange(4, 13), {"video_id": "v"}, frames=frames, masks=masks, kpts=kpts)
    row = to_row(w)
    assert row["a_frames"] == frames.tobytes() and len(row["a_masks"]) == masks.size // 8
    assert "payload" not in row and not any(isinstance(v, bytes) and v[:2] == b"PK" for v in row.values())  # no zip
    back = from_row(row)
    assert back.frames.flags.writeable and back.frames.dtype == np.uint8
    assert all(np.array_equal(getattr(back, k), getattr(w, k)) for k in ("src", "frames", "masks", "kpts"))
    assert back.people is None and back.info == {"video_id": "v"}
    w.sample = {"__key__": "v-0001", "mp4": b"x"}
    with pytest.raises(ValueError, match="does not travel in a row"):
        to_row(w)


class Died(BaseException):
    """Stands for a worker's death: no `except Exception` catches it, so it leaves the ledger's entries
    open exactly as a killed process does."""


def test_a_caption_batch_whose_worker_dies_is_retried_window_by_window():
    """Attempt 1 dies in the batch (all 3 windows charged once); from then on the windows go one by one,
    so only the window that kills its worker reaches max_retries deaths and is rejected."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from dynamictrl import config
    from dynamictrl.preprocess.ray_engine import Attempts, Stage
    from dynamictrl.preprocess.stages import Failed, Window

    calls: list[int] = []

    class Captioner:
        name, version = "fake", "1"

        def __call__(self, clips):
            calls.append(len(clips))
            if any(c[0, 0, 0, 0] == 1 for c in clips):
                raise Died
            return ["A person."] * len(clips)

    stage = Stage(OmegaConf.to_container(config.load("preprocess", [])), "caption", Attempts(), 2)
    stage.backends = SimpleNamespace(caption=Captioner())

    def windows():
        made = [Window(v, 0, 0, np.arange(2), {}, frames=np.zeros((2, 4, 4, 3), np.uint8), crop=[0, 0, 4, 4])
                for v in range(3)]  # fmt: skip
        made[1].frames[0, 0, 0, 0] = 1  # the window that kills its worker
        return made

    for _ in range(3):  # the batch dies, then window 1 dies alone twice
        with pytest.raises(Died):
            stage._caption(windows())
    assert calls == [3, 1, 1, 1, 1]
    done = stage._caption(windows())
    results = list(done.values())
    assert isinstance(results[1], Failed) and results[1].reason.startswith("failed: the caption worker died 3 times")
    assert [r.caption for i, r in enumerate(results) if i != 1] == ["A person.", "A person."]
    assert calls == [3, 1, 1, 1, 1, 1, 1]  # windows 0 and 2 run again alone; window 1 is not run a 4th time
