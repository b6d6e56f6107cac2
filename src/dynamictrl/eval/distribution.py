"""FID, FID-VID and FVD: features of frames or clips, pooled over a whole set, then a Fréchet distance.

Protocols (recorded in every report):
- `disco`: DisCo's tool/metrics as its gen_eval.sh runs it today, on frame folders. FID over all
  frames with pytorch-fid's Inception (which resizes to 299x299 itself). FID-VID and FVD from 16-frame
  clips starting at every frame whose 15 successors exist: a video of T frames gives T-15 clips, one
  shorter than 16 frames none (its frame-folder dataset drops a clip whose frames are missing; only
  its mp4/gif path pads). Each frame is resized once, straight from its own size (a generated frame is
  not first matched to its reference), channel by channel as a float image (PIL mode "F", bicubic),
  so the result is neither rounded nor clipped (bicubic overshoots below 0 and above 255). FID-VID:
  112x112, minus the Kinetics pixel mean (0-255 scale), 3D ResNet-50 pooled features; FVD: 224x224,
  x/127.5-1, I3D logits.
- `disco-gif`: the pipeline behind the published tables (DisCo's June-2023 gen_eval.sh): every
  16-frame clip was first written as a GIF (imageio -> Pillow: each frame quantised to its own
  256-colour adaptive palette, median cut, no dithering), then read back and scored as above. Its GIF
  script's start positions stop one short, `range(0, T - 16)`: T-16 clips per video (the last complete
  clip is never written), none for T <= 16. FID is pytorch-fid on the frames, as in `disco`.
- `clean`: the same backbones, but frames are centre-cropped to a square and resized as 8-bit images
  (no aspect distortion), generated frames taken at their reference's size, and clips do not overlap
  (stride 16), so that no frame is counted 16 times; a video shorter than a clip gives one clip,
  padded with its last frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

CLIP_LENGTH = 16
KINETICS_MEAN = (114.7748, 107.7354, 99.4750)  # the 3D ResNet's training mean, 0-255 RGB
DISTRIBUTION_PROTOCOLS = ("disco", "disco-gif", "clean")


@dataclass(frozen=True)
class ClipProtocol:
    size: int
    normalize: str  # "kinetics_mean" (FID-VID) or "minus_one_one" (FVD)
    stride: int = 1
    crop: bool = False  # centre square crop before resizing, else squash
    float_resize: bool = True  # per-channel float bicubic (DisCo), else 8-bit PIL bicubic
    pad_short: bool = False  # a video shorter than a clip gives one padded clip, else none
    gif: bool = False  # 256-colour GIF round trip and DisCo's GIF script's start positions


def clip_protocol(metric: str, protocol: str) -> ClipProtocol:
    size, normalize = {"fid_vid": (112, "kinetics_mean"), "fvd": (224, "minus_one_one")}[metric]
    if protocol == "clean":
        return ClipProtocol(size, normalize, stride=CLIP_LENGTH, crop=True, float_resize=False, pad_short=True)
    if protocol not in DISTRIBUTION_PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: choose one of {DISTRIBUTION_PROTOCOLS}")
    return ClipProtocol(size, normalize, gif=protocol == "disco-gif")


def one_resize(protocol: str) -> bool:
    """Whether generated frames reach the backbones from their own size (DisCo) rather than after being
    matched to their reference's size (clean, so that both are cropped alike)."""
    return protocol != "clean"


def describe(protocol: str) -> dict[str, str]:
    """One line per metric for the report's definition column."""
    if protocol == "clean":
        return {
            "fid": "pytorch-fid InceptionV3 pool3 over all frames, centre-cropped square",
            "fid_vid": "3D ResNet-50 Kinetics 2048-d, non-overlapping 16-frame clips (a shorter video: one, padded), "
                       "centre crop + 112x112 8-bit bicubic, minus Kinetics mean",
            "fvd": "I3D-400 logits, non-overlapping 16-frame clips (a shorter video: one, padded), "
                   "centre crop + 224x224 8-bit bicubic, x/127.5-1",
        }  # fmt: skip
    clips = ("16-frame clips at stride 1, T-15 per video (none under 16 frames)" if protocol == "disco" else
             "16-frame clips at stride 1, each a 256-colour GIF (Pillow adaptive palette) read back, "
             "T-16 per video (none up to 16 frames)")  # fmt: skip
    squash = "bicubic squash per channel in float (unrounded), generated frames from their own size"
    return {
        "fid": "pytorch-fid InceptionV3 pool3 over all frames (resized to 299 by the network), "
               "generated frames at their own size",
        "fid_vid": f"3D ResNet-50 Kinetics 2048-d, {clips}, 112x112 {squash}, minus Kinetics mean",
        "fvd": f"I3D-400 logits, {clips}, 224x224 {squash}, x/127.5-1",
    }


def _square(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    s = min(h, w)
    return frame[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


def _resize(frame: np.ndarray, size: int, float_resize: bool) -> np.ndarray:
    if not float_resize:
        return np.asarray(Image.fromarray(frame).resize((size, size), Image.BICUBIC))
    channels = [Image.fromarray(np.ascontiguousarray(frame[..., c], np.float32)) for c in range(3)]  # mode "F"
    return np.stack([np.asarray(ch.resize((size, size), Image.BICUBIC)) for ch in channels], axis=-1)


def resize_frames(frames: np.ndarray, size: int, crop: bool = False, float_resize: bool = False) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size, size, 3) with PIL bicubic, squashed unless `crop`: uint8 from the
    8-bit image, or (`float_resize`) float32 from each channel resized as a float image, unrounded."""
    return np.stack([_resize(_square(f) if crop else f, size, float_resize) for f in frames])


def gif_quantize(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> the same frames after a GIF round trip as Pillow writes one: each frame on
    its own 256-colour adaptive (median-cut) palette, without dithering."""
    quantized = [Image.fromarray(f).convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    return np.stack([np.asarray(q.convert("RGB")) for q in quantized])


def clip_starts(num_frames: int, stride: int, length: int = CLIP_LENGTH, pad_short: bool = False,
                drop_last: bool = False) -> list[int]:  # fmt: skip
    """Start frames of the complete `length`-frame clips of a video, every `stride` frames. A video shorter
    than `length` gives one clip (to be padded) if `pad_short`, else none; `drop_last` leaves out the
    last start position, as DisCo's GIF script did."""
    if num_frames < length:
        return [0] if pad_short else []
    return list(range(0, num_frames - length - int(drop_last) + 1, stride))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def clip_features(model: nn.Module, frames: np.ndarray, proto: ClipProtocol, batch: int = 4) -> np.ndarray:
    """(T, H, W, 3) uint8 frames -> (clips, D) features of the protocol's 16-frame clips; (0, 0) for a
    video that has none."""
    starts = clip_starts(len(frames), proto.stride, pad_short=proto.pad_short, drop_last=proto.gif)
    if not starts:
        return np.zeros((0, 0))
    if proto.gif:
        frames = gif_quantize(frames)
    small = resize_frames(frames, proto.size, proto.crop, proto.float_resize).astype(np.float32)
    if len(small) < CLIP_LENGTH:  # only with pad_short
        small = np.concatenate([small, np.repeat(small[-1:], CLIP_LENGTH - len(small), 0)])
    if proto.normalize == "kinetics_mean":
        small -= np.asarray(KINETICS_MEAN, np.float32)
    else:
        small = small / 127.5 - 1.0
    video = torch.from_numpy(small).permute(3, 0, 1, 2)  # (3, T, S, S)
    feats = []
    dev = _device(model)
    for i in range(0, len(starts), batch):
        clips = torch.stack([video[:, s : s + CLIP_LENGTH] for s in starts[i : i + batch]])  # (B, 3, 16, S, S)
        feats.append(model(clips.to(dev)).float().cpu())
    return torch.cat(feats).numpy().astype(np.float64)


@torch.inference_mode()
def frame_features(model: nn.Module, frames: np.ndarray, crop: bool = False, batch: int = 32) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 2048) Inception pool features (the network resizes to 299 itself)."""
    dev = _device(model)
    feats = []
    for i in range(0, len(frames), batch):
        chunk = np.stack([_square(f) for f in frames[i : i + batch]]) if crop else frames[i : i + batch]
        x = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).float() / 255.0
        feats.append(model(x.to(dev)).float().cpu())
    return torch.cat(feats).numpy().astype(np.float64)
