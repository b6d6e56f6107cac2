"""make bench: speed measurements, written to outputs/bench/ (JSON and markdown).

Model: forward+backward step time of the base CogVideoX transformer and of each pose-control variant
at one mid-size config, measured round-robin in one process so that ratios are side by side; plus
the parameter overhead of each variant at 5B (built on the meta device). Eval: frames/s of each
metric. Preprocessing: frames/s of each backend (`dynamictrl.preprocess.bench`). Training: loader
throughput, step time and memory per trainer config (`dynamictrl.train.bench`). VAE: peak memory of
encoding and decoding one 37-frame clip with and without VAE tiling (the tiny shipped VAE, at the
1360x768 frame-to-tile geometry scaled down). Absolute times on a shared machine are noise; the
ratios are the result.

    make bench                      # every section
    make bench ARGS="preprocess"    # some: model eval preprocess train vae
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from dynamictrl.models.inspect import format_rows, model_configs, table
from dynamictrl.models.transformer import CONTROL_MODES, DynamiCtrlTransformer3DModel

MID = dict(num_attention_heads=8, attention_head_dim=64, in_channels=32, out_channels=16, time_embed_dim=256,
           ofs_embed_dim=256, text_embed_dim=256, num_layers=6, sample_width=24, sample_height=48, sample_frames=13,
           patch_size=2, patch_size_t=2, max_text_seq_length=64, use_rotary_positional_embeddings=True,
           patch_bias=False)  # fmt: skip


def bench_model(device: str, repeats: int = 5) -> dict:
    torch.manual_seed(0)
    frames, h, w = 4, MID["sample_height"], MID["sample_width"]
    models = {"base": CogVideoXTransformer3DModel(**MID)}
    models |= {c: DynamiCtrlTransformer3DModel(**MID, control=c) for c in CONTROL_MODES}
    x = torch.randn(1, frames, 32, h, w, device=device)
    text = torch.randn(1, MID["max_text_seq_length"], MID["text_embed_dim"], device=device)
    pose = torch.randn(1, frames, 16, h, w, device=device)
    rope = get_3d_rotary_pos_embed(64, None, (h // 2, w // 2), frames // 2, grid_type="slice",
                                   max_size=(h // 2, w // 2), device=device)  # fmt: skip
    t, ofs = torch.tensor([500], device=device), torch.tensor([2.0], device=device)

    def step(name):
        m = models[name]
        kw = {} if name == "base" else {"control_hidden_states": pose}
        out = m(x, text, t, ofs=ofs, image_rotary_emb=rope, **kw).sample
        out.square().mean().backward()
        m.zero_grad(set_to_none=True)

    for m in models.values():
        m.to(device).train()
    times = {n: [] for n in models}
    for n in models:  # warm-up
        step(n)
    for _ in range(repeats):
        for n in models:  # round-robin: every variant sees the same machine state
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(n)
            if device == "cuda":
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - start)
    median = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
    tokens = frames // 2 * (h // 2) * (w // 2)
    return {
        "device": device, "config": MID, "video_tokens": tokens, "text_tokens": MID["max_text_seq_length"],
        "median_step_s": median,
        "ratio_to_base": {n: median[n] / median["base"] for n in median},
        "padaln_vs_cross_attn": median["padaln"] / median["cross_attn"],
        "params": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
    }  # fmt: skip


def bench_eval(frames: int = 32, size: tuple[int, int] = (256, 256)) -> dict:
    """Frames per second of each eval metric on one video pair (LPIPS with a random VGG backbone:
    the same cost as with real weights)."""
    import numpy as np

    from dynamictrl.animate.run import extract_poses
    from dynamictrl.data.synthetic import make_video
    from dynamictrl.eval.lpips_metric import build, lpips_frames
    from dynamictrl.eval.metrics import video_metrics
    from dynamictrl.pose.mediapipe_backend import MediaPipeHolistic

    real = make_video(0, frames, *size, 8.0)["frames"]
    gen = np.clip(real.astype(int) + np.random.default_rng(0).integers(-20, 20, real.shape), 0, 255).astype(np.uint8)
    from dynamictrl.eval import backbones as B
    from dynamictrl.eval import distribution as D

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lp = build("vgg", random_backbone=True).to(device)
    # random-init networks of the published architectures: the same cost as with their real weights
    inception, r3d, i3d = (nn.eval().to(device) for nn in (B.random_inception(), B.ResNet3D50(), B.InceptionI3D()))
    jobs = {
        "frame metrics (disco)": lambda: video_metrics(gen, real, "disco"),
        "frame metrics (clean)": lambda: video_metrics(gen, real, "clean"),
        "lpips vgg": lambda: lpips_frames(lp, gen, real, normalize=False),
        "pose re-extraction (mediapipe)": lambda: extract_poses(gen, MediaPipeHolistic(), progress=False),
        "fid features (inception)": lambda: D.frame_features(inception, gen),
        "fid-vid features (3d resnet-50, disco clips)": lambda: D.clip_features(r3d, gen, D.clip_protocol("fid_vid", "disco")),
        "fvd features (i3d, disco clips)": lambda: D.clip_features(i3d, gen, D.clip_protocol("fvd", "disco")),
        "fvd features (i3d, clean clips)": lambda: D.clip_features(i3d, gen, D.clip_protocol("fvd", "clean")),
    }
    out = {}
    for name, job in jobs.items():
        start = time.perf_counter()
        job()
        out[name] = frames / (time.perf_counter() - start)
    return {"frames": frames, "size": list(size), "device": device, "frames_per_s": out}


# The VAE section: the released 1360x768 frames against the CogVideoX VAE's 240x360 tile (half its 480x720
# sample size), scaled down by 5 for the tiny VAE (stride 4 instead of 8); tile sizes whose overlaps land
# on whole latents, as the real tile's do.
VAE_FRAME, VAE_TILE, VAE_FRAMES = (152, 272), (48, 80), 37
REAL_FRAME, REAL_TILE = (768, 1360), (240, 360)


def _peak_mb(job: Callable[[], Any], device: str) -> float:
    """Peak memory (MB) `job` adds above what is held before it: CUDA allocations on a GPU, else resident
    memory (Linux: peak RSS reset through /proc/self/clear_refs)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        job()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def status(key: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1])  # kB

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS:")
    job()
    return (status("VmHWM:") - base) / 1024


def bench_vae(device: str) -> dict:
    """Peak memory of VAE encode and decode of one clip, untiled and tiled (tiny shipped VAE)."""
    from dynamictrl.models import embedded

    vae = (embedded.shipped_vae() or embedded.AutoencoderKLCogVideoX(**embedded.VAE)).to(device).eval()
    (h, w), (th, tw) = VAE_FRAME, VAE_TILE
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(1, 3, VAE_FRAMES, h, w, generator=g) * 2 - 1).to(device)
    with torch.no_grad():
        latents = vae.encode(video).latent_dist.mode()
    out = {"device": device, "frame": [h, w], "tile": [th, tw], "frames": VAE_FRAMES, "peak_mb": {}}
    for tiled in (False, True):
        if tiled:
            vae.enable_tiling(tile_sample_min_height=th, tile_sample_min_width=tw)
        else:
            vae.disable_tiling()
        with torch.no_grad():
            out["peak_mb"][f"encode{' tiled' if tiled else ''}"] = _peak_mb(lambda: vae.encode(video), device)
            out["peak_mb"][f"decode{' tiled' if tiled else ''}"] = _peak_mb(lambda: vae.decode(latents), device)
    m = out["peak_mb"]
    out["saved"] = {k: 1 - m[f"{k} tiled"] / m[k] for k in ("encode", "decode")}
    return out


SECTIONS = ("model", "eval", "preprocess", "train", "vae")


def run(output: str | Path = "outputs/bench", sections: tuple[str, ...] = SECTIONS) -> dict:
    """Run the chosen sections; write OUTPUT/bench.json and OUTPUT/bench.md."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"bench: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}}  # fmt: skip
    lines = ["# Benchmarks", "", f"Machine: {results['machine']}", ""]
    if "model" in sections:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        results["model"] = [bench_model(d) for d in devices]
        results["param_overhead_5b"] = table("cogvideox1.5-5b-i2v", model_configs()["cogvideox1.5-5b-i2v"])
        lines += ["## Step time (forward + backward), mid-size config", ""]
        for r in results["model"]:
            lines += [f"{r['device']}: {r['video_tokens']} video + {r['text_tokens']} text tokens, "
                      f"{MID['num_layers']} layers of width {MID['num_attention_heads'] * MID['attention_head_dim']}.", "",
                      "| model | median step (s) | ratio to base | parameters |", "|---|---|---|---|"]  # fmt: skip
            for n, v in r["median_step_s"].items():
                lines.append(f"| {n} | {v:.3f} | {r['ratio_to_base'][n]:.2f} | {r['params'][n] / 1e6:.1f} M |")
            lines += ["", f"PadaLN / cross-attention step time: {r['padaln_vs_cross_attn']:.2f}", ""]
        lines += ["## Parameters at 5B (CogVideoX1.5-5B-I2V base)", "", format_rows(results["param_overhead_5b"]), ""]
    if "eval" in sections:
        ev = results["eval"] = bench_eval()
        lines += [f"## Eval metrics ({ev['frames']} frames at {ev['size'][0]}x{ev['size'][1]}, {ev['device']})", "",
                  "| metric | frames/s |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in ev["frames_per_s"].items()] + [""]
    if "preprocess" in sections:
        from dynamictrl.preprocess import bench as preprocess_bench

        results["preprocess"], more = preprocess_bench.run()
        lines += more
        results["preprocess_engines"], more = preprocess_bench.engines()
        lines += more
    if "train" in sections:
        from dynamictrl.train import bench as train_bench

        results["train"], more = train_bench.run()
        lines += more
    if "vae" in sections:
        results["vae"] = [bench_vae(d) for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])]
        lines += ["## VAE tiling: peak memory of one clip", "",
                  f"{VAE_FRAMES} frames at {VAE_FRAME[0]}x{VAE_FRAME[1]}, tile {VAE_TILE[0]}x{VAE_TILE[1]}: the released "
                  f"{REAL_FRAME[1]}x{REAL_FRAME[0]} against the CogVideoX VAE's {REAL_TILE[0]}x{REAL_TILE[1]} tile, scaled "
                  "down 5x for the tiny VAE.", "", "| device | pass | untiled (MB) | tiled (MB) | saved |", "|---|---|---|---|---|"]  # fmt: skip
        for r in results["vae"]:
            m = r["peak_mb"]
            lines += [f"| {r['device']} | {k} | {m[k]:.0f} | {m[f'{k} tiled']:.0f} | {r['saved'][k]:.0%} |"
                      for k in ("encode", "decode")]  # fmt: skip
        lines.append("")
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    (out / "bench.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"bench: {out / 'bench.md'}, {out / 'bench.json'}")
    return results


if __name__ == "__main__":
    import sys

    run(sections=tuple(sys.argv[1:]) or SECTIONS)
