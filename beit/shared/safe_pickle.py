"""Reading pickles from files the user did not write with this project, running nothing.

Two readers, one rule: a pickle may name only globals on an explicit allow-list, each bound to
something inert (a plain container, a data-only stand-in class, a tensor-rebuild function that
only slices bytes already read), so no code from the file ever runs.

- Zip-format files (PyTorch >= 1.6, `torch.save`'s default): PyTorch's own weights-only
  unpickler with the allow-list added (`torch.serialization.safe_globals`).
- Legacy-format files (`torch.save(..., _use_new_zipfile_serialization=False)`, and what
  PyTorch wrote before 1.6, such as the released DALL-E `encoder.pkl` / `decoder.pkl`):
  `load_legacy` below. PyTorch's weights-only unpickler refuses these outright, because
  `torch.save(module)` records each module class as a persistent id carrying its source text.

The legacy layout, as `torch.serialization._legacy_save` writes it, each item a pickle:

    magic number 0x1950a86a20f9469cfc6c, protocol version 1001,
    system info {protocol_version, little_endian, type_sizes},
    the object, whose persistent ids are
        ("module", class, source_file, source_text)   the first time a module class appears
        ("storage", storage_type, key, location, numel, view_metadata)
    the sorted list of storage keys,
    then for each key: numel as a little-endian int64 and numel x element-size raw bytes.

`load_legacy` reads that with every size and offset checked against the file. A module
record's class must be on the allow-list; its source text is parsed (never compiled or run)
and must be a plain definition of that class, so a record carrying other code is refused.
"""

from __future__ import annotations

import ast
import io
import math
import pickle
import struct
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
ZIP_MAGIC = b"PK\x03\x04"

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class RefusedPickle(ValueError):
    """The pickle asks for something outside the allow-list; nothing in it was run."""


class DamagedFile(ValueError):
    """The file is truncated or its declared sizes do not fit it."""


# ---------------------------------------------------------------- globals a pickle names


def unsafe_globals(path: Path, allowed: list[Any]) -> list[str]:
    """Globals a zip- or legacy-format pickle refers to that `allowed` (objects, or
    (object, name) pairs as for `torch.serialization.safe_globals`) and PyTorch's weights-only
    unpickler do not admit. The pickle is read as opcodes, never run."""
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        names = scan_pickle_globals(Path(path).read_bytes())
    admitted = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in allowed}
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        admitted |= set(_get_allowed_globals())
    except Exception:  # a private helper: fall back to the module names it admits
        names = {n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))}
    return sorted(n for n in names if n not in admitted)


def scan_pickle_globals(data: bytes) -> set[str]:
    """Every global named by the pickles in `data` (one after another, as a legacy file holds
    them), read as opcodes."""
    import pickletools

    names: set[str] = set()
    strings: list[str] = []
    stream = io.BytesIO(data)
    try:
        while stream.tell() < len(data):
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                    strings.append(arg)
                elif opcode.name == "GLOBAL":
                    names.add(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.add(f"{strings[-2]}.{strings[-1]}")
    except Exception:
        pass  # the raw storage bytes after a legacy file's pickles are not opcodes
    return names


# ---------------------------------------------------------------- the legacy format


class _Storage:
    """A storage named by a persistent id; its bytes are read after the object pickle."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: torch.Tensor | None = None  # 1-D, numel elements of dtype, once read
        self.view: tuple[_Storage, int] | None = None  # (root, offset in elements) for a view


class _TensorRef:
    """A tensor to cut from a storage once the storages are read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise RefusedPickle("a tensor rebuilt from something other than a storage record")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _TensorRef):
        raise RefusedPickle("a parameter rebuilt from something other than a tensor")
    return data


def _device(kind, index=None) -> str:
    return str(kind) if index is None else f"{kind}:{index}"


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


_INERT: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "torch.device": _device,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    **{f"torch.{name}": _StorageType(name) for name in _STORAGE_DTYPES},
}


def _plain_class_source(source: str, name: str) -> bool:
    """Whether `source` is only a definition of class `name` whose body defines things (methods,
    annotated or assigned attributes, a docstring): parsed, never compiled or run."""
    try:
        tree = ast.parse(source.expandtabs(4))
    except (SyntaxError, ValueError):
        return False
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.ClassDef) or tree.body[0].name != name:
        return False
    allowed = (ast.FunctionDef, ast.AsyncFunctionDef, ast.AnnAssign, ast.Assign, ast.Pass)
    return all(
        isinstance(node, allowed) or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        for node in tree.body[0].body
    )


class _LegacyUnpickler(pickle.Unpickler):
    """Builds only what `classes` and `_INERT` name; persistent ids are module and storage records."""

    def __init__(self, file, classes: Mapping[str, Any], storages: dict[str, _Storage]):
        super().__init__(file)
        self.classes, self.storages = classes, storages

    def find_class(self, module: str, name: str) -> Any:
        full = f"{'builtins' if module == '__builtin__' else module}.{name}"  # protocol 2 names Python 2's module
        found = self.classes.get(full, _INERT.get(full))
        if found is None:
            raise RefusedPickle(f"its pickle would build {full}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("module", "storage"):
            raise RefusedPickle(f"its pickle holds a persistent record of unknown kind {str(pid)[:60]!r}")
        if pid[0] == "module":
            if len(pid) != 4 or pid[1] not in self.classes.values() or not isinstance(pid[1], type):
                raise RefusedPickle("its pickle holds a malformed module record")
            cls, source = pid[1], pid[3]
            if source is not None and (not isinstance(source, str) or not _plain_class_source(source, cls.__name__)):
                raise RefusedPickle(
                    f"its module record for {cls.__name__} carries source text that is not a plain definition of "
                    "that class"
                )
            return cls
        if len(pid) != 6 or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str):
            raise RefusedPickle("its pickle holds a malformed storage record")
        _, kind, key, _location, numel, view = pid
        if not isinstance(numel, int) or numel < 0:
            raise DamagedFile(f"storage {key} declares {numel!r} elements")
        root = self.storages.setdefault(key, _Storage(key, kind.dtype, numel))
        if root.dtype != kind.dtype or root.numel != numel:
            raise DamagedFile(f"storage {key} is declared twice with different types or sizes")
        if view is None:
            return root
        view_key, offset, size = view
        if not all(isinstance(v, int) and v >= 0 for v in (offset, size)) or offset + size > numel:
            raise DamagedFile(f"storage view {view_key} runs past its storage {key} ({numel} elements)")
        part = _Storage(str(view_key), kind.dtype, size)
        part.view = (root, offset)
        return part


def _load_header(f) -> Any:
    """One of the plain pickles of a legacy file: numbers, strings and containers only."""
    return _LegacyUnpickler(f, {}, {}).load()


def load_legacy(path: Path, classes: Mapping[str, Any]) -> Any:
    """Read a legacy-format PyTorch file, building only `classes` ({"module.Name": stand-in})
    and tensors. Raises RefusedPickle (nothing ran) or DamagedFile, each with a short reason."""
    path = Path(path)
    size = path.stat().st_size
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        try:
            if _load_header(f) != LEGACY_MAGIC:
                raise DamagedFile("it does not start with PyTorch's magic number")
            protocol = _load_header(f)
            if protocol != LEGACY_PROTOCOL:
                raise DamagedFile(f"its PyTorch protocol version is {protocol!r}, not {LEGACY_PROTOCOL}")
            info = _load_header(f)
            if not isinstance(info, dict) or info.get("little_endian") is not True:
                raise DamagedFile("it was written on a big-endian machine or its system record is damaged")
            obj = _LegacyUnpickler(f, classes, storages).load()
            keys = _load_header(f)
        except (RefusedPickle, DamagedFile):
            raise
        except (EOFError, pickle.UnpicklingError) as error:
            if isinstance(error, EOFError) or "truncated" in str(error):
                raise DamagedFile("it ends inside its pickles (truncated)") from None
            raise DamagedFile(f"its pickles cannot be read ({str(error).splitlines()[0][:120]})") from None
        except Exception as error:  # garbage makes an unpickler fail in many ways
            raise DamagedFile(f"its pickles cannot be read ({str(error).splitlines()[0][:120]})") from None
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
            raise DamagedFile("its list of storages does not match the storages its tensors use")
        for key in keys:
            storage = storages[key]
            element = torch.empty((), dtype=storage.dtype).element_size()
            header = f.read(8)
            if len(header) < 8:
                raise DamagedFile(f"it ends before storage {key} (truncated)")
            (numel,) = struct.unpack("<q", header)
            nbytes = numel * element
            if numel != storage.numel:
                raise DamagedFile(f"storage {key} holds {numel} elements where its record declares {storage.numel}")
            if f.tell() + nbytes > size:
                raise DamagedFile(
                    f"storage {key} declares {nbytes} bytes but only {size - f.tell()} remain in the file (truncated)"
                )
            buffer = bytearray(nbytes)
            f.readinto(buffer)
            storage.data = (
                torch.frombuffer(buffer, dtype=storage.dtype) if nbytes else torch.empty(0, dtype=storage.dtype)
            )
        if f.read(1):
            raise DamagedFile(f"it has {size - f.tell() + 1} bytes after its last storage")
    return _materialise(obj, {})


def _cut(ref: _TensorRef) -> torch.Tensor:
    """The tensor `ref` names, after checking that it lies inside its storage."""
    shape, stride, offset = ref.size, ref.stride, ref.offset
    if not all(isinstance(v, int) and v >= 0 for v in (offset, *shape, *stride)) or len(shape) != len(stride):
        raise DamagedFile(f"a tensor on storage {ref.storage.key} has a malformed shape, stride or offset")
    count = math.prod(shape)
    extent = 0 if count == 0 else 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if offset + extent > ref.storage.numel or count > ref.storage.numel:
        raise DamagedFile(
            f"a tensor of shape {list(shape)} at offset {offset} runs past storage {ref.storage.key} "
            f"({ref.storage.numel} elements)"
        )
    storage = ref.storage
    if storage.view is not None:
        storage, base = storage.view
        offset += base
    if storage.data is None:
        raise DamagedFile(f"storage {storage.key} has no data")
    return torch.as_strided(storage.data, shape, stride, offset)  # a view: the file's bytes are read once


def _materialise(obj: Any, seen: dict[int, Any]) -> Any:
    """Replace every tensor reference in the object graph by its tensor (cycles and shared
    objects are kept as they are)."""
    if isinstance(obj, _TensorRef):
        if id(obj) not in seen:
            seen[id(obj)] = _cut(obj)
        return seen[id(obj)]
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, dict):
        seen[id(obj)] = obj
        for key, value in obj.items():
            obj[key] = _materialise(value, seen)
    elif isinstance(obj, list):
        seen[id(obj)] = obj
        obj[:] = [_materialise(v, seen) for v in obj]
    elif isinstance(obj, tuple):
        seen[id(obj)] = obj = tuple(_materialise(v, seen) for v in obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        seen[id(obj)] = obj
        _materialise(vars(obj), seen)
    return obj


def file_format(path: Path) -> str:
    """'zip', 'legacy', 'empty' or 'other', from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty"
    if head == ZIP_MAGIC:
        return "zip"
    if head[:1] == b"\x80":  # a pickle's PROTO opcode: the magic number's pickle
        return "legacy"
    return "other"
