"""Validate plain dicts (from TOML) into dataclasses, with one clear error per problem.

Each spec section is a dataclass whose fields carry their types and defaults; `from_dict` refuses
unknown keys (naming the closest known key), wrong types and values outside `choices`, and
`to_dict` gives back plain JSON-serialisable data so a resolved spec round-trips.
Fields may declare metadata: `choices` (allowed values or a Registry; for a list, each element),
`min`, `max`, `help`, `parser` (a function (value, file, key) -> value for a field that is its own
small language, such as a model spec), `nonfinite` (NaN and inf are refused everywhere else: `nan < lo`
is false, so a range check alone lets them through).
Validation never changes the object it checks: `validate()` hooks raise or return None.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import stat
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from dimr_lab.errors import SpecError, UserError, closest, did_you_mean

T = TypeVar("T")


MAX_SPEC_BYTES = 4 * 1024 * 1024  # a spec is a few kB; anything near this is not a spec


def field(default: Any = dataclasses.MISSING, *, choices: Any = None, min: float | None = None,
          max: float | None = None, help: str = "", default_factory: Any = dataclasses.MISSING,
          parser: Any = None, nonfinite: bool = False) -> Any:
    """A dataclass field with validation metadata."""
    meta = {"choices": choices, "min": min, "max": max, "help": help, "parser": parser, "nonfinite": nonfinite}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if tp is type(None):
        return "none"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {int: "integer", float: "number", str: "string", bool: "boolean", dict: "table"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, file: str | None) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own error says what is wrong
            return _coerce(value, real[0], key, file)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, file)
            except SpecError as err:
                errors.append(err)
        raise SpecError(f"expected {_type_name(tp)}, got {value!r}", file=file, key=key)
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"expected {_type_name(tp)}, got {value!r}", file=file, key=key)
        return [_coerce(v, arg, f"{key}[{i}]", file) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, file=file, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"expected a boolean (true/false), got {value!r}", file=file, key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"expected an integer, got {value!r}", file=file, key=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"expected a number, got {value!r}", file=file, key=key)
        try:
            return float(value)
        except OverflowError:
            raise SpecError(f"{value!r} is too large for a number", file=file, key=key) from None
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"expected a string, got {value!r}", file=file, key=key)
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise SpecError(f"expected a table, got {value!r}", file=file, key=key)
        return value
    raise TypeError(f"unsupported spec type {tp!r}")


def _check_finite(value: Any, key: str, file: str | None) -> None:
    """NaN and inf anywhere in a value (nested lists and tables too) are refused."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"must be a finite number, got {value!r}", file=file, key=key)
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]", file)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}", file)


def _check_meta(value: Any, meta: typing.Mapping[str, Any], key: str, file: str | None) -> None:
    if value is None:
        return
    if not meta.get("nonfinite"):
        _check_finite(value, key, file)
    items = value if isinstance(value, list) else [value]
    choices = meta.get("choices")
    if choices is not None:
        for i, v in enumerate(items):
            where = f"{key}[{i}]" if isinstance(value, list) else key
            if hasattr(choices, "check"):  # a Registry
                choices.check(v, file=file, key=where)
            elif v not in choices:
                hint = closest(str(v), [str(c) for c in choices])
                allowed = ", ".join(repr(c) for c in choices)
                raise SpecError(f"{v!r} is not allowed; allowed: {allowed}"
                                + (f" (did you mean {hint!r}?)" if hint else ""), file=file, key=where)
    lo, hi = meta.get("min"), meta.get("max")
    for v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if lo is not None and v < lo:
                raise SpecError(f"must be >= {lo}, got {v!r}", file=file, key=key)
            if hi is not None and v > hi:
                raise SpecError(f"must be <= {hi}, got {v!r}", file=file, key=key)


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """(field types, init fields by name) of a spec dataclass, worked out once per class: with string
    annotations, typing.get_type_hints compiles every one of them on each call, which was most of the time
    `table`, `status` and `run --dry-run` spent on a tree of hundreds of runs."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[T], data: Any, *, file: str | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, validating every key; errors name `file` and the dotted key."""
    where = prefix or "(top level)"
    if not isinstance(data, dict):
        raise SpecError(f"expected a table, got {data!r}", file=file, key=prefix or None)
    hints, fields = _schema(cls)
    for k in data:
        if k not in fields:
            raise SpecError(f"unknown key in [{where}]; allowed: {', '.join(fields)}" + did_you_mean(k, fields),
                            file=file, key=f"{prefix}.{k}" if prefix else k)
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        parser = f.metadata.get("parser")
        if name in data and parser is not None:
            value = parser(data[name], file, key)
        elif name in data:
            value = _coerce(data[name], hints[name], key, file)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            raise SpecError(f"missing required key ({_type_name(hints[name])})", file=file, key=key)
        _check_meta(value, f.metadata, key, file)
        kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except SpecError as err:
            raise err.at(file, prefix or None) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain JSON-serialisable data (dicts, lists, scalars) from a (nested) spec dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def read_small_file(path: str | Path, *, what: str = "file", limit: int = MAX_SPEC_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else (missing, a directory, a FIFO,
    a device such as /dev/zero, too large, unreadable) is one UserError naming it. Never blocks on a FIFO."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except NotADirectoryError:
        raise UserError(f"{path}: no such file (a part of the path is not a folder)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None
    except ValueError:  # a NUL character: no path the system can open
        raise UserError(f"{str(path)!r}: not a usable path (it holds a NUL character)") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path}: is a directory, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file (a device, FIFO or socket), expected a {what}")
    if st.st_size > limit:
        raise UserError(f"{path}: {st.st_size} bytes is too large for a {what} (at most {limit})")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None
    if len(data) > limit:
        raise UserError(f"{path}: too large for a {what} (at most {limit} bytes)")
    return data


def load_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing, odd or malformed file is a UserError naming it."""
    data = read_small_file(path, what="TOML file")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not valid TOML: {err}") from None


def parse_value(text: str) -> Any:
    """A command-line override value, read as a TOML value ('3', '1e-4', 'true', '"x"', '[1, 2]');
    anything that is not a TOML value is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(data: dict[str, Any], dotted: str, value: Any, *, file: str | None = None) -> None:
    """data['a']['b'] = value for 'a.b', creating tables on the way; a numeric part indexes a list
    ('model.branches.1.block')."""
    parts = dotted.split(".")
    if not all(parts):
        raise SpecError(f"malformed key {dotted!r}", file=file, key=dotted)
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError(f"{'.'.join(parts[:i]) or 'value'} is a list of {len(node)}; "
                                f"{part!r} is not an index into it", file=file, key=dotted)
            if last:
                node[int(part)] = value
                return
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise SpecError(f"{'.'.join(parts[:i])} is not a table", file=file, key=dotted)
        if last:
            node[part] = value
            return
        node = node.setdefault(part, {})


def parse_overrides(items: list[str] | None, *, source: str = "--set") -> list[tuple[str, Any]]:
    """['train.steps=10', ...] -> [('train.steps', 10), ...]"""
    out = []
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{source} {item!r}: expected key=value, e.g. train.steps=100")
        k, v = item.split("=", 1)
        out.append((k.strip(), parse_value(v.strip())))
    return out
