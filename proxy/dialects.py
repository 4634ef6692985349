"""What differs between Ollama's native API and the OpenAI-compatible API on the wire.

Error bodies before headers, and error frames after them: an ``{"error": "..."}`` NDJSON
line as Ollama itself writes, or a ``data: {"error": {...}}`` SSE event, which the OpenAI
SDK raises as ``APIError``. The one reader of either error shape, and of either dialect's
token statistics (``Usage``), for the gateway and its client tools alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from proxy.frames import json_object

JSON_CONTENT_TYPE = "application/json"
NDJSON_CONTENT_TYPE = "application/x-ndjson"
SSE_CONTENT_TYPE = "text/event-stream"

# OpenAI's error ``type`` by status, as the OpenAI API and Ollama's compatibility layer use it.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    openai_errors: bool  # error objects {"message","type","param","code"} vs Ollama's string
    sse: bool  # streams are SSE frames vs NDJSON lines

    @property
    def is_openai(self) -> bool:
        """Usage comes as OpenAI ``usage`` objects (``/v1/*``)."""
        return self.name == "openai"

    def error_body(self, status: int, message: str, code: str) -> bytes:
        """The JSON body of an error response sent before any other byte."""
        if self.openai_errors:
            error = {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "api_error"),
                "param": None,
                "code": code,
            }
            return json.dumps({"error": error}).encode()
        return json.dumps({"error": message}).encode()

    def error_frame(self, message: str, code: str) -> bytes:
        """The last frame of a stream that failed after its headers were sent."""
        if not self.openai_errors:
            return json.dumps({"error": message}).encode() + b"\n"
        error = {"message": message, "type": "api_error", "param": None, "code": code}
        line = json.dumps({"error": error}).encode()
        return b"data: " + line + b"\n\n" if self.sse else line + b"\n"


OLLAMA = Dialect("ollama", openai_errors=False, sse=False)
OPENAI = Dialect("openai", openai_errors=True, sse=True)
# The gateway's own /chat: OpenAI-shaped errors, NDJSON streams.
CHAT = Dialect("chat", openai_errors=True, sse=False)


def error_text(obj: dict[str, Any]) -> str | None:
    """The message of a parsed body's ``error``: Ollama's ``{"error": "..."}`` or OpenAI's
    ``{"error": {"message": ...}}`` (an error object without a message: its JSON); None
    when the body carries no error."""
    error = obj.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        return str(message) if message else json.dumps(error)
    return str(error) if error else None


def error_message(body: str, fallback: str) -> str:
    """The message of an error body in either dialect; else the body's start, else
    ``fallback``."""
    obj = json_object(body.encode())
    message = error_text(obj) if obj is not None else None
    return message or body.strip()[:300] or fallback


def dialect_for(path: str) -> Dialect:
    """The dialect of a path, so that even a 404 speaks the client's language."""
    if path == "/" or path.startswith("/api/") or path == "/api":
        return OLLAMA
    if path == "/chat":
        return CHAT
    return OPENAI


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    eval_duration_s: float | None = None
    load_duration_s: float | None = None
    done_reason: str | None = None

    @property
    def tokens_per_second(self) -> float | None:
        if self.completion_tokens and self.eval_duration_s:
            return self.completion_tokens / self.eval_duration_s
        return None


def count(value: Any) -> int:
    """A token count as JSON gives it; anything but a number is zero."""
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _seconds(nanoseconds: Any) -> float | None:
    """Ollama's nanoseconds as seconds; None when absent or not a number."""
    number = isinstance(nanoseconds, int | float) and not isinstance(nanoseconds, bool)
    return nanoseconds / 1e9 if number else None


def usage_from_native(obj: dict[str, Any]) -> Usage:
    """Statistics from Ollama's final object; a missing field means zero (``omitempty``)."""
    done_reason = obj.get("done_reason")
    return Usage(
        prompt_tokens=count(obj.get("prompt_eval_count")),
        completion_tokens=count(obj.get("eval_count")),
        eval_duration_s=_seconds(obj.get("eval_duration")) or None,  # zero: no speed to tell
        load_duration_s=_seconds(obj.get("load_duration")),
        done_reason=done_reason if isinstance(done_reason, str) else None,
    )


def usage_from_openai(obj: dict[str, Any]) -> Usage | None:
    """Statistics from an OpenAI ``usage`` object; None when there is none."""
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    return Usage(
        prompt_tokens=count(usage.get("prompt_tokens")),
        completion_tokens=count(usage.get("completion_tokens")),
    )
