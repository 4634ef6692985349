"""Running the gateway: its listening sockets, its event loop, the aiohttp runner, and a
drained stop. ``python -m proxy serve`` and the demo both start the gateway here.

    sockets = open_sockets(config)                  # bound before anything slow starts
    run_in_loop(run_gateway(config, sockets, until=stop_signal()))
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import structlog
from aiohttp import web

from proxy import __version__
from proxy.app import create_app
from proxy.config import Config
from proxy.connections import GatewayRunner
from proxy.gateway import GATEWAY
from proxy.listen import listening_sockets, send_timeout_supported
from proxy.log import configure_logging

log = structlog.get_logger("proxy")
T = TypeVar("T")
SHUTDOWN_RESIDUE_S = 0.2
LINGERING_S = 1.0


def serve(config: Config) -> int:
    """``python -m proxy serve``: run until SIGTERM or SIGINT, then drain. The exit status."""
    configure_logging(config.logging.level, config.logging.format)
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
        sockets = open_sockets(config)
    except OSError as exc:
        reason = exc.strerror or str(exc)  # "Address already in use": no traceback needed
        log.error("cannot_listen", host=server.host, port=server.port, error=reason)  # noqa: TRY400
        return 1
    try:
        run_in_loop(run_gateway(config, sockets, until=stop_signal()))
    finally:
        for sock in sockets:
            sock.close()
    log.info("gateway_stopped")
    return 0


def open_sockets(config: Config) -> list[socket.socket]:
    """The gateway's listening sockets, bound now (``OSError`` when the port is taken)."""
    server = config.server
    return listening_sockets(server.host, server.port, send_timeout_s=server.send_timeout_s)


async def run_gateway(config: Config, sockets: list[socket.socket], *, until: Awaitable[T]) -> T:
    """Serve on ``sockets`` until ``until`` completes (or this task is cancelled), then stop
    accepting and give in-flight requests ``server.drain_timeout_s`` to finish. What
    ``until`` gave."""
    runner = gateway_runner(create_app(config))
    await runner.setup()
    try:
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        log.info("gateway_ready", host=config.server.host, port=config.server.port)
        return await until
    finally:
        await runner.cleanup()


def gateway_runner(app: web.Application, **kwargs: Any) -> GatewayRunner:
    """The runner for the gateway's app, as ``serve``, the demo and the tests run it."""
    gateway = app[GATEWAY]
    options: dict[str, Any] = {
        # A client that goes away cancels its handler, which closes the upstream request,
        # so Ollama stops generating (and the server behaves as aiohttp's test server does).
        "handler_cancellation": True,
        # The app drains for server.drain_timeout_s when it shuts down (proxy.shutdown);
        # what aiohttp's own wait then finds is cancelled at once.
        "shutdown_timeout": SHUTDOWN_RESIDUE_S,
        # After an answer to a request whose body was not all read (408, 413), aiohttp
        # reads and drops the rest for this long before closing: 10 s by default, time a
        # slow client would hold the connection for.
        "lingering_time": LINGERING_S,
        "access_log": None,
        **kwargs,
    }
    return GatewayRunner(app, gateway.config.server, gateway.metrics, **options)


async def stop_signal() -> signal.Signals:
    """Wait for the first SIGTERM or SIGINT; the signal."""
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[signal.Signals] = loop.create_future()

    def stop(sig: signal.Signals) -> None:
        if not stopped.done():
            log.info("gateway_stopping", signal=sig.name)
            stopped.set_result(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await stopped
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run_in_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop: uvloop's, a cheaper turn for every
    chunk relayed, where it is installed."""
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(main)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _per_client(config: Config) -> str:
    limits = config.limits
    if not limits.client_requests_per_minute and not limits.client_burst:
        return "the global limit"
    per_minute = limits.client_requests_per_minute or limits.requests_per_minute
    return f"{per_minute:g}/min (burst {limits.client_burst or limits.burst})"


def describe(config: Config) -> str:
    """What ``serve`` would run with, in words (``check-config``)."""
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
            f"global, {_per_client(c)} per client",
            f"gate              {c.limits.parallel} slot(s), queue {c.limits.max_queue} "
            f"({c.limits.max_queue_per_client} per client), wait <= {c.limits.queue_timeout_s:g} s",
            f"api keys          {keys}",
            f"admin routes      {'enabled' if c.auth.admin_key else 'disabled'}",
        ]
    )
