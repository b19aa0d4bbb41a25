#!/usr/bin/env bash
# GPU window, call 3 of 3 (DALI; about 6 minutes): unpack DALI (parts copied to /tmp/dali by
# calls 1-3) and the zarr wheels (.wheels/, carried), then the DALI GPU test, stage 1 end to end
# with the released-size tokenizer on realistic JPEGs (V = 10), and stage 2 cached against online
# with real DALI input plus the input pipeline alone. Then the table.
#   OUT=/tmp/out bash bench/gpu_call3.sh          # on the GPU machine (bench/GPU.md)
#   REHEARSE=1 OUT=/tmp/rehearse bash bench/gpu_call3.sh   # on a CPU with DALI and zarr installed
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
if [ -z "${REHEARSE:-}" ]; then
  mkdir -p /tmp/site
  if ! $py -c "import nvidia.dali" 2>/dev/null; then
    cat /tmp/dali/dali.part.* | $py -c "import lzma,sys,tarfile; tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall('/tmp/site')" \
      > "$out/unpack.log" 2>&1
    echo "unpack DALI: rc $?" | tee -a "$out/steps.txt"
  fi
  if ! $py -c "import zarr" 2>/dev/null; then
    $py -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl > "$out/wheels.log" 2>&1
    echo "install wheels: rc $?" | tee -a "$out/steps.txt"
  fi
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
  tok=(--released --images 2000); pre=(--models base --batch 256 --images 4096 --steps 30)
else
  tok=(--images 16 --views 2); pre=(--models tiny --batch 4 --images 16 --steps 2)
fi
run dali-import 60 $py -c "import nvidia.dali as d, zarr; print(d.__version__, zarr.__version__)"
run gpu-tests-dali 120 $py -m pytest -q -m gpu tests -k dali -p no:cacheprovider -rs
run tokenize 200 $py bench/tokenize_throughput.py "${tok[@]}" --json "$out/tokenize.json"
run pretrain 200 $py bench/pretrain_throughput.py "${pre[@]}" --json "$out/pretrain.json"
$py bench/gpu_summary.py "$out"
