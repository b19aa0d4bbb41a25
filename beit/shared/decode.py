"""Decoding image files with DALI without letting one bad file stop a run.

DALI fails a whole batch when one file in it is truncated, empty or not an image, and the
pipeline is unusable afterwards. `ImageBatches` feeds files to a pipeline through an external
source, so it knows which files a failed batch held; it then decodes each of them alone to find
the culprits, records them with their error text, rebuilds the pipeline and carries on.
Files that are obviously not images (empty, unknown signature) are set aside before decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

# Leading bytes of the formats DALI's decoders read.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP  ")


def precheck(path: Path) -> str | None:
    """Why `path` cannot be an image, or None when it may be one (cheap: reads 16 bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    if not head:
        return "empty file"
    if head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "not an image (unknown file signature)"


def _decode_error(path: Path, error: BaseException) -> str:
    """One line on why `path` failed: PIL's diagnosis when it has one (DALI's exception text
    does not carry the codec's reason), else DALI's own line."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            image.load()
    except Exception as pil_error:
        return f"cannot be decoded: {str(pil_error).strip() or type(pil_error).__name__}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if line.startswith(("Failed to decode", "Unsupported", "Error"))]
    return "cannot be decoded by DALI: " + (useful or lines or [type(error).__name__])[-1]


class ImageBatches:
    """Runs `build(batch_size, device_id, seed)` (a function returning a DALI pipeline whose
    external source is named "encoded" and that returns one output) on batches of files.

        batches = ImageBatches(build, batch_size=64, device_id=None, seed=0)
        array = batches.run(files)      # numpy [len(files) minus failures, ...] and the files used
        batches.failed                  # {path: error text}
    """

    def __init__(self, build: Callable, batch_size: int, device_id: int | None, seed: int):
        self.build = build
        self.batch_size = batch_size
        self.device_id = device_id
        self.seed = seed
        self.failed: dict[Path, str] = {}
        self._pipe = None
        self._single = None
        self._rebuilds = 0

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = self.build(self.batch_size, self.device_id, self.seed + 7919 * self._rebuilds)
            self._pipe.build()
        return self._pipe

    def _run(self, pipe, data: list[np.ndarray]) -> list[np.ndarray]:
        pipe.feed_input("encoded", data)
        (out,) = pipe.run()
        if hasattr(out, "as_cpu"):
            out = out.as_cpu()
        return [np.asarray(out[i]) for i in range(len(out))]

    def _decodes_alone(self, path: Path, data: np.ndarray) -> str | None:
        """None when `path` decodes on its own, else the error text."""
        try:
            if self._single is None:
                self._single = self.build(1, self.device_id, self.seed)
                self._single.build()
            self._run(self._single, [data])
            return None
        except Exception as error:  # DALI raises RuntimeError subclasses with C++ context
            self._single = None  # a failed pipeline cannot run again
            return _decode_error(path, error)

    def run(self, files: list[Path]) -> tuple[list[np.ndarray], list[Path]]:
        """Decode and transform `files` (at most batch_size); failed files are left out and recorded."""
        data, kept = [], []
        for path in files:
            reason = precheck(path)
            if reason is None:
                try:
                    data.append(np.fromfile(path, dtype=np.uint8))
                    kept.append(path)
                    continue
                except OSError as error:
                    reason = f"unreadable: {error.strerror or error}"
            self.failed[path] = reason
        if not data:
            return [], []
        try:
            return self._run(self._pipeline(), data), kept
        except Exception:
            self._pipe = None
            self._rebuilds += 1
            good = []
            for path, blob in zip(kept, data, strict=True):
                reason = self._decodes_alone(path, blob)
                if reason is None:
                    good.append(path)
                else:
                    self.failed[path] = reason
            if len(good) == len(kept):
                raise  # no single file is to blame: a real pipeline error
            return self.run(good)
