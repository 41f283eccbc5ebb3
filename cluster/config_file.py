"""farm.toml -> FarmConfig: TOML tables map onto FarmConfig's dataclasses by field name.

The mapping is read off the dataclasses themselves, so a field added to FarmConfig (or a
pool, limits or retries setting) is loadable without touching this module.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from types import NoneType, UnionType

from renderfarm.cluster.config import ConfigValueError, FarmConfig

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file that does not describe a FarmConfig; the message names the file and the key."""


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (a string)"}


def load_config(path: str | Path) -> FarmConfig:
    """Reads a farm.toml. Unknown keys, wrong types, missing required keys and values out of
    range (as each dataclass's __post_init__ checks them) raise ConfigError."""
    path = Path(path)
    table = read_toml(path)
    return from_table(FarmConfig, table, path.name, "")


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path.name}: not valid TOML: {error}") from None


def from_table(cls, table: dict, source: str, prefix: str):
    """The dataclass `cls` from a TOML table; `source` (a file name) and `prefix` (the table's
    place in it, "denoisers.") name a bad key in the ConfigError."""
    types = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {prefix}{key} (known: {', '.join(fields)})")
    values = {}
    for name, field in fields.items():
        key = prefix + name
        if name not in table:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key {key}")
            continue
        value, expected = table[name], types[name]
        if dataclasses.is_dataclass(expected):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} must be a table ([{key}]), got {_shown(value)}")
            values[name] = from_table(expected, value, source, f"{key}.")
        else:
            values[name] = _scalar(value, expected, source, key)
    try:
        return cls(**values)
    except ConfigValueError as error:
        # The dataclass names its own key (`replicas`); the table it sits in is known here.
        raise ConfigError(f"{source}: {error.under(prefix)}") from None


def _scalar(value, expected, source: str, key: str):
    # `str | None`: TOML has no null, so None is spelled by leaving the key out.
    if isinstance(expected, UnionType) or typing.get_origin(expected) is typing.Union:
        (expected,) = (option for option in typing.get_args(expected) if option is not NoneType)
    # bool is an int subclass in Python, but `replicas = true` is a mistake, not 1.
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is Path and isinstance(value, str):
        return Path(value)
    if type(value) is expected:
        return value
    raise ConfigError(f"{source}: {key} must be {_KINDS.get(expected, expected.__name__)} (got {_shown(value)})")


def _shown(value) -> str:
    """A value as TOML would spell it, near enough: "two", 2.5, true, {...}."""
    return json.dumps(value, default=str)
