"""GPU check: the full-size 5B DynamiCtrl with random weights trains N steps under trainer=fsdp on one
GPU, and the measured step time, peak memory and MFU are written beside the memory plan's prediction.

    python -m dynamictrl.train.gpu_check [--steps 8] [--frames 37] [--height 768] [--width 1360] [--out FILE]
    python -m dynamictrl.train.gpu_check --tiny      # the same path with the tiny model on CPU (a smoke test)

No weight files are needed: a skeleton pipeline folder holds only the configs (transformer, VAE,
scheduler; `module.weights=random`), and synthetic precomputed shards at the clip size feed the real
data path (T5 is never loaded). On a GPU whose memory the plan says cannot hold the sharded state
(FSDP over one GPU shards nothing: ~92 GB at 5B), FSDP's CPU offload is switched on, and if even then
the clip does not fit, the frame count steps down (8 at a time) to the largest that does.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def skeleton(folder: Path, model_cfg: Any) -> Path:
    """A pipeline folder with configs only (no weights): transformer, VAE and scheduler."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler

    from dynamictrl.models import embedded
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel
    from dynamictrl.train.plan import model_architecture

    tiny = "transformer" not in model_cfg.model
    with torch.device("meta"):
        DynamiCtrlTransformer3DModel(**model_architecture(model_cfg)).save_config(folder / "transformer")
        # CogVideoX 1.5's VAE is diffusers' default architecture, with its image-latent scaling
        vae = AutoencoderKLCogVideoX(**embedded.VAE) if tiny else AutoencoderKLCogVideoX(invert_scale_latents=True,
                                                                                        scaling_factor=0.7)  # fmt: skip
        vae.save_config(folder / "vae")
    CogVideoXDPMScheduler(**embedded.SCHEDULER).save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DynamiCtrlPipeline", "note": "configs only"}))
    return folder


def synthetic_shards(folder: Path, n: int, frames: int, height: int, width: int, arch: dict[str, Any],
                     vae_stride: int, latent_channels: int = 16) -> Path:  # fmt: skip
    """`n` precomputed samples of random latents at the clip's size, in the precompute format."""
    import webdataset as wds

    from dynamictrl.train.build import EMPTY_TEXT, save_npy

    def npy(x: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, x, allow_pickle=False)
        return buf.getvalue()

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n_lat, h, w = (frames - 1) // 4 + 1, height // vae_stride, width // vae_stride
    text_shape = (arch["max_text_seq_length"], arch["text_embed_dim"])
    with wds.TarWriter(str(folder / "train-0000-00000.tar")) as tar:
        for i in range(n):
            tar.write({"__key__": f"synthetic-{i}",
                       "latents.npy": npy(rng.standard_normal((n_lat, latent_channels, h, w), dtype=np.float32)),
                       "pose_latents.npy": npy(rng.standard_normal((n_lat, latent_channels, h, w), dtype=np.float32)),
                       "text.npy": npy(rng.standard_normal(text_shape, dtype=np.float32)),
                       "ref.npy": npy(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)),
                       "ref_mask.npy": npy(np.ones((height, width), dtype=bool)), "txt": b"a person dancing",
                       "json": json.dumps({"size": [height, width], "precompute": {"num_frames": frames}}).encode()})  # fmt: skip
    save_npy(folder / EMPTY_TEXT, np.zeros(text_shape, dtype=np.float32))
    return folder


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dynamictrl import config
    from dynamictrl.train import plan
    from dynamictrl.train.bench import PEAK_BF16
    from dynamictrl.train.run import run as train

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("gpu_check: no CUDA device here (use --tiny for the CPU smoke test)")
    model = ["model=tiny"] if args.tiny else ["model=cogvideox1.5-5b-i2v"]
    trainer = ["trainer=fsdp", "trainer.devices=1"] + (
        [] if cuda else ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.strategy.param_dtype=null"])
    frames, height, width = (9, 96, 64) if args.tiny else (args.frames, args.height, args.width)
    root = Path(args.work or tempfile.mkdtemp(prefix="dynamictrl-gpu-check-"))
    base = config.load("train", [*model, *trainer, "data.train_shards=x"])
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if cuda else 1e9
    clip_plan = lambda c, f: plan.make_plan(c, "fsdp", 1, (f, height, width), 1, True)  # noqa: E731
    predicted = clip_plan(base, frames)
    offload = []
    if cuda and not predicted.fits(gpu_gb):
        offload = ["trainer.strategy.cpu_offload=true"]
        base = config.load("train", [*model, *trainer, *offload, "data.train_shards=x"])
        predicted = clip_plan(base, frames)
        while not predicted.fits(gpu_gb) and frames > 9:
            frames -= 8
            predicted = clip_plan(base, frames)
    arch = plan.model_architecture(base)
    stride = 4 if args.tiny else 8
    shards = synthetic_shards(root / "shards", args.steps + 2, frames, height, width, arch, stride)
    model_dir = skeleton(root / "model", base)
    out = root / "train"
    overrides = [*model, *trainer, *offload, f"model.path={model_dir}", "module.weights=random",
                 f"data.train_shards={shards}", f"data.num_frames={frames}", "data.num_workers=0",
                 "data.batch_size=1", f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1",
                 "trainer.enable_progress_bar=false", "logger=csv", "samples.every_n_steps=0",
                 "checkpoint_every=100000", "keep_checkpoints=0", "final_save=false", f"output={out}"]  # fmt: skip
    start = time.perf_counter()
    train(config.load("train", overrides))
    wall = time.perf_counter() - start
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    step_s = [float(r["perf/step_s"]) for r in rows if r.get("perf/step_s")][1:]  # the first includes warm-up
    peak = max(float(r["perf/peak_mem_gb"]) for r in rows if r.get("perf/peak_mem_gb"))
    flops = plan.step_flops(base, (frames, height, width), 1)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), None)
    median = statistics.median(step_s) if step_s else float("nan")
    result = {"device": name, "model": str(base.model.name), "clip": [frames, height, width], "steps": args.steps,
              "trainer": "fsdp, 1 GPU" + (", cpu_offload" if offload else ""), "step_s_median": median,
              "peak_allocated_gb": peak, "plan_gb": predicted.total() / 1e9,
              "plan_rows_gb": {k: v / 1e9 for k, v in predicted.rows.items()},
              "plan_activations_gb": predicted.activations[predicted.checkpointing] / 1e9,
              "step_tflop": flops / 1e12, "mfu": flops / median / peak_flops if peak_flops and step_s else None,
              "wall_s": wall, "plan_source": predicted.source}  # fmt: skip
    write(result, Path(args.out))
    if not args.work:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return result


def write(r: dict[str, Any], path: Path) -> None:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no bf16 peak known for this device)"
    ratio = r["peak_allocated_gb"] / r["plan_gb"] if r["plan_gb"] else float("nan")
    peak_note = ("GPU: torch.cuda.max_memory_allocated" if r["device"] != "cpu"
                 else "CPU smoke run: process peak RSS, not comparable with the plan")  # fmt: skip
    lines = [f"# GPU check: {r['model']}, random weights, {r['trainer']}", "",
             f"Device: {r['device']}. Clip {r['clip'][0]} x {r['clip'][1]} x {r['clip'][2]}, batch 1, "
             f"{r['steps']} steps (precomputed-format synthetic shards; T5 not loaded).", "",
             "| | measured | plan |", "|---|---|---|",
             f"| peak memory GB | {r['peak_allocated_gb']:.1f} ({peak_note}) | {r['plan_gb']:.1f} (ratio {ratio:.2f}) |",
             f"| median step s | {r['step_s_median']:.3f} | - |",
             f"| MFU (bf16 dense peak) | {mfu} | {r['step_tflop']:.3g} TFLOP a step (FlopCounterMode, no recompute) |",
             "", "Plan rows (GB): " + ", ".join(f"{k} {v:.1f}" for k, v in r["plan_rows_gb"].items())
             + f", activations {r['plan_activations_gb']:.1f}.", "", r["plan_source"] + ".", ""]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(r, indent=1))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--frames", type=int, default=37)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=1360)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of this script")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default="docs/gpu-check.md")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
