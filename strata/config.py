"""One config system: dataclasses with working defaults, loadable from YAML/JSON, overridable by CLI flags.

`add_config_args` adds one `--flag` per dataclass field to an argparse parser; `build_config` merges
defaults < config file < flags that were given on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

import yaml

from activations.errors import StrataError


class ConfigError(StrataError):
    """A config file or value that cannot be used; the message says what and how to fix it."""


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
    return tp


def _parse_value(tp, text: str):
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (str,)
        return [inner(x) for x in text.split(",") if x != ""]
    if tp in (int, float, str):
        return tp(text)
    return text


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add `--field-name VALUE` for every field of dataclass `cls` (default None = not given)."""
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        helptext = f"{helptext} (default: {default})" if helptext else f"(default: {default})"
        helptext = helptext.replace("%", "%%")  # argparse %-formats help: "5% of the steps" crashed `train --help`
        if tp is bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const="true", default=None,
                                type=lambda s, _t=tp: _parse_value(_t, s), help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, default=None,
                                type=lambda s, _t=tp: _parse_value(_t, s), help=helptext)


def load_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found: pass an existing .yaml or .json file")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of field: value")
    return data


def config_from_dict(cls, data: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(names))}")
    return cls(**data)


def build_config(cls, args: argparse.Namespace | None = None, file: str | Path | None = None, **overrides):
    """defaults < file < CLI flags that were given < explicit overrides."""
    data: dict = {}
    if file:
        data.update(load_config_file(file))
    if args is not None:
        for f in dataclasses.fields(cls):
            v = getattr(args, f.name, None)
            if v is not None:
                data[f.name] = v
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(cls, data)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
