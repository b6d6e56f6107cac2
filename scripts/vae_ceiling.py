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
import webdataset as wds
from diffusers import AutoencoderKLCogVideoX
from safetensors.torch import load_file

from dynamictrl.data.shards import decode_sample, list_shards
from dynamictrl.eval.pose_accuracy import pck
from dynamictrl.models import embedded
from dynamictrl.pose import layout as L
from dynamictrl.utils.video import read_video, write_video


def load_vae(weights: Path) -> AutoencoderKLCogVideoX:
    meta = json.loads(weights.with_suffix(".json").read_text())
    vae = AutoencoderKLCogVideoX(**meta["architecture"])
    vae.load_state_dict(load_file(weights), strict=True)
    vae.register_to_config(scaling_factor=meta["scaling_factor"])
    return vae.eval()


def held_out(shards: Path, limit: int) -> list[dict]:
    urls = list_shards(str(shards / "test-*.tar"))
    return [decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)][:limit]


def reconstruct(vae: AutoencoderKLCogVideoX, frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> the same through the VAE and back."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)[0]
    return ((rec.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()[: len(frames)]


def poses(frames: np.ndarray, backend) -> tuple[np.ndarray, np.ndarray]:
    """Raw per-frame detection (T,) and keypoints filled forward like `animate.run.extract_poses`."""
    backend.reset()
    found = np.stack([backend(np.ascontiguousarray(f))[0] for f in frames])
    detected = L.body_detected(found)
    kpts, last = L.empty(len(frames)), None
    for i, k in enumerate(found):
        if detected[i]:
            last = k
        if last is not None:
            kpts[i] = last
    return detected, kpts


def measure(vae: AutoencoderKLCogVideoX, samples: list[dict], backend, truth: list) -> dict:
    mse, det, filled, hits, total = [], [], [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for s, (_, target) in zip(samples, truth, strict=True):
            rec = reconstruct(vae, s["frames"])
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
        r = measure(load_vae(w), samples, backend, truth)
        print(json.dumps({"weights": str(w), **{k: round(v, 3) for k, v in r.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
