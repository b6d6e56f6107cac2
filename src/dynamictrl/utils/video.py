"""Reading and writing videos and frame folders (PyAV, libx264)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps

from dynamictrl.errors import UserError

VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
FRAME_NAME = re.compile(r"\d{5}\.png")  # write_frames' names


class VideoStream:
    """The frames of a video file (or mp4 bytes), decoded one at a time: memory holds one frame, not
    the video. `fps`, `height`, `width` (as stored) and `declared` (the container's frame count, 0 if
    unknown) are known on opening.

    Frames come out upright: a phone stores a portrait video as landscape frames with a display
    rotation (the container's display matrix), which is applied here as players apply it; `rotation`
    (degrees counterclockwise, as FFmpeg reports it) is known once the first frame is decoded.

    A truncated file yields the frames decoded before the damage, unless `strict`: then a decoding
    error after the first frame, or fewer frames than the container declares, raises UserError at the
    point it is found (after the frames before it were yielded).

    Raises:
        UserError: the file is missing, is not a video, has no decodable frames, or (strict) is truncated.
    """

    def __init__(self, source: str | Path | bytes, strict: bool = False):
        self.name = "<bytes>" if isinstance(source, bytes) else str(source)
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise UserError(f"{self.name}: no such file")
        self.strict = strict
        try:
            self._container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))
        except av.error.FFmpegError as err:
            raise UserError(f"{self.name}: unreadable video ({type(err).__name__}: {err.strerror or err})") from None
        if not self._container.streams.video:
            self._container.close()
            raise UserError(f"{self.name}: not a video (no video stream)")
        stream = self._container.streams.video[0]
        self.fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        self.declared = int(stream.frames or 0)
        self.height, self.width = int(stream.height), int(stream.width)
        self.decoded = 0
        self.rotation = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        """(H, W, 3) uint8 RGB frames in order."""
        stream = self._container.streams.video[0]
        try:
            for frame in self._container.decode(stream):
                self.decoded += 1
                self.rotation = int(frame.rotation or 0)
                image = frame.to_ndarray(format="rgb24")
                quarter_turns = round(self.rotation / 90) % 4  # counterclockwise, as np.rot90 turns
                yield np.ascontiguousarray(np.rot90(image, quarter_turns)) if quarter_turns else image
        except av.error.FFmpegError as err:
            if not self.decoded:
                raise UserError(f"{self.name}: unreadable video ({type(err).__name__}: {err.strerror or err})") from None
            if self.strict:
                raise UserError(f"{self.name}: truncated video (decoding failed after {self.decoded} frames)") from None
            # A truncated file: keep what decoded before the damage.
        finally:
            self._container.close()
        if not self.decoded:
            raise UserError(f"{self.name}: video has no frames")
        if self.strict and self.declared - self.decoded > max(2, 0.02 * self.declared):
            raise UserError(f"{self.name}: truncated video ({self.decoded} of {self.declared} frames decode)")

    def close(self) -> None:
        self._container.close()


def read_video(source: str | Path | bytes, max_frames: int | None = None,
               strict: bool = False) -> tuple[np.ndarray, float]:  # fmt: skip
    """Decode every frame of a video file (or mp4 bytes) into memory (`VideoStream` for long ones).

    A truncated file keeps the frames decoded before the damage, unless `strict`: then a decoding
    error after the first frame, or fewer frames than the container declares, is an error.

    Returns:
        frames (T, H, W, 3) uint8 RGB and the frame rate.
    Raises:
        UserError: the file is missing, is not a video, has no decodable frames, or (strict) is truncated.
    """
    video = VideoStream(source, strict=strict and not max_frames)
    frames: list[np.ndarray] = []
    for frame in video:
        frames.append(frame)
        if max_frames and len(frames) >= max_frames:
            video.close()
            break
    return np.stack(frames), video.fps


def iter_frames_dir(folder: str | Path) -> Iterator[np.ndarray]:
    """The images of a folder, sorted by name, one at a time as (H, W, 3) uint8 RGB."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: no images")
    shape = None
    for f in files:
        image = read_image(f)
        if shape is not None and image.shape != shape:
            raise UserError(f"{folder}: images differ in size ({f.name} is {image.shape[1]}x{image.shape[0]})")
        shape = image.shape
        yield image


def read_frames_dir(folder: str | Path) -> np.ndarray:
    """All images in a folder, sorted by name, as (T, H, W, 3) uint8 RGB."""
    return np.stack(list(iter_frames_dir(folder)))


def read_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, upright: its EXIF orientation applied (a phone photo
    stores its pixels sideways and says so there). Animate's reference and every frame-folder image
    (eval, preprocess) are read here."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable image ({err})") from None


def write_frames(folder: str | Path, frames: np.ndarray) -> Path:
    """Write (T, H, W, 3) uint8 RGB frames losslessly as FOLDER/00000.png, 00001.png, ... The frames
    of an earlier run in that folder (files named like these) are removed first, so the folder holds
    exactly these frames; other files stay."""
    frames = _checked(frames)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if FRAME_NAME.fullmatch(old.name):
            old.unlink()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:05d}.png")
    return folder


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


def _checked(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8; got {frames.shape} {frames.dtype}")
    return frames


def _write(fileobj, frames: np.ndarray, fps: float, crf: int, fmt: str) -> None:
    frames = _checked(frames)
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
