"""Typed configs: dataclass defaults < YAML file < command-line `key.sub=value` overrides.

Recipes declare their config as (nested) dataclasses; `parse_config` fills one from `--config file.yaml` and
dotted overrides, coercing every value by its type hint. YAML is read with a strict loader: only `true`/`false`
are booleans (so `mixed_precision: no` stays the string "no") and `2e-5` is a float, not a string.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from finetune.errors import ConfigError

T = TypeVar("T")


class _StrictLoader(yaml.SafeLoader):
    """YAML 1.2-style scalars: booleans are only true/false; floats need no dot (`2e-5`); integers are decimal
    (or 0x hex), never YAML 1.1 octal or base 60."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(  # no YAML 1.1 octal (010 is not 8) or base 60 (1:30 is not 90)
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:(?:[0-9][0-9_]*)?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*\.(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


class _StrictDumper(yaml.SafeDumper):
    """Quotes the strings that `_StrictLoader` (e.g. "1e5") or a standard YAML 1.1 reader such as `yaml.safe_load`
    (e.g. "no", "on") would read as something else, so a saved config.yaml reads back the same in either."""


_StrictDumper.yaml_implicit_resolvers = {
    first: yaml.SafeDumper.yaml_implicit_resolvers.get(first, []) + _StrictLoader.yaml_implicit_resolvers.get(first, [])
    for first in {*yaml.SafeDumper.yaml_implicit_resolvers, *_StrictLoader.yaml_implicit_resolvers}
}


_BOUNDS: dict[str, typing.Callable[[float], bool]] = {
    ">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0, ">= 1": lambda v: v >= 1, ">= 2": lambda v: v >= 2,
    "in [0, 1)": lambda v: 0 <= v < 1, "in [0, 1]": lambda v: 0 <= v <= 1, "in (0, 1)": lambda v: 0 < v < 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
}


def check_bounds(cfg: Any, bound: str, *names: str) -> None:
    """Raise ValueError (which config loading turns into a ConfigError naming the key) for the first field of `cfg`
    among `names` that is NaN, infinite or outside `bound` (e.g. "> 0"); None passes (it means "not set")."""
    for name in names:
        value = getattr(cfg, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is not None and (isinstance(v, bool) or not math.isfinite(v) or not _BOUNDS[bound](v)):
                raise ValueError(f"{name} must be {bound}, got {value}")


def check_unique(values: Sequence[Any] | None, name: str) -> None:
    """Raise ValueError when the list `name` repeats an entry (e.g. a label name: two classes would share it)."""
    repeated = sorted({str(v) for v in values or [] if list(values).count(v) > 1})
    if repeated:
        raise ValueError(f"{name} repeats {', '.join(repeated)}; each entry must appear once")


def yaml_load(text: str, *, source: str = "<string>") -> Any:
    """Parse YAML with the strict scalar rules above; a syntax error becomes a ConfigError naming the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}:{where} is not valid YAML ({problem}); fix the syntax there") from None


def parse_config(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Build `cls` from command-line arguments: `[--config FILE] [key.sub=value ...]`; `--help` lists the keys."""
    args = list(sys.argv[1:] if argv is None else argv)
    config_path: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            sys.stdout.write(format_config_help(cls))
            raise SystemExit(0)
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file path: --config recipes/configs/<task>/<name>.yaml")
            config_path, i = args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"cannot read argument {arg!r}; pass --config FILE and overrides as key.sub=value")
        i += 1
    return load_config(cls, config_path, overrides)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of `cls`, updated by the YAML file at `path`, updated by `key.sub=value` overrides."""
    merged: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass an existing YAML file to --config")
        loaded = yaml_load(path.read_text(encoding="utf-8"), source=str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        merged = loaded or {}
    for item in overrides:
        key, _, raw = item.partition("=")
        if not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        value = yaml_load(raw, source=f"override {key}") if raw.strip() else None  # `key=` unsets, as `key:` does
        node = merged
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return _build(cls, merged, prefix="")


def config_from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Build `cls` from plain nested dicts (e.g. one section of a saved config.yaml), coercing by type hint."""
    return _build(cls, data, prefix=prefix)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (what `save_config` writes and trackers log)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML that `load_config` reads back to an equal config."""
    text = yaml.dump(config_to_dict(cfg), Dumper=_StrictDumper, sort_keys=False, allow_unicode=True)
    Path(path).write_text(text, encoding="utf-8")


def format_config_help(cls: type) -> str:
    """One line per key: dotted name, type and default."""
    lines = [f"usage: [--config FILE.yaml] [key.sub=value ...]\n\nkeys of {cls.__name__}:"]

    def walk(klass: type, prefix: str) -> None:
        hints = get_type_hints(klass)
        for f in dataclasses.fields(klass):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            lines.append(f"  {prefix}{f.name}: {_type_name(hint)} = {default!r}")

    walk(cls, "")
    return "\n".join(lines) + "\n"


def _build(cls: type[T], data: Any, prefix: str) -> T:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(hints[f.name]) and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = _build(hints[f.name], {}, f"{prefix}{f.name}.")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key {prefix}{f.name} is required; set it in the YAML or as {prefix}{f.name}=...")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # __post_init__ validation
        raise ConfigError(f"{where}: {err}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if value is None:
        if origin in (Union, types.UnionType) and type(None) in get_args(hint):
            return None
        raise ConfigError(f"{key} needs a value ({_type_name(hint)}); it cannot be empty")
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        candidates = [a for a in args if a is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return _coerce(value, candidate, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a valid {_type_name(hint)}")
    if origin is Literal:
        choices = get_args(hint)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        fix = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}{fix}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin in (list, Sequence, typing.Sequence) or hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list such as [a, b], got {value!r}")
        (item,) = get_args(hint) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item = get_args(hint) or (str, Any)
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number (write floats like 2.0e-5), got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__}); quote it in the YAML")
    raise ConfigError(f"{key}: unsupported config type {hint!r}")  # a recipe bug, not a user error


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "|".join(str(c) for c in get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(hint))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(hint))}]"
    return getattr(hint, "__name__", str(hint))
