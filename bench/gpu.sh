#!/usr/bin/env bash
# Everything that needs a GPU, in one call of under 10 minutes on a lent GPU machine:
# the GPU-marked tests and every GPU benchmark, with JSON results under $OUT (default bench/results/gpu).
#   bash bench/gpu.sh
# On the device machine, make DALI and other missing wheels importable first (../shared/device/README.md).
# Then the quality experiment's GPU size, which needs the official Fashion-MNIST idx files (30 MB),
# carried as an ignored folder (here: mkdir .fmnist && cp /usr/share/datasets/fashion-mnist/* .fmnist/):
#   timeout 570 python3 bench/quality.py --size gpu --source .fmnist --work runs/quality-gpu --jobs 2
# again until it prints its tables (each call resumes where the last was cut off); then copy
# runs/quality-gpu/results.json and logs/ under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
peer=()
python3 -c "import transformers" 2>/dev/null || peer=(--no-peer)
python3 -m pytest -q -m gpu tests 2>&1 | tail -5 | tee "$out/gpu-tests.txt"
python3 bench/train_step.py --models base --batch 256 "${peer[@]}" --json "$out/train_step_base.json" 2>&1 | tee "$out/train_step_base.txt"
python3 bench/train_step.py --models base --batch 256 --compile "${peer[@]}" --json "$out/train_step_base_compile.json" 2>&1 | tee "$out/train_step_base_compile.txt"
python3 bench/train_step.py --models tiny --batch 256 "${peer[@]}" --json "$out/train_step_tiny.json" 2>&1 | tee "$out/train_step_tiny.txt"
python3 bench/dvae.py --batch 256 --json "$out/dvae_released.json" 2>&1 | tee "$out/dvae_released.txt"
python3 bench/tokenize_throughput.py --released --images 2000 --json "$out/tokenize_released.json" 2>&1 | tee "$out/tokenize_released.txt"
python3 bench/pretrain_throughput.py --models base --batch 256 --images 4096 --steps 30 --json "$out/pretrain_base.json" 2>&1 | tee "$out/pretrain_base.txt"
