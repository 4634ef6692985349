"""The command line: ``serve`` and ``check-config``, plus the client subcommands."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.config import Config, ConfigError, default_config_path, load_config

# Client subcommands: each module's add_parser(subparsers) registers its commands with
# set_defaults(run=<callable(args) -> int>); they run without loading the gateway's config.
CLIENT_MODULES = ("proxy.cli.ops", "proxy.cli.terminal")


def _load(path: str | None) -> Config:
    chosen = path if path is not None else default_config_path(os.environ)
    return load_config(chosen, os.environ)


def serve(config: Config) -> None:
    import structlog
    from aiohttp import web

    from proxy.app import create_app
    from proxy.listen import listening_sockets, send_timeout_supported
    from proxy.log import configure_logging

    configure_logging(config.logging.level, config.logging.format)
    log = structlog.get_logger("proxy")
    server = config.server
    log.info(
        "gateway_starting",
        version=__version__,
        host=server.host,
        port=server.port,
        upstream=config.upstream.url,
        upstream_kind=config.upstream.kind,
        slots=config.limits.parallel,
        api_keys=len(config.auth.api_keys),
        admin_routes=bool(config.auth.admin_key),
    )
    if server.send_timeout_s and not send_timeout_supported():
        log.warning("send_timeout_unsupported", detail="TCP_USER_TIMEOUT is Linux-only")
    try:
        sockets = listening_sockets(server.host, server.port, send_timeout_s=server.send_timeout_s)
    except OSError as exc:
        reason = exc.strerror or str(exc)  # "Address already in use": no traceback needed
        log.error("cannot_listen", host=server.host, port=server.port, error=reason)  # noqa: TRY400
        raise SystemExit(1) from None
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    web.run_app(
        create_app(config),
        sock=sockets,
        # A client that goes away cancels its handler, which closes the upstream request,
        # so Ollama stops generating (and run_app behaves as the test server does).
        handler_cancellation=True,
        shutdown_timeout=server.drain_timeout_s,
        access_log=None,
        print=lambda _msg: log.info("gateway_ready", host=server.host, port=server.port),
        loop=loop,
    )
    log.info("gateway_stopped")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _describe(config: Config) -> str:
    c = config
    keys = ", ".join(k.name for k in c.auth.api_keys) or "none (open to every client)"
    return "\n".join(
        [
            f"listen            {c.server.host}:{c.server.port}",
            f"upstream          {c.upstream.kind} at {c.upstream.url}",
            f"default model     {c.upstream.default_model}",
            f"timeouts          connect {c.upstream.connect_timeout_s:g} s, headers "
            f"{c.upstream.headers_timeout_s:g} s, idle {c.upstream.idle_timeout_s:g} s, total "
            f"{c.upstream.total_timeout_s:g} s (0 = off)",
            f"stuck clients     dropped after {c.server.send_timeout_s:g} s with sent data unread "
            "(0 = never)",
            f"retries           {c.upstream.max_retries} from {c.upstream.retry_delay_s:g} s",
            f"rate limits       {c.limits.requests_per_minute:g}/min (burst {c.limits.burst}) "
            f"global, {c.limits.client_requests_per_minute:g}/min (burst "
            f"{c.limits.client_burst}) per client",
            f"gate              {c.limits.parallel} slot(s), queue {c.limits.max_queue} "
            f"({c.limits.max_queue_per_client} per client), wait <= {c.limits.queue_timeout_s:g} s",
            f"api keys          {keys}",
            f"admin routes      {'enabled' if c.auth.admin_key else 'disabled'}",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxy",
        description="A gateway in front of Ollama: API keys, rate limits, a fair queue and "
        "metrics. serve runs it; the other commands check it or talk to it.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--config", help="YAML config file (default: $PROXY_CONFIG or ./config.yaml)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gateway")
    sub.add_parser("check-config", help="validate the configuration and exit")
    for name in CLIENT_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = getattr(args, "run", None)
    if run is not None:
        return int(run(args))
    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(_describe(config))
        print("config ok")
        return 0
    serve(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
