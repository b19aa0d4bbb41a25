#!/usr/bin/env bash
# The spread over seeds of the demo's tokenizer (issue 11): scripts/demo.sh's `beit tokenizer
# train` line on its Fashion-MNIST training images, once per seed, one run after another.
#   bash bench/demo_tokenizer_seeds.sh [FIRST LAST [DIR [--set k=v ...]]]
# (default seeds 0..7 in runs/demo-tokenizer-seeds; further arguments go to `beit tokenizer train`)
# Prints one line per seed: held-out PSNR, the mean-colour baseline (each crop's), their gap, codes used.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
first=${1:-0}
last=${2:-7}
out=${3:-runs/demo-tokenizer-seeds}
shift $(($# < 3 ? $# : 3))
mkdir -p "$out"
[ -d "$out/data/train" ] || "$py" -m beit data fashion-mnist "$out/data" --size 28 >/dev/null
echo "seed  psnr  baseline  gap  codes"
for seed in $(seq "$first" "$last"); do
  # the demo's settings (scripts/demo.sh), with the seed
  "$py" -m beit tokenizer train "$out/data/train" -o "$out/tok$seed.safetensors" --no-resume \
    --steps 400 --input-size 28 --vocab-size 512 --batch-size 64 --set group_count=3 \
    --set n_hid=32 --set n_init=32 --set warmup_steps=100 --set held_out=0.05 --set min_crop_area=0.5 \
    --set seed="$seed" "$@" >/dev/null 2>&1
  "$py" -c "
import json, sys
held = json.load(open(sys.argv[1]))['report']['held_out']
print(f\"{sys.argv[2]:>4}  {held['psnr']:.2f}  {held['baseline_psnr']:.2f}  {held['psnr'] - held['baseline_psnr']:.2f}  {held['codes_used']}\", flush=True)
" "$out/tok$seed.json" "$seed"
done
