"""``POST /chat``: the gateway's own one-shot chat, for curl and scripts.

Request: ``{"prompt": "...", "model"?: "...", "system"?: "...", "stream"?: bool,
"options"?: {...}}``. It speaks ``/api/chat`` to Ollama (or ``/v1/chat/completions`` to an
OpenAI-compatible upstream) and answers in one shape whatever the backend: the text, token
counts and timings from the upstream's final statistics; NDJSON when streamed.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from proxy.errors import InvalidRequestError
from proxy.exchange import EXCHANGE, Exchange
from proxy.gateway import GATEWAY, Gateway
from proxy.policy import field, parse_object, read_body
from proxy.routes import admit, gated, upstream_response
from proxy.streams import Usage, usage_from_native, usage_from_openai

_OPENAI_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def upstream_request(
    gateway: Gateway,
    *,
    model: str,
    prompt: str,
    system: str | None,
    stream: bool,
    options: dict[str, Any],
) -> tuple[str, dict[str, Any]]:
    """The path and body that ask the configured backend for this chat."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if gateway.config.upstream.kind == "ollama":
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
        if options:
            body["options"] = options
        return "/api/chat", body
    body = {"model": model, "messages": messages, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    for native, openai_name in _OPENAI_OPTIONS.items():
        if native in options:
            body[openai_name] = options[native]
    return "/v1/chat/completions", body


async def chat_route(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    exchange = request[EXCHANGE]
    principal = gateway.access.identify(request)
    exchange.client = principal.name
    admit(gateway, exchange, principal)
    obj = parse_object(await read_body(request, gateway.config.server.max_body_bytes))
    prompt = field(obj, "prompt", str, "a string")
    if not prompt:
        raise InvalidRequestError("field 'prompt' is required: a non-empty string")
    model = field(obj, "model", str, "a string") or gateway.config.upstream.default_model
    gateway.policy.check_model(model)
    system = field(obj, "system", str, "a string")
    stream = bool(field(obj, "stream", bool, "true or false"))
    stream = stream and gateway.config.limits.enable_streaming
    options = field(obj, "options", dict, "an object") or {}
    clamped = gateway.policy.clamp_context(options)
    if clamped is not None:
        exchange.headers["X-Context-Length-Clamped"] = str(clamped)
    exchange.model = model
    path, body = upstream_request(
        gateway, model=model, prompt=prompt, system=system, stream=stream, options=options
    )
    estimate = len(prompt) // 4 + gateway.config.limits.default_max_tokens
    async with (
        gated(gateway, exchange, principal, estimate),
        upstream_response(
            request,
            gateway,
            exchange,
            method="POST",
            path=path,
            body=json.dumps(body).encode(),
            is_json=True,
        ) as upstream,
    ):
        if upstream.status != 200:
            return await _upstream_error(exchange, upstream)
        if stream:
            return await _stream(request, gateway, exchange, upstream)
        return await _answer(exchange, upstream)


async def _upstream_error(exchange: Exchange, upstream: aiohttp.ClientResponse) -> web.Response:
    raw = await upstream.read()
    try:
        error = json.loads(raw).get("error")
        message = str(error.get("message") if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        message = raw.decode(errors="replace")[:500] or upstream.reason or "upstream error"
    exchange.status = upstream.status
    exchange.fail("UpstreamStatus", f"the upstream answered {upstream.status}: {message}")
    return web.Response(
        status=upstream.status,
        body=exchange.dialect.error_body(upstream.status, message, "upstream_error"),
        content_type="application/json",
        headers=exchange.headers,
    )


def _stats(exchange: Exchange, obj: dict[str, Any], openai: bool) -> dict[str, Any]:
    usage = (usage_from_openai(obj) if openai else usage_from_native(obj)) or Usage()
    exchange.prompt_tokens = usage.prompt_tokens
    exchange.completion_tokens = usage.completion_tokens
    exchange.tokens_per_second = usage.tokens_per_second
    exchange.load_duration_s = usage.load_duration_s

    def seconds(key: str) -> float | None:
        value = obj.get(key)
        return value / 1e9 if isinstance(value, int) else None

    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_duration_s": seconds("total_duration"),
        "load_duration_s": seconds("load_duration"),
        "prompt_eval_duration_s": seconds("prompt_eval_duration"),
        "eval_duration_s": seconds("eval_duration"),
        "tokens_per_second": usage.tokens_per_second,
    }


async def _answer(exchange: Exchange, upstream: aiohttp.ClientResponse) -> web.Response:
    obj = json.loads(await upstream.read())
    openai = "choices" in obj
    if openai:
        choice = (obj.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or ""
        done_reason = choice.get("finish_reason")
    else:
        text = (obj.get("message") or {}).get("content") or ""
        done_reason = obj.get("done_reason")
    exchange.status = 200
    answer = {
        "model": obj.get("model"),
        "response": text,
        "done_reason": done_reason,
        **_stats(exchange, obj, openai),
    }
    return web.json_response(answer, headers=exchange.headers)


async def _stream(
    request: web.Request, gateway: Gateway, exchange: Exchange, upstream: aiohttp.ClientResponse
) -> web.StreamResponse:
    openai = gateway.config.upstream.kind != "ollama"
    response = web.StreamResponse(
        headers={**exchange.headers, "Content-Type": "application/x-ndjson"}
    )
    exchange.status = 200
    exchange.streamed = True
    exchange.phase = "streaming"
    await response.prepare(request)
    exchange.first_byte_at = time.monotonic()
    final: dict[str, Any] | None = None
    finish_reason: str | None = None
    chunks = 0
    try:
        async for frame in iter_frames(upstream.content, b"\n\n" if openai else b"\n"):
            obj = _parse_frame(frame, openai)
            if obj is None:
                if openai and frame.rstrip().endswith(b"[DONE]"):
                    # Servers that ignore include_usage (llama-cpp-python) send one token
                    # per content chunk: count them.
                    final = final or {"completion_tokens": chunks}
                    final["done_reason"] = finish_reason
                    exchange.completion_tokens = final["completion_tokens"]
                    break
                continue
            if obj.get("error"):
                return await _fail(response, exchange, f"the upstream failed: {obj['error']}")
            if openai and obj.get("choices") == [] and obj.get("usage"):
                final = {"model": obj.get("model"), **_stats(exchange, obj, openai=True)}
                continue
            if openai:
                finish_reason = (obj.get("choices") or [{}])[0].get(
                    "finish_reason"
                ) or finish_reason
            text = _text(obj, openai)
            if text:
                chunks += 1
                if exchange.first_chunk_at is None:
                    exchange.first_chunk_at = time.monotonic()
                await _write(response, exchange, {"response": text, "done": False})
            if not openai and obj.get("done"):
                final = {
                    "model": obj.get("model"),
                    "done_reason": obj.get("done_reason"),
                    **_stats(exchange, obj, openai=False),
                }
                break
    except (TimeoutError, aiohttp.ClientError) as exc:
        message = f"the upstream stream failed ({type(exc).__name__})"
        return await _fail(response, exchange, message)
    if final is None:
        return await _fail(response, exchange, "the upstream ended the stream without finishing it")
    await _write(response, exchange, {"response": "", "done": True, **final})
    await response.write_eof()
    return response


async def _fail(
    response: web.StreamResponse, exchange: Exchange, message: str
) -> web.StreamResponse:
    exchange.fail("StreamInterrupted", message)
    frame = exchange.dialect.error_frame(message, "stream_interrupted")
    await response.write(frame)
    await response.write_eof()
    return response


async def _write(response: web.StreamResponse, exchange: Exchange, obj: dict[str, Any]) -> None:
    line = json.dumps(obj).encode() + b"\n"
    exchange.bytes_out += len(line)
    await response.write(line)


def _parse_frame(frame: bytes, openai: bool) -> dict[str, Any] | None:
    if openai:
        data = b"".join(
            line[5:].strip() for line in frame.splitlines() if line.startswith(b"data:")
        )
        if not data.startswith(b"{"):
            return None
        frame = data
    try:
        obj = json.loads(frame)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _text(obj: dict[str, Any], openai: bool) -> str:
    if openai:
        choices = obj.get("choices") or [{}]
        return str((choices[0].get("delta") or {}).get("content") or "")
    return str((obj.get("message") or {}).get("content") or "")


async def iter_frames(content: aiohttp.StreamReader, sep: bytes) -> AsyncIterator[bytes]:
    """Complete frames (lines, or SSE events) from a body, whatever the chunking.

    SSE events may end in ``\\r\\n\\r\\n`` (sse-starlette); that is normalised to ``sep``.
    """
    pending = b""
    while chunk := await content.readany():
        pending += chunk
        if sep == b"\n\n":
            pending = pending.replace(b"\r\n", b"\n")
        *frames, pending = pending.split(sep)
        for frame in frames:
            if frame.strip():
                yield frame
    if pending.strip():
        yield pending
