#!/usr/bin/env bash
# Every GPU measurement, on a machine that keeps its state (your own GPU box with this project's
# environment, DALI and zarr installed): the steps of a lent window's calls (bench/gpu/GPU.md) in a row,
# each call's four files under $OUT/call1 and $OUT/call3.
#   OUT=bench/results/gpu bash bench/gpu/own_machine.sh
# Then the quality experiment's GPU size, which needs the official Fashion-MNIST idx files:
#   python3 bench/quality/quality.py --preset gpu --source FASHION_MNIST_DIR --work runs/quality-gpu --jobs 2
set -uo pipefail
cd "$(dirname "$0")/../.."
base=${OUT:-bench/results/gpu}
OUT=$base/call1 bash bench/gpu/call1.sh
OUT=$base/call3 bash bench/gpu/call3.sh
