"""What differs between the three routes a load test drives: the request body, and how the
answer (one JSON document, NDJSON lines or SSE events) carries its text, token counts and end.

- ``chat``: the gateway's own ``/chat``; statistics as ``prompt_tokens``/``completion_tokens``.
- ``ollama``: native ``/api/chat``; statistics on the ``done: true`` line (a missing field
  is zero, Ollama omits zeros).
- ``openai``: ``/v1/chat/completions``; ``usage`` in the body, or in the last SSE event when
  ``stream_options.include_usage`` is sent (it always is here).

The parsers are pure: bytes in, facts out, so they are tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.dialects import error_text
from proxy.frames import FrameSplitter, json_object

PATHS = {"chat": "/chat", "ollama": "/api/chat", "openai": "/v1/chat/completions"}


def request_body(
    dialect: str, prompt: str, *, model: str | None, stream: bool, max_tokens: int | None
) -> dict[str, Any]:
    """The JSON body asking ``dialect``'s route for one answer to ``prompt``."""
    if dialect == "chat":
        body: dict[str, Any] = {"prompt": prompt, "stream": stream}
        if model:
            body["model"] = model  # else the gateway's default model
        if max_tokens:
            body["options"] = {"num_predict": max_tokens}
        return body
    messages = [{"role": "user", "content": prompt}]
    body = {"model": model, "messages": messages, "stream": stream}
    if dialect == "ollama":
        if max_tokens:
            body["options"] = {"num_predict": max_tokens}
        return body
    if dialect != "openai":
        raise ValueError(f"unknown dialect {dialect!r}")
    if stream:
        body["stream_options"] = {"include_usage": True}
    if max_tokens:
        body["max_tokens"] = max_tokens
    return body


@dataclass(slots=True)
class Reply:
    """What one answer said about itself."""

    content_chunks: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    eval_tokens_per_s: float | None = None  # the upstream's decode speed, where it reports one
    complete: bool = False  # done: true, [DONE], or a whole JSON document
    error: str | None = None


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _apply_stats(dialect: str, obj: dict[str, Any], reply: Reply) -> None:
    if dialect == "chat":
        reply.prompt_tokens = _int(obj.get("prompt_tokens"))
        reply.completion_tokens = _int(obj.get("completion_tokens"))
        tps = obj.get("tokens_per_second")
        reply.eval_tokens_per_s = float(tps) if isinstance(tps, int | float) else None
    elif dialect == "ollama":
        reply.prompt_tokens = _int(obj.get("prompt_eval_count"))
        reply.completion_tokens = _int(obj.get("eval_count"))
        eval_ns = _int(obj.get("eval_duration"))
        if reply.completion_tokens and eval_ns:
            reply.eval_tokens_per_s = reply.completion_tokens / (eval_ns / 1e9)
    else:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            reply.prompt_tokens = _int(usage.get("prompt_tokens"))
            reply.completion_tokens = _int(usage.get("completion_tokens"))


def _text(dialect: str, obj: dict[str, Any], *, streamed: bool) -> str:
    if dialect == "chat":
        return str(obj.get("response") or "")
    if dialect == "ollama":
        return str((obj.get("message") or {}).get("content") or "")
    choices = obj.get("choices") or [{}]
    part = choices[0].get("delta" if streamed else "message") or {}
    return str(part.get("content") or "")


def parse_document(dialect: str, body: bytes) -> Reply:
    """A non-streamed answer (or an error body)."""
    reply = Reply()
    try:
        obj = orjson.loads(body)
    except ValueError:
        reply.error = "the body is not JSON"
        return reply
    if not isinstance(obj, dict):
        reply.error = "the body is not a JSON object"
    elif (error := error_text(obj)) is not None:
        reply.error = error
    else:
        reply.content_chunks = 1 if _text(dialect, obj, streamed=False) else 0
        _apply_stats(dialect, obj, reply)
        reply.complete = True
    return reply


class StreamParser:
    """Feeds on a streamed body chunk by chunk, whatever the chunking; fills in ``reply``."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.reply = Reply()
        self._sse = dialect == "openai"
        self._frames = FrameSplitter(sse=self._sse)

    def feed(self, chunk: bytes) -> int:
        """Parse the complete frames in ``chunk``; returns how many carried content."""
        before = self.reply.content_chunks
        for frame in self._frames.feed(chunk):
            self._frame(frame)
        return self.reply.content_chunks - before

    def finish(self) -> None:
        """The body ended: parse what is left (a last line without its newline)."""
        for frame in self._frames.finish():
            self._frame(frame)

    def _frame(self, frame: bytes) -> None:
        if self._sse and frame.startswith(b"[DONE]"):
            self.reply.complete = self.reply.error is None
            return
        obj = json_object(frame)
        if obj is None:
            return
        if (error := error_text(obj)) is not None:
            self.reply.error = error
            return
        if _text(self.dialect, obj, streamed=True):
            self.reply.content_chunks += 1
        if self._sse:
            if isinstance(obj.get("usage"), dict):
                _apply_stats(self.dialect, obj, self.reply)
        elif obj.get("done") is True:
            _apply_stats(self.dialect, obj, self.reply)
            self.reply.complete = True
