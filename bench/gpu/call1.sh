#!/usr/bin/env bash
# GPU window, call 1 (bench/gpu/GPU.md): everything that needs neither DALI nor zarr, most valuable
# first: the ViT-B train step against transformers' BEiT (MFU; ours eager, then ours compiled
# before the peer's compile starts), the dVAE's views/s and agreement under each precision policy
# (and cudnn.benchmark), the training step with cached against online targets on device-resident
# batches (eager, then compiled), the GPU tests that need no DALI, which attention kernel runs,
# and torchvision's nvJPEG decode. Each step has its own limit, and the limits add up to 30 s
# under the call's timeout_s; what each step measured is in $OUT after it.
#   OUT=/tmp/out bash bench/gpu/call1.sh                    # on the GPU machine
#   REHEARSE=1 OUT=/tmp/out bash bench/gpu/call1.sh         # tiny sizes, on a CPU (bench/gpu/rehearse.py)
set -uo pipefail
call=call1 budget=290
source "$(dirname "$0")/common.sh"
peer=()
$py -c "import transformers" 2> /dev/null || peer=(--no-peer)
if [ -n "${REHEARSE:-}" ]; then
  train=(--models tiny --depth 2 --batch 2 --steps 1 --warmup 1); dvae=(--batch 2 --reps 1)
  loop=(--model tiny --depth 2 --batch 2 --steps 1 --warmup 1); attention=(--device cpu --batch 1 --reps 1)
  decode=(--count 64 --batch 16 --reps 1)
else
  train=(--models base --batch 256); dvae=(--batch 256); loop=(--model base --batch 256); attention=()
  decode=(--count 2000 --batch 128)
fi
device_info='import json, platform, sys, torch
info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version()}
print(json.dumps(info)); open(sys.argv[1], "w").write(json.dumps(info))'
step device 10 bash -c "$py -c '$device_info' $work/device.json; nvidia-smi || true"
step train_step 115 $py bench/speed/train_step.py "${train[@]}" --compile "${peer[@]}" --json "$work/train_step.json"
step dvae 30 $py bench/speed/dvae.py "${dvae[@]}" --json "$work/dvae.json"
step pretrain_step 40 $py bench/speed/pretrain_step.py "${loop[@]}" --compile --json "$work/pretrain_step.json"
step gpu-tests 55 $py -m pytest -q -m "gpu and not dali" tests -p no:cacheprovider -rs
step attention 20 $py bench/speed/attention_kernels.py "${attention[@]}" --flex-cases "" --model-block \
  --json "$work/attention_kernels.json"
step decode 20 $py bench/speed/jpeg_decode.py --images /tmp/beit-jpegs "${decode[@]}" --json "$work/decode.json"
[ -n "${GPU_PLAN:-}" ] || cat "$out/summary.txt"
