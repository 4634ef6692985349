"""The typed, frozen configuration tree: every key, its type and its default."""

from __future__ import annotations

from dataclasses import dataclass, field


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
class BackendConfig:
    """One upstream server among several (``backends:``)."""

    name: str
    url: str
    kind: str = "ollama"
    api_key: str = field(default="", repr=False)
    slots: int = 1  # its OLLAMA_NUM_PARALLEL
    priority: int = 0  # lower is preferred


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
class SharedConfig:
    """State shared between gateway replicas through Redis (or Valkey); off without a URL."""

    redis_url: str = field(default="", repr=False)  # may hold a password
    on_failure: str = "open"  # open: each replica alone, on its share; closed: 503
    timeout_s: float = 0.25
    lease_s: float = 5.0
    replicas: int = 1
    replica: str = ""  # this replica's name in metrics and leases; empty: the host name


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    backends: tuple[BackendConfig, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    shared: SharedConfig = field(default_factory=SharedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


DEFAULT_BACKEND = "default"


def backends_of(config: Config) -> tuple[BackendConfig, ...]:
    """The upstream servers: the ``backends`` list, or else the one ``upstream`` (its URL,
    kind and key) with ``limits.parallel`` slots, named ``default``."""
    if config.backends:
        return config.backends
    upstream = config.upstream
    single = BackendConfig(
        name=DEFAULT_BACKEND,
        url=upstream.url,
        kind=upstream.kind,
        api_key=upstream.api_key,
        slots=config.limits.parallel,
    )
    return (single,)
