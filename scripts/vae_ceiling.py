"""The VAE ceiling on the demo's held-out clips: ground truth through a VAE and back, scored as the demo does.

    PYTHONPATH=src python scripts/vae_ceiling.py [WEIGHTS.safetensors ...] [--shards DIR] [--clips N]

Each WEIGHTS file needs a .json beside it with "architecture" (AutoencoderKLCogVideoX kwargs) and
"scaling_factor" (the shipped asset's format); with no argument the shipped asset is measured. For
each clip: encode -> latent_dist.mode() -> decode, clamp, uint8, then an mp4 round trip (the demo
writes its `vae_ceiling` videos as mp4). Reports held-out PSNR, MediaPipe body detection (raw, per
frame; `det_filled` also counts frames holding an earlier frame's pose, as `extract_poses` fills
them) and PCK of the reconstruction's keypoints vs those of the ground truth, pooled over keypoints
like `eval.run.score`, plus the ground truth's own detection rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLCogVideoX

from dynamictrl.animate.run import detect_poses, fill_forward
from dynamictrl.demo import held_out, vae_roundtrip
from dynamictrl.eval.pose_accuracy import pck
from dynamictrl.models import embedded
from dynamictrl.pose import layout as L
from dynamictrl.utils.video import read_video, write_video


def poses(frames: np.ndarray, backend) -> tuple[np.ndarray, np.ndarray]:
    """Raw per-frame detection (T,) and keypoints filled forward as `animate.run.extract_poses` fills them."""
    found = detect_poses(frames, backend, progress=False)
    return L.body_detected(found), fill_forward(found)


def measure(vae: AutoencoderKLCogVideoX, samples: list[dict], backend, truth: list) -> dict:
    mse, det, filled, hits, total = [], [], [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for s, (_, target) in zip(samples, truth, strict=True):
            rec = vae_roundtrip(vae, s["frames"])
            path = write_video(Path(tmp) / f"{s['key']}.mp4", rec, s["meta"]["fps"])
            rec = read_video(path)[0]
            mse.append(((rec.astype(np.float64) - s["frames"]) / 255).__pow__(2).mean())
            d, found = poses(rec, backend)
            det.append(d)
            filled.append(L.body_detected(found))  # frames with a pose after filling forward, as the demo's
            acc = pck(found, target)
            hits += acc["pck"] * acc["keypoints"] if acc["keypoints"] else 0
            total += acc["keypoints"]
    return {"psnr": float(np.mean([10 * math.log10(1 / m) for m in mse])),
            "det": float(np.concatenate(det).mean()), "det_filled": float(np.concatenate(filled).mean()), "pck": hits / total if total else float("nan")}  # fmt: skip


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("weights", nargs="*", type=Path)
    ap.add_argument("--shards", type=Path, default=Path("data/demo/shards"))
    ap.add_argument("--clips", type=int, default=12)
    args = ap.parse_args(argv)
    from dynamictrl.pose.mediapipe_backend import MediaPipeHolistic

    torch.set_grad_enabled(False)
    backend = MediaPipeHolistic()
    samples = held_out(args.shards, args.clips)
    truth = [poses(s["frames"], backend) for s in samples]
    print(f"ground truth: {len(samples)} clips, det {np.concatenate([t[0] for t in truth]).mean():.3f}")
    for w in args.weights or [embedded.VAE_ASSET]:
        r = measure(embedded.load_vae_file(w), samples, backend, truth)
        print(json.dumps({"weights": str(w), **{k: round(v, 3) for k, v in r.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
