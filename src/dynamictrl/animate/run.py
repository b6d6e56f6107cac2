"""make animate: a reference picture + a pose video (or a raw driving video) + a prompt -> a video.

- `driving=` videos go through the configured pose backend; the driving skeleton is retargeted to
  the reference person (`align=true`), and the reference's own pose starts the sequence, as in the
  official inference.
- Videos longer than the model's clip are chained: each next clip starts from an already generated
  frame (the previous clip's last one, or `overlap` frames earlier with a linear cross-fade over the
  overlap), so any length comes out with exactly the requested number of frames.
- `background=` masks the reference to the person and replaces the prompt's background sentence:
  the paper's background control.
Writes the video, a side-by-side video (reference | pose | output) and a JSON of every setting.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from diffusers import CogVideoXDPMScheduler
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from dynamictrl.animate.align import retarget
from dynamictrl.errors import UserError
from dynamictrl.models import embedded
from dynamictrl.models.pipeline import DynamiCtrlPipeline
from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel
from dynamictrl.pose import layout as L
from dynamictrl.pose.render import render_pose, render_video
from dynamictrl.utils.video import read_image, read_video, write_video


def load_pipeline(model: str | Path | None = None) -> DynamiCtrlPipeline:
    """A pipeline folder, a training output (base + exported transformer), or the embedded model,
    with the DPM scheduler on trailing timesteps (the official inference's), whatever the folder ships."""
    pipe = _load(model)
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe


def _load(model: str | Path | None) -> DynamiCtrlPipeline:
    path = Path(model) if model else embedded.ensure()
    if (path / "model_index.json").is_file():
        return DynamiCtrlPipeline.from_pretrained(path)
    if (path / "model.json").is_file():
        info = json.loads((path / "model.json").read_text())
        if not (Path(info["base"]) / "model_index.json").is_file():
            raise UserError(f"model={path}: its base model {info['base']} is not a pipeline folder (moved or deleted?)")
        transformer = DynamiCtrlTransformer3DModel.from_pretrained(path / info["transformer"])
        return DynamiCtrlPipeline.from_pretrained(info["base"], transformer=transformer)
    if not path.exists():
        raise UserError(f"model={path}: no such folder")
    raise UserError(f"model={path}: neither a pipeline folder (model_index.json) nor a training output (model.json)")


def crop_region(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The centred (x0, y0, x1, y1) region of an h x w frame with the target aspect ratio."""
    if w * height > h * width:  # too wide
        nw = round(h * width / height)
        return (w - nw) // 2, 0, (w - nw) // 2 + nw, h
    nh = round(w * height / width)
    return 0, (h - nh) // 2, w, (h - nh) // 2 + nh


def fit(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to the target aspect ratio, then resize to (height, width)."""
    x0, y0, x1, y1 = crop_region(*frame.shape[:2], height, width)
    return cv2.resize(frame[y0:y1, x0:x1], (width, height), interpolation=cv2.INTER_AREA)


def fit_keypoints(kpts: np.ndarray, h: int, w: int, height: int, width: int) -> np.ndarray:
    """Normalised keypoints of an h x w frame -> normalised keypoints of its `fit` to height x width."""
    x0, y0, x1, y1 = crop_region(h, w, height, width)
    out = kpts.copy()
    out[..., 0] = (kpts[..., 0] * w - x0) / (x1 - x0)
    out[..., 1] = (kpts[..., 1] * h - y0) / (y1 - y0)
    outside = (out[..., 0] < 0) | (out[..., 0] > 1) | (out[..., 1] < 0) | (out[..., 1] > 1)
    out[outside | (kpts[..., 2] <= 0)] = 0.0
    return out


OFFICIAL_BUCKETS = [[768, 1360], [1360, 768]]  # DynamiCtrl's published inference size, both orientations


def model_defaults(pipe: DynamiCtrlPipeline) -> dict[str, Any]:
    """Animation defaults stored with a model (`dynamictrl.json` in its folder), if any."""
    folder = Path(getattr(pipe, "name_or_path", "") or "")
    path = folder / "dynamictrl.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def choose_size(image: np.ndarray, buckets: list | None) -> tuple[int, int]:
    """The (height, width) bucket closest to the reference's aspect ratio (ties: portrait first)."""
    aspect = image.shape[1] / image.shape[0]
    return min(((int(h), int(w)) for h, w in buckets), key=lambda hw: abs(np.log(hw[1] / hw[0] / aspect)))


def extract_poses(frames: np.ndarray, backend, desc: str = "driving poses", progress: bool = True) -> np.ndarray:
    """(T, H, W, 3) frames -> (T, 134, 3) keypoints; a frame with no person repeats the last pose found.

    A batched backend (DWPose, `batch_size` > 1) gets the whole video at once; a per-frame tracker
    (MediaPipe) is fed frame by frame under a progress bar."""
    if getattr(backend, "batch_size", 1) > 1 and hasattr(backend, "detect_video"):
        found = backend.detect_video(np.ascontiguousarray(frames)).kpts
    else:
        backend.reset()
        found = np.stack([backend(np.ascontiguousarray(f))[0]
                          for f in tqdm(frames, desc=desc, leave=False, disable=not progress)])  # fmt: skip
    kpts = L.empty(len(frames))
    last = None
    for i, k in enumerate(found):
        if L.body_detected(k[None])[0]:
            last = k
        if last is not None:
            kpts[i] = last
    return kpts


def replace_background(prompt: str, background: str) -> str:
    """Swap the prompt's "The background ..." sentences for the requested background."""
    sentence = background.strip().rstrip(".") + "."
    if not sentence.lower().startswith("the background"):
        sentence = f"The background is {sentence[0].lower()}{sentence[1:]}"
    kept = re.sub(r"(?i)\bthe background\b[^.]*\.?", "", prompt).strip()
    return f"{kept} {sentence}".strip()


def animate(pipe: DynamiCtrlPipeline, image: np.ndarray, pose: np.ndarray, prompt: str, clip_frames: int,
            num_frames: int | None = None, seed: int = 0, overlap: int = 0, progress: bool = True,
            **call) -> np.ndarray:  # fmt: skip
    """Generate `num_frames` (default: len(pose)) frames in chained clips of `clip_frames`.

    Clip k > 0 starts at an already generated frame, which is its reference and whose pose is its
    first pose: the previous clip's last frame, or `overlap` frames before it, in which case the
    `overlap` frames after the start are cross-faded from the old clip to the new one. The last
    clip's poses are padded by repeating the final pose; the output is trimmed to `num_frames`.
    """
    total = num_frames or len(pose)
    step = clip_frames - 1 - overlap
    if step < 1:
        raise ValueError(f"overlap={overlap} leaves no new frames in clips of {clip_frames} frames")
    starts = [0]
    while starts[-1] + clip_frames < total:
        starts.append(starts[-1] + step)
    length = starts[-1] + clip_frames
    if len(pose) < length:
        pose = np.concatenate([pose, np.repeat(pose[-1:], length - len(pose), axis=0)])
    out = np.zeros((length, *pose.shape[1:]), np.float32)
    g = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    for k, s in enumerate(tqdm(starts, desc="animate", unit="clip", disable=not progress)):
        ref = image if k == 0 else out[s].round().astype(np.uint8)
        frames = pipe(ref, pose[s : s + clip_frames], prompt=prompt, generator=g, **call).frames[0].astype(np.float32)
        if k == 0:
            out[:clip_frames] = frames
            continue
        for j in range(1, overlap + 1):
            w = j / (overlap + 1)
            out[s + j] = (1 - w) * out[s + j] + w * frames[j]
        out[s + 1 + overlap : s + clip_frames] = frames[1 + overlap :]
    return out[:total].round().astype(np.uint8)


def side_by_side(*videos: np.ndarray) -> np.ndarray:
    """Stack videos (T, H, W, 3) left to right; a single image (H, W, 3) is repeated over time."""
    t = max(len(v) for v in videos if v.ndim == 4)
    cols = [np.repeat(v[None], t, 0) if v.ndim == 3 else v[:t] for v in videos]
    h = cols[0].shape[1]
    cols = [c if c.shape[1] == h else np.stack([cv2.resize(f, (round(f.shape[1] * h / f.shape[0]), h)) for f in c])
            for c in cols]  # fmt: skip
    return np.concatenate(cols, axis=2)


def caption_for(image_path: Path) -> str | None:
    """The caption backend for the reference: a sidecar IMAGE.txt."""
    side = image_path.with_suffix(".txt")
    return side.read_text().strip() or None if side.is_file() else None


def run(cfg: DictConfig, pipe: DynamiCtrlPipeline | None = None, backend=None) -> dict[str, Any]:
    """Animate one picture. `pipe` and the pose `backend` may be passed in loaded, so that a caller
    animating many videos (eval's dataset mode) loads each model once."""
    usage = "make animate ARGS=\"image=PATH (pose=PATH | driving=PATH) prompt='...' output=PATH.mp4\""
    for key in ("image", "output"):
        if not cfg.get(key):
            raise UserError(f"{key} is not set: {usage}")
    if bool(cfg.get("pose")) == bool(cfg.get("driving")):
        raise UserError(f"give exactly one of pose= (a rendered pose video) or driving= (a raw video): {usage}")
    if cfg.get("num_frames") is not None and int(cfg.num_frames) < 1:
        raise UserError(f"num_frames={cfg.num_frames}: must be at least 1")
    image_path = Path(cfg.image)
    image = read_image(image_path)
    source = Path(cfg.pose or cfg.driving)
    frames, src_fps = read_video(source)
    prompt = cfg.get("prompt") or caption_for(image_path)
    if not prompt:
        raise UserError(f"no prompt: give prompt='...' or put a caption in {image_path.with_suffix('.txt')} "
                        f"(caption models come with the caption backends)")  # fmt: skip

    pipe = pipe or load_pipeline(cfg.get("model"))
    defaults = model_defaults(pipe)
    height, width = choose_size(image, cfg.get("buckets") or defaults.get("buckets") or OFFICIAL_BUCKETS)
    height, width = int(cfg.get("height") or height), int(cfg.get("width") or width)
    clip_frames = int(cfg.clip_frames or defaults.get("clip_frames") or pipe.transformer.config.sample_frames)
    ref = fit(image, height, width)
    own_backend = backend is None
    backend = instantiate(cfg.pose_backend) if own_backend else backend
    backend.reset()
    ref_k, ref_mask = backend(ref)
    if not L.body_detected(ref_k[None])[0]:
        raise UserError(f"image={image_path}: no person found in the reference")

    # Driving poses: keypoints when we have them (driving= or a .npy beside the pose video).
    kpts = None
    if cfg.get("driving"):
        kpts = extract_poses(np.stack([fit(f, height, width) for f in frames]), backend, progress=cfg.progress)
        if not L.body_detected(kpts).any():
            raise UserError(f"driving={source}: no person found in any frame")
    elif source.with_suffix(".npy").is_file():
        raw = np.load(source.with_suffix(".npy"), allow_pickle=False)
        kpts = fit_keypoints(raw.astype(np.float32), *frames.shape[1:3], height, width)
    aligned = bool(cfg.align and kpts is not None)
    if aligned:
        px = np.array([width, height, 1.0], np.float32)
        kpts = retarget(kpts * px, ref_k * px) / px
    pose = render_video(kpts, height, width) if kpts is not None else np.stack([fit(f, height, width) for f in frames])
    if own_backend:
        backend.close()

    n = int(cfg.num_frames or len(pose))
    if len(pose) < n:  # hold the last driving pose
        pose = np.concatenate([pose, np.repeat(pose[-1:], n - len(pose), axis=0)])
    pose = pose[:n]
    if cfg.prepend_reference_pose:
        pose = np.concatenate([render_pose(ref_k, height, width)[None], pose])
    mask = None
    if cfg.get("background"):
        if ref_mask is None and L.body_detected(ref_k[None])[0]:
            # a pose backend without segmentation (DWPose): MediaPipe selfie masks in the person's box
            from dynamictrl.pose.base import frame_boxes
            from dynamictrl.pose.mediapipe_backend import MediaPipeSelfieMasks

            selfie = MediaPipeSelfieMasks()
            ref_mask = selfie.masks(ref[None], frame_boxes(ref_k[None], height, width))[0]
            selfie.close()
            ref_mask = ref_mask if ref_mask.any() else None
        if ref_mask is None:
            raise UserError(f"image={image_path}: the mask backend found no person to keep")
        mask = ref_mask
        prompt = replace_background(prompt, cfg.background)

    from dynamictrl.utils.device import local_device

    device = local_device("auto")
    dtype = getattr(torch, cfg.dtype) if cfg.get("dtype") else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    pipe.to(dtype=dtype)
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()
    if cfg.vae_slicing:
        pipe.vae.enable_slicing()
    if cfg.cpu_offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    try:
        video = animate(pipe, ref, pose, prompt, clip_frames, n + int(bool(cfg.prepend_reference_pose)), int(cfg.seed),
                        int(cfg.overlap), cfg.progress, num_inference_steps=int(cfg.steps),
                        guidance_scale=float(cfg.guidance_scale), negative_prompt=cfg.negative_prompt,
                        reference_mask=mask, cfg_separate_passes=bool(cfg.cfg_separate_passes))  # fmt: skip
    except ValueError as err:
        raise UserError(str(err)) from None
    if cfg.prepend_reference_pose:  # the first frame is the reference itself
        video, pose = video[1:], pose[1:]
    fps = float(cfg.fps or src_fps)
    out = Path(cfg.output)
    write_video(out, video, fps)
    side = write_video(out.with_name(out.stem + "_side.mp4"), side_by_side(ref, pose, video), fps)
    settings = OmegaConf.to_container(cfg, resolve=True) | {
        "prompt_used": prompt, "fps": fps, "frames": len(video), "height": height, "width": width,
        "clip_frames": clip_frames, "aligned": aligned, "device": device, "dtype": str(dtype),
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(settings, indent=1))
    print(f"animate: {len(video)} frames at {fps:g} fps, {height}x{width} -> {out} (side by side: {side})")
    return {"output": str(out), "side_by_side": str(side), "frames": len(video), "fps": fps, "aligned": aligned}
