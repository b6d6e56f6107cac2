#!/usr/bin/env bash
# GPU check (docs/TRAINING.md): full-size 5B DynamiCtrl, random weights, N training steps under
# trainer=fsdp on one GPU; writes measured step time, peak memory and MFU beside the memory plan's
# prediction to docs/gpu-check.md (+ .json). Needs no weight files and no network.
#   scripts/gpu_check.sh [--steps 8] [--frames 37] [--height 768] [--width 1360] [--out FILE]
#   scripts/gpu_check.sh --tiny --out /tmp/gpu-check.md     # CPU smoke test of the same path
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "gpu_check: no nvidia-smi"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec "$PY" -m dynamictrl.train.gpu_check "$@"
