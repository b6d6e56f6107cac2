"""Fit a VAE variant with `embedded.fit_vae` and save it in the shipped asset's format (for vae_ceiling.py).

    PYTHONPATH=src python scripts/vae_fit_exp.py NAME STEPS [--arch JSON] [--clip-share F] [--clip-batch N]
        [--person-weight W] [--num-clips N] [--init WEIGHTS] [--device cuda]   -> outputs/vae_exp/NAME.safetensors + .json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX
from safetensors.torch import load_file, save_file

from dynamictrl.models import embedded


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("steps", type=int)
    ap.add_argument("--arch", default="{}", help="JSON overrides of embedded.VAE")
    ap.add_argument("--clip-share", type=float, default=0.5)
    ap.add_argument("--clip-batch", type=int, default=2)
    ap.add_argument("--person-weight", type=float, default=0.0)
    ap.add_argument("--num-clips", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, help="start from these weights (same parameter shapes)")
    ap.add_argument("--out", type=Path, default=Path("outputs/vae_exp"))
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N: where to fit")
    a = ap.parse_args(argv)
    arch = embedded.VAE | json.loads(a.arch)
    torch.manual_seed(a.seed)
    vae = AutoencoderKLCogVideoX(**arch)
    if a.init:
        vae.load_state_dict(load_file(a.init), strict=True)
    start = time.perf_counter()
    stats = embedded.fit_vae(vae, a.steps, a.seed, progress=False, num_clips=a.num_clips, clip_share=a.clip_share,
                             clip_batch=a.clip_batch, person_weight=a.person_weight,
                             device=a.device)  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    w = a.out / f"{a.name}.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, w)
    meta = {"architecture": json.loads(json.dumps(arch)), "scaling_factor": vae.config.scaling_factor,
            "recipe": {k: str(v) for k, v in vars(a).items() if k not in ("out",)}, "fit": stats,
            "params": sum(p.numel() for p in vae.parameters()), "wall": time.perf_counter() - start}  # fmt: skip
    w.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({"name": a.name, "params": meta["params"], **stats}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
