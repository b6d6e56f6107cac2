#!/usr/bin/env bash
# On a lent GPU (issue 16): fit a larger embedded VAE there and score its ceiling as the demo would.
#   scripts/gpu_vae.sh [STEPS] [ARCH_JSON]    -> outputs/vae_exp/gpu.{safetensors,json}, the ceiling table
# Then, if the ceiling's detection and PCK are well above the static reference's (0.33), ship it:
# copy the weights to src/dynamictrl/models/assets/tiny-vae.safetensors (+ the .json's architecture,
# scaling_factor and fit), set embedded.VAE to the architecture, bump embedded.VERSION, run make demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
STEPS=${1:-8000}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu for a smoke run
ARCH=${2:-'{"block_out_channels": [64, 64, 128], "layers_per_block": 2, "temporal_compression_ratio": 2}'}
# the demo's held-out clips (synthetic data and shards; a minute on CPU, skipped when present)
$PY -c "from dynamictrl.data.demo_data import make_demo_data; from dynamictrl import config; make_demo_data(config.load('demo').data)"
PYTHONPATH=src $PY scripts/vae_fit_exp.py gpu "$STEPS" --device "$DEVICE" --arch "$ARCH" --clip-share 0.75 --clip-batch 4
PYTHONPATH=src $PY scripts/vae_ceiling.py outputs/vae_exp/gpu.safetensors
