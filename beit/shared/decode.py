"""Decoding image files with DALI without letting one bad file stop a run.

DALI fails a whole batch when one file in it is truncated, empty or not an image, and the
pipeline is unusable afterwards. `ImageBatches` feeds files to a pipeline through an external
source, so it knows which files a failed batch held; it then decodes each of them alone to find
the culprits, records them with their error text, rebuilds the pipeline and carries on.
Files that are obviously not images (empty, unknown signature) are set aside before decoding.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np

from beit.shared.images import OTHER_IMAGE_SUFFIXES, fetch, is_remote

# Leading bytes of the formats DALI's decoders read.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP  ")


# Leading bytes of image formats DALI does not read here, for a clear reason.
_UNSUPPORTED = {b"GIF87a": "GIF", b"GIF89a": "GIF", b"8BPS": "PSD", b"\x00\x00\x01\x00": "ICO", b"\xff\x0a": "JPEG XL"}
_UNSUPPORTED_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF", b"jxl ": "JPEG XL"}


def _not_a_file(path: Path) -> str | None:
    """Why `path` is not a regular file one can open, or None (without opening it: a pipe would block)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symbolic link (to {os.readlink(path)})"
        return f"unreadable: {os.strerror(errno.ENOENT)}"
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    if stat.S_ISDIR(mode):
        if not os.access(path, os.R_OK | os.X_OK):
            return "permission denied: a folder whose images cannot be listed"
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "not a regular file (a pipe, socket or device)"
    return None


def precheck(path: Path | bytes) -> str | None:
    """Why `path` (or in-memory file bytes) cannot be an image, or None when it may be one
    (cheap: reads 16 bytes)."""
    if isinstance(path, (bytes, bytearray)):
        head = bytes(path[:16])
    else:
        reason = _not_a_file(path)
        if reason:
            return reason
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except PermissionError:
            return "permission denied"
        except OSError as error:
            return f"unreadable: {error.strerror or error}"
    if not head:
        return "empty file"
    if head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    suffix = "" if isinstance(path, (bytes, bytearray)) else Path(path).suffix.lower()
    kind = next((name for magic, name in _UNSUPPORTED.items() if head.startswith(magic)), None)
    if head[4:8] == b"ftyp":
        kind = _UNSUPPORTED_BRANDS.get(head[8:12], kind)
    if suffix in OTHER_IMAGE_SUFFIXES:
        kind = suffix  # named like a format this project does not read: say so, whatever its bytes
    if kind is not None:
        return f"unsupported format ({kind}): convert it to JPEG or PNG"
    return "not an image (unknown file signature)"


def as_tensor(output, pin: bool = False):
    """An `ImageBatches` output as a torch tensor: a GPU output as it is; a CPU (numpy) output
    without a copy, or in page-locked memory when `pin` (a GPU trainer's non-blocking copy then
    really is asynchronous; torch's caching host allocator reuses the pinned blocks)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    tensor = torch.from_numpy(np.ascontiguousarray(output))
    return tensor.pin_memory() if pin else tensor


def dali_threads(setting: int = 0) -> int:
    """DALI's CPU threads for this process: `setting` when positive; 0 (every command's default)
    gives each of the node's local ranks (torchrun's LOCAL_WORLD_SIZE) its share of the CPU
    cores this process may run on."""
    if setting > 0:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


DALI_MISSING = (
    "this needs NVIDIA DALI, which is not installed: pip install 'beit[dali]' (DALI for CUDA 13; "
    "'beit[dali-cuda12]' for CUDA 12), or set up with `make setup`."
)


def require_dali() -> None:
    """Refuse, in one sentence (a ValueError, as every bad input), a use of DALI where it is not installed."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ValueError(DALI_MISSING) from None


def pipeline_builder(graph: Callable, threads: int = 0, decoded: bool = True, gpu: bool = True, conditionals=False):
    """The one DALI pipeline factory: a `build(batch_size, device_id, seed)` for `ImageBatches`.
    Its pipeline reads each file's bytes from an external source named "encoded", decodes them
    to RGB HWC uint8 with EXIF orientation applied ('mixed' on a GPU, the CPU otherwise; raw
    bytes when not `decoded`), and returns `graph(images, device_id)`: one output or a tuple.
    `graph` may declare more per-sample inputs as named external sources; `threads` as in
    `dali_threads` (0: this rank's share of the cores). `gpu=False` keeps the
    whole pipeline on the CPU (for header peeks); `conditionals` allows `if` on DALI data."""
    require_dali()
    from nvidia.dali import fn, pipeline_def, types

    def build(batch_size: int, device_id: int | None, seed: int):
        device_id = device_id if gpu else None

        @pipeline_def(
            batch_size=batch_size,
            num_threads=dali_threads(threads),
            device_id=device_id,
            seed=seed,
            exec_dynamic=True,
            prefetch_queue_depth=1,
            enable_conditionals=conditionals,
        )
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            if not decoded:
                return graph(encoded, device_id)
            device = "mixed" if device_id is not None else "cpu"
            return graph(fn.decoders.image(encoded, device=device, output_type=types.RGB), device_id)

        return pipeline()

    return build


def _decode_error(path: Path | bytes, error: BaseException) -> str:
    """One line on why `path` failed: PIL's diagnosis when it has one (DALI's exception text
    does not carry the codec's reason), else DALI's own line."""
    try:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path) as image:
            image.load()
    except Exception as pil_error:
        return f"cannot be decoded: {str(pil_error).strip() or type(pil_error).__name__}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if line.startswith(("Failed to decode", "Unsupported", "Error"))]
    return "cannot be decoded by DALI: " + (useful or lines or [type(error).__name__])[-1]


def _key(item: Path | bytes) -> Path | str:
    return "<bytes>" if isinstance(item, (bytes, bytearray)) else item


class ImageBatches:
    """Runs a DALI pipeline from `build(batch_size, device_id, seed)` on batches of files.
    The pipeline reads the encoded file through an external source named "encoded", and may
    take more per-sample inputs through other named external sources.

        batches = ImageBatches(build, batch_size=64, device_id=None, seed=0)
        outputs, kept = batches.run(files, {"view0": [...], ...})
        # outputs: one array [len(kept), ...] per pipeline output (numpy for a CPU output, a
        # torch tensor on the GPU for a GPU output: `as_tensor` takes either); kept: the indices
        # into `files` that succeeded. batches.failed: {path: error text}
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
        self._stream = None  # the side stream GPU outputs are copied on

    def reseed(self, seed: int) -> None:
        """Random draws (crops, flips, augmentations) from `seed` on: the pipeline is built anew."""
        self.seed, self._pipe, self._rebuilds = seed, None, 0

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = self.build(self.batch_size, self.device_id, self.seed + 7919 * self._rebuilds)
            self._pipe.build()
        return self._pipe

    def _run(self, pipe, feeds: dict[str, list[np.ndarray]]) -> list:
        from nvidia.dali.backend import TensorListGPU

        for name, data in feeds.items():
            pipe.feed_input(name, data)
        outputs = []
        for out in pipe.run():
            if isinstance(out, TensorListGPU):  # handed to torch on the GPU, never through the host
                outputs.append(self._to_torch(out))
            else:
                outputs.append(np.stack([np.asarray(out[i]) for i in range(len(out))]))
        return outputs

    def _to_torch(self, batch):
        """A DALI GPU batch (one shape for all samples) as a torch tensor on the same GPU: one
        device-to-device copy on a side stream, which this (data) thread waits for, so the
        trainer's stream never does and DALI may reuse its buffer at once."""
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        device = torch.device("cuda", self.device_id)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        dense = batch.as_tensor()
        with torch.cuda.stream(self._stream):  # allocated for the side stream: no block the trainer still uses
            out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, out, cuda_stream=self._stream)
        self._stream.synchronize()
        out.record_stream(torch.cuda.default_stream(device))  # freed only after the trainer's kernels that use it
        return out

    def _decodes_alone(self, path: Path, feeds: dict[str, list[np.ndarray]]) -> str | None:
        """None when `path` runs through the pipeline on its own, else the error text."""
        try:
            if self._single is None:
                self._single = self.build(1, self.device_id, self.seed)
                self._single.build()
            self._run(self._single, feeds)
            return None
        except Exception as error:  # DALI raises RuntimeError subclasses with C++ context
            self._single = None  # a failed pipeline cannot run again
            return _decode_error(path, error)

    def run(
        self, files: list, inputs: dict[str, list[np.ndarray]] | None = None, fetched: dict | None = None
    ) -> tuple[list[np.ndarray], list[int]]:
        """Run `files` (paths, URLs, tar members or file contents; at most batch_size) with their
        per-sample `inputs`; failed files are left out of the outputs and recorded in `failed` (by
        path, URL or member; contents under the key '<bytes>'). URLs and tar members are fetched
        together first (`images.fetch`), unless `fetched` already holds them."""
        inputs = inputs or {}
        fetched = dict(fetched or {})
        fetched.update(fetch([f for f in files if is_remote(f) and f not in fetched]))
        blobs, kept = [], []
        data: list = []  # what each file's bytes come from: the path, or the bytes themselves
        for i, path in enumerate(files):
            item = fetched[path] if is_remote(path) else path
            data.append(item)
            fetch_failed = is_remote(path) and isinstance(item, str)  # then `item` says why
            reason = item if fetch_failed else precheck(item)
            if reason is None:
                try:
                    if isinstance(item, (bytes, bytearray)):
                        blobs.append(np.frombuffer(item, dtype=np.uint8))
                    else:
                        blobs.append(np.fromfile(item, dtype=np.uint8))
                    kept.append(i)
                    continue
                except OSError as error:
                    reason = f"unreadable: {error.strerror or error}"
            self.failed[_key(path)] = reason
        if not kept:
            return [], []
        feeds = {"encoded": blobs, **{name: [values[i] for i in kept] for name, values in inputs.items()}}
        try:
            return self._run(self._pipeline(), feeds), kept
        except Exception:
            self._pipe = None
            self._rebuilds += 1
            good = []
            for position, i in enumerate(kept):
                single = {name: [values[position]] for name, values in feeds.items()}
                reason = self._decodes_alone(data[i], single)
                if reason is None:
                    good.append(i)
                else:
                    self.failed[_key(files[i])] = reason
            if len(good) == len(kept):
                raise  # no single file is to blame: a real pipeline error
            outputs, kept_good = self.run([data[i] for i in good], {n: [v[i] for i in good] for n, v in inputs.items()})
            return outputs, [good[k] for k in kept_good]
