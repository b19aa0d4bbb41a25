"""A full disk, on a real small filesystem: a tmpfs mounted in a user and mount namespace of its
own (`unshare -rm`, no privileges needed), where the commands run and a filler file takes the
room. A checkpoint, a store chunk, the node-local copy or a TensorBoard event file that cannot be
written leaves what was there whole (no half-written checkpoint replaces a whole one, no chunk
marked done that is not),
the command stops with one sentence naming the path and the room needed, and running it again
once space is freed resumes to the uninterrupted result."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import STAGE1_SMALL, assert_same_store, beit_here, the_error

from beit.shared.checkpoint import load_checkpoint
from beit.shared.store import TokenStore

TINY = ["--model", "tiny", "--set", "model.width=96", "--set", "model.heads=3", "--set", "model.depth=2"]
TINY += ["--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "1", "--set", "log_every=1"]


def _namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


pytestmark = pytest.mark.skipif(
    not _namespaces_work(), reason="needs `unshare -rm` (user namespaces) to mount a small tmpfs without privileges"
)


def in_small_disk(mount: Path, size_mb: int, free_bytes: int, steps: list[str], timeout: int = 600):
    """Run shell `steps` in a namespace where `mount` is a fresh tmpfs of `size_mb` MiB holding a
    filler file that leaves about `free_bytes` free ($FILLER names it: `rm $FILLER` frees the room)."""
    mount.mkdir(parents=True, exist_ok=True)
    filler = mount / "filler"
    script = [
        f"mount -t tmpfs -o size={size_mb}m tmpfs {shlex.quote(str(mount))}",
        f"FILLER={shlex.quote(str(filler))}",
        f"head -c {size_mb * 2**20 - free_bytes} /dev/zero > $FILLER",
        *steps,
    ]
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", "\n".join(script)], capture_output=True, text=True, timeout=timeout
    )


def beit_line(*args, log: Path) -> str:
    """A `python -m beit ...` shell line whose stderr goes to `log` and exit status to `log`.rc."""
    command = " ".join(shlex.quote(str(a)) for a in [sys.executable, "-m", "beit", *args])
    return f"{command} > /dev/null 2> {shlex.quote(str(log))}; echo $? > {shlex.quote(str(log))}.rc"


def full_then_freed(args: list, target: Path, logs: Path, copies: Path) -> list[str]:
    """Shell steps: `beit *args` on the full disk (its log `logs`/full), `target` copied to
    `copies`/after-full; the filler removed; the same command again (`logs`/freed), `target` copied
    to `copies`/after-freed."""
    steps = []
    for name in ("full", "freed"):
        steps += [
            beit_line(*args, log=logs / name),
            f"cp -a {shlex.quote(str(target))} {shlex.quote(str(copies / f'after-{name}'))}",
        ]
    return [*steps[:2], "rm $FILLER", *steps[2:]]


def rc(log: Path) -> int:
    return int(Path(f"{log}.rc").read_text())


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_checkpoint_that_finds_no_room_leaves_the_last_one_and_the_run_resumes(reference, tmp_path):
    store, _ = reference
    args = [*TINY, "--epochs", "4", "--set", "checkpoint_every=2"]  # 12 images, 4 a step: 12 steps
    whole = tmp_path / "whole"
    assert beit_here("pretrain", store, "--out", whole, *args).returncode == 0
    size = (whole / "checkpoint.pt").stat().st_size
    mount, run, logs = tmp_path / "small", tmp_path / "small" / "run", tmp_path / "logs"
    logs.mkdir()
    # room for the first checkpoint and a half: the second finds none (the first, kept as the
    # previous one, and the new one would not both fit)
    steps = full_then_freed(["pretrain", store, "--out", run, *args], run, logs, tmp_path)
    result = in_small_disk(mount, 64, int(size * 1.5) + 64 * 1024, steps)
    assert result.returncode == 0, result.stderr[-3000:]
    stderr = (logs / "full").read_text()
    assert rc(logs / "full") == 1, stderr[-3000:]
    assert "no space left to write the checkpoint (pretrain at step 4) to" in stderr and "it needs about" in stderr
    assert "run the same command again to resume. The checkpoint before it is untouched." in stderr
    after = tmp_path / "after-full"
    assert load_checkpoint(after / "checkpoint.pt")[1]["step"] == 2  # whole, the one before the full disk
    assert not list(after.glob(".*.tmp")) and not (after / "checkpoint.previous.pt").exists()
    assert rc(logs / "freed") == 0, (logs / "freed").read_text()[-3000:]
    assert [r["loss"] for r in metrics(tmp_path / "after-freed")] == [r["loss"] for r in metrics(whole)]


def test_a_store_chunk_that_finds_no_room_is_left_pending_and_the_store_finishes(data, tmp_path):
    source, tokenizer = data
    args = ["--tokenizer", tokenizer, *STAGE1_SMALL, "--embed-images"]  # the images make the chunks the bulk
    whole = tmp_path / "whole"
    assert beit_here("tokenize", source, whole, *args).returncode == 0
    size = sum(f.stat().st_size + 4096 for f in whole.rglob("*") if f.is_file())  # tmpfs takes pages
    mount, store, logs = tmp_path / "small", tmp_path / "small" / "store", tmp_path / "logs"
    logs.mkdir()
    steps = full_then_freed(["tokenize", source, store, *args], store, logs, tmp_path)
    result = in_small_disk(mount, 64, size * 2 // 3, steps)
    assert result.returncode == 0, result.stderr[-3000:]
    stderr = (logs / "full").read_text()
    assert rc(logs / "full") == 1, stderr[-3000:]
    assert "no space left to write the chunk of images" in stderr and str(store) in stderr, stderr[-3000:]
    partial = TokenStore.open(tmp_path / "after-full", require_complete=False)
    assert not partial.complete and 0 < len(partial.pending_chunks()) < 6
    assert rc(logs / "freed") == 0, (logs / "freed").read_text()[-3000:]
    assert_same_store(whole, tmp_path / "after-freed")


def test_a_node_copy_that_finds_no_room_names_the_folder_and_another_one_works(reference, tmp_path):
    store, _ = reference
    mount, logs = tmp_path / "small", tmp_path / "logs"
    logs.mkdir()
    args = [*TINY, "--epochs", "1", "--set", f"data_cache={mount}"]
    steps = [beit_line("pretrain", store, "--out", tmp_path / "run", *args, log=logs / "full")]
    result = in_small_disk(mount, 1, 4096, steps)
    assert result.returncode == 0, result.stderr[-3000:]
    stderr = (logs / "full").read_text()
    assert rc(logs / "full") == 1, stderr
    assert f"node's copy of {store} in {mount} (No space left on device; it needs about" in stderr, stderr
    assert "set data_cache to a local folder with room" in stderr
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    result = beit_here("pretrain", store, "--out", tmp_path / "run", *TINY, "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_metrics_row_or_tensorboard_file_that_finds_no_room_stops_the_run_and_it_resumes(reference, tmp_path):
    store, _ = reference
    args = [*TINY, "--epochs", "4", "--set", "checkpoint_every=4", "--set", "tensorboard=true"]
    whole = tmp_path / "whole"
    assert beit_here("pretrain", store, "--out", whole, *args).returncode == 0
    run, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    # TensorBoard's folder is a small disk of its own, full after its first page: metrics.jsonl
    # (on the roomy disk) keeps its rows; TensorBoard's events find no room some steps in
    steps = full_then_freed(["pretrain", store, "--out", run, *args], run, logs, tmp_path)
    result = in_small_disk(run / "tensorboard", 1, 4096, steps)
    assert result.returncode == 0, result.stderr[-3000:]
    stderr = (logs / "full").read_text()
    assert rc(logs / "full") == 1, stderr[-3000:]
    assert f"no space left to write TensorBoard's event file to {run / 'tensorboard'}" in stderr, stderr[-3000:]
    # the sentence is the last line: no traceback after it (DALI's exit hook once printed one, finding a
    # pipeline the stopped command had not let go of yet)
    assert "run the same command again to resume" in the_error(stderr), stderr[-3000:]
    rows = metrics(tmp_path / "after-full")  # every row whole, the run stopped part-way
    assert 0 < len(rows) < 12 and [r["loss"] for r in rows] == [r["loss"] for r in metrics(whole)[: len(rows)]]
    assert rc(logs / "freed") == 0, (logs / "freed").read_text()[-3000:]
    assert [r["loss"] for r in metrics(tmp_path / "after-freed")] == [r["loss"] for r in metrics(whole)]
