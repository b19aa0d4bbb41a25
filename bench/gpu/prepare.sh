#!/usr/bin/env bash
# What a GPU window carries, made here before it (bench/gpu/GPU.md): DALI for Python 3.12 in three
# parts under .dali/ (../shared/device/dali-parts.sh), and under .wheels/ the wheels the GPU
# machine lacks, resolved by pip for its Python (bench/gpu/wheels.py make). Both folders are
# ignored by git and travel only as `carry`. DALI's parts are made once (a minute of xz); the
# wheels are worked out anew each time.
#   bash bench/gpu/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
py312=${PY312:-}
if [ -z "$py312" ]; then
  if [ -x build/rehearse/py312/bin/python ]; then py312=build/rehearse/py312/bin/python; else py312="env PYENV_VERSION=3.12.1 python3.12"; fi
fi
shared=${SHARED:-../shared}
if [ ! -d .dali/part-3 ]; then
  bash "$shared/device/dali-parts.sh" .dali
fi
# (sed drops the notices this machine's pip prints about local index folders it skips)
$py312 bench/gpu/wheels.py make .wheels 2>&1 | sed "/^WARNING: Location 'file:/d"
tree=$(git ls-files -z --cached --others --exclude-standard | python3 -c "import os, sys
print(sum(os.path.getsize(p) for p in sys.stdin.read().split('\0') if os.path.isfile(p)))")
for part in .dali/part-*; do
  size=$(du -sb "$part" | cut -f1)
  echo "$part: $((size / 1048576)) MiB; with the tree ($((tree / 1048576)) MiB): $(((size + tree) / 1048576)) MiB of 64"
done
echo ".wheels: $(($(du -sb .wheels | cut -f1) / 1048576)) MiB (carried with the last part)"
