#!/usr/bin/env bash
# GPU window, call 2 of 3 (no DALI, no zarr; about 5 minutes): the compiled steps, as
# `--set compile=true` runs them: the ViT-B train step against transformers' BEiT compiled, the
# cached/online training step compiled, and the attention module compiled. Then the table.
#   OUT=/tmp/out bash bench/gpu_call2.sh          # on the GPU machine (bench/GPU.md)
#   REHEARSE=1 OUT=/tmp/rehearse bash bench/gpu_call2.sh
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
if [ -n "${REHEARSE:-}" ]; then
  step=(--models tiny --batch 2 --steps 1 --warmup 1); loop=(--batch 2 --steps 1 --warmup 1)
  attention=(--device cpu --batch 1 --reps 1 --flex-cases "" --cases train)
else
  step=(--models base --batch 256); loop=(--model base --batch 256); attention=(--cases train)
fi
run train_step_compiled 240 $py bench/train_step.py "${step[@]}" --compile "${peer[@]}" --json "$out/train_step_compiled.json"
run pretrain_step_compiled 150 $py bench/pretrain_step.py "${loop[@]}" --compile --json "$out/pretrain_step_compiled.json"
run attention_compiled 90 $py bench/attention_kernels.py "${attention[@]}" --model-block --compile --json "$out/attention_compiled.json"
$py bench/gpu_summary.py "$out"
