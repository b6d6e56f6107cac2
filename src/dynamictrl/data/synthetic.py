"""Synthetic human-motion clips: articulated figures dancing in front of textured backgrounds.

Each video is written in the TikTok folder layout that the preprocessing stage reads:

    ROOT/<split>/<video-id>/images/0000.png    RGB frames
                           masks/0000.png     person mask (0 / 255)
                           openpose/0000.json OpenPose-style keypoints (COCO-18 body, feet, face, hands)
                           caption.txt        the figure's colours and the background, in the paper's style
                           meta.json          fps and the generator's parameters

Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dynamictrl.pose import layout as L

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40), "blue": (40, 75, 210), "green": (35, 160, 60), "yellow": (235, 205, 40),
    "purple": (135, 50, 175), "orange": (245, 135, 30), "white": (240, 240, 240), "black": (25, 25, 25),
    "pink": (245, 135, 185), "teal": (25, 150, 150), "brown": (120, 75, 40), "grey": (128, 128, 128),
}  # fmt: skip
SKIN = ((240, 200, 170), (200, 150, 110), (150, 100, 70), (95, 65, 45))
HAIR = {"black": (25, 20, 20), "brown": (100, 60, 30), "blond": (225, 195, 110), "red": (165, 60, 30)}
PATTERNS = ("stripes", "checks", "dots", "waves")


@dataclass(frozen=True)
class Figure:
    """Appearance and motion parameters of one synthetic person."""

    shirt: str
    pants: str
    shoes: str
    hair: str
    skin: int
    height: float  # body height, fraction of the frame height
    x0: float  # pelvis start, fraction of the frame width
    drift: float  # horizontal drift per second, fraction of the width
    sway: float  # side-to-side step amplitude of the pelvis, fraction of the width
    bob: float  # squat depth at the low point of each beat, fraction of the body height
    freq: float  # dance frequency, Hz
    arm_amp: float
    leg_amp: float
    phase: float
    style: int  # which limbs move in phase


@dataclass(frozen=True)
class Background:
    pattern: str
    color1: str
    color2: str
    period: float
    angle: float


def caption(fig: Figure, bg: Background) -> str:
    """The paper's caption style, describing exactly what is drawn."""
    pattern = {"stripes": "diagonal stripes", "checks": "a checkerboard", "dots": "polka dots",
               "waves": "wavy bands"}[bg.pattern]  # fmt: skip
    return (
        f"The person in the image is wearing a {fig.shirt} shirt and {fig.pants} trousers, "
        f"with {fig.shoes} shoes and {fig.hair} hair. "
        f"The background is {pattern} of {bg.color1} and {bg.color2}."
    )


def sample_figure(rng: np.random.Generator) -> tuple[Figure, Background]:
    names = list(COLORS)
    shirt, pants, shoes = rng.choice(names, size=3, replace=False)
    c1, c2 = rng.choice([n for n in names if n not in (shirt, pants)], size=2, replace=False)
    fig = Figure(
        shirt=str(shirt), pants=str(pants), shoes=str(shoes), hair=str(rng.choice(list(HAIR))),
        skin=int(rng.integers(len(SKIN))), height=float(rng.uniform(0.6, 0.72)),
        x0=float(rng.uniform(0.42, 0.58)), drift=float(rng.uniform(-0.04, 0.04)),
        sway=float(rng.uniform(0.10, 0.16)), bob=float(rng.uniform(0.04, 0.08)),
        freq=float(rng.uniform(0.6, 1.1)), arm_amp=float(rng.uniform(0.9, 1.6)),
        leg_amp=float(rng.uniform(0.15, 0.4)), phase=float(rng.uniform(0, 2 * math.pi)),
        style=int(rng.integers(3)),
    )  # fmt: skip
    bg = Background(
        pattern=str(rng.choice(PATTERNS)), color1=str(c1), color2=str(c2),
        period=float(rng.uniform(0.25, 0.45)), angle=float(rng.uniform(0, math.pi)),
    )  # fmt: skip
    return fig, bg


def render_background(bg: Background, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 texture."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    c1 = np.array(COLORS[bg.color1], np.float32)
    c2 = np.array(COLORS[bg.color2], np.float32)
    u = xx * math.cos(bg.angle) + yy * math.sin(bg.angle)
    if bg.pattern == "stripes":
        t = (np.floor(u / bg.period) % 2).astype(np.float32)
    elif bg.pattern == "checks":
        t = ((np.floor(xx / bg.period) + np.floor(yy / bg.period)) % 2).astype(np.float32)
    elif bg.pattern == "dots":
        fx, fy = (xx / bg.period) % 1 - 0.5, (yy / bg.period) % 1 - 0.5
        t = ((fx**2 + fy**2) < 0.09).astype(np.float32)
    else:  # waves
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (u + 0.05 * np.sin(8 * math.pi * yy)) / bg.period)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    img += rng.normal(0, 2, size=img.shape).astype(np.float32)  # a little film grain
    return np.clip(img, 0, 255).astype(np.uint8)


def skeleton(fig: Figure, t: float, height: int, width: int) -> np.ndarray:
    """The figure's 134 keypoints at time t (seconds), in pixels, (134, 3) with score 1."""
    H = fig.height * height  # body height in pixels
    ph = 2 * math.pi * fig.freq * t + fig.phase
    s = math.sin(ph)
    lean = 0.15 * math.sin(ph + 0.5)
    # Whole-body motion (a side step, a squat on each beat, a lean), not only the limbs: a figure that
    # stays put except for its arms would let a copy of the reference frame score well on pose accuracy.
    pelvis = np.array([(fig.x0 + fig.drift * t + fig.sway * s) * width,
                       height * 0.5 + 0.06 * H + fig.bob * H * (1 - abs(math.cos(ph)))])  # fmt: skip
    up = np.array([math.sin(lean), -math.cos(lean)])
    right = np.array([math.cos(lean), math.sin(lean)])  # towards image right = the person's left
    torso, sw, hw = 0.30 * H, 0.22 * H, 0.14 * H
    ua, fa, th, sh = 0.16 * H, 0.15 * H, 0.22 * H, 0.21 * H
    head_r = 0.07 * H
    neck = pelvis + torso * up
    r_sh, l_sh = neck - right * sw / 2, neck + right * sw / 2
    r_hip, l_hip = pelvis - right * hw / 2, pelvis + right * hw / 2

    def limb(origin, angle, length, side):  # angle from straight down, outward positive
        return origin + length * np.array([side * math.sin(angle), math.cos(angle)])

    a_off = (0.0, math.pi, math.pi / 2)[fig.style]
    r_arm = 0.5 + fig.arm_amp * (0.5 + 0.5 * math.sin(ph))
    l_arm = 0.5 + fig.arm_amp * (0.5 + 0.5 * math.sin(ph + a_off))
    r_el = limb(r_sh, r_arm, ua, -1)
    l_el = limb(l_sh, l_arm, ua, +1)
    r_wr = limb(r_el, r_arm + 0.6 + 0.5 * math.sin(ph + 1.0), fa, -1)
    l_wr = limb(l_el, l_arm + 0.6 + 0.5 * math.sin(ph + a_off + 1.0), fa, +1)
    r_leg = 0.12 + fig.leg_amp * max(0.0, math.sin(ph)) + 2 * fig.bob * (1 - abs(math.cos(ph)))
    l_leg = 0.12 + fig.leg_amp * max(0.0, -math.sin(ph)) + 2 * fig.bob * (1 - abs(math.cos(ph)))
    r_kn = limb(r_hip, r_leg, th, -1)
    l_kn = limb(l_hip, l_leg, th, +1)
    r_an = limb(r_kn, r_leg * 0.3, sh, -1)
    l_an = limb(l_kn, l_leg * 0.3, sh, +1)
    hc = neck + up * head_r * 1.35

    def head(x, y):  # head-local coordinates in head radii, y pointing down the face
        return hc + right * x * head_r - up * y * head_r

    k = np.zeros((L.NUM_KEYPOINTS, 3), np.float32)
    body = [head(0, 0.15), neck, r_sh, r_el, r_wr, l_sh, l_el, l_wr, r_hip, r_kn, r_an, l_hip, l_kn, l_an,
            head(-0.35, -0.15), head(0.35, -0.15), head(-0.95, 0.0), head(0.95, 0.0)]  # fmt: skip
    k[L.BODY, :2] = body
    foot = 0.07 * H
    k[L.FEET, :2] = [l_an + (foot * 0.9, foot * 0.3), l_an + (foot * 0.5, foot * 0.35), l_an + (-foot * 0.3, foot * 0.3),
                     r_an + (-foot * 0.9, foot * 0.3), r_an + (-foot * 0.5, foot * 0.35), r_an + (foot * 0.3, foot * 0.3)]  # fmt: skip
    k[L.FACE, :2] = [head(*p) for p in _face_points()]
    k[L.LEFT_HAND, :2] = _hand(l_wr, l_wr - l_el, 0.09 * H, +1)
    k[L.RIGHT_HAND, :2] = _hand(r_wr, r_wr - r_el, 0.09 * H, -1)
    k[:, 2] = 1.0
    return k


def _face_points() -> list[tuple[float, float]]:
    """68 iBUG-ordered points in head-local coordinates."""
    pts = [(-0.9 * math.cos(math.pi * i / 16), 0.05 + 0.85 * math.sin(math.pi * i / 16)) for i in range(17)]
    pts += [(-0.65 + 0.125 * i, -0.4 - 0.06 * math.sin(math.pi * i / 4)) for i in range(5)]
    pts += [(0.15 + 0.125 * i, -0.4 - 0.06 * math.sin(math.pi * i / 4)) for i in range(5)]
    pts += [(0.0, -0.2 + 0.12 * i) for i in range(4)]
    pts += [(-0.2 + 0.1 * i, 0.3 + 0.04 * (1 - abs(i - 2) / 2)) for i in range(5)]
    for cx in (-0.35, 0.35):
        pts += [(cx + 0.15 * math.cos(math.pi * i / 3), -0.15 + 0.06 * math.sin(math.pi * i / 3)) for i in range(6)]
    pts += [(0.3 * math.cos(math.pi + 2 * math.pi * i / 12), 0.55 + 0.12 * math.sin(math.pi + 2 * math.pi * i / 12))
            for i in range(12)]  # fmt: skip
    pts += [(0.2 * math.cos(math.pi + 2 * math.pi * i / 8), 0.55 + 0.05 * math.sin(math.pi + 2 * math.pi * i / 8))
            for i in range(8)]  # fmt: skip
    return pts


def _hand(wrist: np.ndarray, direction: np.ndarray, length: float, side: int) -> np.ndarray:
    """21 hand points: the wrist, then four joints per finger, fanned around the forearm direction."""
    d = direction / (np.linalg.norm(direction) + 1e-6)
    pts = [wrist]
    for f, spread in enumerate((-0.9, -0.35, 0.0, 0.3, 0.6)):
        a = side * spread
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        fd = rot @ d
        base = 0.25 if f == 0 else 0.45
        for j in range(4):
            pts.append(wrist + fd * length * (base + 0.17 * j))
    return np.array(pts)


def draw_figure(img: np.ndarray, mask: np.ndarray, k: np.ndarray, fig: Figure) -> None:
    """Paint the figure defined by pixel keypoints `k` into `img` and its silhouette into `mask`."""
    H = fig.height * img.shape[0]
    skin = SKIN[fig.skin]
    shirt, pants, shoes = COLORS[fig.shirt], COLORS[fig.pants], COLORS[fig.shoes]
    w_leg, w_arm = max(2, round(0.09 * H)), max(2, round(0.07 * H))

    def seg(a, b, color, w):
        for canvas, c in ((img, color), (mask, 255)):
            cv2.line(canvas, _p(a), _p(b), c, w, cv2.LINE_AA)

    def disk(center, r, color):
        for canvas, c in ((img, color), (mask, 255)):
            cv2.circle(canvas, _p(center), max(1, round(r)), c, -1, cv2.LINE_AA)

    b = k[:, :2]
    for hip, knee, ankle in ((8, 9, 10), (11, 12, 13)):
        seg(b[hip], b[knee], pants, w_leg)
        seg(b[knee], b[ankle], pants, w_leg)
    for ankle, toe in ((13, 18), (10, 21)):
        seg(b[ankle], b[toe], shoes, max(2, w_leg - 1))
    torso = np.array([b[2], b[5], b[11], b[8]])
    for canvas, c in ((img, shirt), (mask, 255)):
        cv2.fillConvexPoly(canvas, np.round(torso).astype(np.int32), c, cv2.LINE_AA)
        cv2.polylines(canvas, [np.round(torso).astype(np.int32)], True, c, w_arm, cv2.LINE_AA)
    seg(b[1], b[0] * 0.3 + b[1] * 0.7, skin, w_arm)
    for sh, el, wr, hand in ((2, 3, 4, L.RIGHT_HAND), (5, 6, 7, L.LEFT_HAND)):
        seg(b[sh], b[el], shirt, w_arm)
        seg(b[el], b[wr], skin, max(2, w_arm - 1))
        disk(b[hand][[0, 9, 13]].mean(0), 0.035 * H, skin)
    head_r = 0.07 * H
    center = b[L.FACE][[0, 16]].mean(0)
    disk(center, head_r * 1.05, skin)
    hair_top = center + (b[1] - center) * -0.35
    for canvas, c in ((img, HAIR[fig.hair]), (mask, 255)):
        cv2.ellipse(canvas, _p(hair_top), (round(head_r * 1.05), round(head_r * 0.7)), 0, 180, 360, c, -1, cv2.LINE_AA)
    for eye in (14, 15):
        cv2.circle(img, _p(b[eye]), max(1, round(head_r * 0.15)), (20, 20, 20), -1, cv2.LINE_AA)
    cv2.line(img, _p(b[L.FACE][48]), _p(b[L.FACE][54]), (150, 40, 40), max(1, round(head_r * 0.12)), cv2.LINE_AA)


def _p(x: np.ndarray) -> tuple[int, int]:
    return round(float(x[0])), round(float(x[1]))


def make_video(seed: int, num_frames: int, height: int, width: int, fps: float) -> dict:
    """One synthetic video in memory: frames (T,H,W,3) uint8, masks (T,H,W) bool, keypoints (T,134,3)
    normalised, the caption and the parameters."""
    rng = np.random.default_rng(seed)
    fig, bg = sample_figure(rng)
    background = render_background(bg, height, width, rng)
    frames, masks, kpts = [], [], []
    for i in range(num_frames):
        k = skeleton(fig, i / fps, height, width)
        img = background.copy()
        mask = np.zeros((height, width), np.uint8)
        draw_figure(img, mask, k, fig)
        inside = (k[:, 0] >= 0) & (k[:, 0] < width) & (k[:, 1] >= 0) & (k[:, 1] < height)
        k[~inside, 2] = 0.0
        k[:, 0] /= width
        k[:, 1] /= height
        k[~inside, :2] = 0.0
        frames.append(img)
        masks.append(mask > 127)
        kpts.append(k)
    return {
        "frames": np.stack(frames), "masks": np.stack(masks), "kpts": np.stack(kpts),
        "caption": caption(fig, bg), "figure": fig.__dict__, "background": bg.__dict__,
    }  # fmt: skip


def write_tiktok_folder(video: dict, folder: Path, fps: float) -> None:
    """Write one video in the TikTok folder layout (see the module docstring)."""
    for sub in ("images", "masks", "openpose"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    height, width = video["frames"].shape[1:3]
    for i, (frame, mask, k) in enumerate(zip(video["frames"], video["masks"], video["kpts"], strict=True)):
        Image.fromarray(frame).save(folder / "images" / f"{i:04d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{i:04d}.png")
        (folder / "openpose" / f"{i:04d}.json").write_text(json.dumps(L.to_openpose_json(k, width, height)))
    (folder / "caption.txt").write_text(video["caption"] + "\n")
    meta = {"fps": fps, "generator": "dynamictrl.data.synthetic", "figure": video["figure"],
            "background": video["background"]}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def generate(
    root: str | Path,
    num_train: int = 32,
    num_test: int = 4,
    num_frames: int = 27,
    height: int = 192,
    width: int = 128,
    fps: float = 8.0,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write `num_train` + `num_test` synthetic videos under ROOT/train and ROOT/test.

    Already written videos (a `caption.txt` marks a finished folder) are kept, so a re-run is cheap.
    Returns ROOT.
    """
    root = Path(root)
    jobs = [("train", i) for i in range(num_train)] + [("test", num_train + i) for i in range(num_test)]
    for split, i in tqdm(jobs, desc="synthetic videos", disable=not progress):
        folder = root / split / f"synth{i:04d}"
        if (folder / "caption.txt").exists():
            continue
        video = make_video(seed * 100_003 + i, num_frames, height, width, fps)
        tmp = folder.with_name(folder.name + ".partial")
        write_tiktok_folder(video, tmp, fps)
        tmp.rename(folder)
    return root
