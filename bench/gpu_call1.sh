#!/usr/bin/env bash
# GPU window, call 1 of 3 (no DALI, no zarr; about 5 minutes): the GPU tests, the dVAE's
# views/s and agreement under each precision policy, the ViT-B train step against transformers'
# BEiT (eager), the training step with cached against online targets on device-resident batches,
# and which attention kernel runs. Each step has its own time limit, so one slow step cannot eat
# the window. JSON and logs go under $OUT; a short table is printed last (bench/gpu_summary.py).
#   OUT=/tmp/out bash bench/gpu_call1.sh          # on the GPU machine (bench/GPU.md)
#   REHEARSE=1 OUT=/tmp/rehearse bash bench/gpu_call1.sh   # on a CPU, tiny sizes, same steps
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
if [ -n "${REHEARSE:-}" ]; then
  dvae=(--batch 2 --reps 1); step=(--models tiny --batch 2 --steps 1 --warmup 1)
  loop=(--batch 2 --steps 1 --warmup 1); attention=(--device cpu --batch 1 --reps 1 --flex-cases "")
else
  dvae=(--batch 256); step=(--models base --batch 256); loop=(--model base --batch 256); attention=(--model-block)
fi
: > "$out/steps.txt"
run device 60 $py -c "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}))"
run gpu-tests 150 $py -m pytest -q -m gpu tests -p no:cacheprovider -rs
run dvae 90 $py bench/dvae.py "${dvae[@]}" --json "$out/dvae.json"
run train_step 150 $py bench/train_step.py "${step[@]}" "${peer[@]}" --json "$out/train_step.json"
run pretrain_step 120 $py bench/pretrain_step.py "${loop[@]}" --json "$out/pretrain_step.json"
run attention 120 $py bench/attention_kernels.py "${attention[@]}" --json "$out/attention_kernels.json"
$py bench/gpu_summary.py "$out"
