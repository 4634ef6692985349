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
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

from proxy.config import UpstreamConfig
from proxy.dialects import error_message
from proxy.streams import iter_frames

DEFAULT_URL = "http://localhost:8000"
COMMANDS = "/model NAME, /system TEXT, /reset, /help, /exit"
# A cold model load on a small CPU box can take minutes before the first token.
READ_TIMEOUT_S = 900.0
_DIM, _RESET = "\x1b[2m", "\x1b[0m"

ReadLine = Callable[[], Awaitable[str | None]]


@dataclass
class Conversation:
    url: str
    api_key: str | None
    model: str
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def request_body(self) -> dict[str, Any]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return {
            "model": self.model,
            "messages": system + self.history,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


@dataclass
class Answer:
    parts: list[str] = field(default_factory=list)
    content_chunks: int = 0
    completion_tokens: int | None = None  # from usage, when the server sends it
    first_token_at: float | None = None
    done: bool = False
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


def stats_line(
    ttft_s: float | None, tokens: int, decode_s: float | None, *, estimated: bool
) -> str:
    """``ttft 210 ms, 42 tokens, 18.3 tokens/s`` (a TTFT of a second or more in seconds);
    ``~`` marks a count of chunks, not tokens."""
    if ttft_s is None:
        parts = ["no tokens"]
    elif ttft_s < 0.9995:  # what would round to "1000 ms" reads better as "1.00 s"
        parts = [f"ttft {ttft_s * 1000:.0f} ms"]
    else:
        parts = [f"ttft {ttft_s:.2f} s"]
    parts.append(f"{'~' if estimated else ''}{tokens} tokens")
    if decode_s and tokens > 1:
        parts.append(f"{tokens / decode_s:.1f} tokens/s")
    return ", ".join(parts)


def refusal(status: int, message: str, retry_after: str | None) -> str:
    """What to tell the person when the gateway did not take the question."""
    retry = f"; retry after {retry_after} s" if retry_after else ""
    if status in (401, 403):
        return (
            f"the gateway refused the request (HTTP {status}): {message}\n"
            "hint: pass --api-key or set PROXY_API_KEY to a key the gateway knows"
        )
    if status == 429:
        return f"rate limited (HTTP 429): {message}{retry}"
    if status == 503:
        return f"the gateway is busy (HTTP 503): {message}{retry}"
    return f"the gateway answered HTTP {status}: {message}"


async def stream_answer(response: aiohttp.ClientResponse, out: TextIO) -> Answer:
    """Print the answer's tokens as they arrive and collect what the stream said."""
    answer = Answer()
    async for data in iter_frames(response.content, sse=True):
        if data == b"[DONE]":
            answer.done = answer.error is None
            break
        try:
            obj = json.loads(data)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if error := obj.get("error"):
            answer.error = str(error.get("message") if isinstance(error, dict) else error)
            break
        usage = obj.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            answer.completion_tokens = usage["completion_tokens"]
        for choice in obj.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") or ""
            if text:
                if answer.first_token_at is None:
                    answer.first_token_at = time.perf_counter()
                answer.content_chunks += 1
                answer.parts.append(text)
                out.write(text)
                out.flush()
    return answer


async def ask(http: aiohttp.ClientSession, chat: Conversation, out: TextIO, err: TextIO) -> bool:
    """One question and its streamed answer; False (with a message on ``err``) if it failed."""
    started = time.perf_counter()
    try:
        async with http.post(chat.url + "/v1/chat/completions", json=chat.request_body()) as r:
            if r.status != 200:
                message = error_message(await r.text(), r.reason or "")
                err.write(refusal(r.status, message, r.headers.get("Retry-After")) + "\n")
                return False
            answer = await stream_answer(r, out)
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or str(exc.os_error)
        err.write(
            f"cannot reach the gateway at {chat.url}: {reason}\n"
            "is it running (just up), and is --url (or $GATEWAY_URL) right?\n"
        )
        return False
    except (aiohttp.ClientError, TimeoutError) as exc:
        err.write(f"\nthe connection to the gateway failed: {type(exc).__name__} {exc}\n")
        return False
    ended = time.perf_counter()
    if answer.text and not answer.text.endswith("\n"):
        out.write("\n")
    if answer.error is not None:
        err.write(f"error: the answer was cut short: {answer.error}\n")
        return False
    if not answer.done:
        err.write("error: the answer ended early (the stream closed without [DONE])\n")
        return False
    chat.history.append({"role": "assistant", "content": answer.text})
    first = answer.first_token_at
    tokens = answer.completion_tokens
    line = stats_line(
        first - started if first is not None else None,
        tokens if tokens is not None else answer.content_chunks,
        ended - first if first is not None else None,
        estimated=tokens is None,
    )
    out.write(f"{_DIM}{line}{_RESET}\n" if out.isatty() else line + "\n")
    out.flush()
    return True


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
