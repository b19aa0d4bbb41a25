"""A full disk: what a write that found no room says. Every writer of this project (checkpoints,
store chunks, the node-local copy, metrics) turns ENOSPC (and a quota's EDQUOT) into one sentence
naming the path, what it was writing, about how much room that needs and how much is free, and
that running the same command again after freeing space resumes; what was written before stays
whole (checkpoints and chunks are replaced whole or not at all).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class DiskFull(ValueError):
    """A write that found no room; the message is `no_room`'s sentence."""


def out_of_space(error: BaseException) -> bool:
    """Whether `error` is a write that found the device (or the quota) full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path | str) -> int | None:
    """The free bytes of the device holding `path` (its nearest existing folder); None for a URL."""
    path = Path(path)
    if "://" in str(path):
        return None
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def no_room(path: Path | str, what: str, needed: int) -> str:
    """The sentence for a write of `what` to `path` that found no room."""
    free = free_bytes(path)
    room = f"; {_size(free)} free there" if free is not None else ""
    return (
        f"no space left to write {what} to {path} (it needs about {_size(needed)}{room}): free some space, or "
        "point the output elsewhere, and run the same command again to resume."
    )


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
