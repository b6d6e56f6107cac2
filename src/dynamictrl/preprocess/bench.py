"""Preprocessing benchmark (part of `make bench`): frames/s of each backend on this machine, all on
the same frames in one process.

MediaPipe runs its real weights (they ship in the wheel). DWPose, SAM 2, segment-anything and
Qwen2-VL run the tiny random-weight models of `dynamictrl.testing` through the production code: the
figures measure each backend's pre/post-processing and runtime overhead at real input sizes, not the
cost of the real networks, which are far larger. They are labelled as such in the results.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from dynamictrl.pose.base import frame_boxes


def _frames(n: int, size: int) -> np.ndarray:
    """A real photo of a person (scikit-image's astronaut) drifting across `n` frames."""
    import cv2
    from skimage.data import astronaut

    img = cv2.resize(astronaut(), (size, size), interpolation=cv2.INTER_AREA)
    return np.stack([np.roll(img, 3 * i, axis=1) for i in range(n)])


def _rate(job, frames: int, repeats: int = 1) -> float:
    job()  # warm-up: first calls build graphs and allocate
    start = time.perf_counter()
    for _ in range(repeats):
        job()
    return frames * repeats / (time.perf_counter() - start)


def run(frames: int = 16, size: int = 256) -> tuple[dict, list[str]]:
    """Returns (results, markdown lines)."""
    from dynamictrl.pose.dwpose_backend import DWPose
    from dynamictrl.pose.mediapipe_backend import MediaPipeHolistic, MediaPipeSelfieMasks
    from dynamictrl.preprocess.caption import QwenVLCaptioner
    from dynamictrl.preprocess.masks import Sam2VideoMasks, SegmentAnythingMasks
    from dynamictrl.testing import tiny_dwpose, tiny_qwen2vl, tiny_sam2

    video = _frames(frames, size)
    holistic = MediaPipeHolistic()
    boxes = frame_boxes(holistic.detect_video(video).kpts, size, size)
    real, tiny = {}, {}
    real["pose: mediapipe holistic (with face counting)"] = _rate(lambda: holistic.detect_video(video), frames)
    holistic.count_people = False
    real["pose: mediapipe holistic (no face counting)"] = _rate(lambda: holistic.detect_video(video), frames)
    holistic.close()
    selfie = MediaPipeSelfieMasks()
    real["mask: mediapipe selfie segmentation"] = _rate(lambda: selfie.masks(video, boxes), frames)
    selfie.close()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for dynamic in (False, True):
            det, pose = tiny_dwpose.build(tmp / f"dwpose-{dynamic}", dynamic_batch=dynamic)
            backend = DWPose(det_model=str(det), pose_model=str(pose), device="cpu")
            label = "batched" if dynamic else "batch 1"
            tiny[f"pose: dwpose, tiny graphs ({label})"] = _rate(lambda b=backend: b.detect_video(video), frames)
            backend.close()
        config, ckpt = tiny_sam2.build_sam2(tmp / "sam2")
        sam2 = Sam2VideoMasks(checkpoint=str(ckpt), config=str(config), device="cpu")
        tiny["mask: sam2 video predictor, tiny model"] = _rate(lambda: sam2.masks(video, boxes), frames)
        sam2.close()
        config, ckpt = tiny_sam2.build_sam1(tmp / "sam1")
        sam1 = SegmentAnythingMasks(checkpoint=str(ckpt), config=str(config), device="cpu")
        tiny["mask: segment-anything, tiny model"] = _rate(lambda: sam1.masks(video, boxes), frames)
        sam1.close()
        captioner = QwenVLCaptioner(path=str(tiny_qwen2vl.build(tmp / "qwen")), max_new_tokens=16, device="cpu")
        clips = [video[i : i + 8] for i in range(0, frames, 8)]
        tiny["caption: qwen2-vl, tiny model (frames/s over clips of 8)"] = _rate(lambda: captioner(clips), frames)
        captioner.close()
    results = {"frames": frames, "size": [size, size], "real_weights_frames_per_s": real,
               "tiny_models_frames_per_s": tiny}  # fmt: skip
    lines = [f"## Preprocessing backends ({frames} frames at {size}x{size}, CPU)", "",
             "| backend | weights | frames/s |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | real (in the wheel) | {v:.1f} |" for k, v in real.items()]
    lines += [f"| {k} | tiny random (overhead only) | {v:.1f} |" for k, v in tiny.items()]
    lines += ["", "Tiny-model rows measure the production code path's overhead at this input size; real "
              "DWPose / SAM 2 / Qwen2-VL networks cost far more and want a GPU.", ""]  # fmt: skip
    return results, lines


class PeakRSS:
    """The largest memory of this process and all its descendants (Ray's workers included), sampled
    every `interval` seconds in a thread: the sum of their proportional set sizes (PSS), so that
    memory they share (Ray's object store, libraries) is counted once, not once per process."""

    def __init__(self, interval: float = 0.5):
        import threading

        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:  # it ended between listing and reading
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _driver(args: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """`run` in a fresh process (as `make preprocess` runs it), from `cwd`; returns its summary."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; from dynamictrl import config; from dynamictrl.preprocess.run import run; "
            "print('SUMMARY ' + json.dumps(run(config.load('preprocess', sys.argv[1:]))))")  # fmt: skip
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)
    found = [line for line in done.stdout.splitlines() if line.startswith("SUMMARY ")]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"preprocess {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(found[-1].split(" ", 1)[1])


def engines(videos: int = 6, frames: int = 48, size: int = 256) -> tuple[dict, list[str]]:
    """The engines side by side on the same inputs (`videos` real-photo clips that MediaPipe annotates,
    sidecar captions): local; Ray on a local cluster this process starts; Ray on the rehearsal cluster
    (`preprocess.cluster`: a head and a node with a fake GPU started with `ray start` from another
    directory, the driver joining with `engine.address=auto`, the pose pool on the GPU node). Per row:
    wall time over the time spent inside the models (what a GPU would see: 1.0 means it never waits),
    videos/h, the driver's CPU share (its own CPU seconds over the wall time: the driver is the
    bottleneck when it nears 1) and peak memory. Returns (results, markdown lines)."""
    import os

    from dynamictrl.preprocess import cluster as rehearsal
    from dynamictrl.utils.video import write_video

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        for i in range(videos):
            write_video(raw / f"v{i}.mp4", np.roll(_frames(frames, size), 5 * i, axis=2), 8)
            (raw / f"v{i}.txt").write_text("The person in the image is wearing a space suit.")
        rows = {"local": ["engine=local"], "ray, local cluster": ["engine=ray", f"engine.num_cpus={os.cpu_count()}"],
                "ray, rehearsal cluster (2 nodes)": ["engine=ray", "engine.address=auto", "engine.pose.num_gpus=1",
                                                     "engine.pose.concurrency=1"]}  # fmt: skip
        for label, extra in rows.items():
            cluster = None
            if "rehearsal" in label:  # head: 2 CPUs; node: 1 CPU and a fake GPU (the pose actor's)
                cluster = rehearsal.RehearsalCluster(Path(tmp) / "nodes" / "work").start_head(num_cpus=2)
                cluster.add_node(num_cpus=1, num_gpus=1)
            try:
                args = [f"input={raw}", f"output={Path(tmp) / str(len(results))}", "progress=false", "fps=null", *extra]
                with PeakRSS() as rss:
                    summary = _driver(args, Path(tmp) / "driver", rehearsal.env())
            finally:
                if cluster is not None:
                    cluster.stop()
            wall, cpu = summary["seconds"], summary["driver_cpu_s"]  # measured inside the driver's run()
            inside = sum(summary["backend_seconds"].values())
            results[label] = {"wall_s": wall, "backend_s": inside, "wall_over_backend": wall / max(inside, 1e-9),
                              "videos_per_h": summary["done"] / wall * 3600, "driver_cpu_share": cpu / wall,
                              "peak_rss_mb": rss.peak / 2**20, "memory_scope": "driver; nodes not counted" if cluster else "driver and its Ray workers" if "ray" in label else "driver",
                              "done": summary["done"], "backend_seconds": summary["backend_seconds"],
                              "pools": summary.get("ray", {}).get("pools")}  # fmt: skip
    lines = [f"## Preprocessing engines ({videos} videos of {frames} frames at {size}x{size}, MediaPipe on CPU)", "",
             "| engine | wall / time in models | videos/h | driver CPU share | peak memory, PSS (MB) |",
             "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v['wall_over_backend']:.2f} | {v['videos_per_h']:.0f} | {v['driver_cpu_share']:.2f} | "
              f"{v['peak_rss_mb']:.0f} ({v['memory_scope']}) |" for k, v in results.items()]  # fmt: skip
    lines += ["", "Measured in one run on this machine's CPUs, where the models share the cores with decoding "
              "and encoding and Ray's start-up (workers importing torch and MediaPipe) is part of the wall time; "
              "the ratio the streaming engine is built for (<= 1.25) is the one on GPU nodes, where the models "
              "run beside the CPU stages. Each row is a fresh driver process; wall time and the driver's CPU "
              "seconds are measured inside its `run()` (the Ray rows include connecting to or starting the "
              "cluster and the workers' start-up). Driver CPU share: the driver's CPU seconds over the wall "
              "time (the local engine does all the work in it). The rehearsal cluster's nodes run on the same 2 cores "
              "(3 logical CPUs declared: head 2, node 1 with a fake GPU for the pose actor); its memory column "
              "leaves out the nodes' processes (they are not the driver's children). Every memory figure includes "
              "the benchmark's own process (about the same in each row).", ""]  # fmt: skip
    return results, lines
