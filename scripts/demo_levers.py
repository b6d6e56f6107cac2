"""Time the demo's transformer under a layout lever: build a variant of the embedded pipeline, train it
a few steps on the demo's shards, animate one held-out clip; print the step time and what the clip
costs in temporal token positions. With --eval-clips N: also animate N held-out clips with their own
and with swapped poses and score them as the demo does (frames 1+, whole frame and figure region,
pose-swap gain), beside the static reference.

    PYTHONPATH=src python scripts/demo_levers.py NAME [--frames N] [--patch-t 2|none] [--vae WEIGHTS]
        [--shards DIR] [--steps N] [--heads N] [--layers N] [--eval-clips N] [--base-steps N]
        -> outputs/levers/NAME/

--base-steps N first fits a tiny I2V base of this layout for N steps (`embedded.fit_base_asset`: no
pose branch, its own synthetic clips, cut like --shards's clips) into outputs/levers/NAME/base.safetensors
and builds the model on it; the --steps of training then fine-tune it with the pose branch.

With no option: the shipped demo's layout (9 frames, patch_size_t=2, the shipped VAE, 6 heads of 32).
One CPU thread (torch.set_num_threads(1)); the figures are for comparing levers on one machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dynamictrl import config
from dynamictrl.ablation import step_seconds
from dynamictrl.demo import held_out
from dynamictrl.models import embedded


def evaluate(pipe, samples: list[dict], out: Path, guidance_scale: float = 3.0) -> dict:
    """The demo's measures for a trained pipeline: own-pose scores, static reference, pose-swap gain."""
    import numpy as np
    from omegaconf import OmegaConf

    from dynamictrl.demo import FIRST, generate_all, masks_of, swap_gains
    from dynamictrl.eval.run import score
    from dynamictrl.utils.video import write_frames

    cfg = OmegaConf.create({"seed": 0, "steps": 25, "guidance_scale": guidance_scale})
    for s in samples:
        write_frames(out / "reference" / s["key"], s["frames"])
        write_frames(out / "static_reference" / s["key"], np.repeat(s["frames"][:1], len(s["frames"]), 0))
    kw = {"progress": False, "first": FIRST, "masks": masks_of(samples)}
    generate_all(pipe, samples, out / "trained", cfg, "trained")
    own = score(out / "trained", out / "reference", **kw)
    static = score(out / "static_reference", out / "reference", **kw)
    gains = swap_gains(pipe, samples, out / "trained_swapped", out / "reference", cfg, "trained", own)
    row = {f"{k}": round(own[k], 3) for k in ("psnr_star", "figure_psnr", "ssim", "figure_ssim")}
    row |= {f"static_{k}": round(static[k], 3) for k in ("psnr_star", "figure_psnr", "ssim", "figure_ssim")}
    row |= {f"swap_{k}": [round(g["gain"], 3), [round(x, 3) for x in g["ci95"]]] for k, g in gains.items()}
    return row | {"eval_clips": len(samples)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--frames", type=int, default=embedded.NUM_FRAMES)
    ap.add_argument("--patch-t", default="2")
    ap.add_argument("--vae", type=Path, help="VAE weights in the shipped asset's format")
    ap.add_argument("--shards", type=Path, default=Path("data/demo/shards"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--heads", type=int, default=embedded.TRANSFORMER["num_attention_heads"])
    ap.add_argument("--layers", type=int, default=embedded.TRANSFORMER["num_layers"])
    ap.add_argument("--eval-clips", type=int, default=0)
    ap.add_argument("--base-steps", type=int, default=0)
    ap.add_argument("--train-override", action="append", default=[], help="extra train config override (repeat)")
    ap.add_argument("--cfg", type=float, default=3.0, help="guidance scale of the evaluation (the demo's: 1.0)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path("outputs/levers") / a.name
    patch_t = None if a.patch_t.lower() == "none" else int(a.patch_t)
    embedded.TRANSFORMER.update(patch_size_t=patch_t, sample_frames=a.frames, num_attention_heads=a.heads,
                                num_layers=a.layers)  # fmt: skip
    embedded.NUM_FRAMES = a.frames
    if a.vae:
        embedded.shipped_vae = lambda *_: embedded.load_vae_file(a.vae)
    embedded.BASE_ASSET = out / "base.safetensors"  # never the package's asset here
    if a.base_steps and not embedded.BASE_ASSET.is_file():
        cut = [] if a.frames == 9 else [f"num_frames={a.frames}", "stride=5"]
        embedded.fit_base_asset(a.base_steps, data_root=f"data/levers-base-{a.frames}", out=embedded.BASE_ASSET,
                                progress=False, preprocess_overrides=cut, layout="tiny")  # fmt: skip
    model = embedded.build(out / "model", progress=False) if not (out / "model").is_dir() else out / "model"
    vae = embedded.load_vae_file(a.vae) if a.vae else embedded.shipped_vae()
    lat = (a.frames - 1) // vae.config.temporal_compression_ratio + 1
    positions = lat if patch_t is None else -(-lat // patch_t)
    from dynamictrl.train.run import run as train

    cfg = config.load("train", ["experiment=demo", f"output={out / 'train'}", f"model.path={model}",
                                f"model.num_frames={a.frames}", f"data.train_shards={a.shards}/train-*.tar",
                                f"trainer.max_steps={a.steps}", "samples.every_n_steps=0", "logger=csv",
                                f"checkpoint_every={a.steps}", "trainer.enable_progress_bar=false", *a.train_override])  # fmt: skip
    start = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - start
    from dynamictrl.animate.run import load_pipeline

    pipe = load_pipeline(out / "train")
    pipe.set_progress_bar_config(disable=True)
    s = held_out(a.shards, 1)[0]
    start = time.perf_counter()
    pipe(s["frames"][0], s["pose"], prompt=s["caption"], num_inference_steps=25, guidance_scale=3.0,
         generator=torch.Generator().manual_seed(0))  # fmt: skip
    gen_s = time.perf_counter() - start
    row = {"name": a.name, "base_steps": a.base_steps, "frames": a.frames, "patch_size_t": patch_t, "latent_frames": lat,
           "temporal_positions": positions, "heads": a.heads, "layers": a.layers,
           "step_s": round(step_seconds(Path(result["metrics_csv"]), skip=5), 3), "train_s": round(train_s, 1),
           "steps": a.steps, "clip_25_steps_s": round(gen_s, 2)}  # fmt: skip
    if a.eval_clips:
        row |= evaluate(pipe, held_out(a.shards, a.eval_clips), out, a.cfg) | {"cfg": a.cfg, "train_override": a.train_override}
    (out / "levers.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
