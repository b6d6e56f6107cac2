"""Person masks from the pose box: SAM 2's video predictor (production) and SAM 1 per frame (fallback).

Both meet the mask contract of `dynamictrl.pose.base`:

    backend.masks(frames (T, H, W, 3) uint8 RGB, boxes (T, 4) float32 pixel xyxy, NaN rows = no person)
        -> (T, H, W) bool

`Sam2VideoMasks` is the Segment-and-Track idea with today's tracker: seed SAM 2 with the person box on
the first frame that has one, propagate through the clip, and re-seed from the pose box wherever the
track is lost (`lost`). Frames with neither a box nor a track get an empty mask.

Weights come from local files named in `conf/mask/*.yaml`. Checkpoints are read with
`torch.load(weights_only=True)` (never an arbitrary pickle) into an architecture built from its config.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from dynamictrl.errors import UserError

KEY = "mask"  # the config group these backends are built from; errors name `mask.<kwarg>=VALUE`

# What sam2's `build_sam2_video_predictor` sets on top of a model config (its `apply_postprocessing`).
SAM2_VIDEO_OVERRIDES = {
    "_target_": "sam2.sam2_video_predictor.SAM2VideoPredictor",
    "sam_mask_decoder_extra_args": {"dynamic_multimask_via_stability": True,
                                    "dynamic_multimask_stability_delta": 0.05,
                                    "dynamic_multimask_stability_thresh": 0.98},
    "binarize_mask_from_pts_for_mem_enc": True,
    "fill_hole_area": 8,
    # Ours, for re-seeding: a box added on an already-tracked frame becomes a conditioning frame, so
    # every later frame attends to it. (`clear_non_cond_mem_around_input: true` would also drop the
    # memories that led to the loss, but crashes in sam2 1.1.0: `_track` does it instead.)
    "add_all_frames_to_correct_as_cond": True,
}  # fmt: skip


def import_sam2():
    """Import sam2 without leaving Hydra's global state initialised.

    `sam2/__init__.py` initialises Hydra's global config module to sam2's own configs when nothing has
    yet; later `hydra.compose` calls (ours, `dynamictrl.config.load`) would then search sam2's configs.
    Inside a running Hydra app sam2 leaves the app's state alone, so only the first case needs undoing.
    """
    from hydra.core.global_hydra import GlobalHydra

    was_initialized = GlobalHydra.instance().is_initialized()
    import sam2

    if not was_initialized and GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    return sam2


def lost(mask: np.ndarray, box: np.ndarray, min_area: float, min_inside: float = 0.5) -> bool:
    """Whether the tracked mask (H, W) bool has lost the person whose pose box is `box` (4,) pixel xyxy.

    Lost: the mask covers less than `min_area` of the box (empty, shrunk to a fragment, or gone
    elsewhere), or less than `min_inside` of the mask lies inside the box (drifted or leaked onto the
    background). Never lost where the box is NaN: there is nothing to re-seed from.
    """
    if np.isnan(box).any():
        return False
    h, w = mask.shape
    x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x1, y1 = min(int(np.ceil(box[2])) + 1, w), min(int(np.ceil(box[3])) + 1, h)
    box_area = max((x1 - x0) * (y1 - y0), 1)
    inside = int(mask[y0:y1, x0:x1].sum())
    return inside < min_area * box_area or inside < min_inside * int(mask.sum())


def fill_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """(H, W) bool mask with its background components (8-connected) of at most `max_area` pixels filled:
    sam2's `fill_hole_area` post-processing, for sam2 builds without their CUDA extension."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=8)
    small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] <= max_area)
    small = small[small > 0]  # label 0 is the mask itself
    return mask | np.isin(labels, small) if len(small) else mask


def _file(value: str | Path, kwarg: str) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise UserError(f"{KEY}.{kwarg}={value}: no such file")
    return path


def _checked(frames: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    frames, boxes = np.asarray(frames), np.asarray(boxes, np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3 or boxes.shape != (len(frames), 4):
        raise ValueError(f"frames {frames.shape} and boxes {boxes.shape}: expected (T, H, W, 3) and (T, 4)")
    return frames, boxes


def _device(device: str) -> torch.device:
    from dynamictrl.utils.device import local_device

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{KEY}.device={device}: no CUDA device here (device=auto picks the CPU then)")
    return torch.device(local_device(device))  # auto / cuda: this rank's GPU (cuda:LOCAL_RANK)


def _autocast(device: torch.device, precision: str):
    """bfloat16 autocast on CUDA (as SAM 2's own demos run); float32 elsewhere."""
    if precision not in ("bfloat16", "float32"):
        raise UserError(f"{KEY}.precision={precision}: bfloat16 or float32")
    if device.type == "cuda" and precision == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_weights(model: torch.nn.Module, checkpoint: Path, entry: str | None, against: str) -> None:
    """Load a weights-only torch checkpoint into `model`, strictly; `entry` names the dict entry that
    holds the state dict ("model" for SAM 2), None for a plain state dict (SAM 1). Any mismatch is a
    UserError naming the checkpoint and what it was loaded `against`."""
    where = f"{KEY}.checkpoint={checkpoint}"
    try:
        # weights_only: tensors and plain containers only; a pickle that would run code is refused
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"{where}: not a readable weights-only torch checkpoint ({type(err).__name__}: "
                        f"{first})") from None  # fmt: skip
    if entry is not None:
        if not isinstance(state, dict) or entry not in state:
            raise UserError(f"{where}: no {entry!r} entry (not a SAM 2 checkpoint)")
        state = state[entry]
    if not isinstance(state, dict):
        raise UserError(f"{where}: holds a {type(state).__name__}, not a state dict")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even when not strict
        raise UserError(f"{where} does not fit {against}: {' '.join(str(err).split())[:300]}") from None
    if missing or unexpected:
        raise UserError(f"{where} does not fit {against}: {len(missing)} missing keys {missing[:3]}, "
                        f"{len(unexpected)} unexpected keys {unexpected[:3]}")  # fmt: skip


def sam2_config(config: str | Path) -> Path:
    """A SAM 2 model config: a yaml path, or the name of one shipped in the sam2 package
    ("configs/sam2.1/sam2.1_hiera_l.yaml"; the ".yaml" may be left off, as with Hydra)."""
    path = Path(str(config)).expanduser()
    if path.is_file():
        return path
    spec = importlib.util.find_spec("sam2")  # finds the package without running its __init__
    for folder in spec.submodule_search_locations if spec else []:
        for name in (str(config), f"{config}.yaml"):
            if (Path(folder) / name).is_file():
                return Path(folder) / name
    raise UserError(f"{KEY}.config={config}: no such file, nor a config shipped in sam2 "
                    "(e.g. configs/sam2.1/sam2.1_hiera_l.yaml)")  # fmt: skip


def load_sam2_video_predictor(config: str | Path, checkpoint: str | Path, device: torch.device,
                               fill_hole_area: int = 8):  # fmt: skip
    """SAM 2's video predictor built as `sam2.build_sam.build_sam2_video_predictor` builds it, without
    Hydra's global state (our own Hydra app owns it): the yaml is read with OmegaConf, the predictor's
    overrides are merged in, the model is instantiated, then the checkpoint's "model" entry is loaded."""
    path, checkpoint = sam2_config(config), _file(checkpoint, "checkpoint")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig) or "model" not in cfg:
        raise UserError(f"{KEY}.config={config}: no `model:` node (not a SAM 2 model config)")
    cfg = OmegaConf.merge(cfg, {"model": {**SAM2_VIDEO_OVERRIDES, "fill_hole_area": fill_hole_area}})
    OmegaConf.resolve(cfg)
    import_sam2()
    model = instantiate(cfg.model, _recursive_=True)
    load_weights(model, checkpoint, "model", f"{KEY}.config={config}")
    return model.to(device).eval()


def _sam2_has_cuda_extension() -> bool:
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet_sam2():
    """sam2 draws a progress bar per video and per re-seed; the stage has its own bars."""
    import sam2.sam2_video_predictor as predictor_module
    import sam2.utils.misc as misc_module

    saved = predictor_module.tqdm, misc_module.tqdm
    quiet = functools.partial(saved[0], disable=True)
    predictor_module.tqdm = misc_module.tqdm = quiet
    try:
        yield
    finally:
        predictor_module.tqdm, misc_module.tqdm = saved


class Sam2VideoMasks:
    """SAM 2 video tracking seeded and re-seeded from the pose box (see the module docstring).

    Args:
        checkpoint: a SAM 2 checkpoint (.pt holding {"model": state_dict}), e.g. sam2.1_hiera_large.pt.
        config: its model config: a yaml path, or one shipped in sam2 ("configs/sam2.1/sam2.1_hiera_l.yaml").
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        precision: "bfloat16" (autocast, CUDA only) or "float32".
        min_area, min_inside: the loss test (`lost`): the mask covers less than `min_area` of the pose box,
            or less than `min_inside` of the mask lies in it.
        max_reseeds: re-seeds per video at most (each adds a conditioning frame to the memory bank).
        offload_video_to_cpu, offload_state_to_cpu: sam2's `init_state` options for long videos.
        jpeg_quality: of the temporary frame files sam2 reads the video from.
        tmp_dir: where to write them (None: the system's temporary folder; node-local scratch on clusters).

    After each `masks` call, `prompts` maps each frame that received a box prompt to that box (4,) pixel
    xyxy, read back from the predictor's state; `reseeds` counts the re-seeds.
    """

    name = "sam2-video"

    def __init__(self, checkpoint: str, config: str = "configs/sam2.1/sam2.1_hiera_l.yaml",
                 device: str = "auto", precision: str = "bfloat16",
                 min_area: float = 0.1, min_inside: float = 0.5, max_reseeds: int = 16,
                 offload_video_to_cpu: bool = False, offload_state_to_cpu: bool = False,
                 jpeg_quality: int = 95, tmp_dir: str | None = None):  # fmt: skip
        self.device = _device(device)
        self.precision = precision
        _autocast(self.device, precision)  # validate now, not on the first video
        self.min_area, self.min_inside, self.max_reseeds = min_area, min_inside, max_reseeds
        self.offload_video_to_cpu, self.offload_state_to_cpu = offload_video_to_cpu, offload_state_to_cpu
        self.jpeg_quality, self.tmp_dir = jpeg_quality, tmp_dir
        import_sam2()
        # Without its CUDA extension sam2 would warn on every frame and skip hole filling: fill here instead.
        holes = SAM2_VIDEO_OVERRIDES["fill_hole_area"]
        sam2_fills = _sam2_has_cuda_extension()
        self.hole_area = 0 if sam2_fills else holes
        self.predictor = load_sam2_video_predictor(config, checkpoint, self.device, holes * sam2_fills)
        self.version = f"{importlib.metadata.version('sam2')}+{Path(checkpoint).name}"
        self.prompts: dict[int, np.ndarray] = {}
        self.reseeds = 0

    def masks(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """frames (T, H, W, 3) uint8 RGB, boxes (T, 4) float32 pixel xyxy (NaN rows: no person)
        -> (T, H, W) bool."""
        frames, boxes = _checked(frames, boxes)
        T, H, W = frames.shape[:3]
        out = np.zeros((T, H, W), bool)
        self.prompts, self.reseeds = {}, 0
        has_box = ~np.isnan(boxes).any(axis=1)
        if not has_box.any():
            return out
        first = int(np.argmax(has_box))  # frames before it have no box and no track: empty
        with _autocast(self.device, self.precision), _quiet_sam2():
            with tempfile.TemporaryDirectory(prefix="dynamictrl-sam2-", dir=self.tmp_dir) as folder:
                for i, frame in enumerate(frames[first:]):  # sam2 reads a folder of <index>.jpg
                    Image.fromarray(frame).save(Path(folder) / f"{i}.jpg", quality=self.jpeg_quality)
                state = self.predictor.init_state(folder, offload_video_to_cpu=self.offload_video_to_cpu,
                                                  offload_state_to_cpu=self.offload_state_to_cpu)  # fmt: skip
            self._track(state, boxes[first:], out[first:])
            self.prompts = {first + f: box for f, box in self._prompted_boxes(state).items()}
        if self.hole_area:
            # sam2 fills holes on its (image_size/4)² low-res logits; scale the area to the video's pixels
            area = self.hole_area * H * W / (self.predictor.image_size // 4) ** 2
            out[first:] = [fill_holes(m, area) for m in out[first:]]
        return out

    def _track(self, state: dict, boxes: np.ndarray, out: np.ndarray) -> None:
        """Seed at frame 0 of `state`, propagate, and on a lost frame stop, re-seed there and go on.
        boxes (T', 4), out (T', H, W) bool written in place."""
        predictor = self.predictor
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, box=boxes[0])
        start = 0
        while True:
            reseed = None
            with contextlib.closing(predictor.propagate_in_video(state, start_frame_idx=start)) as tracked:
                for f, _, logits in tracked:  # logits (objects, 1, H, W) at the video's resolution
                    out[f] = (logits[0, 0] > 0).cpu().numpy()
                    is_lost = lost(out[f], boxes[f], self.min_area, self.min_inside)
                    # the start frame has just been prompted: judging it again could only loop
                    if is_lost and f > start and self.reseeds < self.max_reseeds:
                        reseed = f
                        break
            if reseed is None:
                return
            predictor.add_new_points_or_box(state, frame_idx=reseed, obj_id=1, box=boxes[reseed])
            # forget the memories of the frames around it, which hold the lost track (sam2's own routine
            # for correction clicks, which its flag for it fails to reach in 1.1.0)
            predictor._clear_non_cond_mem_around_input(state, reseed)
            self.reseeds += 1
            start = reseed

    def _prompted_boxes(self, state: dict) -> dict[int, np.ndarray]:
        """{frame: box (4,) pixel xyxy} of the box prompts the predictor holds; sam2 stores a box as two
        points labelled 2 and 3, scaled to image_size."""
        scale = np.array([state["video_width"], state["video_height"]] * 2) / self.predictor.image_size
        return {f: p["point_coords"][0, :2].flatten().float().cpu().numpy() * scale
                for f, p in sorted(state["point_inputs_per_obj"][0].items())}  # fmt: skip

    def close(self) -> None:
        self.predictor = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def sam1_architecture(model_type: str = "vit_h", config: str | None = None) -> torch.nn.Module:
    """The SAM 1 architecture with random weights: `segment_anything.sam_model_registry[model_type]`, or
    the `segment_anything.modeling.Sam` described by a yaml of `_target_`s (sizes the registry lacks)."""
    if config is not None:
        cfg = OmegaConf.load(_file(config, "config"))
        if not isinstance(cfg, DictConfig) or "_target_" not in cfg:
            raise UserError(f"{KEY}.config={config}: no `_target_` (not a yaml describing a Sam module)")
        return instantiate(cfg)
    from segment_anything import sam_model_registry

    if model_type not in sam_model_registry:
        raise UserError(f"{KEY}.model_type={model_type}: one of {', '.join(sam_model_registry)}")
    return sam_model_registry[model_type](checkpoint=None)  # its own loader uses a full pickle: load below


class SegmentAnythingMasks:
    """SAM 1 on each frame, prompted with the pose box: no tracking, so no drift, and no mask where no
    box. The fallback when SAM 2 is unavailable.

    Args:
        checkpoint: a SAM 1 checkpoint (a plain state dict), e.g. sam_vit_h_4b8939.pth.
        model_type: "vit_h", "vit_l" or "vit_b", matching the checkpoint.
        config: instead of model_type, a yaml describing the `Sam` module (tiny test models).
        device: "auto" (CUDA when available), "cpu", "cuda", ...
        multimask: ask for SAM's three masks and keep the best-scored one; False (one mask) is what SAM's
            authors advise for an unambiguous box prompt.

    After each `masks` call, `prompts` maps each prompted frame to its box.
    """

    name = "segment-anything"

    def __init__(self, checkpoint: str, model_type: str = "vit_h", config: str | None = None,
                 device: str = "auto", multimask: bool = False):  # fmt: skip
        from segment_anything import SamPredictor

        checkpoint_path = _file(checkpoint, "checkpoint")
        model = sam1_architecture(model_type, config)
        load_weights(model, checkpoint_path, None,
                     f"{KEY}.config={config}" if config else f"{KEY}.model_type={model_type}")  # fmt: skip
        self.device = _device(device)
        self.predictor = SamPredictor(model.to(self.device).eval())
        self.multimask = multimask
        self.version = f"{importlib.metadata.version('segment-anything')}+{Path(checkpoint).name}"
        self.prompts: dict[int, np.ndarray] = {}

    def masks(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """frames (T, H, W, 3) uint8 RGB, boxes (T, 4) float32 pixel xyxy (NaN rows: no person)
        -> (T, H, W) bool."""
        frames, boxes = _checked(frames, boxes)
        out = np.zeros(frames.shape[:3], bool)
        self.prompts = {}
        for t in np.flatnonzero(~np.isnan(boxes).any(axis=1)):
            self.predictor.set_image(frames[t], image_format="RGB")
            masks, scores, _ = self.predictor.predict(box=boxes[t], multimask_output=self.multimask)
            out[t] = masks[int(np.argmax(scores))]  # masks (1 or 3, H, W) bool
            self.prompts[int(t)] = boxes[t]
        self.predictor.reset_image()
        return out

    def close(self) -> None:
        self.predictor = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
