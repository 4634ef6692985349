"""What differs between Ollama's native API and the OpenAI-compatible API on the wire.

Error bodies before headers, and error frames after them: an ``{"error": "..."}`` NDJSON
line as Ollama itself writes, or a ``data: {"error": {...}}`` SSE event, which the OpenAI
SDK raises as ``APIError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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


def error_message(body: str, fallback: str) -> str:
    """The message of an error body in either dialect: Ollama's ``{"error": "..."}`` or
    OpenAI's ``{"error": {"message": ...}}``; else the body's start, else ``fallback``."""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        return body.strip()[:300] or fallback
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error) if error else body.strip()[:300] or fallback


def dialect_for(path: str) -> Dialect:
    """The dialect of a path, so that even a 404 speaks the client's language."""
    if path == "/" or path.startswith("/api/") or path == "/api":
        return OLLAMA
    if path == "/chat":
        return CHAT
    return OPENAI
