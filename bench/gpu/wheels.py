"""The wheels a GPU window carries besides DALI, computed by pip, and the check that they are whole.

    python3.12 bench/gpu/wheels.py make .wheels   # here, before a window (bench/gpu/prepare.sh runs it)
    python3 bench/gpu/wheels.py check /tmp/site   # there, after the install: every Requires-Dist is met

`make` resolves the project's runtime requirements (pyproject.toml) for the GPU machine's Python
(CPython 3.12, manylinux x86_64, binary wheels only) with pip itself, run by a Python 3.12 (pip
checks Requires-Python against the Python it runs in, whatever --python-version says), under the versions
bench/gpu/machine.txt knows the machine has (as constraints), then drops every package that file
lists, and downloads the rest into the folder. Three requirements are not resolved: torch (the
machine's CUDA build is the one to use), the DALI wheel (it travels in parts,
../shared/device/dali-parts.sh) and pillow-simd (the machine's pillow provides `PIL`; pillow-simd
has no binary wheel). The folder is emptied first, so it holds one version of each package.

`check` reads every distribution installed under a folder (the carried wheels and DALI's unpacked
parts) and checks each requirement it declares for Python 3.12 on Linux against what the running
Python sees (its own packages and that folder): one line for each unmet requirement, exit 1 if any
(LEFT_OUT names the requirements left out on purpose, and why).
It needs only the standard library and `packaging`, which the GPU machine has.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MACHINE = ROOT / "bench" / "gpu" / "machine.txt"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"]
TARGET += [f"--platform={p}" for p in PLATFORMS]
NOT_RESOLVED = {"torch", "nvidia-dali-cuda130", "pillow-simd"}
# requirements left unmet on purpose, each with the reason (printed by `check`)
LEFT_OUT = {
    "nvidia-libnvcomp-cu13": "DALI dlopens libnvcomp only for its inflate operators, which beit does not use; "
    "its 27 MiB wheel would need a fourth call",
}

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare Python: pip's own copy
    from pip._vendor.packaging.requirements import Requirement


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def machine_packages() -> dict[str, str | None]:
    """bench/gpu/machine.txt as {canonical name: version or None}."""
    packages = {}
    for line in MACHINE.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            name, _, version = fields[0].partition("==")
            packages[canonical(name)] = version or None
    return packages


def requirements() -> list[str]:
    """The project's runtime requirements, less the three that are not resolved."""

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [r for r in listed if canonical(Requirement(r).name) not in NOT_RESOLVED]


def make(folder: Path) -> None:
    if sys.version_info[:2] != (3, 12):
        sys.exit(f"run this with Python 3.12 (PYENV_VERSION=3.12.1 python3.12), not {sys.version.split()[0]}")
    present = machine_packages()
    pins = [f"{name}=={version}" for name, version in present.items() if version and name != "python"]
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        report = Path(tmp) / "report.json"
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
        subprocess.run(
            [*pip, "install", "--dry-run", "--ignore-installed", "-q", "--report", str(report), *TARGET,
             "--target", str(Path(tmp) / "target"), "-c", str(constraints), *requirements()],
            check=True,
        )  # fmt: skip
        resolved = {
            canonical(item["metadata"]["name"]): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]
        }
    carry = sorted(f"{name}=={version}" for name, version in resolved.items() if name not in present)
    kept = sorted(name for name in resolved if name in present)
    print(f"resolved {len(resolved)} packages; the GPU machine has {len(kept)} ({', '.join(kept)})")
    print(f"to carry: {', '.join(carry)}")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    subprocess.run(
        [*pip, "download", "--no-deps", "-q", *TARGET, "-d", str(folder), *carry], check=True
    )  # fmt: skip
    wheels = sorted(folder.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels in {folder}, {size / 2**20:.1f} MiB")


def check(folder: Path) -> int:
    """Every requirement of every distribution under `folder`, for CPython 3.12 on Linux, met by
    what this Python sees. Returns the number of unmet ones."""
    from importlib.metadata import distributions

    environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
    environment |= {"platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}
    environment |= {"implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    seen: dict[str, str] = {}
    for dist in distributions(path=[str(folder), *sys.path]):
        seen.setdefault(canonical(dist.metadata["Name"]), dist.version)
    carried = list(distributions(path=[str(folder)]))
    unmet = 0
    for dist in carried:
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate(environment):
                continue
            have = seen.get(canonical(requirement.name))
            if have is None and canonical(requirement.name) in LEFT_OUT:
                print(f"left out: {line} ({LEFT_OUT[canonical(requirement.name)]})")
            elif have is None or not requirement.specifier.contains(have, prereleases=True):
                unmet += 1
                found = f"found {have}" if have else "not installed"
                print(f"unmet: {dist.metadata['Name']} {dist.version} requires {line} ({found})")
    print(f"{len(carried)} carried distributions under {folder}: {unmet} unmet requirements")
    return unmet


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("make", "check"):
        sys.exit(__doc__)
    folder = Path(sys.argv[2])
    if sys.argv[1] == "make":
        make(folder)
    else:
        sys.exit(1 if check(folder) else 0)


if __name__ == "__main__":
    main()
