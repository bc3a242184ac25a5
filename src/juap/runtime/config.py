"""Config parsing: YAML and --set overrides into frozen dataclasses, with messages that name the field."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Literal, Mapping, Sequence, Tuple, Type, TypeVar, Union

import yaml

from .._validate import check_int, check_range, is_int  # noqa: F401  (check_range: re-exported)
from ..errors import ConfigError

T = TypeVar("T")


# -- loading -----------------------------------------------------------------------------------------
def load_config(cls: Type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read YAML (optional), apply ``section.key=value`` overrides, validate into ``cls``."""
    raw = read_yaml_mapping(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    return from_dict(cls, raw)


def read_yaml_mapping(path: str | Path, what: str = "config file") -> Dict[str, Any]:
    """The mapping in a YAML file; a missing file, bad YAML or a non-mapping is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {p} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict, returning a new dict."""
    out = _deepcopy_dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[parts[-1]] = value
    return out


def _deepcopy_dict(d: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: _deepcopy_dict(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A config as plain data, for ``config.yaml`` in a run folder."""
    return dataclasses.asdict(cfg)


def from_dict(cls: Type[T], raw: Mapping[str, Any], where: str = "") -> T:
    """Validate a mapping into the dataclass ``cls``; unknown keys and bad values raise ConfigError."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" Did you mean {_join(where, close[0])!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {_join(where, key)!r}.{hint} Known keys in "
                f"{where or 'the top level'}: {', '.join(fields)}"
            )
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in raw.items()}
    return cls(**kwargs)


def signature_defaults(func: Callable) -> Dict[str, Any]:
    """The defaults of ``func``'s parameters (a class: its constructor's), by name.

    A config section reads its defaults from the code it configures (``epochs: int = DEFAULTS["epochs"]``),
    so each default is written once: in the signature.
    """
    params = inspect.signature(func).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {args}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where} = {value!r} is not allowed.{hint} Allowed values: {', '.join(map(str, args))}"
            )
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        return check_int(where, value)
    if tp is float:
        if not (is_int(value) or isinstance(value, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if math.isnan(value):
            raise ConfigError(f"{where} must be a number, got NaN")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (tuple, Tuple, list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def config_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-able config: names cache entries and grid cells."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
