"""Decoding streams: a 5-minute 720p source goes through the decode stage (resampling, clip windows)
with peak memory bounded by one window, not the source's length (all of it would be 20 GB of frames)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

MINUTES, FPS, H, W = 5, 24, 720, 1280

# The stated bound (README, preprocessing): decoding adds at most WINDOWS windows of source frames to
# the process's memory (the frames buffered for the next window, the window being stacked, the one the
# next stage holds, and the decoder's own frames), whatever the source's length. Here a window is
# 41 frames of 720p, 113 MB; the whole source would be 19 GB.
WINDOWS = 6

PROBE = """
import json, resource, sys
from pathlib import Path
from dynamictrl import config
from dynamictrl.preprocess.stages import End, Item, Window, decode
cfg = config.load("preprocess", ["input=x", "output=y", "clip=" + sys.argv[2]])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
windows, end = 0, None
for obj in decode(Item(Path(sys.argv[1]), "long", "train"), 0, cfg, caption_model=True):
    if isinstance(obj, Window):
        windows += 1
        shape = list(obj.frames.shape)
    else:
        end = obj
print(json.dumps({"windows": windows, "shape": shape, "frames": end.frames, "reject": end.reject, "base_mb": base,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def long_source(path: Path) -> Path:
    """MINUTES of 720p at FPS: a bar sliding over grey (24 distinct frames, cycled; fast to encode)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "35"}
        frames = []
        for i in range(FPS):
            f = np.full((H, W, 3), 90, np.uint8)
            f[200:520, i * 40 : i * 40 + 100] = (200, 80, 40)
            frames.append(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p"))
        for i in range(MINUTES * 60 * FPS):
            frames[i % FPS].pts = i
            for p in s.encode(frames[i % FPS]):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.mark.slow
def test_a_long_720p_source_decodes_in_bounded_memory(tmp_path):
    src = long_source(tmp_path / "long.mp4")
    out = subprocess.run([sys.executable, "-c", PROBE, str(src), "cogvideox1.5"], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    resampled = MINUTES * 60 * 16  # cogvideox1.5 clips: 16 fps, 41 frames every 20
    assert got["reject"] is None and got["frames"] == resampled
    assert got["windows"] == (resampled - 41) // 20 + 1 and got["shape"] == [41, H, W, 3]
    window_mb = 41 * H * W * 3 / 2**20
    added = got["peak_mb"] - got["base_mb"]
    assert added < WINDOWS * window_mb, f"decoding added {added:.0f} MB, {added / window_mb:.1f} windows of {window_mb:.0f} MB"
