"""Ranks that see other files are refused before anything is written.

Each test starts two real processes of one gloo process group, as torchrun would on two nodes,
but gives each rank its own copy of the data (its own "mount"), one of which differs.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import COLOUR, beit_here, copy_photos, free_port, run_together, save_jpeg

from beit.shared.dvae import DVAE, DVAEConfig, save_tokenizer
from beit.shared.store import TokenStore


def two_ranks(args_of_rank, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """`python -m beit ARGS` as ranks 0 and 1 of one process group, each with its own arguments."""
    port = free_port()
    commands = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
        commands.append(([sys.executable, "-m", "beit", *args_of_rank(rank)], env))
    return run_together(commands, timeout)


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    """Two copies of one ImageFolder tree of 6 photos (rank 0's and rank 1's), and a tokenizer."""
    root = tmp_path_factory.mktemp("ranks")
    first = root / "node0" / "data"
    for i, path in enumerate(copy_photos(root / "raw", COLOUR[:6])):
        for split in ("train", "val"):
            folder = first / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            save_jpeg(path, folder / f"{path.stem}.jpg", 64)
    second = root / "node1" / "data"
    shutil.copytree(first, second)
    torch.manual_seed(0)
    tokenizer = root / "tok.safetensors"
    save_tokenizer(
        DVAE(DVAEConfig(n_hid=16, blocks_per_group=1, group_count=4, vocab_size=128, n_init=8)), tokenizer, 32
    )
    return first, second, tokenizer


TOKENIZE = ["--views", "2", "--set", "view.image_size=64", "--set", "chunk_images=2", "--batch-size", "2"]


def test_every_rank_tokenizes_rank_0s_listing_under_its_own_mount(mounts, tmp_path):
    """The source is listed once, by rank 0, into the store; each rank reads that listing and opens
    the files under its own SOURCE path: a file only another rank's mount has is not tokenized."""
    first, second, tokenizer = mounts
    extra = second / "train" / "a" / "zzz-extra.jpg"
    shutil.copy(next((first / "train" / "a").iterdir()), extra)
    try:
        store = tmp_path / "store"
        results = two_ranks(
            lambda rank: ["tokenize", (first, second)[rank] / "train", store, "--tokenizer", tokenizer, *TOKENIZE]
        )
    finally:
        extra.unlink()
    assert [r.returncode for r in results] == [0, 0], results[1].stderr[-2000:]
    one = tmp_path / "one"
    assert beit_here("tokenize", first / "train", one, "--tokenizer", tokenizer, *TOKENIZE).returncode == 0
    made, alone = TokenStore.open(store), TokenStore.open(one)
    assert made.keys() == alone.keys() and "a/zzz-extra.jpg" not in made.keys()
    assert np.array_equal(made.tokens(), alone.tokens()) and np.array_equal(made.status(), alone.status())


def test_a_rank_whose_file_differs_in_size_is_refused(mounts, tmp_path):
    first, second, tokenizer = mounts
    changed = sorted((second / "train" / "b").iterdir())[0]
    original = changed.read_bytes()
    changed.write_bytes(original + b"\0")  # the same name, another file
    try:
        store = tmp_path / "store"
        results = two_ranks(
            lambda rank: ["tokenize", (first, second)[rank] / "train", store, "--tokenizer", tokenizer, *TOKENIZE]
        )
    finally:
        changed.write_bytes(original)
    assert [r.returncode for r in results] == [1, 1]
    size = len(original)
    assert f"b/{changed.name} is {size + 1} bytes there and {size} on rank 0" in results[0].stderr
    assert not store.exists()


def test_fine_tuning_ranks_that_see_other_images_are_refused(mounts, tmp_path):
    first, second, _ = mounts
    missing = sorted((second / "val" / "a").iterdir())[0]
    kept = missing.read_bytes()
    missing.unlink()
    try:
        out = tmp_path / "run"
        results = two_ranks(
            lambda rank: ["finetune", (first, second)[rank], "--out", out, "--init", "none", "--model", "tiny"]
        )
    finally:
        missing.write_bytes(kept)
    assert [r.returncode for r in results] == [1, 1], results[0].stderr[-2000:]
    assert f"it lacks a/{missing.name}, which rank 0 has" in results[0].stderr
    assert "lists the val images of" in results[0].stderr
    assert not out.exists()
