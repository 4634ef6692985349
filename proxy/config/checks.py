"""What the configuration must satisfy beyond its types: ranges, names, URLs, and that a
gateway reachable from other machines has client keys."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from proxy.config.tree import (
    AuthConfig,
    BackendConfig,
    Config,
    ConfigError,
    LimitsConfig,
    ServerConfig,
    SharedConfig,
    UpstreamConfig,
)


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


def validate(config: Config) -> None:
    _validate_server(config.server)
    _validate_upstream(config.upstream)
    _validate_limits(config.limits)
    _validate_auth(config.auth)
    _validate_backends(config.backends)
    _validate_shared(config.shared)
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


_BACKEND_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


def _validate_backends(backends: tuple[BackendConfig, ...]) -> None:
    names: set[str] = set()
    for i, backend in enumerate(backends):
        path = f"backends[{i}]"
        _require(
            bool(_BACKEND_NAME.fullmatch(backend.name)),
            f"{path}.name: 1 to 32 of a-z, 0-9, '_', '.', '-' (it is a metric label), "
            f"got {backend.name!r}",
        )
        _require(backend.name not in names, f"{path}.name: duplicate name {backend.name!r}")
        names.add(backend.name)
        _check_url(f"{path}.url", backend.url)
        _require(backend.kind in {"ollama", "openai"}, f"{path}.kind: must be ollama or openai")
        _require(1 <= backend.slots <= 1024, f"{path}.slots: must be between 1 and 1024")
        _require(0 <= backend.priority <= 1000, f"{path}.priority: must be between 0 and 1000")
        _require(not backend.api_key or _is_key(backend.api_key), f"{path}.api_key: visible ASCII")


def _validate_shared(shared: SharedConfig) -> None:
    if shared.redis_url:
        parts = urlsplit(shared.redis_url)
        _require(
            parts.scheme in {"redis", "rediss", "unix"},
            "shared.redis_url: expected redis://[:password@]host[:port][/db], rediss:// or unix://",
        )
    _require(shared.on_failure in {"open", "closed"}, "shared.on_failure: must be open or closed")
    _require(0 < shared.timeout_s <= 10, "shared.timeout_s: must be > 0 and at most 10")
    _require(1 <= shared.lease_s <= 300, "shared.lease_s: must be between 1 and 300")
    _require(1 <= shared.replicas <= 1000, "shared.replicas: must be between 1 and 1000")
    _require(
        not shared.replica or bool(_BACKEND_NAME.fullmatch(shared.replica)),
        "shared.replica: 1 to 32 of a-z, 0-9, '_', '.', '-'",
    )


def _check_url(path: str, url: str) -> None:
    parts = urlsplit(url)
    _require(
        parts.scheme in {"http", "https"} and bool(parts.hostname),
        f"{path}: expected http(s)://host[:port], got {url!r}",
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
    _check_url("upstream.url", upstream.url)
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
