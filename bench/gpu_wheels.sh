#!/usr/bin/env bash
# The wheels stage 1 and stage 2 need on the GPU machine besides DALI (Python 3.12, manylinux
# x86_64): zarr and what it imports (numcodecs, donfig; crc32c for zarr's checksums), at the
# versions this project's environment runs. The GPU machine has numpy, packaging, typing_extensions.
#   bash bench/gpu_wheels.sh            # writes .wheels/ (ignored by git), about 2 MB
# On the device, call 3 installs them: pip install --no-index --no-deps --target /tmp/site .wheels/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.wheels
rm -rf "$dir" && mkdir -p "$dir"
pins=$(.venv/bin/python -c 'from importlib.metadata import version as v; print(*(f"{n}=={v(n)}" for n in ("zarr", "numcodecs", "donfig")))')
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$dir" $pins crc32c
ls "$dir"; du -sh "$dir"
