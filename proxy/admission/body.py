"""What the gateway reads, checks and changes in a request body before it goes upstream.

It reads only what it needs: the model (for the allowlist and metric labels), ``stream``,
the context size it may clamp, and the sizes behind a token estimate. A body is
re-serialised only when something in it changed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.config import Config, backends_of
from proxy.errors import (
    BodyTooLargeError,
    ClientTimeoutError,
    ForbiddenError,
    InvalidRequestError,
)
from proxy.frames import json_bytes


@dataclass(slots=True)
class Prepared:
    """A request body as the gateway will send it, and what it learned from it."""

    body: bytes
    model: str | None = None
    stream: bool = False
    strip_usage: bool = False
    token_estimate: int = 0
    clamped_num_ctx: int | None = None


async def read_body(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole request body, refused with 413 past ``max_bytes`` without reading it all,
    and with 408 when the client sends nothing of it for ``timeout_s`` (0: no limit)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise BodyTooLargeError(f"request body over the {max_bytes}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in body_chunks(request, timeout_s):
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLargeError(f"request body over the {max_bytes}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def body_chunks(request: web.Request, timeout_s: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; 408 when the client sends nothing of it for
    ``timeout_s`` (nginx's ``client_body_timeout``). What already arrived is taken without
    a timer: a small body comes with its head."""
    content = request.content
    while True:
        chunk = content.read_nowait()
        if not chunk:
            if content.at_eof():
                return
            try:
                async with asyncio.timeout(timeout_s or None):
                    chunk = await content.readany()
            except TimeoutError:
                raise ClientTimeoutError(
                    f"the request body stalled: nothing of it arrived for {timeout_s:g} s"
                ) from None
            if not chunk:
                return
        yield chunk


def parse_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or 400 saying why not. What orjson refuses but
    Python's ``json`` reads (a lone surrogate escape, as Ollama's Go decoder takes too) is
    taken, so the gateway refuses nothing its upstream would accept."""
    if not raw.strip():
        raise InvalidRequestError("missing request body: expected a JSON object")
    try:
        obj = orjson.loads(raw)
    except ValueError as exc:
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            raise InvalidRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return obj


def field(obj: dict[str, Any], name: str, kind: type, label: str) -> Any:
    """``obj[name]`` if present and of ``kind``; 400 naming the field otherwise.

    JSON's true/false are Python bools, which are ints too: not accepted as numbers.
    """
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidRequestError(f"field '{name}' must be {label}")
    return value


class Policy:
    def __init__(self, config: Config) -> None:
        self.max_context_length = config.limits.max_context_length
        self.default_max_tokens = config.limits.default_max_tokens
        self.allowlist = frozenset(config.models.allowlist)
        # OpenAI-compatible servers that serve one model answer a request without one with
        # their own idea of a name (llama-cpp-python: the model file's path); name it for
        # them, when every backend is one.
        all_openai = all(backend.kind == "openai" for backend in backends_of(config))
        self.fill_model = config.upstream.default_model if all_openai else None

    def check_model(self, model: str | None) -> None:
        if not self.allowlist or model is None:
            return
        if model in self.allowlist or with_tag(model) in self.allowlist:
            return
        raise ForbiddenError(f"model '{model}' is not allowed on this gateway")

    def clamp_context(self, options: dict[str, Any]) -> int | None:
        """Lower ``options.num_ctx`` to the configured maximum; the value asked, if lowered."""
        num_ctx = field(options, "num_ctx", int, "an integer (options.num_ctx)")
        if num_ctx is not None and num_ctx < 1:
            raise InvalidRequestError(
                "field 'num_ctx' must be a positive integer (options.num_ctx)"
            )
        if num_ctx is None or not self.max_context_length or num_ctx <= self.max_context_length:
            return None
        options["num_ctx"] = self.max_context_length
        return int(num_ctx)

    def token_estimate(self, prompt_bytes: int, max_tokens: int | None, *, generates: bool) -> int:
        """The LLM tokens a request is assumed to cost at admission, settled with the real
        count when it ends: about four bytes of English per token, plus the completion it
        asks for (``default_max_tokens`` when it names none; none for an embedding)."""
        completion = 0
        if generates:
            completion = max_tokens if max_tokens and max_tokens > 0 else self.default_max_tokens
        return prompt_bytes // 4 + completion

    def prepare(self, raw: bytes, *, openai: bool, generates: bool) -> Prepared:
        """Validate and adjust an inference body (native or OpenAI-compatible)."""
        obj = parse_object(raw)
        model = field(obj, "model", str, "a string")
        changed = False
        if model is None and self.fill_model is not None:
            model = obj["model"] = self.fill_model
            changed = True
        self.check_model(model)
        stream_value = field(obj, "stream", bool, "true or false")
        # Native streams unless told not to; OpenAI-compatible does not unless asked.
        stream = bool(stream_value) if openai else stream_value is not False
        options = field(obj, "options", dict, "an object") or {}
        prepared = Prepared(body=raw, model=model, stream=stream)

        prepared.clamped_num_ctx = self.clamp_context(options)
        changed = changed or prepared.clamped_num_ctx is not None

        if openai and stream and generates:
            stream_options = field(obj, "stream_options", dict, "an object") or {}
            if not stream_options.get("include_usage"):
                # Ask for usage on the client's behalf; the relay strips it again.
                obj["stream_options"] = {**stream_options, "include_usage": True}
                prepared.strip_usage = True
                changed = True

        max_tokens = (
            field(obj, "max_tokens", int, "an integer")
            or field(obj, "max_completion_tokens", int, "an integer")
            if openai
            else field(options, "num_predict", int, "an integer")
        )
        prepared.token_estimate = self.token_estimate(len(raw), max_tokens, generates=generates)
        if changed:
            if options:
                obj["options"] = options
            prepared.body = json_bytes(obj)
        return prepared


def with_tag(model: str) -> str:
    """Ollama's implicit tag: ``llama3.2`` is ``llama3.2:latest``."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"
