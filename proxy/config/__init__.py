"""The gateway's configuration: the typed tree (``tree``), loading it from ``config.yaml``
and the environment (``load``, ``env``), and what it must satisfy (``checks``)."""

from proxy.config.checks import is_loopback
from proxy.config.env import ENV_OVERRIDES
from proxy.config.load import default_config_path, from_env, load_config, parse_config
from proxy.config.tree import (
    DEFAULT_BACKEND,
    ApiKey,
    AuthConfig,
    BackendConfig,
    Config,
    ConfigError,
    LimitsConfig,
    LoggingConfig,
    ModelsConfig,
    ServerConfig,
    SharedConfig,
    UpstreamConfig,
    backends_of,
)

__all__ = [
    "DEFAULT_BACKEND",
    "ENV_OVERRIDES",
    "ApiKey",
    "AuthConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "LoggingConfig",
    "ModelsConfig",
    "ServerConfig",
    "SharedConfig",
    "UpstreamConfig",
    "backends_of",
    "default_config_path",
    "from_env",
    "is_loopback",
    "load_config",
    "parse_config",
]
