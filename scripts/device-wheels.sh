#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (Python 3.12, torch 2.11 + CUDA 13, numpy; no zarr, typer,
# safetensors, ...), for carrying there beside DALI (../shared/device/dali-parts.sh).
# Usage: scripts/device-wheels.sh .wheels   (add /.wheels/ to .git/info/exclude), then on the device:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl
#   export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH
set -euo pipefail
dir=${1:-.wheels}
mkdir -p "$dir"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "$dir" \
  zarr numcodecs donfig crc32c typer click rich shellingham markdown-it-py mdurl pygments safetensors tqdm \
  fsspec pillow packaging typing_extensions pyyaml --no-deps
du -sh "$dir"
