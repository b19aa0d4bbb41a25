#!/usr/bin/env bash
# GPU window, call 3 (bench/gpu/GPU.md), after calls 1 and 2 copied DALI's first two parts to /tmp/dali
# and this call's command copied the third: DALI unpacked and the carried wheels installed under
# /tmp/site (bench/gpu/install.sh, which also checks every requirement they declare), then the
# end-to-end figures: stage 1 with the released-size tokenizer on realistic JPEGs (V = 10; steady
# state and end to end) beside the released approach; stage 2 cached against online with real DALI
# input on that store, and the input pipeline alone; the DALI GPU tests; DALI's decode beside
# torchvision's. Each step has its own limit; the limits add up to 30 s under the call's timeout_s.
#   OUT=/tmp/out bash bench/gpu/call3.sh                    # on the GPU machine
#   REHEARSE=1 OUT=/tmp/out bash bench/gpu/call3.sh         # tiny sizes, on a CPU (bench/gpu/rehearse.py)
set -uo pipefail
call=call3 budget=185
source "$(dirname "$0")/common.sh"
if [ -n "${REHEARSE:-}" ]; then
  images=64; tok=(--views 2 --chunk-images 16 --reference-images 16); pre=(--models tiny --batch 4 --steps 2)
  decode=(--count 64 --batch 16 --reps 1)
else
  images=12000; tok=(--released --reference-images 1000); pre=(--models base --batch 256 --steps 15)
  decode=(--count 2000 --batch 128)
fi
step install 35 bash bench/gpu/install.sh /tmp/dali /tmp/site .wheels
export PYTHONPATH="/tmp/site:$PYTHONPATH"
step jpegs 15 $py bench/speed/jpegs.py /tmp/beit-jpegs "$images"
step tokenize 60 $py bench/speed/tokenize_throughput.py --images "$images" --jpegs /tmp/beit-jpegs "${tok[@]}" \
  --workdir /tmp/gpu-window/stage1 --json "$work/tokenize.json"
step pretrain 40 $py bench/speed/pretrain_throughput.py "${pre[@]}" --store /tmp/gpu-window/stage1/store.zarr \
  --workdir /tmp/gpu-window/stage2 --json "$work/pretrain.json"
step dali-tests 20 $py -m pytest -q -m "gpu and dali" tests -p no:cacheprovider -rs
step decode 15 $py bench/speed/jpeg_decode.py --images /tmp/beit-jpegs "${decode[@]}" --json "$work/decode_dali.json"
[ -n "${GPU_PLAN:-}" ] || cat "$out/summary.txt"
