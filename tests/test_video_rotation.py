"""Phone videos: portrait clips stored as landscape frames plus a display rotation come out upright,
as a player shows them, in preprocessing and wherever a video is read."""

from pathlib import Path

import av
import numpy as np
import pytest

from dynamictrl.utils.video import VideoStream, read_video


def rotated_video(path: Path, rotation: int, frames: int = 3) -> np.ndarray:
    """A 32x64 (HxW) stored clip with a white block in its top-left corner and the display rotation
    `rotation` (degrees counterclockwise, FFmpeg's sign: a phone's portrait video has -90)."""
    img = np.zeros((32, 64, 3), np.uint8)
    img[:8, :16] = 255
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(rotation)
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return img


def corner(frame: np.ndarray) -> str:
    h, w = frame.shape[:2]
    quads = {"top-left": frame[: h // 2, : w // 2], "top-right": frame[: h // 2, w // 2 :],
             "bottom-left": frame[h // 2 :, : w // 2], "bottom-right": frame[h // 2 :, w // 2 :]}  # fmt: skip
    return max(quads, key=lambda k: quads[k].mean())


@pytest.mark.parametrize("rotation, shape, where", [(0, (32, 64), "top-left"), (-90, (64, 32), "top-right"),
                                                    (90, (64, 32), "bottom-left"), (180, (32, 64), "bottom-right")])  # fmt: skip
def test_frames_come_out_upright(tmp_path, rotation, shape, where):
    rotated_video(tmp_path / "v.mp4", rotation)
    stream = VideoStream(tmp_path / "v.mp4")
    frames = list(stream)
    assert stream.rotation % 360 == rotation % 360 and len(frames) == 3  # FFmpeg reads 180 back as -180
    assert all(f.shape[:2] == shape and f.flags.c_contiguous for f in frames)
    assert corner(frames[0]) == where  # -90: turned clockwise, the top-left corner goes to the top right
    video, _ = read_video(tmp_path / "v.mp4")
    assert video.shape[1:3] == shape
