"""Benchmark datasets and their generation through the animate stage (generate, then score).

- `tiktok`: the TikTok dataset's folder layout, one folder of frames per video
  (`NNNNN/images/*.png`, optional `caption.txt`, `meta.json` with `fps`). Videos 1-334 train, 335-339
  are the test set (`range(335, 340)`, as DisCo and the papers after it evaluate). Folders whose
  names are not numbers (our synthetic data) are taken from `DATA_ROOT/test/`.
- `unseen100`: a folder of videos (`NAME.mp4`, optional caption `NAME.txt`), every one a test video.

Each test video is animated from its own first frame, driven by its own frames (poses extracted and
aligned by the animate stage), with its caption as the prompt, to exactly its own frame count. The
generated frames go to `OUTPUT/generated/NAME/00000.png, ...`, lossless (animate's `frames_dir`), with
the animate stage's NAME.json of settings beside them, and `OUTPUT/reference/NAME` links to the
ground truth, so scoring pairs them by name and no H.264 encoding moves the scores. The mp4s, for
viewing, go to `OUTPUT/animate/NAME.mp4` and `NAME_side.mp4` (reference | pose | output).
Generation is resumable (a video with its NAME.json is done) and split by rank: rank r of N takes
videos r, r+N, ... (`rank`/`world_size`, else SLURM array or torchrun variables).

`pose_swap=true` generates every test video a second time, driven by another test video
(`eval.pose_swap.donors`: video i by video i+1's frames, cyclically; the same reference frame, prompt,
seed and frame count), into `OUTPUT/generated_swapped/` (mp4s in `OUTPUT/animate_swapped/`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from dynamictrl import config
from dynamictrl.errors import UserError
from dynamictrl.utils.device import launcher_world
from dynamictrl.utils.video import VIDEO_SUFFIXES, read_any, write_video

TIKTOK_TEST = range(335, 340)


@dataclass(frozen=True)
class TestVideo:
    name: str
    source: Path  # a frame folder or a video file: the ground truth and the driving video
    caption: str | None


def _caption(*candidates: Path) -> str | None:
    for c in candidates:
        if c.is_file() and c.read_text().strip():
            return c.read_text().strip()
    return None


def tiktok(root: Path, ids: list[int] | None = None) -> list[TestVideo]:
    """The TikTok test videos under `root` (numbered folders `ids`, default 335-339)."""
    numbered = {int(p.name): p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / "images").is_dir()}
    if numbered:
        wanted = list(ids) if ids else list(TIKTOK_TEST)
        missing = [i for i in wanted if i not in numbered]
        if missing:
            raise UserError(f"data_root={root}: TikTok test videos {missing} not found (numbered folders with images/)")
        folders = [numbered[i] for i in wanted]
    else:
        test = root / "test"
        folders = sorted(p for p in test.iterdir() if (p / "images").is_dir()) if test.is_dir() else []
        if not folders:
            raise UserError(f"data_root={root}: neither numbered TikTok folders (00335/images/...) nor test/*/images/")
    return [TestVideo(f.name, f, _caption(f / "caption.txt")) for f in folders]


def unseen100(root: Path) -> list[TestVideo]:
    """Every video file in `root` (captions from NAME.txt)."""
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise UserError(f"data_root={root}: no video files")
    return [TestVideo(p.stem, p, _caption(p.with_suffix(".txt"))) for p in files]


def test_videos(dataset: str, root: str | Path, ids: list[int] | None = None) -> list[TestVideo]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data_root={root}: no such folder")
    if dataset == "tiktok":
        return tiktok(root, ids)
    if dataset == "unseen100":
        return unseen100(root)
    raise UserError(f"dataset={dataset}: choose tiktok or unseen100")


def rank_and_world(cfg: DictConfig) -> tuple[int, int]:
    """rank/world_size from config, else the launcher's (SLURM array, torchrun, srun), else 0/1."""
    if cfg.get("rank") is not None and cfg.get("world_size") is not None:
        rank, world = int(cfg.rank), int(cfg.world_size)
    else:
        rank, world = launcher_world()
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside world_size {world}")
    return rank, world


def _safe_name(name: str) -> str:
    """A file name that stays inside its folder (names come from the data)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
    return clean or "video"


def link_reference(video: TestVideo, folder: Path) -> Path:
    """OUTPUT/reference/NAME(.ext) -> the ground truth, so that scoring pairs it by name."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / (_safe_name(video.name) + ("" if video.source.is_dir() else video.source.suffix.lower()))
    if not link.is_symlink():
        link.symlink_to(video.source.resolve(), target_is_directory=video.source.is_dir())
    return link


def generate(cfg: DictConfig, videos: list[TestVideo], out: Path, swap: bool = False) -> dict[str, int]:
    """Animate this rank's share of `videos` into OUTPUT/generated; the models load once. `swap`: each
    driven by its donor's frames (`pose_swap.donors`) instead, into OUTPUT/generated_swapped."""
    from hydra.utils import instantiate

    from dynamictrl.animate.run import load_pipeline
    from dynamictrl.animate.run import run as animate_run
    from dynamictrl.eval.pose_swap import swapped

    suffix = "_swapped" if swap else ""
    generated, animated, inputs = out / f"generated{suffix}", out / f"animate{suffix}", out / f"inputs{suffix}"
    rank, world = rank_and_world(cfg)
    drivers = dict(zip((v.name for v in videos), swapped(videos) if swap else videos, strict=True))
    mine = videos[rank::world]
    todo = [v for v in mine if not (generated / f"{_safe_name(v.name)}.json").is_file()]
    stats = {"videos": len(videos), "this_rank": len(mine), "done_before": len(mine) - len(todo), "generated": 0}
    if not todo:
        return stats
    pipe = load_pipeline(cfg.get("model"))
    # animate's config has no defaults list: read as a plain YAML, it also loads inside eval's Hydra app
    base = OmegaConf.load(config.conf_dir() / "animate" / "animate.yaml")
    base.pop("hydra", None)
    base.merge_with(OmegaConf.from_dotlist(list(cfg.get("animate_overrides") or [])))
    backend = instantiate(base.pose_backend)
    try:
        for v in tqdm(todo, desc=f"generate (rank {rank}/{world})", unit="video", disable=not cfg.get("progress", True)):
            frames, fps = read_any(v.source)
            fps = float(fps or cfg.get("default_fps") or 30)
            name = _safe_name(v.name)
            inputs.mkdir(parents=True, exist_ok=True)
            image = inputs / f"{name}.png"
            Image.fromarray(frames[0]).save(image)
            driver = frames if drivers[v.name] is v else read_any(drivers[v.name].source)[0]
            driving = write_video(inputs / f"{name}.mp4", driver, fps, crf=10)
            prompt = v.caption or cfg.get("default_prompt")
            if not prompt:
                raise UserError(f"{v.source}: no caption (caption.txt / NAME.txt) and no default_prompt")
            anim = base.copy()
            anim.image, anim.driving, anim.prompt = str(image), str(driving), prompt
            anim.output, anim.frames_dir = str(animated / f"{name}.mp4"), str(generated / name)
            anim.num_frames, anim.fps, anim.progress = len(frames), fps, False
            animate_run(anim, pipe=pipe, backend=backend)
            # last: NAME.json marks the video done, and gives the clip metrics its prompt
            Path(anim.output).with_suffix(".json").replace(generated / f"{name}.json")
            stats["generated"] += 1
    finally:
        backend.close()
    return stats
