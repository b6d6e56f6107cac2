"""Reading and writing videos and frame folders (PyAV, libx264)."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from dynamictrl.errors import UserError

VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_video(source: str | Path | bytes, max_frames: int | None = None,
               strict: bool = False) -> tuple[np.ndarray, float]:  # fmt: skip
    """Decode every frame of a video file (or mp4 bytes).

    A truncated file keeps the frames decoded before the damage, unless `strict`: then a decoding
    error after the first frame, or fewer frames than the container declares, is an error.

    Returns:
        frames (T, H, W, 3) uint8 RGB and the frame rate.
    Raises:
        UserError: the file is missing, is not a video, has no decodable frames, or (strict) is truncated.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise UserError(f"{name}: no such file")
    frames: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            if not container.streams.video:
                raise UserError(f"{name}: not a video (no video stream)")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            declared = stream.frames
            try:
                for frame in container.decode(stream):
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if max_frames and len(frames) >= max_frames:
                        break
            except av.error.FFmpegError:
                if not frames:
                    raise
                if strict:
                    raise UserError(f"{name}: truncated video (decoding failed after {len(frames)} frames)") from None
                # A truncated file: keep what decoded before the damage.
            if strict and not max_frames and declared - len(frames) > max(2, 0.02 * declared):
                raise UserError(f"{name}: truncated video ({len(frames)} of {declared} frames decode)")
    except av.error.FFmpegError as err:
        raise UserError(f"{name}: unreadable video ({type(err).__name__}: {err.strerror or err})") from None
    if not frames:
        raise UserError(f"{name}: video has no frames")
    return np.stack(frames), fps


def read_frames_dir(folder: str | Path) -> np.ndarray:
    """All images in a folder, sorted by name, as (T, H, W, 3) uint8 RGB."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: no images")
    frames = [read_image(p) for p in files]
    if len({f.shape for f in frames}) > 1:
        raise UserError(f"{folder}: images differ in size")
    return np.stack(frames)


def read_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable image ({err})") from None


def read_any(path: str | Path) -> tuple[np.ndarray, float | None]:
    """A video file or a folder of frames -> (frames, fps or None for folders)."""
    path = Path(path)
    if path.is_dir():
        images = path / "images" if (path / "images").is_dir() else path
        return read_frames_dir(images), None
    return read_video(path)


def encode_mp4(frames: np.ndarray, fps: float, crf: int = 12) -> bytes:
    """(T, H, W, 3) uint8 RGB -> H.264 mp4 bytes (yuv420p; H and W must be even)."""
    buf = io.BytesIO()
    _write(buf, frames, fps, crf, "mp4")
    return buf.getvalue()


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 16) -> Path:
    """Write (T, H, W, 3) uint8 RGB frames to an mp4 file, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        _write(f, frames, fps, crf, "mp4")
    return path


def _write(fileobj, frames: np.ndarray, fps: float, crf: int, fmt: str) -> None:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8; got {frames.shape} {frames.dtype}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:  # yuv420p needs even sizes
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(fileobj, mode="w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
