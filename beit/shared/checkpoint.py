"""Checkpoints: this project's format, and the one place that adapts foreign BEiT weights.

This project's checkpoint is one file written by `save_checkpoint`:

    torch.save({"format": "beit-checkpoint", "version": 1,
                "meta": "<JSON: kind, step, config, data position, seed, store fingerprint, ...>",
                "model": state_dict, ...more state dicts (optimizer, scaler, rng)...})

holding tensors, numbers and strings only, so it loads with `torch.load(weights_only=True)`.
It is written to a temporary file in the same folder and moved into place with `os.replace`,
so a crash never leaves a half-written checkpoint; a human-readable copy of `meta` sits beside
it as `NAME.json`.

Foreign weights (`read_state_dict`, `adapt_state_dict`):
- unilm BEiT `.pth` files, pre-trained (shared `rel_pos_bias.relative_position_bias_table`,
  `mask_token`, `lm_head`) or fine-tuned (per-block tables, `fc_norm`, `head`), with or without
  a top-level `model` / `module` key. They also pickle the training `args` (an
  `argparse.Namespace`); that and plain numbers are the only objects the allow-list admits.
- timm-layout BEiT state dicts (`.pth`, `.bin` or `.safetensors`): the same names without the
  `relative_position_index` buffers.
Anything else a pickle asks to build is refused before it runs, naming what it asked for.

This project's models use the released parameter names, so adapting is dropping the index
buffers, copying a shared relative position table into every block (pre-training ->
fine-tuning), resizing tables for another grid (`resize_relative_position_table`, the released
geometric-progression interpolation), and dropping what the target model has no place for.
`to_timm` writes a classifier's state dict in timm's key layout.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from beit.shared import hf_format
from beit.shared.safe_pickle import unsafe_globals
from beit.shared.space import no_room, out_of_space

FORMAT = "beit-checkpoint"
VERSION = 1

# Globals besides tensors and plain containers that released BEiT checkpoints pickle: the
# training args, and numpy scalars (plain numbers) that training scripts often store.
_SCALAR = getattr(np, "_core", getattr(np, "core", None)).multiarray.scalar
ALLOWED_GLOBALS: list[Any] = [
    argparse.Namespace,
    np.dtype,
    _SCALAR,
    (_SCALAR, "numpy.core.multiarray.scalar"),  # the name numpy 1.x (2021's checkpoints) pickled
    *(type(np.dtype(kind)) for kind in ("float64", "float32", "int64", "int32", "bool")),
]


class CheckpointError(ValueError):
    """A file that cannot be used as the checkpoint asked for; the message says why and what to do."""


# ---------------------------------------------------------------- this project's format


def save_checkpoint(path: Path, state: dict[str, Any], meta: dict[str, Any], keep_previous: bool = False) -> Path:
    """Atomically write `state` (state dicts of tensors and numbers) plus JSON `meta` to `path`,
    with a checksum of every tensor (`checksum`, checked when it is read). `keep_previous`: the
    checkpoint `path` held until now stays, as `previous(path)` (a resume falls back to it when
    the newest is damaged)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_text = json.dumps(meta, indent=2, sort_keys=True, default=str)
    payload = {"format": FORMAT, "version": VERSION, "meta": meta_text, "checksum": checksum(state), **state}
    kept = keep_previous and path.exists()
    before = previous(path)
    if kept:
        os.replace(path, before)  # one rename: at every moment one of the two holds a whole checkpoint
        if path.with_suffix(".json").exists():
            os.replace(path.with_suffix(".json"), before.with_suffix(".json"))
    try:
        _atomic_write(path, lambda f: torch.save(payload, f))
        _atomic_write(path.with_suffix(".json"), lambda f: f.write(meta_text.encode() + b"\n"))
    except OSError as error:
        if kept:  # the last whole checkpoint back in its place
            os.replace(before, path)
            if before.with_suffix(".json").exists():
                os.replace(before.with_suffix(".json"), path.with_suffix(".json"))
        if not out_of_space(error):
            raise
        raise CheckpointError(
            no_room(
                path, f"the checkpoint ({meta.get('kind', 'run')} at step {meta.get('step', '?')})", tensor_bytes(state)
            )
            + (" The checkpoint before it is untouched." if path.exists() else "")
        ) from None
    return path


def tensor_bytes(state: Any) -> int:
    """The bytes of every tensor in `state` (what a checkpoint of it takes on disk, about)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def previous(path: Path) -> Path:
    """Where `save_checkpoint(..., keep_previous=True)` keeps the checkpoint before `path`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def checksum(state: Any) -> str:
    """A crc32 of every tensor's bytes (and every number and string) in `state`, in a fixed order:
    what a checkpoint records of itself, so that one changed on disk is refused, not trained on."""
    crc = 0

    def walk(value: Any) -> None:
        nonlocal crc
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous()
            crc = zlib.crc32(str((tuple(data.shape), str(data.dtype))).encode(), crc)
            crc = zlib.crc32(data.reshape(-1).view(torch.uint8).numpy(), crc)  # its bytes, not copied
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                crc = zlib.crc32(str(key).encode(), crc)
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        else:
            crc = zlib.crc32(repr(value).encode(), crc)

    walk(state)
    return f"crc32:{crc:08x}"


def _atomic_write(path: Path, write) -> None:
    # A write killed half-way leaves its temporary file (a base model's is gigabytes): one
    # writer per path, so any such file left beside `path` is stale.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    f = None
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _Writes(raw)
            write(f)
            f.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if f is not None and f.error is not None:  # torch's writer reports a failed write as its own error
            raise f.error from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _Writes:
    """A file's writes, remembering the OSError of one that failed (a full disk): torch.save's zip
    writer turns it into a RuntimeError of its own ("unexpected pos"), which says nothing."""

    def __init__(self, raw):
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        try:
            return self.raw.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name):
        return getattr(self.raw, name)


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`: (state dicts, meta)."""
    data = _torch_load(Path(path))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a beit checkpoint (no '{FORMAT}' marker): pass a file written by "
            "`beit pretrain` or `beit finetune`, or import foreign weights with --init."
        )
    return _opened(data, path)


def _opened(data: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is beit checkpoint version {data.get('version')}, this beit reads version "
            f"{VERSION}: use the beit release that wrote it."
        )
    data = dict(data)
    meta = json.loads(data.pop("meta"))
    data.pop("format"), data.pop("version")
    recorded = data.pop("checksum", None)  # checkpoints written before checksums have none
    if recorded is not None and checksum(data) != recorded:
        raise CheckpointError(
            f"{path} is damaged: its tensors no longer match the checksum written with them (a bad disk or a partial "
            "copy); copy it again, or resume from the previous checkpoint."
        )
    return data, meta


def read_any(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A file of any layout this project reads, read once: (state dicts, meta) for this project's
    checkpoints, (the model's state dict, None) for foreign weights (`read_state_dict`)."""
    path = Path(path)
    if path.suffix != ".safetensors" and not path.is_dir():
        data = _torch_load(path)
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return _opened(data, path)
        return _state_dict_in(data, path), None
    return read_state_dict(path), None


# ---------------------------------------------------------------- reading foreign files


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path.")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a note on the pickle protocol of old files
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = unsafe_globals(path, ALLOWED_GLOBALS)
        if unsafe:
            raise CheckpointError(
                f"{path} was refused: its pickle would build {', '.join(unsafe)}, not tensors or "
                "plain data, and nothing in it was run. Load it only if you trust it, "
                "and save its state dict alone with torch.save(model.state_dict())."
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(error)}): check the path.") from None
    except Exception as error:  # garbage makes the unpickler fail in many ways
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(error)}): check the path.") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint file of any supported layout, or in a Hugging Face model
    folder (`hf_format`), in this project's names, never running its code. Unwraps this
    project's checkpoints and `model` / `module` / `state_dict` containers."""
    path = Path(path)
    if hf_format.is_hf_folder(path):  # a Hugging Face model folder: its weights in this project's names
        hf_format.read_config(path)
        state = {}
        for file in hf_format.weight_files(path):
            state.update(read_state_dict(file))
        try:
            return hf_format.from_hub_names(state)
        except hf_format.HFFormatError as error:
            raise CheckpointError(f"{path}: {error}") from None
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder without a config.json: pass a checkpoint file or a Hugging Face folder."
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist: check the path.")
        try:
            return load_file(path)
        except SafetensorError as error:
            raise CheckpointError(f"{path} is not a safetensors file ({_first_line(error)}).") from None
    return _state_dict_in(_torch_load(path), path)


def _state_dict_in(data: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(data, dict) and data.get("format") == FORMAT:
        data = data["model"]
    for key in ("model", "module", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(
            f"{path} holds no state dict of tensors (at the top level or under 'model' or 'module'): "
            "pass a BEiT checkpoint."
        )
    # "backbone.": unilm's segmentation checkpoints (mmseg) keep the ViT and its neck under it
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in data.items()}


# ---------------------------------------------------------------- relative position tables


def _geometric_positions(small: int, large: int) -> np.ndarray:
    """Where the released resize places the `small` rows of one axis among `large` unit-spaced
    ones: 0 at the centre, then steps 1, q, q^2, ... outwards, q found by bisection in
    [1.01, 1.5] so that the outermost lands near large // 2 (unilm `run_class_finetuning.py`)."""
    half = small // 2

    def reach(q: float) -> float:
        return (1.0 - q**half) / (1.0 - q)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if reach(q) > large // 2:
            right = q
        else:
            left = q
    steps = np.cumsum([1.0] + [q ** (i + 1) for i in range(half - 1)]) if half else np.zeros(0)
    return np.concatenate([-steps[::-1], [0.0], steps])


def _bspline_basis(knots: np.ndarray, degree: int, x: np.ndarray) -> np.ndarray:
    """[len(x), len(knots) - degree - 1] values of the B-spline basis (Cox-de Boor);
    x is clamped to the knots' span, as FITPACK does when evaluating."""
    x = np.clip(x, knots[degree], knots[-degree - 1])
    n = len(knots) - 1
    basis = np.zeros((len(x), n))
    for j in range(n):
        left, right = knots[j], knots[j + 1]
        inside = (x >= left) & (x < right)
        if right == knots[-1] and left < right:  # close the last non-empty interval on the right
            inside |= x == right
        basis[:, j] = inside
    for d in range(1, degree + 1):
        nxt = np.zeros((len(x), n - d))
        for j in range(n - d):
            den1, den2 = knots[j + d] - knots[j], knots[j + d + 1] - knots[j + 1]
            if den1 > 0:
                nxt[:, j] += (x - knots[j]) / den1 * basis[:, j]
            if den2 > 0:
                nxt[:, j] += (knots[j + d + 1] - x) / den2 * basis[:, j + 1]
        basis = nxt
    return basis


def _spline_operator(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[len(dst), len(src)] matrix: interpolating cubic spline through points at `src` with
    FITPACK's s=0 knots (not-a-knot ends), evaluated at `dst`. What interp2d(kind='cubic')
    did on each axis; falls back to linear / constant for fewer than 4 points."""
    n = len(src)
    if n == 1:
        return np.ones((len(dst), 1))
    degree = 3 if n >= 4 else 1
    interior = src[(degree + 1) // 2 : n - (degree + 1) // 2] if degree == 3 else src[1:-1]
    knots = np.concatenate([[src[0]] * (degree + 1), interior, [src[-1]] * (degree + 1)])
    collocation = _bspline_basis(knots, degree, src)
    return _bspline_basis(knots, degree, dst) @ np.linalg.inv(collocation)


def _axis_operator(src_size: int, dst_size: int) -> np.ndarray:
    """[dst_size, src_size] resize matrix for one axis of a relative position table."""
    if src_size == dst_size:
        return np.eye(src_size)
    if src_size < dst_size:
        t = dst_size // 2
        return _spline_operator(_geometric_positions(src_size, dst_size), np.arange(-t, t + 0.1, 1.0))
    # Shrinking: the least-squares inverse of growing dst -> src, so that growing a table
    # and shrinking it back returns it. (The released bisection assumes growing: asked to
    # shrink, it pins q at 1.01 and reads roughly the centre of the table.)
    return np.linalg.pinv(_axis_operator(dst_size, src_size))


def resize_relative_position_table(
    table: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize a [(2gh-1)(2gw-1) + 3, heads] table from patch grid `src_grid` to `dst_grid`.
    Growing is the released method: per head, the table's values are placed at geometric-
    progression positions and a bicubic interpolating spline is read at unit steps (unilm's
    scipy interp2d(kind='cubic'), written here without scipy). Shrinking departs from the
    release on purpose: it is the least-squares inverse of growing, so 14 -> 24 -> 14 returns
    the table. The three cls rows are kept as they are."""
    if tuple(src_grid) == tuple(dst_grid):
        return table
    src_h, src_w = 2 * src_grid[0] - 1, 2 * src_grid[1] - 1
    dst_h, dst_w = 2 * dst_grid[0] - 1, 2 * dst_grid[1] - 1
    if table.shape[0] != src_h * src_w + 3:
        raise CheckpointError(
            f"relative position table has {table.shape[0]} rows, a {src_grid[0]}x{src_grid[1]} grid "
            f"needs {src_h * src_w + 3}."
        )
    heads = table.shape[1]
    grid = table[:-3].double().numpy().reshape(src_h, src_w, heads)
    rows = _axis_operator(src_h, dst_h)
    cols = _axis_operator(src_w, dst_w)
    resized = np.einsum("ab,bch,dc->adh", rows, grid, cols).reshape(dst_h * dst_w, heads)
    out = torch.cat([torch.from_numpy(resized).to(table.dtype), table[-3:]])
    return out.contiguous()


def table_grid(rows: int) -> tuple[int, int]:
    """The square patch grid a relative position table of `rows` rows was made for."""
    side = (round((rows - 3) ** 0.5) + 1) // 2
    if (2 * side - 1) ** 2 + 3 != rows:
        raise CheckpointError(f"a relative position table of {rows} rows fits no square patch grid.")
    return (side, side)


# ---------------------------------------------------------------- adapting to a model

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Turn a unilm / timm / project state dict into one `model` loads strictly.
    Returns (state dict, notes on what was changed or dropped)."""
    target = model.state_dict()
    notes: list[str] = []
    state = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    if "pos_embed" in state and "pos_embed" not in target:
        raise CheckpointError(
            "the checkpoint uses absolute position embeddings (pos_embed), which this project's BEiT "
            "does not have: use a checkpoint trained with relative position bias."
        )
    per_block = "blocks.0.attn.relative_position_bias_table"
    if SHARED_TABLE in state and per_block in target and SHARED_TABLE not in target:
        shared = state.pop(SHARED_TABLE)
        depth = 1 + max(int(k.split(".")[1]) for k in target if k.startswith("blocks."))
        for i in range(depth):
            state[f"blocks.{i}.attn.relative_position_bias_table"] = shared.clone()
        notes.append(f"copied the shared relative position table into each of the {depth} blocks")
    elif per_block in state and SHARED_TABLE in target and SHARED_TABLE not in state:
        raise CheckpointError(
            "the checkpoint has a relative position table per block (a fine-tuned model) and the "
            "model wants one shared table (pre-training): start pre-training from a pre-trained checkpoint."
        )
    for key, value in list(state.items()):
        if key.endswith("relative_position_bias_table") and key in target and value.shape != target[key].shape:
            if value.shape[1] != target[key].shape[1]:
                continue  # a head-count mismatch is reported below as a shape error
            src, dst = table_grid(value.shape[0]), table_grid(target[key].shape[0])
            state[key] = resize_relative_position_table(value, src, dst)
            if key.endswith("blocks.0.attn.relative_position_bias_table") or key == SHARED_TABLE:
                notes.append(f"resized relative position tables from a {src[0]}x{src[1]} to a {dst[0]}x{dst[1]} grid")
    dropped = [k for k in state if k not in target and k in _HEAD_KEYS]
    for key in dropped:
        del state[key]
    if dropped:
        notes.append(f"dropped {', '.join(dropped)} (not part of this model)")
    for key in ("head.weight", "head.bias"):
        if key in state and key in target and state[key].shape != target[key].shape:
            notes.append(
                f"{key} {tuple(state.pop(key).shape)} does not fit {tuple(target[key].shape)}: the model's own is used"
            )
    for key in ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"):
        if key in target and key not in state:
            state[key] = target[key].clone()
            notes.append(f"{key} starts from the model's initialisation")
    fresh = [k for k in target if k not in state and k.startswith(getattr(model, "head_prefixes", ()))]
    for key in fresh:  # a segmenter's neck and heads, from a backbone checkpoint
        state[key] = target[key].clone()
    if fresh:
        heads = sorted({key.split(".")[0] for key in fresh})
        notes.append(f"{', '.join(heads)} start from the model's initialisation")
    return state, notes


# Keys a model of one kind may lack that another kind's checkpoint holds.
_HEAD_KEYS = {
    "mask_token",
    "lm_head.weight",
    "lm_head.bias",
    "norm.weight",
    "norm.bias",
    "fc_norm.weight",
    "fc_norm.bias",
    "head.weight",
    "head.bias",
}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strictly load `state`; a mismatch names the missing, unexpected and misshapen keys."""
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    misshapen = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in set(state) & set(target)
        if state[k].shape != target[k].shape
    )
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        if misshapen:
            parts.append(f"shape mismatches (checkpoint vs model) {_listing(misshapen)}")
        raise CheckpointError(
            f"{source} does not fit the model: {'; '.join(parts)}. Check that the checkpoint is a "
            "BEiT of the same size (preset, width, depth, heads, patch size)."
        )
    model.load_state_dict(state, strict=True)


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_pretrained(model: nn.Module, path: Path) -> list[str]:
    """Read any supported checkpoint file into `model`, adapting it; returns the notes."""
    state, notes = adapt_state_dict(read_state_dict(path), model)
    load_weights(model, state, source=str(path))
    return notes


# ---------------------------------------------------------------- export


def to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A classifier's state dict in timm's `Beit` key layout (timm keeps the relative position
    index buffers out of its state dicts, as this project does; the names are the released ones)."""
    out = {k: v.detach().clone().contiguous() for k, v in state.items() if not k.endswith("relative_position_index")}
    for key in ("mask_token", "lm_head.weight", "lm_head.bias"):
        out.pop(key, None)
    return out


def export_classifier(checkpoint: Path, out: Path, format: str = "timm") -> tuple[dict[str, torch.Tensor], dict]:
    """Write a fine-tuned checkpoint's classifier in timm's layout to `out`: a `torch.save`d
    state dict ("timm") or a safetensors file. Returns (the weights, the checkpoint's meta)."""
    if format not in ("timm", "safetensors"):
        raise ValueError(f"--format {format} is not one of timm, safetensors, hf.")
    state, meta = load_checkpoint(checkpoint)
    if meta.get("kind") != "finetune":
        raise ValueError(f"{checkpoint} is a {meta.get('kind')} checkpoint: export a fine-tuned classifier.")
    weights = to_timm(state["model"])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if format == "safetensors":
        from safetensors.torch import save_file

        save_file(weights, out)
    else:
        torch.save(weights, out)
    return weights, meta
