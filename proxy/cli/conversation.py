"""One turn of the terminal chat: the conversation so far, the question sent to the gateway's
``/v1/chat/completions`` with ``stream: true``, the answer printed as it streams, and what
to tell the person afterwards (the stats line, or why the gateway did not answer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

from proxy.dialects import error_message, error_text
from proxy.frames import iter_frames, json_object

_DIM, _RESET = "\x1b[2m", "\x1b[0m"


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
        if data.startswith(b"[DONE]"):
            answer.done = answer.error is None
            break
        obj = json_object(data)
        if obj is None:
            continue
        if (error := error_text(obj)) is not None:
            answer.error = error
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
