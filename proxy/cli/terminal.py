"""``python -m proxy chat``: a streaming chat with a model through the gateway, in a terminal.

It speaks ``/v1/chat/completions`` with ``stream: true``, which the gateway serves for both
Ollama and OpenAI-compatible upstreams, and keeps the conversation for the session. Tokens
are printed as they arrive; after each answer a dim line gives the time to first token,
the tokens and the tokens per second. Commands: ``/model NAME``, ``/system TEXT``,
``/reset``, ``/help``, ``/exit`` (or end of input). Ctrl-C stops an answer; at the prompt
it ends the chat.

The exit status is 0 when every question was answered and 1 when one was not, so a piped
``echo "hi" | python -m proxy chat`` can be used in a script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import aiohttp

from proxy.cli.conversation import Conversation, ask
from proxy.config import UpstreamConfig

DEFAULT_URL = "http://localhost:8000"
COMMANDS = "/model NAME, /system TEXT, /reset, /help, /exit"
# A cold model load on a small CPU box can take minutes before the first token.
READ_TIMEOUT_S = 900.0

ReadLine = Callable[[], Awaitable[str | None]]


def command(chat: Conversation, line: str, out: TextIO) -> bool:
    """Apply a ``/command``; False when it ends the chat."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/model":
        if arg:
            chat.model = arg
        out.write(f"model: {chat.model}\n")
    elif name == "/system":
        chat.system = arg or None
        out.write("system prompt set\n" if arg else "system prompt cleared\n")
    elif name == "/reset":
        chat.history.clear()
        out.write("history cleared\n")
    elif name == "/help":
        out.write(f"commands: {COMMANDS}; Ctrl-C stops an answer\n")
    else:
        out.write(f"unknown command {name}; commands: {COMMANDS}\n")
    out.flush()
    return True


async def converse(chat: Conversation, read_line: ReadLine, out: TextIO, err: TextIO) -> int:
    """The session: read a line, run a command or ask it, until /exit or end of input."""
    failed = False
    headers = {"Authorization": f"Bearer {chat.api_key}"} if chat.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=READ_TIMEOUT_S)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        while (line := await read_line()) is not None:
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not command(chat, line, out):
                    break
                continue
            chat.history.append({"role": "user", "content": line})
            if not await _interruptible(ask(http, chat, out, err), out):
                chat.history.pop()  # unanswered: the next question goes without it
                failed = True
    return 1 if failed else 0


async def _interruptible(turn: Awaitable[bool], out: TextIO) -> bool:
    """Run one turn; Ctrl-C cancels the turn (the gateway stops the model), not the chat."""
    task = asyncio.ensure_future(turn)
    loop = asyncio.get_running_loop()
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, interrupt)
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        return await task
    try:
        return await task
    except asyncio.CancelledError:
        if not interrupted:
            raise
        out.write("\n[answer interrupted]\n")
        return False
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def stdin_reader(prompt: str) -> ReadLine:
    """Lines from stdin, read in a daemon thread so that exiting never waits for a keypress."""

    async def read_line() -> str | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()

        def settle(value: str | None) -> None:
            if not future.done():
                future.set_result(value)

        def work() -> None:
            try:
                line: str | None = input(prompt) if prompt else sys.stdin.readline() or None
            except EOFError:
                line = None
            loop.call_soon_threadsafe(settle, line)

        threading.Thread(target=work, daemon=True).start()
        return await future

    return read_line


async def gateway_default_model(url: str) -> str | None:
    """The model the gateway itself defaults to (its /health says), if it answers."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(url + "/health") as response,
        ):
            body = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    model = body.get("default_model") if isinstance(body, dict) else None
    return model if isinstance(model, str) and model else None


async def _session(chat: Conversation, interactive: bool) -> int:
    if not chat.model:
        chat.model = await gateway_default_model(chat.url) or UpstreamConfig().default_model
    if interactive:
        print(f"chatting with {chat.model} through {chat.url}; {COMMANDS}")
    return await converse(chat, stdin_reader(">>> " if interactive else ""), sys.stdout, sys.stderr)


def run_chat(args: argparse.Namespace) -> int:
    chat = Conversation(
        url=(args.url or os.environ.get("GATEWAY_URL") or DEFAULT_URL).rstrip("/"),
        api_key=args.api_key or os.environ.get("PROXY_API_KEY") or None,
        model=args.model or os.environ.get("OLLAMA_MODEL") or "",
        system=args.system,
    )
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history where available
            import readline  # noqa: F401
    try:
        return asyncio.run(_session(chat, interactive))
    except KeyboardInterrupt:
        print()
        return 130


def add_parser(subparsers: Any) -> None:
    """Register ``chat``."""
    parser = subparsers.add_parser("chat", help="chat with a model through the gateway")
    parser.add_argument("--url", help=f"gateway URL (default: $GATEWAY_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", help="a client API key (default: $PROXY_API_KEY)")
    parser.add_argument(
        "--model", help="model (default: $OLLAMA_MODEL, else the gateway's default model)"
    )
    parser.add_argument("--system", help="system prompt for the conversation")
    parser.set_defaults(run=run_chat)
