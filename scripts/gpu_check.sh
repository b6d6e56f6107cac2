#!/usr/bin/env bash
# GPU check (docs/TRAINING.md): CogVideoX1.5-5B-I2V's architecture, random weights, trainer=fsdp on ONE
# GPU without offload, at the full clip (37 x 768 x 1360) with as many of the 42 blocks as the plan
# fits (K) and with K/2; writes the measured step time, peak memory and MFU of both runs, the figures
# per block and their extrapolation to 42 blocks beside the plan's to docs/gpu-check.md (+ .json).
# Needs no weight files and no network.
#   scripts/gpu_check.sh [--steps 8] [--frames 37] [--height 768] [--width 1360] [--blocks K] [--out FILE]
#   scripts/gpu_check.sh --tiny --out /tmp/gpu-check.md     # CPU smoke test of the same path
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "gpu_check: no nvidia-smi"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec "$PY" -m dynamictrl.train.gpu_check "$@"
