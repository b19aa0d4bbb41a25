"""`python -m pytest -m gpu tests` works on the GPU machine, whose Python has the core stack
(torch, torchvision, transformers, timm, safetensors, numpy, Pillow, typer, tqdm, fsspec, pytest)
and the project, but none of zarr, numcodecs or DALI, nor the dev extras (scipy, matplotlib,
scikit-image, dall_e). Here those are made unimportable in a subprocess, on the CPU.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_MACHINE_LACKS = ["zarr", "numcodecs", "nvidia.dali", "scipy", "matplotlib", "skimage", "dall_e"]
# A None in sys.modules is how a missing module looks to both `import` (ModuleNotFoundError) and
# importlib.util.find_spec (None). Only nvidia.dali: CUDA builds of torch bring other nvidia.* packages.
BLOCK = f"import sys\nfor name in {GPU_MACHINE_LACKS!r}:\n    sys.modules[name] = None\n"


def run_without_the_missing_packages(code: str) -> subprocess.CompletedProcess:
    # zarr registers a pytest plugin through an entry point; where zarr is not installed there is none.
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-c", BLOCK + code]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_the_gpu_tests_collect_without_zarr_numcodecs_or_dali():
    args = ["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    code = f"import pytest\nsys.exit(pytest.main({args!r}))"
    result = run_without_the_missing_packages(code)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "ERROR collecting" not in output and "error" not in output.splitlines()[-1], output[-3000:]

    module = ast.parse((ROOT / "tests" / "test_gpu.py").read_text())
    names = [node.name for node in module.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    expected = {f"tests/test_gpu.py::{name}" for name in names}
    collected = {line.partition("[")[0] for line in result.stdout.splitlines() if line.startswith("tests/")}
    assert expected and expected <= collected, output[-3000:]


def test_the_dali_marker_selects_exactly_the_gpu_tests_that_need_dali():
    """A GPU window runs `-m "gpu and not dali"` before DALI is there and `-m "gpu and dali"` once it
    is (bench/gpu/call1.sh, call3.sh): together every GPU test, each where it can run."""
    needs_dali, marked = set(), set()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                for call in ast.walk(node):
                    if (
                        isinstance(call, ast.Call)
                        and getattr(call.func, "attr", "") == "importorskip"
                        and ast.literal_eval(call.args[0]) == "nvidia.dali"
                    ):
                        needs_dali.add(node.name)
                if any(ast.unparse(d).endswith("mark.dali") for d in node.decorator_list):
                    marked.add(node.name)
    assert needs_dali and needs_dali == marked
    args = ["--collect-only", "-q", "-m", "gpu and dali", "-p", "no:cacheprovider", "tests"]
    result = run_without_the_missing_packages(f"import pytest\nsys.exit(pytest.main({args!r}))")
    collected = {line.partition("::")[2] for line in result.stdout.splitlines() if line.startswith("tests/")}
    assert collected == needs_dali, result.stdout[-3000:]


def test_the_modules_the_gpu_benchmarks_import_need_no_zarr_numcodecs_or_dali():
    code = (
        "import importlib.util\n"
        f"for name in {GPU_MACHINE_LACKS!r}:\n"  # the block holds, so this test can fail
        "    assert importlib.util.find_spec(name) is None, name\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError(name + ' imported')\n"
        "import beit.train.model, beit.shared.dvae, beit.train.pretrain.masking, beit.train.pretrain.trainer\n"
        "import beit.train.scaffold\n"
        # the scripts of a GPU window's call 1 (bench/gpu/GPU.md), imported as modules
        "sys.path[:0] = ['bench/speed', 'bench/gpu']\n"
        "import dvae, train_step, pretrain_step, attention_kernels, jpeg_decode, jpegs, summary, wheels\n"
    )
    result = run_without_the_missing_packages(code)
    assert result.returncode == 0, result.stderr[-3000:]
