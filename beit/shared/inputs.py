"""Every input a command lists is read or accounted for: how many were listed, read and skipped,
each skipped file with its reason, and a limit on the share that may be skipped.

    inputs = Inputs("DATA/val", len(files), names=lambda i: str(files[i]), limit=0.05)
    inputs.tried(indices)                 # these files went to the decoder
    inputs.skip(i, reason)                # this one could not be read (`ImageBatches.failed` says why)
    inputs.check()                        # too large a share unreadable: one sentence, a ValueError
    inputs.counts()                       # {"listed": 22, "read": 20, "skipped": 2, "not_reached": 0}
    inputs.basis()                        # "over 20 of 22 listed images (2 unreadable, see FILE)"

Under torchrun each rank counts its own share of the training images, in its read-ahead thread, so
the ranks would pass the limit at different steps. A trainer's training `Inputs` there has `defer`
set: a check that fails (or a batch of none) notes its sentence in `stop` instead of raising, and
`Run.check_inputs` stops every rank at the same step with it (`beit.train.scaffold`).

A `SkippedLog` is the file the skipped inputs go to, one JSON line each, as they are found (a run
that dies keeps what it found): {"path", "reason"} and, where a command reads two splits, "split".
A fresh run starts it empty; a resumed one appends, without writing a path twice.

The limit exists for the failure that is not a few bad files: a wrong path, a mount that went away,
a folder of files still being copied. Those make most inputs unreadable, where a data set in use
has a handful of bad files at most: 5% is far above normal damage and far below a broken source.
The share stops a run only once `MIN_SKIPPED` inputs are skipped (or every input listed, when
fewer): two bad files among twenty report, not stop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

MAX_SKIPPED_FRACTION = 0.05  # every command's default of max_skipped_fraction
MIN_SKIPPED = 10  # skipped inputs before their share can stop a run


class SkippedLog:
    """The skipped inputs' file: one JSON line per input, appended as each is found."""

    def __init__(self, path: Path, fresh: bool = True):
        self.path = Path(path)
        self.written: set[tuple[str, str]] = set()
        if fresh:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.written.add((entry.get("split", ""), entry["path"]))
                except (ValueError, KeyError):
                    continue  # a line cut short by a killed run

    def append(self, split: str, path: str, reason: str) -> None:
        if (split, path) in self.written:
            return
        self.written.add((split, path))
        entry = {"path": path, "reason": reason, **({"split": split} if split else {})}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # one short write in append mode: ranks may share the file
            f.write(json.dumps(entry) + "\n")


class Inputs:
    """The listed inputs of one split of one command: which were tried, which were skipped and why.
    `names(i)` is input i's path (as the user would look for it); `unreadable_at_listing` holds the
    inputs dropped while listing (path -> reason): listed, tried and skipped, with no index."""

    def __init__(
        self,
        where: str,
        count: int,
        names: Callable[[int], str],
        limit: float = MAX_SKIPPED_FRACTION,
        setting: str = "--set max_skipped_fraction=F",
        split: str = "",
        log: SkippedLog | None = None,
        unreadable_at_listing: dict[str, str] | None = None,
    ):
        self.where, self.names, self.split, self.log = where, names, split, log
        self.limit, self.setting = limit, setting  # the share that stops a run, and how to raise it
        self.seen = np.zeros(count, dtype=bool)
        self._seen_count = 0
        self.skipped: dict[str, str] = {}  # path -> reason, in the order found
        self._skipped_index: set[int] = set()
        for path, reason in (unreadable_at_listing or {}).items():
            self._record(path, reason)
        self._at_listing = len(self.skipped)
        self.defer = False  # note a failed check in `stop` rather than raise (torchrun's training ranks)
        self.stop: str | None = None  # the first such sentence

    @property
    def listed(self) -> int:
        return len(self.seen) + self._at_listing

    @property
    def tried_count(self) -> int:
        return self._seen_count + self._at_listing

    @property
    def read(self) -> int:
        return self.tried_count - len(self.skipped)

    def counts(self) -> dict[str, int]:
        """{listed, read, skipped, not_reached} in this process (a resumed run counts from its resume):
        not_reached counts the inputs it did not come to."""
        return {
            "listed": self.listed,
            "read": self.read,
            "skipped": len(self.skipped),
            "not_reached": self.listed - self.tried_count,
        }

    def tried(self, indices: Iterable[int]) -> None:
        indices = np.unique(np.asarray(list(indices), dtype=np.int64))
        self._seen_count += int(np.count_nonzero(~self.seen[indices]))
        self.seen[indices] = True

    def skip(self, index: int, reason: str) -> None:
        """Input `index` could not be read, for `reason` (once per input, however often it is tried)."""
        self.tried([index])
        if index in self._skipped_index:
            return
        self._skipped_index.add(index)
        self._record(self.names(index), reason)

    def _record(self, path: str, reason: str) -> None:
        self.skipped[path] = reason
        if self.log is not None:
            self.log.append(self.split, path, reason)

    def account(self, indices, files: list, kept: list[int], failed: dict) -> None:
        """After a decoder ran on `files`, inputs `indices`: `kept` the positions it decoded,
        `failed` its reasons by file (`ImageBatches.failed`). The rest are skipped with their
        reasons; then `check`."""
        self.tried(indices)
        done = set(kept)
        for position, index in enumerate(indices):
            if position not in done:
                self.skip(int(index), failed.get(_failed_key(files[position]), "could not be decoded"))
        self.check()

    def check(self) -> None:
        """Stop (a ValueError, one sentence) when more than `limit` of the inputs tried so far were
        skipped, once `MIN_SKIPPED` were (or every input listed, when fewer are listed)."""
        skipped, tried = len(self.skipped), self.tried_count
        if not tried or skipped < min(MIN_SKIPPED, self.listed) or skipped / tried <= self.limit:
            return
        where = f" (every one is in {self.log.path})" if self.log is not None else ""
        example = next(iter(self.skipped.items()))
        self._stop(
            f"{skipped} of the {tried} images of {self.where} tried so far could not be read ({skipped / tried:.0%}, "
            f"more than max_skipped_fraction {self.limit:g}; the first: {example[0]}: {example[1]}{where}): check "
            f"the path and that its disk or mount is reachable, or raise the limit with {self.setting}."
        )

    def refuse_empty_batch(self, size: int) -> None:
        """A training batch none of whose `size` images could be read stops the run, in one sentence
        (an update on no images is no update, and ranks must agree on every step). With `defer`, the
        caller hands on an empty batch, which `Run.check_inputs` stops before it is used."""
        path, reason = next(reversed(self.skipped.items()))
        self._stop(
            f"none of the {size} images of a training batch of {self.where} could be read (the last: {path}: "
            f"{reason}): check the path and that its disk or mount is reachable."
        )

    def _stop(self, sentence: str) -> None:
        if not self.defer:
            raise ValueError(sentence)
        self.stop = self.stop or sentence

    def basis(self) -> str:
        """What a metric over these inputs was computed over: "over 20 of 22 listed images (2 unreadable,
        see FILE)"; "" when this process read none (a finished run asked again)."""
        if not self.tried_count:
            return ""
        if not self.skipped and self.read == self.listed:
            return f"over all {self.listed} listed images"
        text = f"over {self.read} of {self.listed} listed images"
        if self.skipped:
            text += f" ({len(self.skipped)} unreadable" + (f", see {self.log.path})" if self.log else ")")
        return text

    def summary(self) -> dict:
        """The counts, the skipped inputs' file, and (without a file) the skipped inputs themselves."""
        out: dict = dict(self.counts())
        if self.log is not None:
            out["skipped_file"] = str(self.log.path)
        else:
            out["skipped_inputs"] = [{"path": path, "reason": reason} for path, reason in self.skipped.items()]
        return out


def _failed_key(item) -> object:
    """The key `ImageBatches.failed` files `item` under."""
    return "<bytes>" if isinstance(item, (bytes, bytearray)) else item


def source_name(files, keys: list[str]) -> Callable[[int], str]:
    """Input i's name: its file's path or URL, or its key when the input is bytes (a store's copy)."""

    def name(i: int) -> str:
        item = files[i]
        if isinstance(item, (bytes, bytearray)):
            return keys[i]
        return os.fspath(item) if isinstance(item, Path) else str(item)

    return name
