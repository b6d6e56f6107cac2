"""make animate: a reference picture + a pose video (or a raw driving video) + a prompt -> a video.

- `driving=` videos go through the configured pose backend; the driving skeleton is retargeted to
  the reference person (`align=true`), and the reference's own pose starts the sequence (our default;
  `preset=official` runs the official script's inference instead: `PRESETS`, docs/MODEL.md).
- Videos longer than the model's clip are chained: each next clip starts from an already generated
  frame (the previous clip's last one, or `overlap` frames earlier with a linear cross-fade over the
  overlap), so any length comes out with exactly the requested number of frames.
- `background=` masks the reference to the person and replaces the prompt's background sentence:
  the paper's background control. Every chained clip's reference (a generated frame) gets its own mask.
- Clip length, sizes and reference scaling default to the model's own settings (`pipe.settings`: the
  released inference's for a released folder, else the model's `dynamictrl.json`).
- The reference picture is read upright: its EXIF orientation is applied (phone photos).
Writes the video, a side-by-side video (reference | pose | output) and a JSON of every setting, and
with `frames_dir=` the video's frames as lossless PNGs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from diffusers import CogVideoXDPMScheduler
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from dynamictrl.animate.align import retarget
from dynamictrl.errors import UserError
from dynamictrl.models import embedded
from dynamictrl.models.lora import load_lora, pose_control
from dynamictrl.models.pipeline import RELEASED_SETTINGS, DynamiCtrlPipeline, read_settings
from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel
from dynamictrl.pose import layout as L
from dynamictrl.pose.render import render_pose, render_video
from dynamictrl.utils.video import read_image, read_video, write_frames, write_video


def load_pipeline(model: str | Path | None = None, lora: str | Path | None = None,
                  lora_scale: float = 1.0) -> DynamiCtrlPipeline:  # fmt: skip
    """A pipeline folder (ours, a base, or a released DynamiCtrl folder), a training output (base +
    exported transformer or LoRA, its `dynamictrl.json` settings over the base's), or the embedded model,
    with the DPM scheduler on trailing timesteps (the official inference's), whatever the folder ships;
    `lora` (a folder written by LoRA training) is loaded on top at `lora_scale`."""
    pipe, lora = _load(model, lora)
    if lora:
        load_lora(pipe, lora, lora_scale)
    elif lora_scale != 1.0:
        raise UserError(f"lora_scale={lora_scale} needs lora=PATH")
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe


def _load(model: str | Path | None, lora: str | Path | None) -> tuple[DynamiCtrlPipeline, str | Path | None]:
    """The pipeline, and the LoRA to load into it: `lora`, or the one a LoRA training output names."""
    path = Path(model) if model else embedded.ensure()
    if (path / "model_index.json").is_file():
        return (_lora_base(path, lora) if lora else DynamiCtrlPipeline.from_pretrained(path)), lora
    if (path / "model.json").is_file():
        info = json.loads((path / "model.json").read_text())
        if not (Path(info["base"]) / "model_index.json").is_file():
            raise UserError(f"model={path}: its base model {info['base']} is not a pipeline folder (moved or deleted?)")
        if info.get("lora"):
            if lora:
                raise UserError(f"model={path} is a LoRA training output already; give model=BASE lora={lora} instead")
            pipe = _lora_base(info["base"], path / info["lora"])
            pipe.apply_settings({"reference_scaling": "diffusers"} | read_settings(path))
            return pipe, path / info["lora"]
        if lora:
            raise UserError(f"lora={lora} goes with the base model it was trained on; model={path} is a fine-tuned one")
        transformer = DynamiCtrlTransformer3DModel.from_pretrained(path / info["transformer"])
        pipe = DynamiCtrlPipeline.from_pretrained(info["base"], transformer=transformer)
        # an export made before dynamictrl.json was written trained with the diffusers convention
        pipe.apply_settings({"reference_scaling": "diffusers"} | read_settings(path))
        return pipe, None
    if not path.exists():
        raise UserError(f"model={path}: no such folder")
    raise UserError(f"model={path}: neither a pipeline folder (model_index.json) nor a training output (model.json)")


def _lora_base(base: str | Path, lora: str | Path) -> DynamiCtrlPipeline:
    """The base pipeline for a LoRA, its transformer built as DynamiCtrl with the pose branch the LoRA
    carries: a plain CogVideoX base (what LoRA training usually starts from) has none."""
    control = pose_control(lora)
    transformer = DynamiCtrlTransformer3DModel.from_pretrained(base, subfolder="transformer",
                                                               **({"control": control} if control else {}))  # fmt: skip
    return DynamiCtrlPipeline.from_pretrained(base, transformer=transformer)


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


def stretch(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to (height, width) with no crop, PIL Lanczos (the official script's reference resize)."""
    if frame.shape[:2] == (height, width):
        return frame
    return np.array(Image.fromarray(frame).resize((width, height), Image.LANCZOS))


def fit_keypoints(kpts: np.ndarray, h: int, w: int, height: int, width: int) -> np.ndarray:
    """Normalised keypoints of an h x w frame -> normalised keypoints of its `fit` to height x width."""
    x0, y0, x1, y1 = crop_region(h, w, height, width)
    out = kpts.copy()
    out[..., 0] = (kpts[..., 0] * w - x0) / (x1 - x0)
    out[..., 1] = (kpts[..., 1] * h - y0) / (y1 - y0)
    outside = (out[..., 0] < 0) | (out[..., 0] > 1) | (out[..., 1] < 0) | (out[..., 1] > 1)
    out[outside | (kpts[..., 2] <= 0)] = 0.0
    return out


OFFICIAL_BUCKETS = RELEASED_SETTINGS["buckets"]  # DynamiCtrl's published inference size, both orientations

# What each `preset` sets where the command line leaves a key null: ours, and the official inference
# script's (docs/MODEL.md lists the differences). `vae_tiling: None` is "when the frame exceeds a tile": the
# official script's always-on tiling does nothing below a tile either.
PRESETS = {
    None: {"seed": 0, "steps": 25, "guidance_scale": 3.0, "frame_trim": "aligned", "prepend_reference_pose": True,
           "align": True, "resize": "crop", "sample_posterior": False, "vae_tiling": None, "vae_slicing": False,
           "clip_frames": None, "reference_scaling": None},
    "official": {"seed": 42, "steps": 50, "guidance_scale": 3.0, "frame_trim": "official", "prepend_reference_pose": False,
                 "align": False, "resize": "stretch", "sample_posterior": True, "vae_tiling": None, "vae_slicing": True,
                 "clip_frames": 37, "reference_scaling": "official"},
}  # fmt: skip


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The settings `PRESETS` governs: each the command line's value if given, else the preset's."""
    preset = cfg.get("preset")
    if preset not in PRESETS:
        raise UserError(f"preset={preset}: choose official or leave it unset")
    opts = {k: v if cfg.get(k) is None else cfg.get(k) for k, v in PRESETS[preset].items()}
    if opts["resize"] not in ("crop", "stretch"):
        raise UserError(f"resize={opts['resize']}: choose crop or stretch")
    return opts


def tiles_exactly(vae) -> bool:
    """Whether diffusers' CogVideoX tiling reassembles this VAE's tiles to the full frame: each tile's
    kept part (tile minus blend) must equal the stride between tiles, in pixels and latents, for encode
    and decode (true of CogVideoX's own 240x360 tile; other tile sizes come back cropped wrongly)."""
    stride = 2 ** (len(vae.config.block_out_channels) - 1)
    for sample, latent, f in ((vae.tile_sample_min_height, vae.tile_latent_min_height, vae.tile_overlap_factor_height),
                              (vae.tile_sample_min_width, vae.tile_latent_min_width, vae.tile_overlap_factor_width)):  # fmt: skip
        encode_ok = int(sample * (1 - f)) == (latent - int(latent * f)) * stride
        decode_ok = int(latent * (1 - f)) * stride == sample - int(sample * f)
        if sample != latent * stride or not (encode_ok and decode_ok):
            return False
    return True


def vae_tiling(vae, height: int, width: int, wanted: bool | None) -> bool:
    """Whether to tile the VAE: `wanted`, or (None) when a height x width frame exceeds the VAE's tile and
    the tiles reassemble exactly (`tiles_exactly`); `wanted=True` on a VAE whose tiles do not is an error."""
    exact = tiles_exactly(vae)
    if wanted and not exact:
        raise UserError(f"vae_tiling=true: this VAE's {vae.tile_sample_min_height}x{vae.tile_sample_min_width} tiles "
                        "do not reassemble to the full frame in diffusers' tiling; give vae_tiling=false")  # fmt: skip
    if wanted is not None:
        return bool(wanted)
    return exact and (height > vae.tile_sample_min_height or width > vae.tile_sample_min_width)


def default_clip_frames(pipe: DynamiCtrlPipeline) -> int:
    """The model's clip length: what it was trained at (`settings`), else its config's `sample_frames`."""
    settings = pipe.settings
    return int(settings.get("num_frames") or settings.get("clip_frames") or pipe.transformer.config.sample_frames)


def choose_size(image: np.ndarray, buckets: list | None) -> tuple[int, int]:
    """The (height, width) bucket closest to the reference's aspect ratio (ties: portrait first)."""
    aspect = image.shape[1] / image.shape[0]
    return min(((int(h), int(w)) for h, w in buckets), key=lambda hw: abs(np.log(hw[1] / hw[0] / aspect)))


def extract_poses(frames: np.ndarray, backend, desc: str = "driving poses", progress: bool = True) -> np.ndarray:
    """(T, H, W, 3) frames -> (T, 134, 3) keypoints; a frame with no person repeats the last pose found."""
    return fill_forward(detect_poses(frames, backend, desc, progress))


def detect_poses(frames: np.ndarray, backend, desc: str = "driving poses", progress: bool = True) -> np.ndarray:
    """(T, H, W, 3) frames -> (T, 134, 3) keypoints as the backend finds them (zeros: nobody found).

    A batched backend (DWPose, `batch_size` > 1) gets the whole video at once; a per-frame tracker
    (MediaPipe) is fed frame by frame under a progress bar."""
    if getattr(backend, "batch_size", 1) > 1 and hasattr(backend, "detect_video"):
        return backend.detect_video(np.ascontiguousarray(frames)).kpts
    backend.reset()
    return np.stack([backend(np.ascontiguousarray(f))[0]
                     for f in tqdm(frames, desc=desc, leave=False, disable=not progress)])  # fmt: skip


def fill_forward(found: np.ndarray) -> np.ndarray:
    """(T, 134, 3) keypoints -> the same with each frame without a body holding the last one found."""
    kpts = L.empty(len(found))
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
            mask_for: Callable[[np.ndarray], np.ndarray] | None = None, **call) -> np.ndarray:  # fmt: skip
    """Generate `num_frames` (default: len(pose)) frames in chained clips of `clip_frames`.

    Clip k > 0 starts at an already generated frame, which is its reference and whose pose is its
    first pose: the previous clip's last frame, or `overlap` frames before it, in which case the
    `overlap` frames after the start are cross-faded from the old clip to the new one. The last
    clip's poses are padded by repeating the final pose; the output is trimmed to `num_frames`.
    `mask_for` (background mode) gives the (H, W) person mask of a clip's own reference.
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
        mask = mask_for(ref) if mask_for is not None else None
        frames = pipe(ref, pose[s : s + clip_frames], prompt=prompt, generator=g, reference_mask=mask,
                      **call).frames[0].astype(np.float32)  # fmt: skip
        if k == 0:
            out[:clip_frames] = frames
            continue
        for j in range(1, overlap + 1):
            w = j / (overlap + 1)
            out[s + j] = (1 - w) * out[s + j] + w * frames[j]
        out[s + 1 + overlap : s + clip_frames] = frames[1 + overlap :]
    return out[:total].round().astype(np.uint8)


class ReferenceMasker:
    """The person mask of each chained clip's own reference (background mode).

    The pose backend's segmentation, else (DWPose has none) MediaPipe selfie segmentation in the
    person's box. A generated reference in which no person is found keeps the last mask found.
    """

    def __init__(self, backend) -> None:
        self.backend = backend
        self.first: np.ndarray | None = None  # the first reference and its mask
        self.first_mask: np.ndarray | None = None
        self.last: np.ndarray | None = None
        self._selfie = None

    def find(self, frame: np.ndarray, kpts: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray | None:
        """(H, W, 3) uint8 -> (H, W) bool person mask, or None; `kpts`/`mask`: the backend's output if known."""
        if kpts is None:
            self.backend.reset()  # an independent picture, not the next frame of a track
            kpts, mask = self.backend(frame)
        if mask is None and L.body_detected(kpts[None])[0]:
            from dynamictrl.pose.base import frame_boxes
            from dynamictrl.pose.mediapipe_backend import MediaPipeSelfieMasks

            self._selfie = self._selfie or MediaPipeSelfieMasks()
            mask = self._selfie.masks(frame[None], frame_boxes(kpts[None], *frame.shape[:2]))[0]
        return np.asarray(mask, dtype=bool) if mask is not None and np.any(mask) else None

    def start(self, frame: np.ndarray, kpts: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
        """The first reference's mask (from the backend's output already at hand)."""
        self.first, self.first_mask = frame, self.find(frame, kpts, mask)
        self.last = self.first_mask
        return self.first_mask

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        if frame is self.first:  # clip 0: the reference measured in `start`
            return self.first_mask
        found = self.find(frame)
        self.last = found if found is not None else self.last
        return self.last

    def close(self) -> None:
        if self._selfie is not None:
            self._selfie.close()


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

    opts = resolve(cfg)
    pipe = pipe or load_pipeline(cfg.get("model"), cfg.get("lora"), cfg.get("lora_scale", 1.0))
    defaults = pipe.settings
    height, width = choose_size(image, cfg.get("buckets") or defaults.get("buckets") or OFFICIAL_BUCKETS)
    height, width = int(cfg.get("height") or height), int(cfg.get("width") or width)
    clip_frames = int(opts["clip_frames"] or default_clip_frames(pipe))
    reference_scaling = opts["reference_scaling"] or pipe.reference_scaling
    try:  # before any pose extraction: a wrong clip length or convention is the user's to fix
        codec = pipe.latent_codec(reference_scaling, opts["frame_trim"])
        codec.check_frames(clip_frames, "clip_frames")
    except ValueError as err:
        raise UserError(str(err)) from None
    resize = {"crop": fit, "stretch": stretch}[opts["resize"]]
    prepend = bool(opts["prepend_reference_pose"])
    ref = resize(image, height, width)
    own_backend = backend is None
    backend = instantiate(cfg.pose_backend) if own_backend else backend
    backend.reset()
    ref_k, ref_mask = backend(ref)
    if not L.body_detected(ref_k[None])[0]:
        raise UserError(f"image={image_path}: no person found in the reference")

    # Driving poses: keypoints when we have them (driving= or a .npy beside the pose video).
    kpts = None
    if cfg.get("driving"):
        kpts = extract_poses(np.stack([resize(f, height, width) for f in frames]), backend, progress=cfg.progress)
        if not L.body_detected(kpts).any():
            raise UserError(f"driving={source}: no person found in any frame")
    elif source.with_suffix(".npy").is_file() and opts["resize"] == "crop":  # stretch: the video's frames as they are
        raw = np.load(source.with_suffix(".npy"), allow_pickle=False)
        kpts = fit_keypoints(raw.astype(np.float32), *frames.shape[1:3], height, width)
    aligned = bool(opts["align"] and kpts is not None)
    if aligned:
        px = np.array([width, height, 1.0], np.float32)
        kpts = retarget(kpts * px, ref_k * px) / px
    pose = render_video(kpts, height, width) if kpts is not None else np.stack([resize(f, height, width) for f in frames])

    n = int(cfg.num_frames or len(pose))
    if len(pose) < n:  # hold the last driving pose
        pose = np.concatenate([pose, np.repeat(pose[-1:], n - len(pose), axis=0)])
    pose = pose[:n]
    if prepend:
        pose = np.concatenate([render_pose(ref_k, height, width)[None], pose])
    masker = None
    if cfg.get("background"):
        masker = ReferenceMasker(backend)
        if masker.start(ref, ref_k, ref_mask) is None:
            raise UserError(f"image={image_path}: the mask backend found no person to keep")
        prompt = replace_background(prompt, cfg.background)

    from dynamictrl.utils.device import local_device

    device = local_device("auto")
    dtype = getattr(torch, cfg.dtype) if cfg.get("dtype") else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    pipe.to(dtype=dtype)
    tiling = vae_tiling(pipe.vae, height, width, opts["vae_tiling"])
    pipe.vae.enable_tiling() if tiling else pipe.vae.disable_tiling()  # a passed-in pipe keeps no earlier choice
    pipe.vae.enable_slicing() if opts["vae_slicing"] else pipe.vae.disable_slicing()
    if cfg.cpu_offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    try:
        video = animate(pipe, ref, pose, prompt, clip_frames, n + int(prepend), int(opts["seed"]),
                        int(cfg.overlap), cfg.progress, mask_for=masker, num_inference_steps=int(opts["steps"]),
                        guidance_scale=float(opts["guidance_scale"]), negative_prompt=cfg.negative_prompt,
                        cfg_separate_passes=bool(cfg.cfg_separate_passes), reference_scaling=reference_scaling,
                        frame_trim=codec.frame_trim, sample_posterior=bool(opts["sample_posterior"]))  # fmt: skip
    except ValueError as err:
        raise UserError(str(err)) from None
    finally:
        if masker is not None:
            masker.close()
        if own_backend:
            backend.close()
    if prepend:  # the first frame is the reference itself
        video, pose = video[1:], pose[1:]
    fps = float(cfg.fps or src_fps)
    model_fps = defaults.get("fps")
    if model_fps and not cfg.fps and abs(fps / float(model_fps) - 1) > 0.25:
        print(f"animate: note: the driving video runs at {fps:g} fps and the model was trained on {float(model_fps):g} fps "
              f"clips; motion per frame differs from training (resample the driving video to {float(model_fps):g} fps "
              "to match)")  # fmt: skip
    out = Path(cfg.output)
    write_video(out, video, fps)
    if cfg.get("frames_dir"):  # the same frames, lossless (eval scores these, not the H.264 copy)
        write_frames(cfg.frames_dir, video)
    side = write_video(out.with_name(out.stem + "_side.mp4"), side_by_side(ref, pose, video), fps)
    settings = OmegaConf.to_container(cfg, resolve=True) | opts | {"vae_tiling": tiling} | {  # the values used
        "prompt_used": prompt, "fps": fps, "frames": len(video), "height": height, "width": width,
        "clip_frames": clip_frames, "aligned": aligned, "device": device, "dtype": str(dtype),
        "reference_scaling_used": reference_scaling, "frame_trim": codec.frame_trim, "model_settings": defaults,
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(settings, indent=1))
    print(f"animate: {len(video)} frames at {fps:g} fps, {height}x{width} -> {out} (side by side: {side})")
    return {"output": str(out), "side_by_side": str(side), "frames": len(video), "fps": fps, "aligned": aligned,
            "frames_dir": cfg.get("frames_dir")}  # fmt: skip
