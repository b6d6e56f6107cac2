"""make animate ARGS="image=PATH pose=PATH prompt='...' output=PATH.mp4": animate a picture.

Clips longer than the model's clip length are chained: each next clip starts from the last
generated frame (as in the paper's long videos), so the output has exactly the requested frames.
Writes the video, a side-by-side video (reference | pose | output) and a JSON of every setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from dynamictrl.errors import UserError
from dynamictrl.models import embedded
from dynamictrl.models.pipeline import DynamiCtrlPipeline
from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel
from dynamictrl.utils.video import read_image, read_video, write_video


def load_pipeline(model: str | Path | None = None) -> DynamiCtrlPipeline:
    """A pipeline folder, a training output (base + exported transformer), or the embedded model."""
    path = Path(model) if model else embedded.ensure()
    if (path / "model_index.json").is_file():
        return DynamiCtrlPipeline.from_pretrained(path)
    if (path / "model.json").is_file():
        info = json.loads((path / "model.json").read_text())
        transformer = DynamiCtrlTransformer3DModel.from_pretrained(path / info["transformer"])
        return DynamiCtrlPipeline.from_pretrained(info["base"], transformer=transformer)
    if not path.exists():
        raise UserError(f"model={path}: no such folder")
    raise UserError(f"model={path}: neither a pipeline folder (model_index.json) nor a training output (model.json)")


def fit(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to the target aspect ratio, then resize to (height, width)."""
    h, w = frame.shape[:2]
    if w * height > h * width:  # too wide
        nw = round(h * width / height)
        frame = frame[:, (w - nw) // 2 : (w - nw) // 2 + nw]
    else:
        nh = round(w * height / width)
        frame = frame[(h - nh) // 2 : (h - nh) // 2 + nh]
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)


def animate(pipe: DynamiCtrlPipeline, image: np.ndarray, pose: np.ndarray, prompt: str, clip_frames: int,
            num_frames: int | None = None, seed: int = 0, progress: bool = True, **call) -> np.ndarray:  # fmt: skip
    """Generate `num_frames` (default: len(pose)) frames in chained clips of `clip_frames`.

    Clip k > 0 takes the last frame of clip k-1 as its reference and that frame's pose as its first
    pose, and contributes clip_frames - 1 new frames. The last clip's poses are padded by repeating
    the final pose, and the output is trimmed to exactly `num_frames`.
    """
    total = num_frames or len(pose)
    if len(pose) < total:
        pose = np.concatenate([pose, np.repeat(pose[-1:], total - len(pose), axis=0)])
    starts = [0]
    while starts[-1] + clip_frames < total:
        starts.append(starts[-1] + clip_frames - 1)
    out: list[np.ndarray] = []
    ref = image
    g = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    for k, s in enumerate(tqdm(starts, desc="animate", unit="clip", disable=not progress)):
        chunk = pose[s : s + clip_frames]
        if len(chunk) < clip_frames:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], clip_frames - len(chunk), axis=0)])
        frames = pipe(ref, chunk, prompt=prompt, generator=g, **call).frames[0]
        out.extend(frames if k == 0 else frames[1:])
        ref = frames[-1]
    return np.stack(out[:total])


def side_by_side(*videos: np.ndarray) -> np.ndarray:
    """Stack videos (T, H, W, 3) left to right; a single image (H, W, 3) is repeated over time."""
    t = max(len(v) for v in videos if v.ndim == 4)
    cols = [np.repeat(v[None], t, 0) if v.ndim == 3 else v for v in videos]
    h = cols[0].shape[1]
    cols = [c if c.shape[1] == h else np.stack([cv2.resize(f, (round(f.shape[1] * h / f.shape[0]), h)) for f in c]) for c in cols]
    return np.concatenate(cols, axis=2)


def run(cfg: DictConfig) -> dict[str, Any]:
    for key in ("image", "pose", "output"):
        if not cfg.get(key):
            raise UserError(f"{key} is not set: make animate ARGS=\"image=PATH pose=PATH prompt='...' output=PATH.mp4\"")
    if not cfg.get("prompt"):
        raise UserError("prompt is not set (captioning the reference automatically comes with the caption backends)")
    image = read_image(cfg.image)
    pose, pose_fps = read_video(cfg.pose)
    if cfg.get("num_frames") is not None and int(cfg.num_frames) < 1:
        raise UserError(f"num_frames={cfg.num_frames}: must be at least 1")
    pipe = load_pipeline(cfg.get("model"))
    tc = pipe.transformer.config
    height = int(cfg.height or tc.sample_height * pipe.vae_scale_factor_spatial)
    width = int(cfg.width or tc.sample_width * pipe.vae_scale_factor_spatial)
    clip_frames = int(cfg.clip_frames or tc.sample_frames)
    image = fit(image, height, width)
    pose = np.stack([fit(f, height, width) for f in pose])
    try:
        frames = animate(pipe, image, pose, cfg.prompt, clip_frames, cfg.get("num_frames"), int(cfg.seed),
                         cfg.get("progress", True), num_inference_steps=int(cfg.steps),
                         guidance_scale=float(cfg.guidance_scale), negative_prompt=cfg.negative_prompt)  # fmt: skip
    except ValueError as err:
        raise UserError(str(err)) from None
    fps = float(cfg.fps or pose_fps)
    out = Path(cfg.output)
    write_video(out, frames, fps)
    side = write_video(out.with_name(out.stem + "_side.mp4"), side_by_side(image, pose[: len(frames)], frames), fps)
    settings = OmegaConf.to_container(cfg, resolve=True) | {"fps": fps, "frames": len(frames)}
    out.with_suffix(".json").write_text(json.dumps(settings, indent=1))
    print(f"animate: {len(frames)} frames at {fps:g} fps -> {out} (side by side: {side})")
    return {"output": str(out), "side_by_side": str(side), "frames": len(frames), "fps": fps}
