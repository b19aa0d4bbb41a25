"""Running a command again after it was SIGKILLed in its first seconds finishes the work.

For `beit tokenize`, with sources smaller than one chunk, of exactly one chunk and of one chunk
plus one image, killed during the store's creation, in the middle of writing the first chunk,
between chunks and while marking the store complete; for `beit pretrain`, `beit finetune` and
`beit tokenizer train`, killed while their first checkpoint is written.
Each kill waits for a file to appear (never a sleep), so it lands at the same moment on any machine.
"""

import functools
import json
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import COLOUR, GREY, beit_here, copy_photos, kill_when, save_jpeg, tiny_tokenizer

from beit.shared.checkpoint import load_checkpoint
from beit.shared.store import DONE, TokenStore

CHUNK = 4
# A 64 px patch view (4x4 patches of 16) and a 32 px tokenizer view (4x4 tokens of 8), 4 images a chunk.
SMALL = ["--views", "2", "--set", "view.image_size=64", "--set", f"chunk_images={CHUNK}", "--batch-size", "2"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Five real photos as 96 px JPEGs, and a tiny random tokenizer."""
    root = tmp_path_factory.mktemp("resume")
    folder = root / "photos"
    folder.mkdir()
    for path in copy_photos(root / "raw", COLOUR[:3] + GREY[:3]):
        save_jpeg(path, folder / f"{path.stem}.jpg", 96)
    tokenizer = tiny_tokenizer(root / "tok.safetensors")
    return sorted(folder.iterdir()), tokenizer


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory):
    """An uninterrupted store of the five photos: a store of the first n is its first n rows
    (the views of image i are drawn for (seed, i, view), whatever the source's size)."""
    zarr = pytest.importorskip("zarr")  # the tests of a store skip without zarr; the others still run
    files, tokenizer = photos
    root = tmp_path_factory.mktemp("reference")
    source = root / "photos"
    source.mkdir()
    for path in files[: CHUNK + 1]:
        shutil.copy(path, source / path.name)
    result = beit_here("tokenize", source, root / "store", "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    group = zarr.open_group(str(root / "store"), mode="r")
    return {"store": root / "store", **{name: group[name][:] for name in ("tokens", "views", "keys", "status")}}


def _chunk_files(store: Path, array: str) -> int:
    folder = store / array / "c"
    return len(list(folder.iterdir())) if folder.exists() else 0


@pytest.mark.parametrize("images", [CHUNK - 1, CHUNK, CHUNK + 1])
def test_tokenize_killed_at_each_moment_resumes_to_the_uninterrupted_store(photos, reference, tmp_path, images):
    files, tokenizer = photos
    source = tmp_path / "photos"
    source.mkdir()
    for path in files[:images]:
        shutil.copy(path, source / path.name)
    store = tmp_path / "store"
    command = [sys.executable, "-m", "beit", "tokenize", source, store, "--tokenizer", tokenizer, *SMALL]

    def attrs() -> dict:
        try:
            return json.loads((store / "zarr.json").read_text()).get("attributes", {})
        except ValueError:  # the kill cut its writing short: an unfinished store
            return {}

    def creating() -> bool:  # the group exists: its arrays are being made
        return (store / "zarr.json").exists()

    def writing_the_first_chunk() -> bool:  # its tokens are written, its status not yet (or just)
        return _chunk_files(store, "tokens") > 0

    def between_chunks(done_before: int) -> bool:  # one more chunk's status is written
        return _chunk_files(store, "status") > done_before

    def marking_complete() -> bool:  # the counts are written; `complete` comes next, on its own
        return "counts" in attrs()

    # Each run is killed at the next moment. The last writes of a chunk and the marking follow
    # one another within milliseconds, so a kill aimed at one of them may land at the next: only
    # the kills during creation and between two chunks (a chunk's decoding apart) are sure to
    # leave the store unfinished.
    assert kill_when(command, creating, timeout=120) == -signal.SIGKILL
    assert not attrs().get("complete")
    kill_when(command, writing_the_first_chunk, timeout=120)
    done_before = _chunk_files(store, "status")
    if images > CHUNK and not attrs().get("complete"):  # a source of one chunk has no "between"
        code = kill_when(command, functools.partial(between_chunks, done_before), timeout=120)
        if done_before == 0:
            assert code == -signal.SIGKILL and not attrs().get("complete")
    if not attrs().get("complete"):
        kill_when(command, marking_complete, timeout=120)
    result = beit_here(*command[3:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "made differently" not in result.stderr
    opened = TokenStore.open(store)
    assert opened.attrs["counts"] == {"images": images, "done": images, "failed": 0}
    group = opened.group
    for name in ("tokens", "views", "keys", "status"):
        assert np.array_equal(group[name][:], reference[name][:images]), name
    assert np.all(group["status"][:] == DONE)
    if images < CHUNK:  # such a store was refused as "made differently": it now reports itself complete
        again = beit_here(*command[3:])
        assert again.returncode == 0 and "already complete" in again.stdout, again.stderr[-3000:]


# A 2-layer, 96-wide ViT on 64 px images (4x4 patches), as tests/test_pretrain.py and test_finetune.py use.
TINY = ["--model", "tiny", "--set", "model.width=96", "--set", "model.heads=3", "--set", "model.depth=2"]
TINY += ["--batch-size", "4", "--lr", "1e-3", "--set", "log_every=1", "--set", "checkpoint_every=2"]


def _killed_while_saving_its_first_checkpoint(command: list, out: Path, checkpoint: str) -> None:
    """Kill `command` while its first checkpoint is being written (its temporary file exists, the
    checkpoint does not yet: the run folder holds a config and the first steps' metrics, nothing
    to resume from), then run it again to the end. A tiny checkpoint is written in milliseconds:
    on a busy machine the kill can land just after the rename, and then the checkpoint must be
    whole (never torn)."""

    def saving() -> bool:
        return any(out.glob(f".{checkpoint}.*.tmp"))

    assert kill_when(command, saving, timeout=120) == -signal.SIGKILL
    assert (out / "config.toml").exists()
    if (out / checkpoint).exists():
        load_checkpoint(out / checkpoint)  # whole: it loads
    result = beit_here(*command[3:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(out.glob(".*.tmp"))  # the killed write's temporary file is cleared, not left for good


def _steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "eval_top1" not in r]


def test_pretrain_killed_in_its_first_seconds_runs_again_to_the_end(reference, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "beit", "pretrain", reference["store"], "--out", out, *TINY, "--epochs", "4"]
    command += ["--warmup-epochs", "1"]
    _killed_while_saving_its_first_checkpoint(command, out, "checkpoint.pt")
    assert _steps(out) == list(range(1, 5))  # every step logged once
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 4


def test_finetune_killed_in_its_first_seconds_runs_again_to_the_end(photos, tmp_path):
    files, _ = photos
    data = tmp_path / "data"
    for i, path in enumerate(files):  # train/ 2 + 2, val/ 1 + 1
        folder = data / ("val" if i % 3 == 0 else "train") / ("colour" if i < 3 else "grey")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "beit", "finetune", data, "--init", "none", "--out", out, *TINY]
    command += ["--set", "model.image_size=64", "--set", "warmup_epochs=1", "--epochs", "4"]
    _killed_while_saving_its_first_checkpoint(command, out, "checkpoint.pt")
    assert _steps(out) == list(range(1, 5))
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 4


def test_tokenizer_train_killed_in_its_first_seconds_runs_again_to_the_end(photos, tmp_path):
    files, _ = photos
    out = tmp_path / "tok.safetensors"
    command = [sys.executable, "-m", "beit", "tokenizer", "train", files[0].parent, "-o", out, "--steps", "4"]
    command += ["--input-size", "32", "--vocab-size", "64", "--batch-size", "4", "--set", "checkpoint_every=1"]
    command += [
        "--set",
        "model.group_count=3",
        "--set",
        "model.n_hid=16",
        "--set",
        "model.n_init=16",
        "--set",
        "held_out=0",
    ]

    def saving_the_first_checkpoint() -> bool:
        return any(tmp_path.glob("tok.run/.checkpoint.pt.*.tmp"))

    assert kill_when(command, saving_the_first_checkpoint, timeout=120) == -signal.SIGKILL
    assert not out.exists()  # killed before the end
    # killed while the first checkpoint was being written: its temporary file is left and no
    # checkpoint (the usual case), or, when the kill lands just after the rename (a busy machine),
    # a whole checkpoint of step 1; never a torn one
    checkpoint = out.with_suffix(".run") / "checkpoint.pt"
    if checkpoint.exists():
        assert load_checkpoint(checkpoint)[1]["step"] == 1
    result = beit_here(*command[3:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.with_suffix(".json").read_text())["report"]["steps"] == 4
    assert not checkpoint.exists()
    assert not any(tmp_path.glob("**/.*.tmp"))
