"""Loading the configuration: built-in defaults < ``config.yaml`` < environment variables,
each value coerced to its key's type, with errors that name the key path."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from proxy.config.checks import validate
from proxy.config.env import ENV_OVERRIDES
from proxy.config.tree import Config, ConfigError


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the config from defaults, the YAML file at ``path`` (if any) and ``env``."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        raw = loaded or {}
    for name, (key_path, parse) in ENV_OVERRIDES.items():
        text = (env or {}).get(name)
        if text is None or text == "":
            continue
        try:
            value = parse(text)
        except ValueError as exc:
            raise ConfigError(f"environment variable {name} ({key_path}): {exc}") from exc
        section, _, key = key_path.partition(".")
        if not key:  # a top-level key (backends)
            raw[section] = value
            continue
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{section}: expected a mapping")
        node[key] = value
    return parse_config(raw)


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Build and validate a config from a mapping shaped like ``config.yaml``."""
    config = typing.cast(Config, _build(Config, dict(raw), ""))
    validate(config)
    return config


def default_config_path(env: Mapping[str, str]) -> Path | None:
    """``PROXY_CONFIG`` if set, else ``./config.yaml`` when it exists."""
    if env.get("PROXY_CONFIG"):
        return Path(env["PROXY_CONFIG"])
    candidate = Path("config.yaml")
    return candidate if candidate.is_file() else None


def _build(cls: type[Any], raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"unknown key {_join(prefix, str(key))}")
    values = {
        name: _coerce(hints[name], raw[name], _join(prefix, name)) for name in names if name in raw
    }
    return cls(**values)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type[Any], hint), value, path)
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item_hint, _) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(item_hint, item, f"{path}[{i}]") for i, item in enumerate(value))
    if origin is types.UnionType:
        raise ConfigError(f"{path}: unsupported type")  # pragma: no cover - no such fields
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {hint!r}")  # pragma: no cover


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def from_env() -> Config:
    """The config a server started from a shell would use."""
    return load_config(default_config_path(os.environ), os.environ)
