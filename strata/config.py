"""One config system: dataclasses with working defaults, loadable from YAML/JSON, overridable by CLI flags.

Every value, whether from a flag, a config file or a sweep, goes through `validate_config` (or `check_value`
for one field): pydantic validates the plain dataclass against its declared field types in lax mode, so "1e-4"
becomes a float, "1024" an int, `true`/"yes" a bool, while 32.5 for an int, a negative count or an unknown
choice is refused with one line naming the field, the value, where it came from and what it takes.
pydantic rather than tyro or simple_parsing: it validates the plain standard-library dataclasses the stages
already take (`pydantic.TypeAdapter`), with constraints written as standard `Annotated` metadata, so the same
check serves argparse flags, files and sweeps, and nothing about the dataclasses or the CLI layout changes.

`add_config_args` adds one `--flag` per dataclass field to an argparse parser (values stay strings until
validation); `build_config` merges defaults < config file < flags that were given < fixed values.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import types
import typing
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from activations.config_types import TextSpec
from activations.errors import StrataError


class ConfigError(StrataError):
    """A config file or value that cannot be used; the message says what and how to fix it."""


# ---------------------------------------------------------------- field types
@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls, include_extras=True)


@functools.cache
def _adapter(cls, name: str | None = None) -> TypeAdapter:
    """The validator of dataclass `cls`, or of its field `name`."""
    return TypeAdapter(cls if name is None else _hints(cls)[name])


def _optional_inner(tp):
    """(T, True) for `T | None`, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def base_type(cls, name: str):
    """The plain Python type of a field (int, float, str, bool), constraints and `| None` stripped."""
    tp, _ = _optional_inner(_hints(cls)[name])
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is typing.Literal:
        tp = type(typing.get_args(tp)[0])
    return tp


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
_NAMES = {bool: "bool (true or false)", int: "int", float: "float", str: "string"}


def describe(cls, name: str) -> str:
    """What a field takes, as a noun: 'int >= 0', 'float > 0 (or null)', 'choice (relu, topk)', or the
    description of a str field's syntax ('layer spec (all, 3, 0-29:3, ...)')."""
    tp, optional = _optional_inner(_hints(cls)[name])
    meta = []
    if typing.get_origin(tp) is typing.Annotated:
        tp, *meta = typing.get_args(tp)
    specs = [m for m in meta if isinstance(m, TextSpec)]
    if typing.get_origin(tp) is typing.Literal:
        text = "choice (" + ", ".join(str(c) for c in typing.get_args(tp)) + ")"
    elif specs:
        text = specs[0].description
    else:
        base = _NAMES.get(tp, getattr(tp, "__name__", str(tp)))
        bounds = [f"{sign} {getattr(m, attr)}" for m in meta  # Gt(0), Ge(0), Interval(ge=0, lt=1), ...
                  for attr, sign in _BOUNDS if getattr(m, attr, None) is not None]
        text = " and ".join([f"{base} {bounds[0]}", *bounds[1:]]) if bounds else base
    return text + (" (or null)" if optional else "")


def _error_text(cls, name: str, value, origin: str, err: dict) -> str:
    """One line: where the value came from, the field, the value, what the field takes (and why not)."""
    if err["type"] == "value_error":  # the project's own validators: their message says what and how to fix
        return f"{origin}: {name}={value!r}: {err['ctx']['error']}"
    text = f"{origin}: {name}={value!r} is not a valid {describe(cls, name)}"
    if err["type"] != "literal_error":  # the choices are already listed
        text += f": {err['msg'][:1].lower()}{err['msg'][1:]}"
    return text


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def check_fields(cls, names, origin: str) -> None:
    """Refuse names that are not fields of `cls`, listing the valid ones."""
    unknown = sorted(str(n) for n in names if n not in _fields(cls))
    if unknown:
        raise ConfigError(f"{origin}: unknown {cls.__name__} field(s) {', '.join(unknown)}; "
                          f"valid fields: {', '.join(sorted(_fields(cls)))}")


def check_value(cls, name: str, value, origin: str):
    """One field's value, validated and converted as `validate_config` would ('1e-4' -> 0.0001)."""
    check_fields(cls, [name], origin)
    try:
        return _adapter(cls, name).validate_python(value)
    except ValidationError as e:
        raise ConfigError(_error_text(cls, name, value, origin, e.errors()[0])) from None


def validate_config(cls, values: dict, origins: dict[str, str] | None = None, where: str = "config"):
    """An instance of dataclass `cls` from `values` (field -> value), every field validated against its declared
    type; `origins` names where each value came from (a flag, a file, a sweep), else `where`."""
    origins = origins or {}
    check_fields(cls, values, where)
    try:
        return _adapter(cls).validate_python(values)
    except ValidationError as e:
        errors = []
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            if name in values:
                errors.append(_error_text(cls, name, values[name], origins.get(name, where), err))
            elif err["type"] == "missing":
                errors.append(f"{where}: {name} is missing; give a {describe(cls, name)}")
            else:
                errors.append(f"{where}: {err['msg']}")
        raise ConfigError("; ".join(errors)) from None


# ---------------------------------------------------------------- files and flags
def load_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found: pass an existing .yaml or .json file")
    kind = "JSON" if p.suffix == ".json" else "YAML"
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {p} is not valid {kind}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of field: value, not a {type(data).__name__}")
    return data


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add `--field-name VALUE` for every field of dataclass `cls` (default None = not given). Values are kept
    as the strings typed; `build_config` validates them with the same rules as config files."""
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        helptext = f.metadata.get("help", "")
        takes = describe(cls, f.name)
        helptext = f"{helptext} [{takes}; default: {default}]" if helptext else f"[{takes}; default: {default}]"
        helptext = helptext.replace("%", "%%")  # argparse formats help with %
        if base_type(cls, f.name) is bool:
            parser.add_argument(flag_name(f.name), dest=f.name, nargs="?", const="true", default=None,
                                metavar="BOOL", help=helptext)
        else:
            tp, _ = _optional_inner(_hints(cls)[f.name])
            choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else f.name.upper()
            parser.add_argument(flag_name(f.name), dest=f.name, default=None, metavar=metavar, help=helptext)


def given_flags(cls, args: argparse.Namespace) -> dict:
    """The fields of `cls` that were given as flags (argparse leaves the others None)."""
    return {name: getattr(args, name) for name in _fields(cls) if getattr(args, name, None) is not None}


def build_config(cls, file: str | Path | None = None, flags: dict | None = None, **fixed):
    """defaults < config file < flags that were given < fixed values (e.g. the RUN positional), validated once."""
    values: dict = {}
    origins: dict = {}
    if file:
        data = load_config_file(file)
        check_fields(cls, data, f"config file {file}")
        values.update(data)
        origins.update({k: f"config file {file}" for k in data})
    for name, value in (flags or {}).items():
        values[name], origins[name] = value, flag_name(name)
    for name, value in fixed.items():
        if value is not None:
            values[name], origins[name] = value, "command line"
    return validate_config(cls, values, origins)
