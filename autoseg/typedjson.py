"""Turn dataclasses into JSON and back, checking every field's type on the way in.

Used for fingerprint.json and plans.json: a hand-edited file with a wrong type, a missing field or an
unknown key gets a :class:`SchemaError` naming the field by its path, e.g. ``stages[1].patch_size[2]``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from autoseg.atomic import atomic_path

__all__ = ["SchemaError", "to_jsonable", "from_jsonable", "write_json_atomic", "read_json"]

T = TypeVar("T")


class SchemaError(ValueError):
    """A JSON document does not match its dataclass schema; the message names the field."""


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tuples and dicts with int keys -> plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj


def _type_name(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except SchemaError as e:
                errors.append(str(e))
        raise SchemaError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise SchemaError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_jsonable(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{path}: expected true/false, got {value!r} ({_type_name(value)})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{path}: expected an integer, got {value!r} ({_type_name(value)})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{path}: expected a number, got {value!r} ({_type_name(value)})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(f"{path}: expected a string, got {value!r} ({_type_name(value)})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected a list, got {value!r} ({_type_name(value)})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise SchemaError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected an object, got {value!r} ({_type_name(value)})")
        ktype, vtype = args if args else (str, Any)
        mapping = {}
        for k, v in value.items():
            key = k
            if ktype is int:
                try:
                    key = int(k)
                except ValueError:
                    raise SchemaError(f"{path}: key {k!r} must be an integer") from None
            mapping[key] = _convert(vtype, v, f"{path}.{k}")
        return mapping
    raise SchemaError(f"{path}: unsupported schema type {tp}")  # a bug in autoseg, not in the file


def from_jsonable(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from parsed JSON, checking types, missing fields and unknown keys.

    Raises:
        SchemaError: naming the first offending field by its path.
    """
    where = path or cls.__name__
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected an object, got {_type_name(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # T is a dataclass
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{path}." if path else ""
        raise SchemaError(f"{prefix}{unknown[0]}: unknown key (known keys: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        fpath = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise SchemaError(f"{fpath}: missing")
        kwargs[name] = _convert(hints[name], data[name], fpath)
    return cls(**kwargs)


def write_json_atomic(obj: Any, path: str | Path) -> None:
    """Write ``obj`` (a dataclass or JSON value) to ``path`` via a temporary file and a rename."""
    text = json.dumps(to_jsonable(obj), indent=1) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error becomes a :class:`SchemaError` naming the file and line."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
