"""The typed, frozen configuration tree and how it is loaded.

Precedence: built-in defaults < ``config.yaml`` < environment variables. Every value is
validated before the server binds; an unknown key or a bad value is a ``ConfigError`` that
names the key path (``limits.max_queue``) or the environment variable.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the offending key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"  # this machine only, as Ollama itself binds
    port: int = 8000
    drain_timeout_s: float = 30.0
    send_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024
    max_body_bytes: int = 20 * 1024 * 1024
    trusted_proxies: tuple[str, ...] = ()
    enable_docs: bool = True


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    kind: str = "ollama"
    url: str = "http://localhost:11434"
    api_key: str = field(default="", repr=False)
    default_model: str = "qwen2.5:7b-instruct-q4_0"
    connect_timeout_s: float = 5.0
    headers_timeout_s: float = 300.0
    idle_timeout_s: float = 120.0
    total_timeout_s: float = 0.0
    keepalive_s: float = 4.0
    max_connections: int = 64
    max_retries: int = 3
    retry_delay_s: float = 1.0
    retry_max_delay_s: float = 10.0
    probe_interval_s: float = 10.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    requests_per_minute: float = 60.0
    burst: int = 10
    client_requests_per_minute: float = 0.0  # 0: the global limit
    client_burst: int = 0  # 0: the global burst
    client_tokens_per_minute: float = 0.0
    max_clients: int = 10_000
    parallel: int = 1
    max_queue: int = 8
    max_queue_per_client: int = 4
    queue_timeout_s: float = 60.0
    max_context_length: int = 8192
    enable_streaming: bool = True
    default_max_tokens: int = 512


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    key: str = field(repr=False)
    requests_per_minute: float = 0.0
    burst: int = 0
    tokens_per_minute: float = 0.0


@dataclass(frozen=True, slots=True)
class AuthConfig:
    api_keys: tuple[ApiKey, ...] = ()
    admin_key: str = field(default="", repr=False)
    allow_anonymous: bool = False


@dataclass(frozen=True, slots=True)
class ModelsConfig:
    allowlist: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_api_keys(text: str) -> list[dict[str, Any]]:
    """``name:key[:requests_per_minute[:burst]]``, comma-separated."""
    keys: list[dict[str, Any]] = []
    for item in _parse_list(text):
        parts = item.split(":")
        if len(parts) < 2 or len(parts) > 4 or not parts[0] or not parts[1]:
            raise ValueError("expected name:key[:requests_per_minute[:burst]] entries")
        entry: dict[str, Any] = {"name": parts[0], "key": parts[1]}
        if len(parts) > 2:
            entry["requests_per_minute"] = float(parts[2])
        if len(parts) > 3:
            entry["burst"] = int(parts[3])
        keys.append(entry)
    return keys


# Environment variable -> (key path, parser). The names come from the original design and
# the compose stack; README.md and config.yaml list them beside their keys.
ENV_OVERRIDES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "PROXY_HOST": ("server.host", str),
    "PROXY_PORT": ("server.port", int),
    "SHUTDOWN_DRAIN_TIMEOUT": ("server.drain_timeout_s", float),
    "SEND_TIMEOUT": ("server.send_timeout_s", float),
    "CLIENT_HEADER_TIMEOUT": ("server.header_timeout_s", float),
    "CLIENT_BODY_TIMEOUT": ("server.body_timeout_s", float),
    "MAX_CONNECTIONS": ("server.max_connections", int),
    "MAX_BODY_BYTES": ("server.max_body_bytes", int),
    "TRUSTED_PROXIES": ("server.trusted_proxies", _parse_list),
    "ENABLE_DOCS": ("server.enable_docs", _parse_bool),
    "UPSTREAM_KIND": ("upstream.kind", str),
    "OLLAMA_URL": ("upstream.url", str),
    "UPSTREAM_API_KEY": ("upstream.api_key", str),
    "OLLAMA_MODEL": ("upstream.default_model", str),
    "CONNECT_TIMEOUT": ("upstream.connect_timeout_s", float),
    "API_TIMEOUT": ("upstream.headers_timeout_s", float),
    "IDLE_TIMEOUT": ("upstream.idle_timeout_s", float),
    "TOTAL_TIMEOUT": ("upstream.total_timeout_s", float),
    "UPSTREAM_KEEPALIVE": ("upstream.keepalive_s", float),
    "UPSTREAM_MAX_CONNECTIONS": ("upstream.max_connections", int),
    "MAX_RETRIES": ("upstream.max_retries", int),
    "RETRY_DELAY": ("upstream.retry_delay_s", float),
    "PROBE_INTERVAL": ("upstream.probe_interval_s", float),
    "MAX_REQUESTS_PER_MINUTE": ("limits.requests_per_minute", float),
    "RATE_LIMIT_BURST": ("limits.burst", int),
    "CLIENT_REQUESTS_PER_MINUTE": ("limits.client_requests_per_minute", float),
    "CLIENT_RATE_LIMIT_BURST": ("limits.client_burst", int),
    "CLIENT_TOKENS_PER_MINUTE": ("limits.client_tokens_per_minute", float),
    "OLLAMA_NUM_PARALLEL": ("limits.parallel", int),
    "MAX_QUEUE": ("limits.max_queue", int),
    "MAX_QUEUE_PER_CLIENT": ("limits.max_queue_per_client", int),
    "QUEUE_TIMEOUT": ("limits.queue_timeout_s", float),
    "MAX_CONTEXT_LENGTH": ("limits.max_context_length", int),
    "ENABLE_STREAMING": ("limits.enable_streaming", _parse_bool),
    "PROXY_API_KEYS": ("auth.api_keys", _parse_api_keys),
    "PROXY_ADMIN_KEY": ("auth.admin_key", str),
    "ALLOW_ANONYMOUS": ("auth.allow_anonymous", _parse_bool),
    "ALLOWED_MODELS": ("models.allowlist", _parse_list),
    "LOG_LEVEL": ("logging.level", str),
    "LOG_FORMAT": ("logging.format", str),
}


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
        section, key = key_path.split(".")
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{section}: expected a mapping")
        node[key] = value
    return parse_config(raw)


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Build and validate a config from a mapping shaped like ``config.yaml``."""
    config = typing.cast(Config, _build(Config, dict(raw), ""))
    _validate(config)
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


def is_loopback(host: str) -> bool:
    """Whether ``host`` can only be reached from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _is_key(key: str) -> bool:
    """What a client can send in a header: visible ASCII (RFC 9110 field values)."""
    return all("!" <= c <= "~" for c in key)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate(config: Config) -> None:
    _validate_server(config.server)
    _validate_upstream(config.upstream)
    _validate_limits(config.limits)
    _validate_auth(config.auth)
    host = config.server.host
    _require(
        is_loopback(host) or bool(config.auth.api_keys) or config.auth.allow_anonymous,
        f"server.host: {host} is reachable from other machines and no client API key is "
        "configured, so anyone who reaches it could use the model: set client keys "
        "(PROXY_API_KEYS, auth.api_keys), or ALLOW_ANONYMOUS=true (auth.allow_anonymous) "
        "to serve without keys knowingly, or listen on 127.0.0.1",
    )
    _require(
        config.logging.level.lower() in {"debug", "info", "warning", "error"},
        "logging.level: must be one of debug, info, warning, error",
    )
    _require(
        config.logging.format in {"auto", "json", "console"},
        "logging.format: must be one of auto, json, console",
    )


def _validate_server(server: ServerConfig) -> None:
    _require(1 <= server.port <= 65535, "server.port: must be between 1 and 65535")
    _require(server.drain_timeout_s >= 0, "server.drain_timeout_s: must be >= 0")
    _require(server.send_timeout_s >= 0, "server.send_timeout_s: must be >= 0")
    _require(server.header_timeout_s >= 0, "server.header_timeout_s: must be >= 0 (0 = off)")
    _require(server.body_timeout_s >= 0, "server.body_timeout_s: must be >= 0 (0 = off)")
    _require(server.max_connections >= 1, "server.max_connections: must be >= 1")
    _require(server.max_body_bytes >= 1024, "server.max_body_bytes: must be at least 1024")
    for i, cidr in enumerate(server.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            raise ConfigError(f"server.trusted_proxies[{i}]: {exc}") from exc


def _validate_upstream(upstream: UpstreamConfig) -> None:
    _require(upstream.kind in {"ollama", "openai"}, "upstream.kind: must be ollama or openai")
    parts = urlsplit(upstream.url)
    _require(
        parts.scheme in {"http", "https"} and bool(parts.hostname),
        f"upstream.url: expected http(s)://host[:port], got {upstream.url!r}",
    )
    _require(bool(upstream.default_model), "upstream.default_model: must not be empty")
    for name in ("connect_timeout_s", "headers_timeout_s", "idle_timeout_s", "probe_interval_s"):
        _require(getattr(upstream, name) > 0, f"upstream.{name}: must be > 0")
    _require(upstream.total_timeout_s >= 0, "upstream.total_timeout_s: must be >= 0 (0 = off)")
    _require(upstream.keepalive_s >= 0, "upstream.keepalive_s: must be >= 0 (0 = no reuse)")
    _require(
        1 <= upstream.max_connections <= 10_000,
        "upstream.max_connections: must be between 1 and 10000",
    )
    _require(0 <= upstream.max_retries <= 10, "upstream.max_retries: must be between 0 and 10")
    _require(upstream.retry_delay_s >= 0, "upstream.retry_delay_s: must be >= 0")
    _require(
        upstream.retry_max_delay_s >= upstream.retry_delay_s,
        "upstream.retry_max_delay_s: must be >= upstream.retry_delay_s",
    )


def _validate_limits(limits: LimitsConfig) -> None:
    _require(limits.requests_per_minute > 0, "limits.requests_per_minute: must be > 0")
    _require(limits.burst >= 1, "limits.burst: must be >= 1")
    _require(
        limits.client_requests_per_minute >= 0,
        "limits.client_requests_per_minute: must be >= 0 (0 = the global limit)",
    )
    _require(limits.client_burst >= 0, "limits.client_burst: must be >= 0 (0 = the global burst)")
    _require(limits.client_tokens_per_minute >= 0, "limits.client_tokens_per_minute: >= 0")
    _require(limits.max_clients >= 1, "limits.max_clients: must be >= 1")
    _require(1 <= limits.parallel <= 1024, "limits.parallel: must be between 1 and 1024")
    _require(limits.max_queue >= 0, "limits.max_queue: must be >= 0")
    _require(limits.max_queue_per_client >= 1, "limits.max_queue_per_client: must be >= 1")
    _require(limits.queue_timeout_s > 0, "limits.queue_timeout_s: must be > 0")
    _require(limits.max_context_length >= 0, "limits.max_context_length: >= 0 (0 = off)")
    _require(limits.default_max_tokens >= 1, "limits.default_max_tokens: must be >= 1")


def _validate_auth(auth: AuthConfig) -> None:
    names: set[str] = set()
    secrets: set[str] = set()
    for i, api_key in enumerate(auth.api_keys):
        path = f"auth.api_keys[{i}]"
        _require(bool(api_key.name), f"{path}.name: must not be empty")
        _require(
            api_key.name != "admin",
            f"{path}.name: 'admin' names the admin key (auth.admin_key, PROXY_ADMIN_KEY); "
            "give this client key another name",
        )
        _require(len(api_key.key) >= 8, f"{path}.key: must be at least 8 characters")
        _require(_is_key(api_key.key), f"{path}.key: visible ASCII characters only, no spaces")
        _require(api_key.name not in names, f"{path}.name: duplicate name {api_key.name!r}")
        _require(api_key.key not in secrets, f"{path}.key: the same key is listed twice")
        _require(api_key.requests_per_minute >= 0, f"{path}.requests_per_minute: >= 0")
        _require(api_key.burst >= 0, f"{path}.burst: must be >= 0")
        _require(api_key.tokens_per_minute >= 0, f"{path}.tokens_per_minute: >= 0")
        names.add(api_key.name)
        secrets.add(api_key.key)
    admin = auth.admin_key
    _require(not admin or len(admin) >= 8, "auth.admin_key: must be at least 8 characters")
    _require(not admin or _is_key(admin), "auth.admin_key: visible ASCII characters only")
    _require(admin not in secrets, "auth.admin_key: must differ from every API key")


def from_env() -> Config:
    """The config a server started from a shell would use."""
    return load_config(default_config_path(os.environ), os.environ)
