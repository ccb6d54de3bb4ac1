#!/usr/bin/env bash
# The GPU benchmarks in one command, for a machine with a CUDA device:
#
#   bash benchmarks/gpu.sh            # from anywhere; PYTHON=... picks the interpreter
#
# Prints the devices (nvidia-smi -L, torch's device name), then runs
#   benchmarks/slim_latency.py --device cuda       full vs slim latency, batch 1 and 32
#   benchmarks/train_throughput.py --device cuda   SGD vs DHSPG training images/s, 3x32x32, batch 256
#   benchmarks/amp_check.py --device cuda          DHSPG under fp16/bf16 autocast and GradScaler (a skipped
#                                                  step changes nothing); with 2+ GPUs, torchrun --sync-bn
# and writes their JSON, their tables (.md) and the device description to benchmarks/results/gpu/.
# Nothing is downloaded: models have random weights, data are generated on the device.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")'
OUT=benchmarks/results/gpu
mkdir -p "$OUT"

{
    nvidia-smi -L || echo "nvidia-smi not found"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "-", torch.cuda.get_device_name(0))'
} | tee "$OUT/device.txt"

"$PYTHON" benchmarks/slim_latency.py --device cuda --out "$OUT/slim_latency.json" | tee "$OUT/slim_latency.md"
"$PYTHON" benchmarks/train_throughput.py --device cuda --out "$OUT/train_throughput.json" | tee "$OUT/train_throughput.md"
"$PYTHON" benchmarks/amp_check.py --device cuda --out "$OUT/amp_check.json" | tee "$OUT/amp_check.md"
