"""`make demo`: the whole chain on embedded defaults, offline, on CPU.

1. synthetic clips in TikTok layout -> 2. shards -> 3. the embedded tiny model -> 4. training ->
5. animation of held-out clips by the trained and the untrained model -> 6. evaluation of both ->
7. report.json, report.md and a side-by-side video (reference | pose | generated | ground truth).
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
from dynamictrl.data.shards import decode_sample, list_shards
from dynamictrl.data.synthetic import generate
from dynamictrl.eval.run import score, write_report
from dynamictrl.models import embedded
from dynamictrl.utils.video import read_video, write_video


def make_demo_data(cfg: DictConfig | dict) -> Path:
    """Synthetic videos under ROOT/raw and their shards under ROOT/shards (skipped when present)."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    root = Path(cfg.root)
    generate(root / "raw", num_train=cfg.num_train, num_test=cfg.num_test, num_frames=27, seed=cfg.seed)
    shards = root / "shards"
    if not list_shards(str(shards / "train-*.tar")):
        from dynamictrl.preprocess.run import run as preprocess

        preprocess(config.load("preprocess", [f"input={root / 'raw'}", f"output={shards}"]))
    return shards


def held_out(shards: Path, limit: int) -> list[dict[str, Any]]:
    urls = list_shards(str(shards / "test-*.tar"))
    samples = [decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    return samples[:limit]


def generate_all(model: str | Path | None, samples: list[dict], folder: Path, cfg: DictConfig, label: str,
                 prompt: str | None = None) -> None:  # fmt: skip
    """Animate each held-out clip from its first frame and its poses; `prompt` replaces the captions."""
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    for s in tqdm(samples, desc=f"animate held-out clips ({label})"):
        g = torch.Generator().manual_seed(cfg.seed)
        frames = pipe(s["frames"][0], s["pose"], prompt=s["caption"] if prompt is None else prompt, num_inference_steps=cfg.steps,
                      guidance_scale=cfg.guidance_scale, generator=g).frames[0]  # fmt: skip
        write_video(folder / f"{s['key']}.mp4", frames, s["meta"]["fps"])


ROWS = {  # the report's rows, in order
    "untrained": "the embedded model before training",
    "static_reference": "the reference frame repeated: what ignoring the pose gives",
    "trained": "the embedded model after training",
    "vae_ceiling": "the ground truth through the VAE and back: the most any model can reach here",
}
LABELS = tuple(ROWS)


def finite(value: Any) -> Any:
    """NaN (e.g. no keypoint found in any generated frame) as None: JSON has no NaN."""
    return None if isinstance(value, float) and value != value else value


def _f(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else f"{value:{fmt}}"


def report_markdown(report: dict[str, Any], samples: list[dict]) -> str:
    rows = "\n".join(
        f"| {label} | {r['l1']:.3e} | {r['ssim']:.3f} | {r['psnr']:.2f} | {r['psnr_star']:.2f} | "
        f"{_f(r['pose_pck'], '.3f')} | {_f(r['pose_mean_distance'], '.3f')} | {ROWS[label]} |"
        for label in LABELS if (r := report[label])
    )  # fmt: skip
    return (
        f"# dynamictrl demo\n\nThe embedded tiny model trained for {report['train_steps']} steps on synthetic clips, "
        f"scored on {len(samples)} held-out clips (protocol `disco`, see eval/*/report.md). Pose PCK: MediaPipe "
        f"re-extracts the body keypoints of each generated frame and of the ground-truth frame; a keypoint counts "
        f"when it lies within 0.1 of the person's box of the ground truth's.\n\n"
        f"| | L1 | SSIM | PSNR (uint8, DisCo) | PSNR* | pose PCK | pose distance | what |\n"
        f"|---|---|---|---|---|---|---|---|\n{rows}\n\n"
        f"Trained pose PCK over the static reference's: {_f(report['pck_over_static'], '.2f')}x.\n\n"
        f"Side by side (reference | pose | generated | ground truth): `side_by_side.mp4`.\n\n"
        f"![reference | pose | untrained | trained | ground truth, every other frame](side_by_side.png)\n"
    )


def write_baselines(model: str | Path, samples: list[dict], out: Path) -> None:
    """Two reference points scored like the models: `static_reference` repeats the reference frame
    (what a model that ignores the pose would at best produce), `vae_ceiling` is the ground truth
    through the VAE and back (what any model decoding through this VAE can at most reach)."""
    vae = load_pipeline(model).vae
    for s in samples:
        frames, fps = s["frames"], s["meta"]["fps"]
        write_video(out / "static_reference" / f"{s['key']}.mp4", np.repeat(frames[:1], len(frames), 0), fps)
        write_video(out / "vae_ceiling" / f"{s['key']}.mp4", vae_roundtrip(vae, frames), fps)


def vae_roundtrip(vae, frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> the same frames encoded by the VAE (posterior mode) and decoded again."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)[0]
    return ((rec.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()[: len(frames)]


def run(cfg: DictConfig) -> dict[str, Any]:
    start = time.perf_counter()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    print("[1/6] synthetic data and shards")
    shards = make_demo_data(cfg.data)
    print("[2/6] the embedded tiny model")
    base = embedded.ensure()
    print("[3/6] training")
    from dynamictrl.train.run import run as train

    train_cfg = config.load("train", ["experiment=demo", f"output={out / 'train'}", *cfg.train_overrides])
    trained = train(train_cfg)
    samples = held_out(shards, cfg.eval_clips)
    print(f"[4/6] animating {len(samples)} held-out clips")
    for s in samples:
        write_video(out / "reference" / f"{s['key']}.mp4", s["frames"], s["meta"]["fps"])
    generate_all(out / "train", samples, out / "trained", cfg.animate, "trained")
    generate_all(base, samples, out / "untrained", cfg.animate, "untrained")
    write_baselines(base, samples, out)
    print("[5/6] evaluation")
    from dynamictrl.pose.mediapipe_backend import MediaPipeHolistic  # real weights, shipped in the wheel

    results, poses = {}, MediaPipeHolistic()
    for label in LABELS:
        results[label] = score(out / label, out / "reference", pose_backend=poses,
                               side_by_side=out / "eval" / label / "side_by_side")  # fmt: skip
        write_report(results[label], out / "eval" / label, title=f"Demo: {label} on held-out clips")
    print("[6/6] report")
    s = samples[0]
    untrained = read_video(out / "untrained" / f"{s['key']}.mp4")[0]
    gen = read_video(out / "trained" / f"{s['key']}.mp4")[0]
    panel = side_by_side(s["frames"][0], s["pose"], gen, s["frames"])
    side = write_video(out / "side_by_side.mp4", panel, s["meta"]["fps"])
    sheet = np.concatenate([side_by_side(s["frames"][0], s["pose"], untrained, gen, s["frames"])[i]
                            for i in range(0, len(gen), 2)], axis=0)  # fmt: skip
    Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(out / "side_by_side.png")
    keys = ("l1", "ssim", "psnr", "psnr_star", "pose_pck", "pose_mean_distance")
    report = {label: {k: finite(results[label][k]) for k in keys} for label in results}
    t, u, static = report["trained"], report["untrained"], report["static_reference"]
    report |= {"protocol": results["trained"]["protocol"], "held_out_clips": len(samples),
               "train_steps": trained["steps"], "seconds": time.perf_counter() - start,
               "learned": bool(t["psnr_star"] > u["psnr_star"] and t["l1"] < u["l1"]),
               "beats_static_reference": bool(t["psnr_star"] > static["psnr_star"] and t["pose_pck"] > static["pose_pck"]),
               "pck_over_static": t["pose_pck"] / static["pose_pck"] if static["pose_pck"] else None}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_markdown(report, samples))
    print(f"\ndemo finished in {report['seconds'] / 60:.1f} min:")
    for label in results:
        print(f"  {label:9s} L1 {report[label]['l1']:.3e}  SSIM {report[label]['ssim']:.3f}  PSNR* {report[label]['psnr_star']:.2f}")
    print(f"  trained pose PCK over the static reference's: {_f(report['pck_over_static'], '.2f')}x")
    print(f"  shards      {shards}\n  checkpoint  {trained['last_ckpt']}\n  videos      {out}/trained, {out}/untrained\n"
          f"  side by side {side}\n  report      {out}/report.md, {out}/report.json")
    return report
