"""Real photos that install with scikit-image (skimage/data), and running the `beit` command, for tests."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLOUR = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "motorcycle_right.png",
]
GREY = ["camera.png", "brick.png", "grass.png", "gravel.png", "moon.png", "coins.png", "page.png"]


def data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed: run `make test` (scripts/setup.sh dev) to set up.")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def copy_photos(dest: Path, names: list[str]) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(data_dir() / name, dest / name)) for name in names]


def save_jpeg(path: Path, dest: Path, side: int) -> Path:
    """The image at `path` as an RGB JPEG (quality 90) whose shorter side is `side` pixels."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    scale = side / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    image.save(dest, quality=90)
    return dest


def tiny_tokenizer(path: Path) -> Path:
    """A tiny random tokenizer (cosine logits, 128 codes, 32 px views: a 4x4 grid), the same every time."""
    import torch

    from beit.shared.dvae import DVAE, DVAEConfig, save_tokenizer

    torch.manual_seed(0)
    model = DVAE(DVAEConfig(n_hid=16, blocks_per_group=1, group_count=4, vocab_size=128, n_init=8, cosine_logits=True))
    save_tokenizer(model, path, input_size=32)
    return path


def beit(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m beit ARGS` in a subprocess, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "beit", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def beit_here(*args) -> subprocess.CompletedProcess:
    """`beit ARGS` run in this process through the real CLI (typer's runner): the same exit status,
    stdout and stderr as `beit()`, without a subprocess's 3 s of start-up (importing torch and
    DALI). For every command that is not killed, not distributed and needs no environment of its
    own; `beit()` runs those. An exception the CLI does not turn into its one-line error ends as in
    a subprocess: exit status 1 and the traceback on stderr."""
    import traceback

    from typer.testing import CliRunner

    from beit.cli import app

    result = CliRunner().invoke(app, [*map(str, args)], catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["beit", *map(str, args)], result.exit_code, result.stdout, stderr)


def the_error(stderr: str) -> str:
    """The one sentence of a command that failed: the last line of its stderr, "error: ...", with
    nothing before it but its progress bars (no traceback, no other message) and nothing after it."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert all("%|" in line for line in lines[:-1]), stderr[-3000:]
    return lines[-1]


def beit_torchrun(processes: int, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node PROCESSES -m beit ARGS` (as python -m torch.distributed.run), output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "beit"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (for a process group's rendezvous or a local server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(commands: list[tuple[list, dict]], timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Start every (command, environment) at once, output captured; wait for all of them."""
    processes = [
        subprocess.Popen([*map(str, command)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command, env in commands
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def _descendants(pid: int) -> list[int]:
    """The processes started by `pid`, and by them, ... (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process has just ended
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_when(command: list, condition, timeout: float = 300) -> int:
    """Start `command`, SIGKILL it and every process under it (torchrun's workers too) the moment
    `condition()` holds (polled every 5 ms), and return the command's exit code.

    The kill comes within milliseconds of the condition, so a test can leave a wide margin of steps
    between the state it waits for and the end of the run, however fast the machine.
    """
    process = subprocess.Popen([*map(str, command)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if condition():
                break
        except (OSError, ValueError):  # a file the condition reads is half-written: look again
            pass
        time.sleep(0.005)
    tree = [process.pid, *_descendants(process.pid)]
    for pid in tree:  # freeze the whole tree first, so that no process moves on while others die
        _signal(pid, signal.SIGSTOP)
    tree += [pid for pid in _descendants(process.pid) if pid not in tree]
    for pid in tree:
        _signal(pid, signal.SIGKILL)
    code = process.wait()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in tree):
        assert time.monotonic() < deadline, f"a process of {command[:6]} outlived SIGKILL"
        time.sleep(0.01)
    return code


def signal_when(command: list, condition, sig: int = signal.SIGTERM, timeout: float = 300, worker: bool = False):
    """Start `command`, send it `sig` the moment `condition()` holds (polled every 5 ms), or with
    `worker` to one of the `beit` processes under it (one torchrun rank: the other must agree to
    stop), and wait for it to end: (exit code, stderr)."""
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([*map(str, command)], stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if condition():
                    break
            except (OSError, ValueError):  # a file the condition reads is half-written: look again
                pass
            time.sleep(0.005)
        target = process.pid
        if worker:
            ranks = [pid for pid in _descendants(process.pid) if b"beit" in _cmdline(pid)]
            target = ranks[-1] if ranks else process.pid
        _signal(target, sig)
        code = process.wait(timeout=timeout)
        err.seek(0)
        return code, err.read()


def stop_two_ranks(args: list, run: Path, trained, drawn: int) -> int:
    """`beit *args` on two torchrun ranks with no periodic checkpoint due, SIGUSR1 (the default
    stop_signal) to one rank once `trained()` counts `drawn` training rows: torchrun reports its
    ranks' exit 75; returns the step of the checkpoint they saved in `run`."""
    import json

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "beit", *args]
    stop = [*command, "--set", "checkpoint_every=1000"]
    code, stderr = signal_when(stop, lambda: trained() >= drawn, signal.SIGUSR1, worker=True)
    assert code != 0 and "exitcode  : 75" in stderr, (drawn, code, stderr[-3000:])
    return json.loads((run / "checkpoint.json").read_text())["step"]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (ended, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# Stage 1 at test size, for the shared `data` and `reference` fixtures (conftest.py): a 64 px patch
# view (4x4 patches of 16) and a 32 px tokenizer view (4x4 tokens of 8).
STAGE1_SMALL = ["--views", "3", "--set", "view.image_size=64", "--set", "chunk_images=2", "--batch-size", "4"]


def arrays(store: Path) -> dict:
    import zarr

    group = zarr.open_group(str(store), mode="r")
    return {name: group[name][:] for name in ("tokens", "views", "labels", "keys", "status", "errors")}


def assert_same_store(a: Path, b: Path) -> None:
    import numpy as np

    first, second = arrays(a), arrays(b)
    for name in first:
        assert np.array_equal(first[name], second[name]), name


def randomised(model):
    """`model` in eval mode with weights of order 1 everywhere (layer scales, heads, norms,
    batch-norm statistics), so that logits compared are not dominated by an init's zeros and
    0.001 scales."""
    import torch

    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name or name.endswith(("norm1.weight", "norm2.weight")):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.uniform_(-0.2, 0.2)
            elif "relative_position_bias_table" in name:
                p.normal_(std=0.5)
            else:
                p.normal_(std=0.3 / max(1, p[0].numel()) ** 0.5)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()
