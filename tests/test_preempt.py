"""Preemption: a second signal stops at once, a bad stop_signal is refused, and SIGTERM at a
random moment of stage 1 finishes the chunk in flight, exits 75 and leaves a store that the same
command finishes to the uninterrupted one. The trainers' preemption tests continue their SIGKILL
tests (a SIGTERM at a random step, exit 75 and the checkpoint at the step in flight; then a
SIGKILL; then the resume): tests/test_pretrain.py (one rank; two under torchrun, SIGUSR1 to one
rank only), test_finetune.py, test_segment.py, test_dvae_train.py. Real processes and signals;
each signal waits for a file (never a sleep), at a moment drawn at random (named on failure)."""

import random
import signal
import subprocess
import sys
import textwrap

import pytest
from helpers import STAGE1_SMALL, assert_same_store, beit_here, signal_when

from beit.shared.preempt import PREEMPTED
from beit.shared.store import PENDING

zarr = pytest.importorskip("zarr")

# A 2-layer, 96-wide ViT on 64 px images (4x4 patches), as the other trainer tests use.
TINY = ["--model", "tiny", "--set", "model.width=96", "--set", "model.heads=3", "--set", "model.depth=2"]
TINY += ["--lr", "1e-3", "--set", "log_every=1", "--set", "checkpoint_every=1000"]


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
    # a run that fails after taking the signals (here: a batch larger than the store) gives them back
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    result = beit_here("pretrain", store, "--out", tmp_path / "y", *TINY, "--batch-size", 64, "--epochs", 1)
    assert result.returncode == 1 and "fewer than one global batch" in result.stderr, result.stderr[-2000:]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before


def test_stage1_stopped_by_sigterm_keeps_its_chunks_and_finishes_to_the_uninterrupted_store(data, reference, tmp_path):
    source, tokenizer = data
    store = tmp_path / "store"
    chunks = random.randint(1, 3)  # of 6 (12 images, 2 a chunk): two chunks after the one in flight

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
