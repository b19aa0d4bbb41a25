"""The package as users install it: a wheel built from the project, installed into a fresh
environment that holds the runtime dependencies and nothing else (no DALI, no test tools), gives
the `beit` command and the Python API; what needs DALI says so in one sentence."""

import importlib.metadata as metadata
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from helpers import STAGE1_SMALL
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = {"torch", "numpy", "zarr", "fsspec", "typer", "tqdm", "safetensors", "pillow-simd"}


def _requires(name: str) -> list[str]:
    """The distributions `name` needs here (its Requires-Dist whose markers hold, no extras)."""
    needed = []
    for text in metadata.distribution(name).requires or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({**default_environment(), "extra": ""}):
            needed.append(requirement.name)
    return needed


def _closure(names: set[str]) -> set[str]:
    seen, todo = set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name not in seen:
            seen.add(name)
            todo += _requires(name)
    return seen


def _link_distributions(names: set[str], folder: Path) -> None:
    """A folder of links to the top-level files and folders of `names` in this environment."""
    folder.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for name in names:
        for entry in {Path(f).parts[0] for f in metadata.distribution(name).files or [] if ".." not in Path(f).parts}:
            target = folder / entry
            if (site / entry).exists() and not target.exists() and entry != "__pycache__":
                target.symlink_to(site / entry)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh environment's bin folder, the wheel's runtime requirements)."""
    root = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root, ROOT]
    subprocess.run([*map(str, build)], check=True, capture_output=True, timeout=300)
    (wheel,) = root.glob("beit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    requires = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    runtime = {canonicalize_name(r.name) for r in requires if r.marker is None}
    env = root / "env"
    venv.create(env, with_pip=False)
    site = next((env / "lib").glob("python3*/site-packages"))
    _link_distributions(_closure(runtime), root / "runtime")
    (site / "runtime.pth").write_text(str(root / "runtime") + "\n")
    install = [sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install", "--no-deps", "-q", wheel]
    subprocess.run([*map(str, install)], check=True, capture_output=True, timeout=300)
    return env / "bin", runtime


def test_the_wheel_needs_the_runtime_dependencies_only_and_they_suffice(installed, reference, tmp_path):
    bin_, runtime = installed
    assert runtime == {canonicalize_name(n) for n in RUNTIME}
    result = subprocess.run([bin_ / "beit", "--help"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0 and "tokenize" in result.stdout and "pretrain" in result.stdout, result.stderr
    code = (
        "import sys, importlib.util, beit\n"
        "assert beit.__file__.startswith(sys.prefix), beit.__file__  # the installed wheel, not the checkout\n"
        "assert not any(importlib.util.find_spec(m) for m in ('nvidia', 'transformers', 'pytest', 'matplotlib'))\n"
        "store = beit.open_store(sys.argv[1])\n"
        "print(len(store), store.grid, store.vocab_size)\n"
    )
    command = [bin_ / "python", "-c", code, reference[0]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # not the checkout
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["12", "(4,", "4)", "128"]


def test_without_dali_a_command_that_decodes_images_is_one_sentence(installed, data, tmp_path):
    bin_, _ = installed
    source, tokenizer = data
    command = [bin_ / "beit", "tokenize", source, tmp_path / "store", "--tokenizer", tokenizer, *STAGE1_SMALL]
    result = subprocess.run([*map(str, command)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "this needs NVIDIA DALI, which is not installed: pip install 'beit[dali]'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "store").exists()  # refused before any work
