#!/usr/bin/env bash
# Every GPU measurement, on a machine that keeps its state (your own GPU box with this project's
# environment, DALI and zarr installed): the three calls of a lent window (bench/GPU.md) in a row.
#   OUT=bench/results/gpu bash bench/gpu.sh
# Then the quality experiment's GPU size, which needs the official Fashion-MNIST idx files:
#   python3 bench/quality.py --size gpu --source FASHION_MNIST_DIR --work runs/quality-gpu --jobs 2
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench/results/gpu}
bash bench/gpu_call1.sh
bash bench/gpu_call2.sh
bash bench/gpu_call3.sh
