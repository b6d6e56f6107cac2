"""`make demo`: the whole chain on embedded defaults, offline, on CPU.

1. synthetic clips in TikTok layout -> 2. shards -> 3. the embedded tiny model -> 4. training ->
5. animation of held-out clips by the trained and the untrained model, each clip once with its own
poses and once with another clip's (the pose swap, `eval/pose_swap.py`); the trained model's clips
again with their own poses moved sideways (the pose shift, `eval/pose_shift.py`) -> 6. evaluation of both
and of two baselines, over the frames after the reference (frame 0 is given, not generated), whole
frame and inside the figure's region -> 7. report.json, report.md, a side-by-side video and pictures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from dynamictrl import config
from dynamictrl.animate.run import load_pipeline, side_by_side
from dynamictrl.data.demo_data import make_demo_data
from dynamictrl.data.shards import decode_sample, list_shards
from dynamictrl.eval import pose_shift, pose_swap
from dynamictrl.eval.run import reference_rule, score, write_report
from dynamictrl.models import embedded
from dynamictrl.utils.video import read_frames_dir, write_frames, write_video

FIRST = 1  # the first scored frame: frame 0 is the reference, given to the model


def held_out(shards: Path, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` test clips of the shards, spread over their videos (`spread_over_videos`)."""
    urls = list_shards(str(shards / "test-*.tar"))
    return spread_over_videos([decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)], limit)


def spread_over_videos(samples: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first clip of each video, then the second of each, and so on, up to `limit`. With as many
    test videos as clips, no two clips overlap, the pose swap's donor is always another video, and
    the bootstrap's clips are independent."""
    by_video: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_video.setdefault(s["meta"].get("video_id") or s["key"].rsplit("-", 1)[0], []).append(s)
    rounds = max((len(v) for v in by_video.values()), default=0)
    return [v[i] for i in range(rounds) for v in by_video.values() if i < len(v)][:limit]


def generate_all(model, samples: list[dict], folder: Path, cfg: DictConfig, label: str,
                 prompt: str | None = None, swap: bool = False, poses: list[np.ndarray] | None = None) -> None:  # fmt: skip
    """Animate each held-out clip from its first frame and its poses; `prompt` replaces the captions.
    `swap`: each clip driven by another clip's poses instead (`pose_swap.donors`), all else the same;
    `poses`: each clip driven by these instead (one per clip).
    `model`: a pipeline folder, or a loaded pipeline. Frames go to FOLDER/KEY/%05d.png, lossless: H.264
    is not bit-reproducible here (NOTES), and scores (the pose swap's differences above all) must
    not move with the encoder."""
    pipe = load_pipeline(model) if model is None or isinstance(model, str | Path) else model
    pipe.set_progress_bar_config(disable=True)
    drivers = poses or (pose_swap.swapped([s["pose"] for s in samples]) if swap else [s["pose"] for s in samples])
    for s, pose in tqdm(list(zip(samples, drivers, strict=True)), desc=f"animate held-out clips ({label})"):
        g = torch.Generator().manual_seed(cfg.seed)
        frames = pipe(s["frames"][0], pose_swap.fit_length(pose, len(s["pose"])),
                      prompt=s["caption"] if prompt is None else prompt, num_inference_steps=cfg.steps,
                      guidance_scale=cfg.guidance_scale, generator=g).frames[0]  # fmt: skip
        write_frames(folder / s["key"], frames)


def masks_of(samples: list[dict]) -> dict[str, np.ndarray]:
    """The ground truth's person masks by clip name, for the figure-region scores."""
    return {s["key"]: s["mask"] for s in samples}


def swap_gains(model, samples: list[dict], folder: Path, reference: Path, cfg: DictConfig, label: str, own: dict,
               prompt: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The pose-swap gain of a model whose own-pose clips were scored into `own` (`score`'s result,
    frames from FIRST, with masks): the clips again with swapped poses into `folder`, scored the same
    way against `reference`, and the per-clip differences (`pose_swap.gains`)."""
    generate_all(model, samples, folder, cfg, f"{label}, swapped poses", prompt=prompt, swap=True)
    swapped = score(folder, reference, progress=False, first=FIRST, masks=masks_of(samples))
    return pose_swap.gains(own["per_video"], swapped["per_video"])


def shift_follow(model, samples: list[dict], folder: Path, cfg: DictConfig, own: Path) -> dict[str, Any]:
    """The pose-shift test (`eval/pose_shift.py`) of a model whose own-pose clips are under `own`: every
    clip again with its poses moved by each of `pose_shift.SHIFTS` (frames to FOLDER/dx+8/KEY, ...),
    scored against the moved ground truth; the follow score per clip (mean over the shifts) and over clips."""
    pipe = load_pipeline(model) if isinstance(model, str | Path) else model
    scores: dict[str, list[float]] = {s["key"]: [] for s in samples}
    for dx in pose_shift.SHIFTS:
        generate_all(pipe, samples, folder / f"dx{dx:+d}", cfg, f"shifted poses, {dx:+d} px",
                     poses=[pose_swap.fit_length(pose_shift.shift(s["pose"], dx), len(s["pose"])) for s in samples])  # fmt: skip
        for s in samples:
            moved, mine = (read_frames_dir(f / s["key"]) for f in (folder / f"dx{dx:+d}", own))
            scores[s["key"]].append(pose_shift.follow(mine, moved, s["frames"], s["mask"], dx))
    return pose_shift.summary({k: float(np.mean(v)) for k, v in scores.items()})


def shift_sheet(s: dict, folder: Path, own: Path) -> np.ndarray:
    """The shown clip with its poses moved left, its own, moved right: pose | generated for each, frames
    0, 2, 4, ... top to bottom."""
    cols = []
    for dx in (pose_shift.SHIFTS[0], 0, pose_shift.SHIFTS[-1]):
        cols += [pose_shift.shift(s["pose"], dx), read_frames_dir((folder / f"dx{dx:+d}" if dx else own) / s["key"])]
    panel = side_by_side(*cols)
    return np.concatenate([panel[i] for i in range(0, len(panel), 2)], axis=0)


ROWS = {  # the report's rows, in order
    "untrained": "the embedded model before training",
    "static_reference": "the reference frame repeated: what ignoring the pose gives",
    "trained": "the embedded model after training",
    "vae_ceiling": "the ground truth through the VAE and back: the most any model can reach here",
}
LABELS = tuple(ROWS)


def shown_clip(gains: dict[str, Any], keys: list[str]) -> int:
    """Which clip the side-by-side shows: the one whose pose-swap gain (figure PSNR, else PSNR*) is the
    median of the clips' (the lower middle one for an even count), so the picture is a typical clip,
    not a chosen one; clip 0 when no gain was computed."""
    per_clip = next((gains[k]["per_clip"] for k in ("figure_psnr", "psnr_star") if (gains.get(k) or {}).get("per_clip")), {})
    ranked = sorted((g, keys.index(name)) for name, g in per_clip.items() if name in keys)
    return ranked[(len(ranked) - 1) // 2][1] if ranked else 0


def finite(value: Any) -> Any:
    """NaN (e.g. no keypoint found in any generated frame) as None: JSON has no NaN."""
    return None if isinstance(value, float) and value != value else value


def _f(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else f"{value:{fmt}}"


def swap_table(swaps: dict[str, dict]) -> str:
    """The pose-swap gains as markdown rows: `| label | gain [lo, hi] | ... |` per model."""
    def cell(r: dict | None, fmt: str) -> str:
        return "n/a" if not r or r["gain"] is None else f"{r['gain']:+{fmt}} [{r['ci95'][0]:{fmt}}, {r['ci95'][1]:{fmt}}]"

    head = "| | PSNR* gain (dB) | figure PSNR gain (dB) | SSIM gain |\n|---|---|---|---|\n"
    return head + "\n".join(f"| {label} | {cell(g.get('psnr_star'), '.2f')} | {cell(g.get('figure_psnr'), '.2f')} | "
                            f"{cell(g.get('ssim'), '.3f')} |" for label, g in swaps.items())  # fmt: skip


def report_markdown(report: dict[str, Any], samples: list[dict]) -> str:
    shift = report["pose_shift"]["trained"]
    follow = "n/a" if shift["gain"] is None else f"{shift['gain']:+.2f} [{shift['ci95'][0]:.2f}, {shift['ci95'][1]:.2f}]"
    rows = "\n".join(
        f"| {label} | {r['l1']:.3e} | {r['ssim']:.3f} | {r['psnr']:.2f} | {r['psnr_star']:.2f} | "
        f"{_f(r['figure_psnr'], '.2f')} | {_f(r['figure_ssim'], '.3f')} | "
        f"{_f(r['pose_pck'], '.3f')} | {_f(r['pose_mean_distance'], '.3f')} | {report['rows'][label]} |"
        for label in LABELS if (r := report[label])
    )  # fmt: skip
    return (
        f"# dynamictrl demo\n\nThe embedded tiny model trained for {report['train_steps']} steps on synthetic clips, "
        f"scored on {len(samples)} held-out clips (protocol `disco`, see eval/*/report.md), {report['reference_frame']}. "
        f"Figure PSNR and SSIM: the same scores inside the figure's region only (the union over the clip of the "
        f"ground truth's person masks; `eval/metrics.py`). Pose PCK: MediaPipe "
        f"re-extracts the body keypoints of each generated frame and of the ground-truth frame; a keypoint counts "
        f"when it lies within 0.1 of the person's box of the ground truth's.\n\n"
        f"| | L1 | SSIM | PSNR (uint8, DisCo) | PSNR* | figure PSNR | figure SSIM | pose PCK | pose distance | what |\n"
        f"|---|---|---|---|---|---|---|---|---|---|\n{rows}\n\n"
        f"Trained over the static reference: figure PSNR {_f(report['figure_psnr_over_static'], '+.2f')} dB, PSNR* "
        f"{_f(report['psnr_star_over_static'], '+.2f')} dB; pose PCK {_f(report['pck_over_static'], '.2f')}x.\n\n"
        f"## Pose swap\n\nEach held-out clip animated again from the same reference frame, prompt and seed, but "
        f"driven by another held-out clip's poses (clip i takes clip i+1's, cyclically); the gain is the score "
        f"with its own poses minus the score with the swapped ones, against its own ground truth, per clip: mean "
        f"over clips and 95% bootstrap interval ({pose_swap.RESAMPLES} resamples of the clips). A model that "
        f"ignores the pose gains exactly 0.\n\n{swap_table(report['pose_swap'])}\n\n"
        f"Side by side (reference | pose | trained | swapped pose | trained, swapped poses | ground truth) of "
        f"`{report['shown_clip']}`, the clip with the median pose-swap gain (figure PSNR; PSNR* without masks), "
        f"not a chosen one: "
        f"`side_by_side.mp4`; every clip's frames, lossless, in `trained/`, `trained_swapped/`, `untrained/`, ...\n\n"
        f"![reference | pose | untrained | trained | swapped pose | trained, swapped poses | ground truth, every "
        f"other frame](side_by_side.png)\n\n"
        f"## Pose shift\n\nEach held-out clip animated again by the trained model from the same reference frame, "
        f"prompt and seed, its own poses moved sideways from frame 1 on (by {' and '.join(f'{d:+d}' for d in shift['shifts'])} "
        f"pixels of {samples[0]['frames'].shape[2]}); scored against the ground truth moved the same way, inside the moved "
        f"figure: figure PSNR with the moved poses minus figure PSNR with its own poses (`eval/pose_shift.py`). "
        f"A model that ignores the pose scores exactly 0; one that moves the figure with the pose scores above 0.\n\n"
        f"| | follow (dB, 95% interval) | clips above 0 |\n|---|---|---|\n"
        f"| trained | {follow} | {sum(v > 0 for v in shift['per_clip'].values())} of {shift['clips']} |\n\n"
        f"![pose moved left | trained | own pose | trained | pose moved right | trained, every other frame of "
        f"`{report['shown_clip']}`](shift.png)\n"
    )


def write_baselines(model: str | Path, samples: list[dict], out: Path) -> None:
    """Two reference points scored like the models: `static_reference` repeats the reference frame
    (what a model that ignores the pose would at best produce), `vae_ceiling` is the ground truth
    through the VAE and back (what any model decoding through this VAE can at most reach)."""
    vae = load_pipeline(model).vae
    for s in samples:
        frames = s["frames"]
        write_frames(out / "static_reference" / s["key"], np.repeat(frames[:1], len(frames), 0))
        write_frames(out / "vae_ceiling" / s["key"], vae_roundtrip(vae, frames))


def vae_roundtrip(vae, frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> the same frames encoded by the VAE (posterior mode) and decoded again."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)[0]
    return ((rec.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()[: len(frames)]


def prepare(cfg: DictConfig) -> tuple[Path, Path, list[str]]:
    """The demo's data cut for its layout, its base model, and the train overrides that go with them."""
    layout = cfg.get("layout", "tiny")
    data = OmegaConf.to_container(cfg.data) | {"preprocess_overrides": embedded.clip_cut(layout)}
    shards = make_demo_data(data)
    base = embedded.ensure(layout=layout)
    overrides = ["experiment=demo", f"model.path={base}", f"model.num_frames={embedded.LAYOUTS[layout]['num_frames']}",
                 f"data.train_shards={shards / 'train-*.tar'}"]  # fmt: skip
    return shards, base, overrides


def untrained_row(base: Path) -> str:
    """What the `untrained` row is: the shipped I2V base when the build took one, else a random transformer."""
    build = json.loads((base / "BUILD.json").read_text()) if (base / "BUILD.json").is_file() else {}
    if build.get("base_fit"):
        return (f"the tiny I2V base before fine-tuning: fitted {build['base_fit']['steps']} steps without the pose "
                "branch (models/assets/tiny-base.*), its pose branch at its initial weights")  # fmt: skip
    return "the embedded model before training (random transformer)"


def run(cfg: DictConfig) -> dict[str, Any]:
    start = time.perf_counter()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    print("[1/6] synthetic data and shards, the embedded tiny model")
    shards, base, overrides = prepare(cfg)
    print("[2/6] training")
    from dynamictrl.train.run import run as train

    train_cfg = config.load("train", [*overrides, f"output={out / 'train'}", *cfg.train_overrides])
    trained = train(train_cfg)
    samples = held_out(shards, cfg.eval_clips)
    print(f"[3/6] animating {len(samples)} held-out clips")
    for s in samples:  # the ground truth as decoded from the shards, lossless from here on
        write_frames(out / "reference" / s["key"], s["frames"])
    models = {"trained": out / "train", "untrained": base}
    for label, model in models.items():
        generate_all(model, samples, out / label, cfg.animate, label)
    write_baselines(base, samples, out)
    print("[4/6] evaluation")
    from dynamictrl.pose.mediapipe_backend import MediaPipeHolistic  # real weights, shipped in the wheel

    results, poses = {}, MediaPipeHolistic()
    for label in LABELS:
        results[label] = score(out / label, out / "reference", pose_backend=poses, first=FIRST, masks=masks_of(samples),
                               side_by_side=out / "eval" / label / "side_by_side")  # fmt: skip
        write_report(results[label], out / "eval" / label, title=f"Demo: {label} on held-out clips")
    swaps = {label: swap_gains(model, samples, out / f"{label}_swapped", out / "reference", cfg.animate, label,
                               results[label]) for label, model in models.items()}  # fmt: skip
    follows = shift_follow(out / "train", samples, out / "trained_shifted", cfg.animate, out / "trained")
    print("[5/6] report")
    shown = shown_clip(swaps["trained"], [x["key"] for x in samples])
    s, donor = samples[shown], pose_swap.swapped(samples)[shown]
    untrained, gen, moved = (read_frames_dir(out / label / s["key"]) for label in ("untrained", "trained", "trained_swapped"))
    donor_pose = pose_swap.fit_length(donor["pose"], len(s["pose"]))
    panel = side_by_side(s["frames"][0], s["pose"], gen, donor_pose, moved, s["frames"])
    side = write_video(out / "side_by_side.mp4", panel, s["meta"]["fps"])
    sheet = np.concatenate([side_by_side(s["frames"][0], s["pose"], untrained, gen, donor_pose, moved, s["frames"])[i]
                            for i in range(0, len(gen), 2)], axis=0)  # fmt: skip
    for picture, name in ((sheet, "side_by_side.png"), (shift_sheet(s, out / "trained_shifted", out / "trained"), "shift.png")):
        Image.fromarray(picture).resize((picture.shape[1] * 2, picture.shape[0] * 2), Image.NEAREST).save(out / name)
    keys = ("l1", "ssim", "psnr", "psnr_star", "figure_psnr", "figure_ssim", "pose_pck", "pose_mean_distance")
    report = {label: {k: finite(results[label][k]) for k in keys} for label in results}
    t, u, static = report["trained"], report["untrained"], report["static_reference"]
    report |= {"rows": ROWS | {"untrained": untrained_row(base)}, "layout": cfg.get("layout", "tiny"),
               "protocol": results["trained"]["protocol"], "reference_frame": reference_rule(FIRST),
               "held_out_clips": len(samples), "train_steps": trained["steps"],
               "pose_swap": swaps, "pose_shift": {"trained": follows}, "shown_clip": s["key"], "seconds": time.perf_counter() - start,
               "learned": bool(t["psnr_star"] > u["psnr_star"] and t["l1"] < u["l1"]),
               "beats_static_reference": bool(t["psnr_star"] > static["psnr_star"] and t["figure_psnr"] > static["figure_psnr"]),
               "psnr_star_over_static": t["psnr_star"] - static["psnr_star"],
               "figure_psnr_over_static": finite(t["figure_psnr"] - static["figure_psnr"]),
               "pck_over_static": t["pose_pck"] / static["pose_pck"] if static["pose_pck"] else None}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_markdown(report, samples))
    print(f"\ndemo finished in {report['seconds'] / 60:.1f} min ({report['reference_frame']}):")
    for label in results:
        r = report[label]
        print(f"  {label:16s} L1 {r['l1']:.3e}  SSIM {r['ssim']:.3f}  PSNR* {r['psnr_star']:.2f}  "
              f"figure PSNR {_f(r['figure_psnr'], '.2f')}  figure SSIM {_f(r['figure_ssim'], '.3f')}")  # fmt: skip
    for label, g in swaps.items():
        print(f"  pose-swap gain, {label}: {pose_swap.describe(g)}")
    print(f"  pose-shift follow, trained: {pose_shift.describe(follows)}")
    print(f"  trained pose PCK over the static reference's: {_f(report['pck_over_static'], '.2f')}x")
    print(f"  shards      {shards}\n  checkpoint  {trained['last_ckpt']}\n  frames      {out}/trained, {out}/trained_swapped, {out}/untrained\n"
          f"  side by side {side}\n  report      {out}/report.md, {out}/report.json")
    return report
