"""Preemption: SIGTERM, or the config's stop_signal (SIGUSR1 by default), at a random moment of
fine-tuning, segmentation, the tokenizer's training and stage 1 stops the command cleanly: the
work in flight is finished and saved (a checkpoint at that very step, no periodic one being due;
the chunk in flight of a store), it exits 75, and running it again finishes the work to the
standard the SIGKILL tests hold (the same losses where the data can be rewound, every step once
where DALI's random operators draw afresh, the same store). Pre-training's tests, on one rank and
two, are in test_pretrain.py beside its SIGKILL ones. Real processes and real signals; each signal
waits for a file (never a sleep), at a step drawn at random (named on failure)."""

import json
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zarr
from helpers import STAGE1_SMALL, assert_same_store, beit_here, signal_when

from beit.shared.preempt import MARKER, PREEMPTED
from beit.shared.store import PENDING

# A 2-layer, 96-wide ViT on 64 px images (4x4 patches), as the other trainer tests use; no periodic
# checkpoint falls inside any run below, so the one after a signal is the signal's own.
TINY = ["--model", "tiny", "--set", "model.width=96", "--set", "model.heads=3", "--set", "model.depth=2"]
TINY += ["--lr", "1e-3", "--set", "log_every=1", "--set", "checkpoint_every=1000"]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in rows(run) if "loss" in r]


def at_least(run: Path, count: int):
    """A condition: `run` has logged `count` training rows."""
    return lambda: len(losses(run)) >= count


def stopped_at(run: Path, code: int, stderr: str, drawn: int, total: int, signal_name: str = "SIGTERM") -> int:
    """The stop after a signal sent once `drawn` steps were logged: exit 75, one sentence, the
    checkpoint and the marker at the step in flight (past `drawn`, before the end), nothing trained
    after it; returns that step."""
    assert code == PREEMPTED, (drawn, code, stderr[-3000:])
    assert f"preempted: stopped by {signal_name} at step " in stderr, stderr[-3000:]
    step = json.loads((run / "checkpoint.json").read_text())["step"]
    assert drawn <= step < total, (drawn, step)
    assert max(r["step"] for r in rows(run)) == step  # no step trained past the checkpoint
    marker = json.loads((run / MARKER).read_text())
    assert marker["step"] == step and marker["exit_code"] == PREEMPTED
    return step


def test_a_second_signal_stops_at_once_and_a_bad_stop_signal_is_refused(reference, tmp_path):
    script = textwrap.dedent("""
        import os, signal, time
        from beit.shared.preempt import REPEAT, StopSignals
        stops = StopSignals("SIGUSR2").install()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.2)
        assert stops.received == "SIGUSR2"
        os.kill(os.getpid(), signal.SIGUSR2)  # the same signal delivered twice (scheduler, torchrun)
        time.sleep(0.2)
        print("first caught", flush=True)
        time.sleep(REPEAT)
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(5)
        print("still running")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGUSR2, result.stderr
    assert "first caught" in result.stdout and "still running" not in result.stdout
    assert "received SIGUSR2: finishing the work in flight" in result.stderr
    store, _ = reference
    result = beit_here("pretrain", store, "--out", tmp_path / "x", *TINY, "--set", "stop_signal=SIGKILL")
    assert result.returncode == 1 and "stop_signal 'SIGKILL' is not a signal this command can catch" in result.stderr


@pytest.fixture(scope="module")
def labelled(data, tmp_path_factory) -> Path:
    """The shared photos as train/ and val/ ImageFolder trees (two classes of 6)."""
    source, _ = data
    root = tmp_path_factory.mktemp("labelled")
    for split in ("train", "val"):
        shutil.copytree(source, root / split)
    return root


def test_fine_tuning_stopped_by_sigterm_resumes_with_every_step_once(labelled, tmp_path):
    args = [*TINY, "--init", "none", "--batch-size", 4, "--set", "model.image_size=64", "--set", "warmup_epochs=1"]
    args += ["--epochs", 4, "--set", "eval_every=2"]  # 12 images: 12 steps, evaluated after steps 6 and 12
    cut = tmp_path / "cut"
    drawn = random.randint(2, 9)
    command = [sys.executable, "-m", "beit", "finetune", labelled, "--out", cut, *args]
    stopped_at(cut, *signal_when(command, at_least(cut, drawn)), drawn, 12)
    result = beit_here("finetune", labelled, "--out", cut, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    # the SIGKILL test's standard: a resumed fine-tuning draws fresh augmentations (DALI's random
    # operators cannot be rewound), so every step once, none missing, the same evaluations
    assert [r["step"] for r in rows(cut) if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows(cut) if "eval_top1" in r] == [6, 12]


def test_segmentation_stopped_by_sigterm_resumes_to_the_uninterrupted_losses(tmp_path):
    scenes = tmp_path / "scenes"
    assert beit_here("data", "fashion-scenes", scenes, "--train", 8, "--val", 4).returncode == 0
    args = ["--init", "none", "--crop", 64, "--batch-size", 4, "--iters", 12, "--set", "model.width=48"]
    args += ["--set", "model.heads=2", "--set", "model.depth=4", "--set", "model.preset=tiny"]
    args += ["--set", "aux_channels=16", "--set", "channels=16", "--set", "warmup_iters=1", "--set", "log_every=1"]
    args += ["--set", "eval_every=6", "--set", "checkpoint_every=1000"]
    whole = tmp_path / "whole"
    result = beit_here("segment", "train", scenes, "--out", whole, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    cut = tmp_path / "cut"
    drawn = random.randint(2, 9)
    command = [sys.executable, "-m", "beit", "segment", "train", scenes, "--out", cut, *args]
    stopped_at(cut, *signal_when(command, at_least(cut, drawn)), drawn, 12)
    result = beit_here("segment", "train", scenes, "--out", cut, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(cut) == pytest.approx(losses(whole), rel=1e-5)  # as the SIGKILL test holds it
    assert [r["step"] for r in rows(cut) if "eval_mIoU" in r] == [6, 12]


def test_tokenizer_training_stopped_by_sigterm_resumes_with_every_step_once(data, tmp_path):
    source, _ = data
    args = ["--steps", 16, "--input-size", 32, "--vocab-size", 64, "--batch-size", 4, "--set", "model.group_count=3"]
    args += ["--set", "model.n_hid=16", "--set", "model.n_init=16", "--set", "held_out=0", "--set", "log_every=1"]
    args += ["--set", "checkpoint_every=1000"]
    cut = tmp_path / "cut.safetensors"
    drawn = random.randint(2, 12)
    command = [sys.executable, "-m", "beit", "tokenizer", "train", source, "-o", cut, *args]
    run = cut.with_suffix(".run")
    stopped_at(run, *signal_when(command, at_least(run, drawn)), drawn, 16)
    assert not cut.exists()
    result = beit_here("tokenizer", "train", source, "-o", cut, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    # the SIGKILL test's standard: the crops after a resume are fresh DALI draws, so every step
    # once, none missing, and the tokenizer written with its report
    assert [r["step"] for r in rows(run) if "loss" in r] == list(range(1, 17))
    assert json.loads(cut.with_suffix(".json").read_text())["report"]["steps"] == 16


def test_stage1_stopped_by_sigterm_keeps_its_chunks_and_finishes_to_the_uninterrupted_store(data, reference, tmp_path):
    source, tokenizer = data
    store = tmp_path / "store"
    chunks = random.randint(1, 4)  # of 6 (12 images, 2 a chunk)

    def written() -> bool:
        try:
            status = zarr.open_group(str(store), mode="r")["status"][:]
        except Exception:  # the store is being made
            return False
        return int((status != PENDING).sum()) >= 2 * chunks

    command = [sys.executable, "-m", "beit", "tokenize", source, store, "--tokenizer", tokenizer, *STAGE1_SMALL]
    code, stderr = signal_when(command, written)
    assert code == PREEMPTED, (chunks, code, stderr[-3000:])
    assert "which is not complete: run the same command again to finish it" in stderr
    group = zarr.open_group(str(store), mode="r")
    done = int((group["status"][:] != PENDING).sum())
    assert not group.attrs.get("complete") and 2 * chunks <= done < 12 and done % 2 == 0, (chunks, done)
    result = beit_here("tokenize", source, store, "--tokenizer", tokenizer, *STAGE1_SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_store(reference[0], store)
