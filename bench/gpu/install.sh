#!/usr/bin/env bash
# DALI and the carried wheels into one folder on the GPU machine (call 3 of bench/gpu/GPU.md), exactly
# as the rehearsal does it here: the parts DALI was split into (../shared/device/dali-parts.sh),
# concatenated and unpacked; the wheels (bench/gpu/wheels.py make) installed with pip, no index,
# no dependencies; then every requirement they declare checked against what python3 sees, and
# DALI and zarr imported. Exit 0 only if all of that holds.
#   bash bench/gpu/install.sh /tmp/dali /tmp/site .wheels
set -uo pipefail
parts=$1 site=$2 wheels=$3
py=${PYTHON:-python3}
mkdir -p "$site"
status=0
if [ ! -d "$site/nvidia/dali" ]; then
  ls -l "$parts"
  cat "$parts"/dali.part.* | $py -c "import lzma,sys,tarfile; tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall('$site')" \
    || { echo "unpacking DALI failed: are all three parts in $parts?"; status=1; }
fi
$py -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl || status=1
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" $py bench/gpu/wheels.py check "$site" || status=1
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" $py -c "import nvidia.dali as d, zarr; print('DALI', d.__version__, 'zarr', zarr.__version__)" || status=1
exit $status
