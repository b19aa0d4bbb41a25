"""Typed configs: dataclasses filled from a TOML file, then `--set key=value` overrides.

    cfg = load_config(PretrainConfig, Path("run.toml"), ["model.depth=6", "optim.lr=1e-3"])

Nested dataclasses are TOML tables and dotted keys. A value given with `--set` is read as a
TOML value when it parses as one (`3`, `1e-3`, `true`, `[1, 2]`, `"text"`) and as a plain
string otherwise. An unknown key, a value of the wrong type, or a number below the minimum its
class lists in `MINIMUM` (a ClassVar: {"log_every": 1, ...}) raises `ConfigError` with one
sentence naming the key. `to_toml` writes a config back, so a run's resolved config is saved
beside it and can be loaded again.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclass."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(key: str, value: Any, kind: Any) -> Any:
    """Check `value` against the annotation `kind`; return it in that type."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None  # TOML has no null: "none" spells it, on the command line and in saved configs
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(key, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"config key {key}: {value!r} is not one of {', '.join(repr(a) for a in args)}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {type(value).__name__} {value!r}.")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key {key}: expected {len(args)} values, got {len(value)}.")
            return tuple(_convert(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        return origin(_convert(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if kind is Any:
        return value
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a table, got {type(value).__name__} {value!r}.")
        return _build(kind, value, prefix=f"{key}.")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # --set name=2024 reads as a number: the field wants its text
    elif kind is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return Path(str(value))
    else:
        raise ConfigError(f"config key {key}: unsupported annotation {kind!r}.")
    raise ConfigError(f"config key {key}: expected {kind.__name__}, got {type(value).__name__} {value!r}.")


def _has_field(kind: Any, name: str) -> bool:
    """Whether `kind` is a config dataclass with a field `name` (a key given one level too high)."""
    return dataclasses.is_dataclass(kind) and name in {f.name for f in dataclasses.fields(kind)}


def _build(cls: type[T], table: dict[str, Any], prefix: str = "") -> T:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(table) - names)
    if unknown:
        key = unknown[0]
        inner = [f"{prefix}{f.name}.{key}" for f in dataclasses.fields(cls) if _has_field(hints[f.name], key)]
        if inner:
            raise ConfigError(f"unknown config key {prefix}{key}: it is {inner[0]} (set that key instead).")
        raise ConfigError(f"unknown config key {prefix}{key}: known keys here are {', '.join(sorted(names))}.")
    values = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in table.items():
        factory = fields[name].default_factory
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[name]) and factory is not dataclasses.MISSING:
            value = {**to_dict(factory()), **value}  # a table refines the field's own default, not the class's
        values[name] = _convert(prefix + name, value, hints[name])
    built = cls(**values)
    for name, low in getattr(cls, "MINIMUM", {}).items():
        if getattr(built, name) < low:
            raise ConfigError(
                f"config key {prefix}{name}: {getattr(built, name)!r} is below {low}: set it to {low} or more."
            )
    return built


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=v' -> (['a', 'b'], v as a TOML value, or the raw string)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r} is not of the form key=value (for example --set model.depth=6).")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def merge_overrides(table: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = table
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is a value, not a table.")
            node = child
        node[path[-1]] = value
    return table


def flatten(table: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of a nested table's values: {"model": {"width": 96}} -> ["model.width"]."""
    keys = []
    for key, value in table.items():
        keys += flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def load_config(cls: type[T], path: Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Build `cls` from a TOML file (optional) and `key=value` overrides, checking every key and type."""
    table: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: pass an existing TOML file to --config.")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML ({error}): fix the file.") from None
    return _build(cls, merge_overrides(table, overrides))


def resume_fields(cls: type, table: dict[str, Any] | None) -> dict[str, Any]:
    """A config's plain data without the keys a resumed run may change (the class's
    FREE_ON_RESUME: threads, logging and checkpoint intervals, ...): what must match to resume."""
    free = getattr(cls, "FREE_ON_RESUME", ())
    return {k: v for k, v in (table or {}).items() if k not in free}


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data (paths as strings, tuples as lists), ready for TOML or JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML.")


def to_toml(cfg: Any, comments: dict[str, str] | None = None) -> str:
    """TOML text that `load_config` reads back into an equal config (None is written "none");
    `comments` (dotted key -> text) go after their keys' values, e.g. where a value came from."""
    lines: list[str] = []
    comments = comments or {}

    def table(data: dict[str, Any], name: str) -> None:
        scalars = {k: "none" if v is None else v for k, v in data.items() if not isinstance(v, dict)}
        if name and scalars:
            lines.append(f"\n[{name}]")
        for k, v in scalars.items():
            note = comments.get(f"{name}.{k}" if name else k)
            lines.append(f"{k} = {_toml_value(v)}" + (f"  # {note}" if note else ""))
        for k, v in data.items():
            if isinstance(v, dict):
                table(v, f"{name}.{k}" if name else k)

    table(to_dict(cfg), "")
    return "\n".join(lines).lstrip("\n") + "\n"


def differences(theirs: Any, ours: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, theirs, ours) wherever two nested dicts differ: a key either side lacks counts
    as None there; values that are not both dicts are compared as they are."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        out = []
        for key in sorted(set(theirs) | set(ours)):
            out += differences(theirs.get(key), ours.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if theirs == ours else [(prefix or "value", theirs, ours)]
