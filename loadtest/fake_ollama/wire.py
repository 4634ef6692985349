"""Bytes as Ollama writes them: Go-style JSON, timestamps, error bodies, tokens and host rules.

Everything here is a pure function or a constant, so the handlers stay readable and the
per-token hot path is a few byte concatenations.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import math
import re
import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

NDJSON = "application/x-ndjson"
# gin's c.JSON adds the charset; errors written by streamResponse and the OpenAI layer do not.
JSON_GIN = "application/json; charset=utf-8"
JSON = "application/json"
SSE = "text/event-stream"
TEXT = "text/plain; charset=utf-8"

BUSY = "server busy, please try again.  maximum pending requests exceeded"
RUNNER_STOPPED = (
    "model runner has unexpectedly stopped, this may be due to resource limitations"
    " or an internal error, check ollama server logs for details"
)
MIDSTREAM = "an error was encountered while running the model"

# Go's encoding/json escapes these even inside strings (HTML safety, JS line separators).
_GO_ESCAPES = {
    b"<": b"\\u003c",
    b">": b"\\u003e",
    b"&": b"\\u0026",
    "\u2028".encode(): b"\\u2028",
    "\u2029".encode(): b"\\u2029",
}
_GO_ESCAPE_RE = re.compile(b"|".join(re.escape(k) for k in _GO_ESCAPES))


def dumps(obj: Any) -> bytes:
    """Serialise like Go's encoding/json: insertion order kept, `<>&` escaped, no spaces."""
    data = orjson.dumps(obj)
    if _GO_ESCAPE_RE.search(data) is None:
        return data
    return _GO_ESCAPE_RE.sub(lambda m: _GO_ESCAPES[m.group(0)], data)


_second_cache: tuple[int, str] = (-1, "")


def rfc3339(ns: int) -> str:
    """Go's RFC3339Nano in UTC: trailing zeros of the fraction trimmed, no dot when whole."""
    global _second_cache  # noqa: PLW0603 -- a one-entry cache; strftime is the costly part
    sec, frac = divmod(ns, 1_000_000_000)
    if _second_cache[0] != sec:
        _second_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    base = _second_cache[1]
    if frac:
        return f"{base}.{frac:09d}".rstrip("0") + "Z"
    return base + "Z"


def created_at() -> str:
    return rfc3339(time.time_ns())


# One token per chunk, cycling; pre-encoded so a chunk is a concatenation.
WORDS = (
    "The", " sky", " is", " blue", " because", " air", " molecules", " scatter",
    " short", " wavelengths", " of", " sunlight", " more", " than", " long", " ones", ".",
)  # fmt: skip
WORDS_JSON = tuple(dumps(w) for w in WORDS)
_TOKEN_IDS = tuple(1000 + int.from_bytes(hashlib.sha256(w.encode()).digest()[:2]) for w in WORDS)

# Prompt tokens are "words + template overhead", the same for the native and OpenAI routes.
MESSAGE_OVERHEAD = 4  # role header and end-of-turn markers
CHAT_OVERHEAD = 3  # begin-of-text plus the assistant header that opens the reply


def count_words(text: object) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def generate_prompt_tokens(
    prompt: str, system: str = "", suffix: str = "", *, raw: bool = False
) -> int:
    words = count_words(prompt) + count_words(system) + count_words(suffix)
    if raw:
        return words
    return words + (MESSAGE_OVERHEAD if system else 0) + MESSAGE_OVERHEAD + CHAT_OVERHEAD


def chat_prompt_tokens(contents: Iterable[str]) -> int:
    """Tokens for native messages, given each message's text (one entry per message)."""
    return sum(count_words(c) + MESSAGE_OVERHEAD for c in contents) + CHAT_OVERHEAD


def context_ids(prompt_tokens: int, generated: int) -> list[int]:
    """A plausible `context` array: one id per prompt and generated token."""
    prompt = [128_000 + i % 256 for i in range(prompt_tokens)]
    return prompt + [_TOKEN_IDS[i % len(_TOKEN_IDS)] for i in range(generated)]


def embedding(text: str, dims: int) -> list[float]:
    """A deterministic L2-normalised vector derived from the text."""
    if dims <= 0:
        return []
    raw = hashlib.shake_256(text.encode()).digest(2 * dims)
    vec = [int.from_bytes(raw[i : i + 2], "little") / 32767.5 - 1.0 for i in range(0, 2 * dims, 2)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [round(v / norm, 6) for v in vec]


def truncate_embedding(vec: list[float], dims: object) -> list[float]:
    """Ollama's `dimensions`: keep the first N components and renormalise."""
    if not isinstance(dims, int) or dims <= 0 or dims >= len(vec):
        return vec
    head = vec[:dims]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [round(v / norm, 6) for v in head]


def float32_base64(vec: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


def short_name(name: str) -> str:
    """How Ollama's DisplayShortest prints a name: default registry and namespace dropped,
    the tag always present."""
    name = name.strip().removeprefix("registry.ollama.ai/").removeprefix("library/")
    if name and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def canonical_name(name: str) -> str:
    """The key two spellings of one model share (Ollama compares names case-insensitively)."""
    return short_name(name).lower()


def digest_of(name: str) -> str:
    return hashlib.sha256(canonical_name(name).encode()).hexdigest()


def parameter_count(parameter_size: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMBT]?)\s*", parameter_size.upper())
    if match is None:
        return 0
    scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}[match.group(2)]
    return int(float(match.group(1)) * scale)


def metrics(
    *, total_ns: int, load_ns: int, prompt_count: int, prompt_ns: int, eval_count: int, eval_ns: int
) -> dict[str, int]:
    """The final-chunk statistics in Go field order; zero values are omitted (omitempty)."""
    pairs = (
        ("total_duration", total_ns),
        ("load_duration", load_ns),
        ("prompt_eval_count", prompt_count),
        ("prompt_eval_duration", prompt_ns),
        ("eval_count", eval_count),
        ("eval_duration", eval_ns),
    )
    return {k: v for k, v in pairs if v}


_DURATION_RE = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_s(value: object) -> float | None:
    """A request's keep_alive in seconds (a number is seconds, a string a Go duration).

    None when unset or unparseable; negative means forever.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    try:
        return sign * float(text)
    except ValueError:
        pass
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def native_error(status: int, message: str, content_type: str = JSON_GIN) -> web.Response:
    """Ollama's `{"error": "..."}`; c.JSON writes no trailing newline."""
    return web.Response(
        status=status, body=dumps({"error": message}), headers={"Content-Type": content_type}
    )


def openai_error_body(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def openai_error(status: int, message: str, *, from_middleware: bool = False) -> web.Response:
    """OpenAI-shaped error. Handler errors go through json.Encoder (newline, no charset);
    request-parsing errors are gin c.JSON from the middleware (charset, no newline)."""
    body = dumps(openai_error_body(status, message))
    if from_middleware:
        return web.Response(status=status, body=body, headers={"Content-Type": JSON_GIN})
    return web.Response(status=status, body=body + b"\n", headers={"Content-Type": JSON})


def json_response(obj: Any, content_type: str = JSON_GIN, newline: bool = False) -> web.Response:
    body = dumps(obj) + b"\n" if newline else dumps(obj)
    return web.Response(body=body, headers={"Content-Type": content_type})


# Go's netip IsPrivate: RFC 1918 and RFC 4193 only (Python's is_private is much broader).
_GO_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_HOSTNAME = socket.gethostname().lower()


def split_host(host_header: str) -> str:
    """net.SplitHostPort, falling back to the whole value when there is no port (as Ollama does)."""
    if host_header.startswith("["):
        end = host_header.find("]")
        if end != -1 and host_header[end + 1 : end + 2] == ":":
            return host_header[1:end]
        return host_header
    if host_header.count(":") == 1:
        return host_header.split(":", 1)[0]
    return host_header


@functools.lru_cache(maxsize=256)
def host_verdict(host_header: str) -> str:
    """`ip` (allowed address), `name` (allowed name: OPTIONS gets 204) or `deny` (403)."""
    host = split_host(host_header)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if (
            addr.is_loopback
            or addr.is_unspecified
            or any(addr.version == n.version and addr in n for n in _GO_PRIVATE)
        ):
            return "ip"
    host = host.lower()
    if host in {"", "localhost", _HOSTNAME} or host.endswith((".localhost", ".local", ".internal")):
        return "name"
    return "deny"
