"""``python -m proxy demo``: no Docker, no Ollama. SmolLM2 on llama.cpp, the gateway in front.

The engine (``proxy.cli.engine``) runs as a child process on a loopback port; the gateway
runs in this process, started as ``serve`` starts it (``proxy.server``) and configured as
usual (``config.yaml``, then the environment) except that its upstream is the engine
(``upstream.kind: openai``). Ctrl-C or SIGTERM stops the gateway, then the engine; a second
Ctrl-C while stopping is ignored so that nothing is left behind.

``--check`` only starts the engine, generates one token and stops it (``just engine`` runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable
from typing import Any

from proxy.cli.engine import (
    ALIAS,
    EngineError,
    EngineSettings,
    default_threads,
    exit_cause,
    running_engine,
)
from proxy.config import Config, ConfigError, LimitsConfig, default_config_path, load_config

DEFAULT_PORT = 8000
# A demo stops at once; a deployed gateway drains for server.drain_timeout_s.
DEMO_DRAIN_S = 5.0


def add_parser(subparsers: Any) -> None:
    """Register ``demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="SmolLM2-135M on llama.cpp with the gateway in front: no Docker, no Ollama",
        description="SmolLM2-135M on llama.cpp with the gateway in front: no Docker, no Ollama.",
    )
    parser.add_argument(
        "--check", action="store_true", help="start the engine, generate one token, stop"
    )
    parser.add_argument("--host", default="127.0.0.1", help="gateway address (127.0.0.1)")
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"gateway port ({DEFAULT_PORT})"
    )
    parser.add_argument(
        "--ctx", type=_at_least(256), default=2048, help="engine context size (2048)"
    )
    parser.add_argument(
        "--threads",
        type=_at_least(1),
        default=default_threads(),
        help=f"engine threads (CPUs, at most 4: {default_threads()})",
    )
    parser.set_defaults(run=run_demo)


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError("must be between 1 and 65535")
    return port


def _at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}")
        return value

    return parse


def demo_config(base: Config, engine_url: str) -> Config:
    """The configured gateway, pointed at the engine; a demo stops without a long drain."""
    upstream = dataclasses.replace(
        base.upstream, kind="openai", url=engine_url, default_model=ALIAS, api_key=""
    )
    server = dataclasses.replace(
        base.server, drain_timeout_s=min(base.server.drain_timeout_s, DEMO_DRAIN_S)
    )
    return dataclasses.replace(base, upstream=upstream, server=server)


def next_steps(gateway_url: str, limits: LimitsConfig) -> str:
    """What to try, with the commands spelled out for this gateway's URL."""
    hi = [{"role": "user", "content": "Hi!"}]
    url = "" if gateway_url == f"http://localhost:{DEFAULT_PORT}" else f" --url {gateway_url}"
    post = "-H 'Content-Type: application/json' -d"
    return "\n".join(
        [
            f"The gateway is ready on {gateway_url}, in front of SmolLM2-135M ({ALIAS}).",
            "Try, from another terminal:",
            f"  just chat{url} --model {ALIAS}",
            f"  curl -s {gateway_url}/v1/chat/completions {post} "
            + json_arg({"model": ALIAS, "messages": hi}),
            f"  curl -sN {gateway_url}/v1/chat/completions {post} "
            + json_arg({"model": ALIAS, "stream": True, "messages": hi}),
            f"  curl -sN {gateway_url}/chat {post} "
            + json_arg({"prompt": "Why is the sky blue?", "stream": True}),
            f"  just stress{url} --dialect openai --model {ALIAS}",
            f"  curl -s {gateway_url}/metrics | grep '^ollama_'",
            f"Limits (config.yaml, environment): {limits.requests_per_minute:g} requests/min "
            f"in bursts of {limits.burst}, {limits.parallel} at a time; past them, 429 or a wait.",
            "Ctrl-C stops the gateway and the engine.",
        ]
    )


def json_arg(obj: object) -> str:
    return shlex.quote(json.dumps(obj))


def say(text: str) -> None:
    print(text, flush=True)


def cannot_listen(host: str, port: int, exc: OSError) -> int:
    print(
        f"demo: cannot listen on {host}:{port} ({exc.strerror}); choose another port with --port",
        file=sys.stderr,
    )
    return 1


async def check(settings: EngineSettings) -> int:
    async with running_engine(settings, report=say):
        pass
    say("engine ok")
    return 0


async def serve(settings: EngineSettings, config: Config) -> int:
    from proxy.log import configure_logging
    from proxy.server import open_sockets, run_gateway

    host, port = config.server.host, config.server.port
    try:  # before the engine starts: fail early, and hold the port
        sockets = open_sockets(config)
    except OSError as exc:
        return cannot_listen(host, port, exc)
    try:
        async with running_engine(settings, report=say) as engine:
            config = demo_config(config, engine.url)
            configure_logging(config.logging.level, config.logging.format)

            async def until_the_engine_exits() -> int:
                shown = "localhost" if host in {"127.0.0.1", "0.0.0.0"} else host
                say(next_steps(f"http://{shown}:{port}", config.limits))
                return await engine.wait_exited()

            code = await run_gateway(config, sockets, until=until_the_engine_exits())
            print(
                f"demo: the engine exited unexpectedly ({exit_cause(code)}); its last "
                f"output:\n{engine.tail()}",
                file=sys.stderr,
            )
            return 1
    finally:
        for sock in sockets:
            sock.close()


async def run(args: argparse.Namespace, config: Config | None) -> int:
    """Run until done, or until SIGINT/SIGTERM cancels this task; then clean up."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if not stopping:  # stopping is bounded; a second signal must not cut it short
            stopping = True
            say("\nstopping...")
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    settings = EngineSettings(n_ctx=args.ctx, n_threads=args.threads)
    try:
        if config is None:
            return await check(settings)
        return await serve(settings, config)
    except EngineError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        if not stopping:
            raise
        say("stopped")
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_demo(args: argparse.Namespace) -> int:
    """``python -m proxy demo``: the exit status."""
    from proxy.server import run_in_loop

    config: Config | None = None
    if not args.check:
        try:
            base = load_config(args.config or default_config_path(os.environ), os.environ)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        server = dataclasses.replace(base.server, host=args.host, port=args.port)
        config = dataclasses.replace(base, server=server)
    return run_in_loop(run(args, config))
