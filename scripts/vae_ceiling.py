"""The VAE ceiling on the demo's held-out clips: ground truth through a VAE and back, scored as the demo does.

    PYTHONPATH=src python scripts/vae_ceiling.py [WEIGHTS.safetensors ...] [--shards DIR] [--clips N] [--no-pose]

Each WEIGHTS file needs a .json beside it with "architecture" (AutoencoderKLCogVideoX kwargs) and
"scaling_factor" (the shipped asset's format); with no argument the shipped asset is measured. For
each clip: encode -> latent_dist.mode() -> decode, clamp, uint8 (lossless, as the demo now keeps its
frames). Reports held-out PSNR over all frames (`psnr`), and as the demo scores since issue 20, over
frames 1+ (frame 0 is the reference): per-frame PSNR* (`psnr_star_1`) and figure-region PSNR
(`figure_psnr_1`, inside the union of the clip's person masks), beside the static reference's (frame 0
repeated: `static_*`), and the latent frames per clip. Unless --no-pose: MediaPipe body detection (raw,
per frame; `det_filled` also counts frames holding an earlier frame's pose, as `extract_poses` fills
them) and PCK of the reconstruction's keypoints vs those of the ground truth, pooled over keypoints
like `eval.run.score`, plus the ground truth's own detection rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLCogVideoX

from dynamictrl.animate.run import detect_poses, fill_forward
from dynamictrl.demo import held_out, vae_roundtrip
from dynamictrl.eval.metrics import figure_metrics, figure_region, video_metrics
from dynamictrl.eval.pose_accuracy import pck
from dynamictrl.models import embedded
from dynamictrl.pose import layout as L


def poses(frames: np.ndarray, backend) -> tuple[np.ndarray, np.ndarray]:
    """Raw per-frame detection (T,) and keypoints filled forward as `animate.run.extract_poses` fills them."""
    found = detect_poses(frames, backend, progress=False)
    return L.body_detected(found), fill_forward(found)


def after_reference(gen: np.ndarray, s: dict) -> dict[str, list[float]]:
    """Per-frame PSNR* and figure PSNR of frames 1+ against the clip's ground truth, as the demo scores."""
    region = figure_region(s["mask"])
    return {"psnr_star_1": video_metrics(gen[1:], s["frames"][1:])["psnr_star"],
            "figure_psnr_1": figure_metrics(gen[1:], s["frames"][1:], region)["figure_psnr"]}  # fmt: skip


def static_reference(samples: list[dict]) -> dict[str, float]:
    """The static reference (frame 0 repeated) scored over frames 1+, whole frame and figure region."""
    per = [after_reference(np.repeat(s["frames"][:1], len(s["frames"]), 0), s) for s in samples]
    return {f"static_{k}": float(np.mean([v for p in per for v in p[k]])) for k in ("psnr_star_1", "figure_psnr_1")}


def measure(vae: AutoencoderKLCogVideoX, samples: list[dict], backend, truth: list | None) -> dict:
    mse, det, filled, hits, total, after = [], [], [], 0, 0, {"psnr_star_1": [], "figure_psnr_1": []}
    for i, s in enumerate(samples):
        rec = vae_roundtrip(vae, s["frames"])
        mse.append(((rec.astype(np.float64) - s["frames"]) / 255).__pow__(2).mean())
        for k, v in after_reference(rec, s).items():
            after[k] += v
        if truth is None:
            continue
        d, found = poses(rec, backend)
        det.append(d)
        filled.append(L.body_detected(found))  # frames with a pose after filling forward, as the demo's
        acc = pck(found, truth[i][1])
        hits += acc["pck"] * acc["keypoints"] if acc["keypoints"] else 0
        total += acc["keypoints"]
    x = torch.from_numpy(samples[0]["frames"]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    out = {"psnr": float(np.mean([10 * math.log10(1 / m) for m in mse])),
           "latent_frames": int(vae.encode(x).latent_dist.mode().shape[2]),
           **{k: float(np.mean(v)) for k, v in after.items()}}  # fmt: skip
    if truth is not None:
        out |= {"det": float(np.concatenate(det).mean()), "det_filled": float(np.concatenate(filled).mean()),
                "pck": hits / total if total else float("nan")}  # fmt: skip
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("weights", nargs="*", type=Path)
    ap.add_argument("--shards", type=Path, default=Path("data/demo/shards"))
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--no-pose", action="store_true", help="skip MediaPipe (detection and PCK)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    samples = held_out(args.shards, args.clips)
    backend = truth = None
    if not args.no_pose:
        from dynamictrl.pose.mediapipe_backend import MediaPipeHolistic

        backend = MediaPipeHolistic()
        truth = [poses(s["frames"], backend) for s in samples]
        print(f"ground truth: {len(samples)} clips, det {np.concatenate([t[0] for t in truth]).mean():.3f}")
    print(json.dumps({"clips": len(samples), "frames": len(samples[0]["frames"]),
                      **{k: round(v, 3) for k, v in static_reference(samples).items()}}), flush=True)  # fmt: skip
    for w in args.weights or [embedded.VAE_ASSET]:
        r = measure(embedded.load_vae_file(w), samples, backend, truth)
        print(json.dumps({"weights": str(w), **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
