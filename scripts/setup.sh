#!/usr/bin/env bash
# Creates the project's environment in .venv (or $VENV) and installs everything it needs.
#   scripts/setup.sh          runtime (with NVIDIA DALI, the `dali` extra)
#   scripts/setup.sh plot     runtime + matplotlib (the demo's pictures)
#   scripts/setup.sh dev      runtime + matplotlib + test tools (TensorBoard, ONNX, transformers, ...)
# torch: a CUDA torch the system Python already has is kept (the venv sees system site-packages);
# otherwise a machine with an NVIDIA GPU gets PyPI's CUDA build and a machine without one gets
# torch==2.13.0+cpu, the CPU build, from its own disk or indexes when they hold it, else from
# PyTorch's CPU index (never a multi-GB CUDA build it cannot use).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
python=${PYTHON:-python3}
extra=${1:-}

if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "setup: keeping the system's CUDA torch ($("$python" -c 'import torch; print(torch.__version__)'))"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
# (sed drops the notices this machine's pip prints about local index folders it skips)
pip_install() {
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-warn-conflicts -q "$@" 2>&1 | sed "/^WARNING: Location 'file:/d"
}

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install torch
  elif ! "$venv/bin/python" -m pip install --disable-pip-version-check -q "torch==2.13.0+cpu" >/dev/null 2>&1; then
    # the CPU build is not on this machine's disk or indexes; PyPI's own torch wheels for Linux are
    # CUDA builds, so take it from PyTorch's CPU index
    pip_install --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
  fi
fi

case "$extra" in
  dev | plot) target=".[dali,$extra]" ;;
  "") target=".[dali]" ;;
  *) echo "setup: unknown extra '$extra' (use dev or plot)" >&2 && exit 2 ;;
esac
pip_install -e "$target"
# The DALL-E release's own modules, for the tests that check our converter against them.
# --no-deps: its requirements list torchvision, which does not work beside the CPU torch.
[ "$extra" = "dev" ] && pip_install --no-deps "dall-e==0.1"

# pillow-simd and pillow share the PIL module; anything that pulls pillow overwrites it.
# Install pillow-simd last, alone, so the environment ends with the one we mean.
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; m.version('pillow-simd'); sys.exit(1 if any(d.metadata['Name'].lower() == 'pillow' for d in m.distributions()) else 0)" 2>/dev/null; then
  "$venv/bin/python" -m pip uninstall -y -q pillow pillow-simd >/dev/null 2>&1 || true
  pip_install --no-deps "pillow-simd>=9"
fi
"$venv/bin/python" - <<'PY'
import importlib.metadata as m
import PIL, torch
assert m.version("pillow-simd") == PIL.__version__, (m.version("pillow-simd"), PIL.__version__)
print(f"setup: torch {torch.__version__} (CUDA {'yes' if torch.cuda.is_available() else 'no'}), pillow-simd {PIL.__version__}")
PY
