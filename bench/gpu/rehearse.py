"""Rehearse a GPU window on this machine, as the GPU machine will run it (bench/gpu/GPU.md).

    make gpu-rehearsal                 # or: python3 bench/gpu/rehearse.py [--calls 1,3]

1. A Python 3.12 environment with the GPU machine's packages at their versions
   (bench/gpu/machine.txt, the lines marked "rehearse"), in build/rehearse/py312: made once,
   remade when those lines change (about 5 GB: torch 2.11's CUDA build, which runs on the CPU).
   No project package is installed in it: as there, the calls run from the checkout.
2. What the calls carry (bench/gpu/prepare.sh): DALI's parts, and the wheels pip resolves.
3. The plan's arithmetic: one start (120 s) and every call's timeout_s within 720 s; in each call
   script, its steps' limits (GPU_PLAN=1) within its budget, and the budget 30 s under the call's
   timeout_s.
4. The machine's state as a fresh GPU machine has it (no /tmp/dali, /tmp/site, /tmp/gpu-window,
   /tmp/beit-jpegs), then each call of bench/gpu/GPU.md in order, its command line exactly as written
   there, on a copy of the tree as the device tool makes it (tracked files and untracked ones git
   does not ignore, plus the carried paths: at most 64 MiB), with that Python as `python3`,
   $OUT an empty folder and REHEARSE=1 (tiny sizes), under its timeout_s. Each must exit 0 in
   time, every step `rc 0`, and leave in $OUT at most 8 files, no deeper than 2 folders, each at
   most 16 MiB and 64 MiB together.

A short table ends it; the exit code is 0 only if every check held.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = ROOT / "build" / "rehearse" / "py312"
WORK = Path("/tmp/gpu-rehearse")
MACHINE_STATE = ["/tmp/dali", "/tmp/site", "/tmp/gpu-window", "/tmp/beit-jpegs"]
START_S, WINDOW_S, MARGIN_S = 120, 720, 30
CARRY_LIMIT, OUT_FILES, OUT_FILE_LIMIT, OUT_DEPTH = 64 * 2**20, 8, 16 * 2**20, 2


def rehearse_requirements() -> list[str]:
    lines = []
    for line in (ROOT / "bench" / "gpu" / "machine.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) == 2 and fields[1] == "rehearse":
            lines.append(fields[0])
    return lines


def make_environment() -> Path:
    """build/rehearse/py312 with the GPU machine's packages; remade when the list changes."""
    requirements = rehearse_requirements()
    stamp = hashlib.sha256("\n".join(requirements).encode()).hexdigest()
    python = ENV / "bin" / "python"
    marker = ENV / ".rehearse-packages"
    if python.exists() and marker.exists() and marker.read_text() == stamp:
        return python
    shutil.rmtree(ENV, ignore_errors=True)
    base = os.environ.get("PY312", "python3.12")
    env = {**os.environ, "PYENV_VERSION": "3.12.1"}  # pyenv's Python 3.12 (PY312 names another)
    print(f"making {ENV.relative_to(ROOT)}: Python 3.12 with {len(requirements)} of the GPU machine's packages")
    subprocess.run([base, "-m", "venv", str(ENV)], check=True, env=env)
    version = subprocess.run([str(python), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True)
    if version.stdout.strip() != b"(3, 12)":
        sys.exit(f"{base} is not Python 3.12 ({version.stdout.decode().strip()}): set PY312 to a Python 3.12")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    result = subprocess.run([*pip, *requirements], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"installing the GPU machine's packages failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    marker.write_text(stamp)
    return python


def read_calls() -> list[dict]:
    """The calls as bench/gpu/GPU.md writes them: carry, timeout_s and command, in order."""
    calls, current = [], {}
    for line in (ROOT / "bench" / "gpu" / "GPU.md").read_text().splitlines():
        match = re.match(r"^    (carry|timeout_s|command):\s+(.*)$", line)
        if not match:
            continue
        key, value = match.groups()
        current[key] = json.loads(value) if key == "carry" else int(value) if key == "timeout_s" else value
        if key == "command":
            calls.append(current)
            current = {}
    if not calls or any(set(c) != {"carry", "timeout_s", "command"} for c in calls):
        sys.exit("bench/gpu/GPU.md: each call needs carry:, timeout_s: and command: lines, in that order")
    return calls


def plan(call: dict, errors: list[str], number: int) -> None:
    """The call script's step limits against its budget, and the budget against timeout_s."""
    script = re.search(r"bash (bench/gpu/call\d\.sh)", call["command"])
    if not script:
        return
    path = ROOT / script.group(1)
    budget = int(re.search(r"budget=(\d+)", path.read_text()).group(1))
    listed = subprocess.run(
        ["bash", str(path)], env={**os.environ, "GPU_PLAN": "1"}, capture_output=True, text=True, check=True
    ).stdout.split()
    limits = [int(x) for x in listed[1::2]]
    call["steps"] = dict(zip(listed[0::2], limits, strict=True))
    if sum(limits) > budget:
        errors.append(f"call {number}: its steps' limits add up to {sum(limits)} s, over its budget of {budget} s")
    if budget + MARGIN_S > call["timeout_s"]:
        errors.append(f"call {number}: budget {budget} s is not {MARGIN_S} s under timeout_s {call['timeout_s']}")


def device_tree(destination: Path, carry: list[str]) -> int:
    """The tree the device tool sends: tracked files and untracked ones git does not ignore, plus
    the carried paths. Returns its size in bytes."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    shutil.rmtree(destination, ignore_errors=True)
    size = 0
    for name in [n for n in listed if n]:
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            size += source.stat().st_size
    for name in carry:
        source = ROOT / name
        if not source.exists():
            raise FileNotFoundError(f"the carried path {name} does not exist: run bash bench/gpu/prepare.sh")
        files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
        for path in files:
            target = destination / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            size += path.stat().st_size
    return size


def check_out(out: Path) -> list[str]:
    """What would not come back from $OUT."""
    problems = []
    entries = [p for p in out.rglob("*")]
    files = [p for p in entries if p.is_file()]
    if len(files) > OUT_FILES:
        problems.append(f"{len(files)} files in $OUT (at most {OUT_FILES} come back)")
    for path in entries:
        depth = len(path.relative_to(out).parts) - 1
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            problems.append(f"{path.relative_to(out)} is not a plain file")
        elif path.is_file() and depth > OUT_DEPTH:
            problems.append(f"{path.relative_to(out)} is more than {OUT_DEPTH} folders down")
        elif path.is_file() and path.stat().st_size > OUT_FILE_LIMIT:
            problems.append(f"{path.relative_to(out)} is over 16 MiB")
    if sum(p.stat().st_size for p in files) > CARRY_LIMIT:
        problems.append("$OUT holds more than 64 MiB")
    return problems


def run_call(number: int, call: dict, python: Path) -> dict:
    tree, out = WORK / f"tree-{number}", WORK / f"out-{number}"
    size = device_tree(tree, call["carry"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {"PATH": f"{python.parent}:{env['PATH']}", "OUT": str(out), "REHEARSE": "1"}
    start = time.perf_counter()
    try:
        result = subprocess.run(
            ["bash", "-c", call["command"]], cwd=tree, env=env, capture_output=True, text=True,
            timeout=call["timeout_s"],
        )  # fmt: skip
        rc, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        rc = "timed out"
        output = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - start
    (WORK / f"call-{number}.log").write_text(output)
    problems = [] if rc == 0 else [f"exit {rc}"]
    if size > CARRY_LIMIT:
        problems.append(f"carries {size / 2**20:.1f} MiB, over 64 MiB")
    problems += check_out(out)
    steps = out / "steps.txt"
    if call.get("steps"):
        lines = steps.read_text().splitlines() if steps.exists() else []
        ran = {line.split(":", 1)[0]: line for line in lines}
        for name in call["steps"]:
            if " rc 0 " not in ran.get(name, ""):
                problems.append(f"step {name}: {ran.get(name, 'no status')}")
        if not (out / "summary.txt").exists() or "measure" not in output:
            problems.append("no table at the end")
    return {"carried_mib": size / 2**20, "seconds": seconds, "problems": problems, "files": len(list(out.rglob("*")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", default="", help="only these calls, e.g. 1,3 (the machine state is reset first)")
    args = parser.parse_args()
    python = make_environment()
    prepare = ["bash", str(ROOT / "bench" / "gpu" / "prepare.sh")]
    subprocess.run(prepare, check=True, env={**os.environ, "PY312": str(python)})
    calls = read_calls()
    errors: list[str] = []
    total = START_S + sum(c["timeout_s"] for c in calls)
    if total > WINDOW_S:
        errors.append(f"the window needs {total} s (a start of {START_S} s and the calls' timeout_s), over {WINDOW_S}")
    for number, call in enumerate(calls, 1):
        plan(call, errors, number)
    for path in MACHINE_STATE:
        shutil.rmtree(path, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    chosen = {int(x) for x in args.calls.split(",") if x} or set(range(1, len(calls) + 1))
    rows = []
    for number, call in enumerate(calls, 1):
        if number not in chosen:
            continue
        print(f"call {number}: {call['command']}  (timeout {call['timeout_s']} s)", flush=True)
        result = run_call(number, call, python)
        rows.append((number, call, result))
        errors += [f"call {number}: {p}" for p in result["problems"]]
    print(f"\nwindow: a start of {START_S} s + calls {' + '.join(str(c['timeout_s']) for c in calls)} s = {total} s "
          f"of {WINDOW_S}")  # fmt: skip
    print(f"{'call':<5} {'carried':>9} {'time':>13} {'files back':>10}  steps (limits)")
    for number, call, result in rows:
        steps = ", ".join(f"{k} {v}" for k, v in call.get("steps", {}).items()) or "-"
        spent = f"{result['seconds']:.0f}/{call['timeout_s']} s"
        print(f"{number:<5} {result['carried_mib']:7.1f}MiB {spent:>13} {result['files']:>10}  {steps}")
    for error in errors:
        print(f"FAILED: {error}")
    print(f"logs: {WORK}/call-N.log, $OUT of each call: {WORK}/out-N")
    print("rehearsal passed" if not errors else f"rehearsal failed: {len(errors)} problems")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
