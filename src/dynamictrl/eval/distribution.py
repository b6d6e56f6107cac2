"""FID, FID-VID and FVD: features of frames or clips, pooled over a whole set, then a Fréchet distance.

Protocols (recorded in every report):
- `disco` (DisCo's tool/metrics, behind the published tables): FID over all frames with pytorch-fid's
  Inception (which resizes to 299x299 itself); FID-VID from 16-frame clips squashed to 112x112 with
  PIL bicubic, minus the Kinetics pixel mean (0-255 scale), 3D ResNet-50 pooled features; FVD from
  16-frame clips squashed to 224x224, x/127.5-1, I3D logits. Clips start at every frame (stride 1),
  as DisCo's frame-folder datasets do; a video shorter than a clip is padded with its last frame.
- `clean`: the same backbones, but frames are centre-cropped to a square before resizing (no
  aspect distortion) and clips do not overlap (stride 16), so that no clip is counted 16 times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

CLIP_LENGTH = 16
KINETICS_MEAN = (114.7748, 107.7354, 99.4750)  # the 3D ResNet's training mean, 0-255 RGB


@dataclass(frozen=True)
class ClipProtocol:
    size: int
    stride: int
    crop: bool
    normalize: str  # "kinetics_mean" (FID-VID) or "minus_one_one" (FVD)


def clip_protocol(metric: str, protocol: str) -> ClipProtocol:
    size, normalize = {"fid_vid": (112, "kinetics_mean"), "fvd": (224, "minus_one_one")}[metric]
    return ClipProtocol(size, 1 if protocol == "disco" else CLIP_LENGTH, protocol != "disco", normalize)


def describe(protocol: str) -> dict[str, str]:
    """One line per metric for the report's definition column."""
    if protocol == "disco":
        return {
            "fid": "pytorch-fid InceptionV3 pool3 over all frames (resized to 299 by the network)",
            "fid_vid": "3D ResNet-50 Kinetics 2048-d, 16-frame clips at stride 1, 112x112 bicubic squash, minus Kinetics mean",
            "fvd": "I3D-400 logits, 16-frame clips at stride 1, 224x224 bicubic squash, x/127.5-1",
        }
    return {
        "fid": "pytorch-fid InceptionV3 pool3 over all frames, centre-cropped square",
        "fid_vid": "3D ResNet-50 Kinetics 2048-d, non-overlapping 16-frame clips, centre crop + 112x112 bicubic, minus Kinetics mean",
        "fvd": "I3D-400 logits, non-overlapping 16-frame clips, centre crop + 224x224 bicubic, x/127.5-1",
    }


def _square(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    s = min(h, w)
    return frame[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


def resize_frames(frames: np.ndarray, size: int, crop: bool) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size, size, 3) uint8 with PIL bicubic (squashed unless `crop`)."""
    out = [np.asarray(Image.fromarray(_square(f) if crop else f).resize((size, size), Image.BICUBIC)) for f in frames]
    return np.stack(out)


def clip_starts(num_frames: int, stride: int, length: int = CLIP_LENGTH) -> list[int]:
    """Start frames of the clips of a video (one clip, padded, for a video shorter than `length`)."""
    return list(range(0, max(num_frames - length, 0) + 1, stride))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def clip_features(model: nn.Module, frames: np.ndarray, proto: ClipProtocol, batch: int = 4) -> np.ndarray:
    """(T, H, W, 3) uint8 frames -> (clips, D) features of the protocol's 16-frame clips."""
    small = resize_frames(frames, proto.size, proto.crop).astype(np.float32)
    if len(small) < CLIP_LENGTH:  # pad with the last frame, as DisCo does
        small = np.concatenate([small, np.repeat(small[-1:], CLIP_LENGTH - len(small), 0)])
    if proto.normalize == "kinetics_mean":
        small -= np.asarray(KINETICS_MEAN, np.float32)
    else:
        small = small / 127.5 - 1.0
    video = torch.from_numpy(small).permute(3, 0, 1, 2)  # (3, T, S, S)
    starts = clip_starts(len(small), proto.stride)
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
