"""GPU check: CogVideoX1.5-5B-I2V's architecture with random weights trains under trainer=fsdp on ONE
GPU, without any offload, at the full clip (37 x 768 x 1360 by default), with as many of its 42
blocks as the memory plan says fit (K) and with two thirds of those (K'). The two runs' step time and peak
memory give the figures per block and the fixed part, extrapolated to 42 blocks beside the plan's
figure for 42.

    python -m dynamictrl.train.gpu_check [--steps 8] [--frames 37] [--height 768] [--width 1360] [--blocks K] [--out FILE]
    python -m dynamictrl.train.gpu_check --tiny      # the same path with the tiny model on CPU (a smoke test)

No weight files are needed: a skeleton pipeline folder per depth holds only the configs (transformer
with K blocks, VAE, scheduler; `module.weights=random`), and synthetic precomputed shards at the clip
size feed the real data path (T5 is never loaded). K is the largest depth whose plan (state counted
per block, activations measured under fake tensors) fits 90% of the GPU. Each run trains in a process
of its own, so its peak memory is its own; a run that runs out of memory is retried with fewer blocks.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynamictrl.errors import UserError

GB = 1e9
WARMUP = 2  # steps left out of the median: the first has no step time, the second warms the allocator and kernels


def skeleton(folder: Path, model_cfg: Any, layers: int) -> Path:
    """A pipeline folder with configs only (no weights): the transformer with `layers` blocks, the VAE,
    the scheduler and T5's config (what the plan counts)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler
    from transformers import T5Config

    from dynamictrl.models import embedded
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel
    from dynamictrl.train.plan import T5_XXL, model_architecture

    tiny = "transformer" not in model_cfg.model
    with torch.device("meta"):
        arch = model_architecture(model_cfg) | {"num_layers": layers}
        DynamiCtrlTransformer3DModel(**arch).save_config(folder / "transformer")
        # CogVideoX 1.5's VAE is diffusers' default architecture, with its image-latent scaling
        vae = AutoencoderKLCogVideoX(**embedded.VAE) if tiny else AutoencoderKLCogVideoX(invert_scale_latents=True,
                                                                                        scaling_factor=0.7)  # fmt: skip
        vae.save_config(folder / "vae")
    (T5Config(vocab_size=300, **embedded.T5) if tiny else T5Config(**T5_XXL)).save_pretrained(folder / "text_encoder")
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


def train_once(overrides: list[str]) -> dict[str, Any]:
    """One training run through the train app (in a process of its own): step times after warm-up and
    the peak memory (CUDA max allocated; on CPU the process's peak resident set), in GB of 1e9 bytes."""
    import resource

    from dynamictrl import config
    from dynamictrl.train.run import run as train

    cfg = config.load("train", overrides)
    try:
        out = train(cfg)
    except torch.OutOfMemoryError as e:
        return {"oom": str(e).splitlines()[0]}
    rows = list(csv.DictReader(open(out["metrics_csv"])))
    step_s = [float(r["perf/step_s"]) for r in rows if r.get("perf/step_s")][WARMUP - 1 :]
    cuda = cfg.trainer.accelerator != "cpu"
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_s": step_s, "step_s_median": statistics.median(step_s), "peak_gb": peak / GB}


def _line(runs: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """(slope per block, value at 0 blocks) of the line through two runs' `key`."""
    (k1, v1), (k2, v2) = ((r["blocks"], r[key]) for r in runs)
    slope = (v2 - v1) / (k2 - k1)
    return slope, v1 - slope * k1


def in_own_process(overrides: list[str]) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(train_once, overrides).result()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dynamictrl import config
    from dynamictrl.train import plan
    from dynamictrl.train.bench import PEAK_BF16

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise UserError("gpu_check: no CUDA device here (use --tiny for the CPU smoke test)")
    if args.steps <= WARMUP:
        raise UserError(f"gpu_check: --steps {args.steps}: give more than {WARMUP} (the first {WARMUP} warm up)")
    common = ["model=tiny" if args.tiny else "model=cogvideox1.5-5b-i2v", "trainer=fsdp", "trainer.devices=1",
              "module.gradient_checkpointing=true"]  # every depth as the full model trains: checkpointed per block
    if not cuda:
        common += ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.strategy.param_dtype=null"]
    clip = (9, 96, 64) if args.tiny else (args.frames, args.height, args.width)
    root = Path(args.work or tempfile.mkdtemp(prefix="dynamictrl-gpu-check-"))
    base = config.load("train", [*common, "data.train_shards=x"])
    layers = int(plan.model_architecture(base)["num_layers"])
    name = torch.cuda.get_device_name() if cuda else "cpu"
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / GB if cuda else 1e9

    def at_depth(n: int, *extra: str) -> list[str]:
        folder = skeleton(root / f"model-{n}", base, n)
        depth = [f"model.transformer.num_layers={n}"] if "transformer" in base.model else []
        return [*common, f"model.path={folder}", *depth, *extra]

    # The plan per depth: state counted from the model with n blocks, activations (and FLOPs) a + b * n
    # from fake runs with 2 and 3 blocks at the full clip.
    acts = plan.by_blocks(base, clip, 1, checkpointing=True)
    flops = plan.by_blocks(base, clip, 1, checkpointing=False, count_flops=True)["flops"]

    def activations(n: int) -> float:  # the step's peak: the transformer's, or the reference encode's before it
        return max(acts["transformer"][0] + acts["transformer"][1] * n, acts["vae"][0])

    def plan_at(n: int) -> dict[str, float]:
        act = activations(n)
        p = plan.make_plan(config.load("train", at_depth(n, "data.train_shards=x")), "fsdp", 1, clip, 1,
                           precomputed=True, activations={True: act})  # fmt: skip
        return {"total": p.total() / GB, "state": sum(p.rows.values()) / GB, "activations": act / GB}

    two, three = plan_at(2), plan_at(3)
    state_block = three["state"] - two["state"]  # weights, grads and AdamW of one block (the rest is fixed)

    def planned(n: int) -> float:
        return two["state"] + state_block * (n - 2) + activations(n) / GB

    blocks = args.blocks or next((n for n in range(layers, 1, -1) if planned(n) <= plan.MARGIN * gpu_gb), 0)
    if blocks < 2:
        raise UserError(f"gpu_check: K={blocks} blocks: needs 2 or more (by the plan 2 blocks take "
                        f"{planned(2):.1f} GB of {gpu_gb:.0f})")  # fmt: skip

    shards = synthetic_shards(root / "shards", args.steps + 2, *clip, plan.model_architecture(base), 4 if args.tiny else 8)
    train = ["module.weights=random", f"data.train_shards={shards}", f"data.num_frames={clip[0]}", "data.num_workers=0",
             "data.batch_size=1", f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1",
             "trainer.enable_progress_bar=false", "logger=csv", "samples.every_n_steps=0", "checkpoint_every=100000",
             "keep_checkpoints=0", "final_save=false"]  # fmt: skip
    measure = lambda n: in_own_process(at_depth(n, *train, f"output={root / f'train-{n}'}")) | {"blocks": n}  # noqa: E731
    notes: list[str] = []
    start = time.perf_counter()
    large = measure(blocks)  # the larger depth first: if the plan overshoots, it is the one to run out of memory
    while "oom" in large:
        notes.append(f"{blocks} blocks ran out of GPU memory ({large['oom']}); retried with fewer")
        if len(notes) == 3 or blocks <= 3:
            raise UserError(f"gpu_check: out of GPU memory down to {blocks} blocks: the plan overestimates what fits")
        blocks -= max(1, blocks // 8)
        large = measure(blocks)
    # two thirds, not half: the smaller run's peak must still be the transformer's, not the reference
    # VAE encode's (11 GB at 37 x 768 x 1360 under CUDA autocast), or the per-block line is skewed
    small = measure(max(1, (2 * blocks) // 3))
    if "oom" in small:
        raise UserError(f"gpu_check: {small['blocks']} blocks ran out of GPU memory after {blocks} did not")
    runs = [small, large]
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), None)
    for r in runs:
        r["plan"] = plan_at(r["blocks"])
        r["step_tflop"] = (flops[0] + flops[1] * r["blocks"]) / 1e12
        r["mfu"] = r["step_tflop"] * 1e12 / r["step_s_median"] / peak_flops if peak_flops else None

    # Every block has the same shape: the line through the two runs gives the figures per block and the fixed part.
    mem_b, mem_0 = _line(runs, "peak_gb")
    time_b, time_0 = _line(runs, "step_s_median")
    full_tflop, full_s = (flops[0] + flops[1] * layers) / 1e12, time_0 + time_b * layers
    result = {"device": name, "device_gb": gpu_gb, "model": str(base.model.name), "layers": layers,
              "clip": list(clip), "steps": args.steps, "trainer": "fsdp, 1 GPU, no offload, checkpointing per block",
              "runs": runs, "notes": notes, "wall_s": time.perf_counter() - start, "blocks_given": bool(args.blocks),
              "per_block": {"peak_gb": mem_b, "step_s": time_b, "step_tflop": flops[1] / 1e12,
                            "plan_gb": state_block + acts["transformer"][1] / GB, "plan_state_gb": state_block,
                            "plan_activations_gb": acts["transformer"][1] / GB},
              "fixed": {"peak_gb": mem_0, "step_s": time_0, "step_tflop": flops[0] / 1e12,
                        "plan_gb": two["state"] - 2 * state_block + acts["transformer"][0] / GB},
              "extrapolated": {"blocks": layers, "peak_gb": mem_0 + mem_b * layers, "step_s": full_s,
                               "step_tflop": full_tflop, "plan": plan_at(layers),
                               "mfu": full_tflop * 1e12 / full_s / peak_flops if peak_flops and full_s > 0 else None}}  # fmt: skip
    write(result, Path(args.out))
    if not args.work:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return result


def write(r: dict[str, Any], path: Path) -> None:
    cpu = r["device"] == "cpu"
    mfu = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    (small, large), per, fixed, full = r["runs"], r["per_block"], r["fixed"], r["extrapolated"]
    where = "CPU (smoke test: the tiny model)" if cpu else f"{r['device']} ({r['device_gb']:.1f} GB)"
    peak_what = ("the process's peak resident set, NOT comparable with the plan" if cpu else
                 "torch.cuda.max_memory_allocated of the run's own process")  # fmt: skip
    lines = [f"# GPU check: {r['model']} architecture, random weights, trainer=fsdp on one device, no offload", "",
             f"Device: {where}. Clip {' x '.join(map(str, r['clip']))} (full width and height), batch 1, "
             f"gradient checkpointing per block, synthetic precomputed shards (T5 not loaded), {r['steps']} steps a "
             f"run; step time is the median after the first {WARMUP} steps.", "",
             f"The full model ({r['layers']} blocks) needs {full['plan']['total']:.1f} GB by the plan; the check "
             f"trains the same architecture with {large['blocks']} blocks ("
             + ("given by --blocks" if r["blocks_given"] else "the most whose plan fits 90% of the device")
             + f") and with {small['blocks']}.", "",
             "| | blocks | peak memory GB | plan GB | median step s | TFLOP a step | MFU |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in (small, large):
        lines.append(f"| measured | {run['blocks']} | {run['peak_gb']:.2f} | {run['plan']['total']:.2f} | "
                     f"{run['step_s_median']:.3f} | {run['step_tflop']:.3g} | {mfu(run['mfu'])} |")  # fmt: skip
    lines += [f"| per block (derived: slope of the two runs) | 1 | {per['peak_gb']:.3f} | {per['plan_gb']:.3f} "
              f"(state {per['plan_state_gb']:.3f} + activations {per['plan_activations_gb']:.3f}) | "
              f"{per['step_s']:.4f} | {per['step_tflop']:.3g} | - |",
              f"| fixed part (derived: the line at 0 blocks) | 0 | {fixed['peak_gb']:.2f} | {fixed['plan_gb']:.2f} | "
              f"{fixed['step_s']:.3f} | {fixed['step_tflop']:.3g} | - |",
              f"| extrapolated, full model | {full['blocks']} | {full['peak_gb']:.1f} | {full['plan']['total']:.1f} | "
              f"{full['step_s']:.2f} | {full['step_tflop']:.3g} | {mfu(full['mfu'])} |", "",
              f"- MEASURED on {'the CPU' if cpu else r['device']}: the two `measured` rows' peak memory "
              f"({peak_what}; GB = 1e9 bytes) and step time (wall time between step ends, data loading included).",
              "- DERIVED: `per block` and `fixed part` are the straight line through the two measured runs; it "
              "assumes each block adds the same memory and time (all blocks have one shape).",
              (f"- EXTRAPOLATED, not run: the `{full['blocks']}` row is fixed part + {full['blocks']} x per block; "
               "its plan figure is the plan's own for the full model." if large["blocks"] < full["blocks"] else
               f"- The full model ran: the `{full['blocks']}` row is the measured one, through the line."),
              "- Plan (`python -m dynamictrl.train.plan`): trainer=fsdp on 1 GPU at each depth, the state counted "
              "from the parameters, activations measured under FakeTensorMode with MemTracker (2- and 3-block "
              "runs, linear in blocks). TFLOP a step: FlopCounterMode over the same fake step (model FLOPs, no "
              "recomputation), linear in blocks; MFU against the device's bf16 dense peak.", ""]  # fmt: skip
    if r["notes"]:
        lines += [f"Note: {n}." for n in r["notes"]] + [""]
    if not cpu:
        lines += [f"At {full['blocks']} blocks: {full['peak_gb']:.1f} GB extrapolated from the measurements against "
                  f"{full['plan']['total']:.1f} GB planned (ratio {full['peak_gb'] / full['plan']['total']:.2f}); "
                  f"per block {per['peak_gb']:.3f} against {per['plan_gb']:.3f} GB.", ""]  # fmt: skip
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
    p.add_argument("--blocks", type=int, default=None, help="K, the larger depth (default: the most the plan fits)")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of this script")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default="docs/gpu-check.md")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    import sys

    try:
        main()
    except UserError as e:
        sys.exit(str(e))
