"""Operator commands for the deployed stack: ``status``, ``pull`` (``setup-model``) and ``warmup``.

``status`` lives in ``proxy.cli.stack`` (it asks the Docker Engine); ``pull`` and ``warmup`` talk to
the gateway over HTTP. Each async core takes its URL, key and output streams, so tests drive it
inside their own event loop (next to the gateway), while ``run_*`` wraps it in ``asyncio.run``.
With several backends behind the gateway, ``--backend`` names the one to act on; it travels
as the gateway's ``X-Backend`` header (issue 15).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, TextIO

import aiohttp

from proxy.cli.progress import PullProgress
from proxy.cli.stack import DEFAULT_PROJECT, run_status
from proxy.dialects import error_message

DEFAULT_URL = "http://localhost:8000"
DEFAULT_MODEL = "qwen2.5:7b-instruct-q4_0"
# A cold load of a 7B model from a slow disk on a small box can take minutes, and verifying a
# multi-GB layer sends nothing for a while; a dead peer still ends the read by closing the socket.
READ_TIMEOUT_S = 900.0
CONNECT_TIMEOUT_S = 10.0

ADMIN_HINT = (
    "hint: model management through the gateway needs its admin key: "
    "set PROXY_ADMIN_KEY (or pass --admin-key) to the gateway's auth.admin_key"
)
API_KEY_HINT = "hint: this gateway requires a client key: set PROXY_API_KEY (or pass --api-key)"
BACKEND_HEADER = "X-Backend"  # the gateway's name for it: proxy.admission.admit


def _timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
    )


def _headers(key: str | None, backend: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if backend:
        headers[BACKEND_HEADER] = backend
    return headers


async def _backend_names(session: aiohttp.ClientSession, url: str) -> list[str]:
    """The gateway's backends as its liveness answer lists them; empty when it does not."""
    try:
        async with session.get(f"{url}/health") as resp:
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return []
    backends = body.get("backends") if isinstance(body, dict) else None
    return [str(name) for name in backends] if isinstance(backends, dict) else []


async def _hint_backend(
    session: aiohttp.ClientSession, url: str, backend: str | None, err: TextIO
) -> None:
    """After a 400: when the gateway has several backends and none was named, or one it does
    not have, say which names it takes (asked of the gateway, not read from its message)."""
    names = await _backend_names(session, url)
    listed = ", ".join(names)
    if backend is None and len(names) > 1:
        err.write(
            f"hint: this gateway has several backends ({listed}): name the one to act on "
            "with --backend NAME or OLLAMA_BACKEND\n"
        )
    elif backend is not None and names and backend not in names:
        err.write(
            f"hint: the gateway has no backend '{backend}'; its backends: {listed} "
            "(--backend NAME or OLLAMA_BACKEND)\n"
        )


async def _report_refusal(
    resp: aiohttp.ClientResponse, err: TextIO, *, auth_hint: str, what: str
) -> int:
    message = error_message(await resp.text(), resp.reason or "")
    err.write(f"{what} failed: HTTP {resp.status}: {message}\n")
    if resp.status in (401, 403):
        err.write(auth_hint + "\n")
    elif resp.status in (429, 503) and resp.headers.get("Retry-After"):
        why = "rate limited" if resp.status == 429 else "busy"
        err.write(f"{why}: retry after {resp.headers['Retry-After']} s\n")
    return 1


def _connection_failed(url: str, what: str, exc: BaseException, err: TextIO) -> int:
    """2 when the gateway cannot be reached at all, 1 when an exchange with it broke."""
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError):
        err.write(
            f"cannot reach the gateway at {url}: {reason}\n"
            "is the stack up (just up), and is GATEWAY_URL or --url right?\n"
        )
        return 2
    err.write(f"{what} failed: the connection to the gateway broke: {reason}\n")
    return 1


async def pull(
    url: str,
    model: str,
    key: str | None,
    out: TextIO,
    *,
    backend: str | None = None,
    err: TextIO | None = None,
    is_tty: bool | None = None,
) -> int:
    """Stream ``/api/pull`` through the gateway (onto ``backend``, if named); 0 once Ollama
    says ``success``."""
    err = err if err is not None else sys.stderr
    progress = PullProgress(out, is_tty=out.isatty() if is_tty is None else is_tty)
    body = {"model": model, "stream": True}
    try:
        async with (
            aiohttp.ClientSession(timeout=_timeout()) as session,
            session.post(f"{url}/api/pull", json=body, headers=_headers(key, backend)) as resp,
        ):
            if resp.status != 200:
                code = await _report_refusal(resp, err, auth_hint=ADMIN_HINT, what="pull")
                if resp.status == 400:
                    await _hint_backend(session, url, backend, err)
                return code
            async for raw in resp.content:
                if not raw.strip():
                    continue
                try:
                    event = json.loads(raw)
                except ValueError:
                    event = {"error": f"unreadable progress line: {raw[:200]!r}"}
                if not isinstance(event, dict) or "error" in event:
                    progress.finish()
                    message = event.get("error") if isinstance(event, dict) else event
                    err.write(f"pull failed: {message}\n")
                    return 1
                progress.update(event)
                if event.get("status") == "success":
                    progress.finish()
                    out.write(f"{model} is ready{f' on {backend}' if backend else ''}\n")
                    return 0
    except (aiohttp.ClientError, TimeoutError) as exc:
        progress.finish()
        return _connection_failed(url, "pull", exc, err)
    progress.finish()
    err.write("pull failed: the stream ended before Ollama reported success\n")
    return 1


async def warmup(
    url: str,
    model: str,
    key: str | None,
    out: TextIO,
    *,
    backend: str | None = None,
    err: TextIO | None = None,
) -> int:
    """Load the model with an empty prompt (Ollama's documented way) and report how long it
    took; ``backend`` goes along as ``X-Backend``."""
    err = err if err is not None else sys.stderr
    body = {"model": model, "prompt": "", "stream": False}
    out.write(f"loading {model} ...\n")
    out.flush()
    started_s = time.monotonic()
    try:
        async with (
            aiohttp.ClientSession(timeout=_timeout()) as session,
            session.post(f"{url}/api/generate", json=body, headers=_headers(key, backend)) as resp,
        ):
            if resp.status != 200:
                code = await _report_refusal(resp, err, auth_hint=API_KEY_HINT, what="warmup")
                if resp.status == 404:
                    err.write(f"hint: pull it first: python -m proxy pull {model}\n")
                elif resp.status == 400:
                    await _hint_backend(session, url, backend, err)
                return code
            answer = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return _connection_failed(url, "warmup", exc, err)
    except ValueError:
        err.write("warmup failed: the gateway's answer is not JSON\n")
        return 1
    elapsed_s = time.monotonic() - started_s
    if isinstance(answer, dict) and "error" in answer:
        err.write(f"warmup failed: {answer['error']}\n")
        return 1
    out.write(f"{model} loaded in {elapsed_s:.1f} s\n")
    return 0


def model_of(args: argparse.Namespace) -> str:
    return str(args.model or os.environ.get("OLLAMA_MODEL") or DEFAULT_MODEL)


def url_of(args: argparse.Namespace) -> str:
    return str(args.url or os.environ.get("GATEWAY_URL") or DEFAULT_URL).rstrip("/")


def backend_of(args: argparse.Namespace) -> str | None:
    return args.backend or os.environ.get("OLLAMA_BACKEND") or None


def run_pull(args: argparse.Namespace) -> int:
    key = args.admin_key or os.environ.get("PROXY_ADMIN_KEY") or None
    return asyncio.run(
        pull(url_of(args), model_of(args), key, sys.stdout, backend=backend_of(args))
    )


def run_warmup(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("PROXY_API_KEY") or None
    return asyncio.run(
        warmup(url_of(args), model_of(args), key, sys.stdout, backend=backend_of(args))
    )


def _add_gateway_args(parser: argparse.ArgumentParser, backend_help: str) -> None:
    parser.add_argument(
        "model", nargs="?", help=f"model name (default: $OLLAMA_MODEL or {DEFAULT_MODEL})"
    )
    parser.add_argument("--url", help=f"gateway URL (default: $GATEWAY_URL or {DEFAULT_URL})")
    parser.add_argument(
        "--backend",
        metavar="NAME",
        help=f"{backend_help}, sent as {BACKEND_HEADER} (default: $OLLAMA_BACKEND)",
    )


def add_parser(subparsers: Any) -> None:
    """Register ``status``, ``pull`` (alias ``setup-model``) and ``warmup``."""
    status = subparsers.add_parser(
        "status", help="state, health, memory, restarts and OOM kills of the stack's containers"
    )
    status.add_argument(
        "--project",
        help=f"compose project name (default: $COMPOSE_PROJECT_NAME or {DEFAULT_PROJECT})",
    )
    status.add_argument(
        "--docker-host", help="Docker Engine URL (default: $DOCKER_HOST or the local socket)"
    )
    status.set_defaults(run=run_status)

    pull_parser = subparsers.add_parser(
        "pull", aliases=["setup-model"], help="download a model through the gateway"
    )
    _add_gateway_args(
        pull_parser, "the backend to download to (needed when the gateway has several)"
    )
    # The environment is the better place for keys: arguments show up in `ps`.
    pull_parser.add_argument("--admin-key", help="the gateway's admin key ($PROXY_ADMIN_KEY)")
    pull_parser.set_defaults(run=run_pull)

    warmup_parser = subparsers.add_parser(
        "warmup", help="load the model into memory and report the load time"
    )
    _add_gateway_args(warmup_parser, "the backend to load it on")
    warmup_parser.add_argument("--api-key", help="a client API key ($PROXY_API_KEY)")
    warmup_parser.set_defaults(run=run_warmup)
