"""The node-local copy of a store's training arrays (`TokenStore.node_copy`): the tokens, view
parameters, status, image sizes, tar members and keys of a store, as plain arrays in a folder on
the node's own disk, written once per node (the first process to ask writes it under a lock, the
others wait) and memory-mapped by every rank, so the node's page cache holds them once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from beit.shared.space import out_of_space
from beit.shared.store import StoreError

if TYPE_CHECKING:
    from beit.shared.store import TokenStore


def make_node_copy(store: TokenStore, cache_root: str | Path = "") -> NodeCopy:
    """A store's tokens, view parameters, status, image sizes and keys as plain arrays in a
    node-local cache folder (`cache_root`, "" = the system's temporary folder), written once
    by the first process of the node to ask (the others wait on a lock) and memory-mapped
    by every one: the node's page cache holds them once for all its ranks. The folder is
    named by the store's identity, so a run that starts again maps it without copying."""
    root = Path(cache_root or tempfile.gettempdir())
    identity = {
        "location": store.location if "://" in store.location else str(Path(store.location).resolve()),
        **{k: store.attrs.get(k) for k in ("created", "completed", "counts")},
        "tokenizer": store.attrs.get("tokenizer", {}).get("sha256"),
        "fingerprint": store.attrs.get("source", {}).get("fingerprint"),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = root / f"beit-store-{digest}"
    if not (folder / "ready.json").is_file():
        try:
            root.mkdir(parents=True, exist_ok=True)
            lock = open(root / f"beit-store-{digest}.lock", "a")  # noqa: SIM115 (held until the copy exists)
        except OSError as error:
            raise StoreError(
                f"cannot write the node's copy of {store.location} under {root} ({error.strerror}): set "
                "data_cache to a writable local folder."
            ) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / "ready.json").is_file():
                _write(store, folder, identity)
    return NodeCopy.open(folder)


def _write(store: TokenStore, folder: Path, identity: dict) -> None:
    n, views, (gh, gw) = len(store), store.views_per_image, store.grid
    # tokens, views; status, sizes, key offsets, tar members; keys (about 64 bytes each)
    need = n * views * (gh * gw * 2 + 8 * 4) + n * (1 + 8 + 8 + 16 + 64)
    for stale in folder.parent.glob(f"{folder.name}.tmp-{socket.gethostname()}-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a copy this host began and did not finish (we hold the lock)
    free = shutil.disk_usage(folder.parent).free
    if free < need:
        raise StoreError(
            f"the node's copy of {store.location} needs about {need / 2**30:.1f} GiB and {folder.parent} has "
            f"{free / 2**30:.1f} GiB free: set data_cache to a local folder with room."
        )
    work = folder.parent / f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        _fill(store, work, identity)
    except OSError as error:
        shutil.rmtree(work, ignore_errors=True)
        room = f"; it needs about {need / 2**20:.1f} MiB, {shutil.disk_usage(folder.parent).free / 2**20:.1f} MiB free"
        raise StoreError(
            f"could not write the node's copy of {store.location} in {folder.parent} ({error.strerror or error}"
            f"{room if out_of_space(error) else ''}): set data_cache to a local folder with room."
        ) from None
    try:
        os.rename(work, folder)
    except OSError:  # another node sharing this folder finished first: theirs is the same
        shutil.rmtree(work, ignore_errors=True)
        if not (folder / "ready.json").is_file():
            raise


def _fill(store: TokenStore, work: Path, identity: dict) -> None:
    n, views, (gh, gw) = len(store), store.views_per_image, store.grid
    work.mkdir()

    def open_memmap(path: Path, mode: str, dtype, shape):  # noqa: ARG001 (mode is always w+)
        # the file's blocks taken now: a disk that fills up later is an error here, not a SIGBUS in a write
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        return array

    tokens = open_memmap(work / "tokens.npy", mode="w+", dtype=np.uint16, shape=(n, views, gh, gw))
    params = open_memmap(work / "views.npy", mode="w+", dtype=np.float32, shape=(n, views, 8))
    status = open_memmap(work / "status.npy", mode="w+", dtype=np.uint8, shape=(n,))
    sizes = open_memmap(work / "sizes.npy", mode="w+", dtype=np.int32, shape=(n, 2)) if "sizes" in store.group else None
    members = None
    if "members" in store.group:
        members = open_memmap(work / "members.npy", mode="w+", dtype=np.int64, shape=(n, 2))
    offsets = open_memmap(work / "key_offsets.npy", mode="w+", dtype=np.int64, shape=(n + 1,))
    offsets[0] = 0
    with open(work / "keys.bin", "wb") as blob:
        for start, stop in store.chunks():
            span = np.arange(start, stop)

            def read(name: str, start=start, stop=stop, span=span):  # a damaged chunk: one sentence naming it
                return store._checked(name, span, lambda: store.group[name][start:stop])

            tokens[start:stop] = read("tokens")
            params[start:stop] = read("views")
            status[start:stop] = read("status")
            if sizes is not None:
                sizes[start:stop] = read("sizes")
            if members is not None:
                members[start:stop] = read("members")
            encoded = [str(k).encode() for k in read("keys")]
            offsets[start + 1 : stop + 1] = offsets[start] + np.cumsum([len(k) for k in encoded])
            blob.write(b"".join(encoded))
    for array in (tokens, params, status, sizes, members, offsets):
        if array is not None:
            array.flush()
    (work / "ready.json").write_text(json.dumps(identity, indent=2) + "\n")


class KeyTable:
    """N strings as one UTF-8 blob and N + 1 offsets, both memory-mapped: `table[i]` is key i."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()


@dataclass
class NodeCopy:
    """A store's training arrays, memory-mapped from a node-local folder (`TokenStore.node_copy`)."""

    folder: Path
    tokens: np.ndarray  # [N, V, gh, gw] uint16
    views: np.ndarray  # [N, V, 8] float32
    status: np.ndarray  # [N] uint8
    sizes: np.ndarray | None  # [N, 2] int32 (height, width), None for a store made before they were recorded
    keys: KeyTable
    members: np.ndarray | None = None  # [N, 2] int64 (offset, size) in a tar shard, for a source of shards

    @classmethod
    def open(cls, folder: Path) -> NodeCopy:
        def load(name: str):
            path = folder / name
            return np.load(path, mmap_mode="r") if path.is_file() else None

        blob_path = folder / "keys.bin"
        blob = (
            np.memmap(blob_path, dtype=np.uint8, mode="r")
            if blob_path.stat().st_size
            else np.zeros(0, dtype=np.uint8)  # all keys empty: numpy cannot map an empty file
        )
        return cls(
            folder, load("tokens.npy"), load("views.npy"), load("status.npy"), load("sizes.npy"),
            KeyTable(blob, load("key_offsets.npy")), load("members.npy"),
        )  # fmt: skip
