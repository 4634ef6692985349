"""The environment's names for config keys, and how each value is read from text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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


_BACKEND_OPTIONS = {"kind": str, "api_key": str, "slots": int, "priority": int}


def _parse_backends(text: str) -> list[dict[str, Any]]:
    """``name=url[;option=value...]``, comma-separated; options: kind, api_key, slots,
    priority. ``gpu=http://gpu-box:11434;slots=2,cpu=http://localhost:11434;priority=1``"""
    backends: list[dict[str, Any]] = []
    for i, item in enumerate(_parse_list(text), start=1):
        first, *options = item.split(";")
        name, equals, url = first.partition("=")
        where = f"entry {i} ({name.strip() or '?'})"
        if not equals or not name.strip() or not url.strip():
            raise ValueError(f"{where}: expected name=url[;option=value...]")
        entry: dict[str, Any] = {"name": name.strip(), "url": url.strip()}
        for option in options:
            key, equals, value = option.partition("=")
            key = key.strip()
            if not equals or key not in _BACKEND_OPTIONS:
                known = ", ".join(_BACKEND_OPTIONS)
                raise ValueError(f"{where}: unknown option {option!r} (options: {known})")
            try:
                entry[key] = _BACKEND_OPTIONS[key](value.strip())
            except ValueError:
                raise ValueError(f"{where}: {key} must be a whole number, got {value!r}") from None
        backends.append(entry)
    return backends


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
    "BACKENDS": ("backends", _parse_backends),
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
    "REDIS_URL": ("shared.redis_url", str),
    "SHARED_STATE_ON_FAILURE": ("shared.on_failure", str),
    "REDIS_TIMEOUT": ("shared.timeout_s", float),
    "SLOT_LEASE": ("shared.lease_s", float),
    "GATEWAY_REPLICAS": ("shared.replicas", int),
    "REPLICA_ID": ("shared.replica", str),
    "LOG_LEVEL": ("logging.level", str),
    "LOG_FORMAT": ("logging.format", str),
}
