"""End-to-end check of a VAE variant: animate one held-out clip through DynamiCtrlPipeline with it.

    PYTHONPATH=src python scripts/vae_e2e.py WEIGHTS.safetensors [...]

Builds the embedded model once (shipped VAE) in a temporary folder, swaps in each VAE, animates the
first held-out clip (4 steps, the same seed) and prints the output shape and the seconds per
transformer call, so a VAE with another temporal compression can be compared.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from dynamictrl.demo import held_out
from dynamictrl.models import embedded
from dynamictrl.models.pipeline import DynamiCtrlPipeline


def main(argv: list[str]) -> int:
    s = held_out(Path("/work/main/data/demo/shards"), 1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        pipe = DynamiCtrlPipeline.from_pretrained(embedded.build(Path(tmp) / "m", progress=False))
    pipe.set_progress_bar_config(disable=True)
    for w in [embedded.VAE_ASSET, *map(Path, argv)]:
        pipe.vae = embedded.load_vae_file(w)
        calls = []
        forward = pipe.transformer.forward

        def timed(*a, forward=forward, calls=calls, **k):
            t = time.perf_counter()
            out = forward(*a, **k)
            calls.append((time.perf_counter() - t, k["hidden_states"].shape))
            return out

        pipe.transformer.forward = timed
        frames = pipe(s["frames"][0], s["pose"], prompt=s["caption"], num_inference_steps=4,
                      generator=torch.Generator().manual_seed(0)).frames[0]  # fmt: skip
        pipe.transformer.forward = forward
        sec = sorted(c[0] for c in calls)[len(calls) // 2]
        print(f"{w.name}: tcr {pipe.vae.config.temporal_compression_ratio}, output {frames.shape}, "
              f"transformer input {tuple(calls[0][1])}, median {sec * 1000:.1f} ms/call over {len(calls)} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
