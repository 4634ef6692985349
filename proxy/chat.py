"""``POST /chat``: the gateway's own one-shot chat, for curl and scripts.

Request: ``{"prompt": "...", "model"?: "...", "system"?: "...", "stream"?: bool,
"options"?: {...}}``. It speaks ``/api/chat`` to Ollama (or ``/v1/chat/completions`` to an
OpenAI-compatible upstream) and answers in one shape whatever the backend: the text, token
counts and timings from the upstream's final statistics; NDJSON when streamed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.admission.admit import Gated, admit, named_backend, session_of
from proxy.admission.body import field as body_field
from proxy.admission.body import parse_object, read_body
from proxy.dialects import Usage, error_message, error_text, usage_from_native, usage_from_openai
from proxy.errors import InvalidRequestError, UpstreamResponseError
from proxy.exchange import EXCHANGE, Exchange
from proxy.frames import iter_frames, json_object
from proxy.gateway import GATEWAY
from proxy.upstream.client import Interrupted, UpstreamError, UpstreamResponse
from proxy.upstream.encodings import DecodedBody, UnreadableBodyError
from proxy.upstream.forward import Upstream, open_placed

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
    kind: str,
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
    if kind == "ollama":
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
    await admit(gateway, exchange, principal)
    server = gateway.config.server
    raw = await read_body(request, server.max_body_bytes, server.body_timeout_s)
    obj = parse_object(raw)
    prompt = body_field(obj, "prompt", str, "a string")
    if not prompt:
        raise InvalidRequestError("field 'prompt' is required: a non-empty string")
    model = body_field(obj, "model", str, "a string") or gateway.config.upstream.default_model
    gateway.policy.check_model(model)
    system = body_field(obj, "system", str, "a string")
    stream = bool(body_field(obj, "stream", bool, "true or false"))
    stream = stream and gateway.config.limits.enable_streaming
    options = body_field(obj, "options", dict, "an object") or {}
    clamped = gateway.policy.clamp_context(options)
    if clamped is not None:
        exchange.headers["X-Context-Length-Clamped"] = str(clamped)
    num_predict = body_field(options, "num_predict", int, "an integer (options.num_predict)")
    estimate = gateway.policy.token_estimate(len(raw), num_predict, generates=True)
    exchange.model = model
    only = named_backend(request, gateway.backends.by_name)
    await gateway.probe.learn(model)
    gateway.backends.check_route(
        model, native=False, retry_after_s=gateway.gate.retry_after_s(), only=only
    )

    def build(upstream: Upstream) -> tuple[str, bytes]:
        """The chat in the backend's own API."""
        path, body = upstream_request(
            upstream.kind, model=model, prompt=prompt, system=system, stream=stream,
            options=options,
        )  # fmt: skip
        return path, json.dumps(body).encode()

    session = session_of(request, principal)
    place = Gated(
        gateway, exchange, principal, estimate, model=model, native=False, session=session,
        only=only,
    )  # fmt: skip
    async with place:
        used, response = await open_placed(
            request, place, exchange, method="POST", build=build, is_json=True
        )
        with response:
            try:
                answer = DecodedBody(response)
                if response.status != 200:
                    return await _upstream_error(exchange, response, answer)
                if stream:
                    return await _stream(request, used.kind, exchange, answer)
                return await _answer(exchange, answer)
            except UnreadableBodyError as exc:
                raise UpstreamResponseError(str(exc)) from None
            except (TimeoutError, UpstreamError) as exc:  # before anything was sent
                raise UpstreamResponseError(f"the upstream's answer failed: {exc}") from None


async def _upstream_error(
    exchange: Exchange, upstream: UpstreamResponse, body: DecodedBody
) -> web.Response:
    raw = await body.read()
    message = error_message(raw.decode(errors="replace"), upstream.reason or "upstream error")
    exchange.status = upstream.status
    exchange.fail("UpstreamStatus", f"the upstream answered {upstream.status}: {message}")
    return web.Response(
        status=upstream.status,
        body=exchange.dialect.error_body(upstream.status, message, "upstream_error"),
        content_type="application/json",
        headers=exchange.headers,
    )


def _stats(exchange: Exchange, usage: Usage, obj: dict[str, Any]) -> dict[str, Any]:
    """The answer's statistics, recorded on the exchange too (metrics, log line)."""
    exchange.record_usage(usage)

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


async def _answer(exchange: Exchange, body: DecodedBody) -> web.Response:
    obj = json_object(await body.read())
    if obj is None:
        raise UpstreamResponseError("the upstream's answer is not a JSON object")
    if "choices" in obj:
        choice = _first(obj.get("choices"))
        text = _text(choice.get("message"))
        done_reason = choice.get("finish_reason")
        usage = usage_from_openai(obj) or Usage()
    else:
        text = _text(obj.get("message"))
        done_reason = obj.get("done_reason")
        usage = usage_from_native(obj)
    exchange.status = 200
    answer = {
        "model": obj.get("model"),
        "response": text,
        "done_reason": done_reason,
        **_stats(exchange, usage, obj),
    }
    return web.json_response(answer, headers=exchange.headers)


def _first(choices: object) -> dict[str, Any]:
    """The first choice of an OpenAI answer, or an empty one."""
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


def _text(message: object) -> str:
    """The ``content`` of a message or delta, if it is text."""
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


@dataclass(slots=True)
class _Progress:
    """What a /chat stream has said so far, whatever the backend's dialect."""

    openai: bool
    model: str | None = None
    done_reason: str | None = None
    chunks: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    error: str | None = None

    def digest(self, frame: bytes) -> str:
        """Take one upstream frame; the text it carries."""
        if self.openai and frame.startswith(b"[DONE]"):  # as the OpenAI SDK tests it
            self.finished = True
            return ""
        obj = json_object(frame)
        if obj is None:
            return ""
        error = error_text(obj)
        if error is not None:
            self.error = error
            return ""
        self.model = obj.get("model") or self.model
        if self.openai:
            if isinstance(obj.get("usage"), dict):
                self.stats = obj  # the last usage a client would read
            if obj.get("choices") == []:
                return ""
            choice = _first(obj.get("choices"))
            self.done_reason = choice.get("finish_reason") or self.done_reason
            text = _text(choice.get("delta"))
        else:
            text = _text(obj.get("message"))
            if obj.get("done") is True:
                self.finished = True
                self.stats = obj
                self.done_reason = obj.get("done_reason")
        self.chunks += bool(text)
        return text

    def usage(self) -> Usage:
        if not self.openai:
            return usage_from_native(self.stats)
        # Servers that ignore include_usage (llama-cpp-python) send one token per content
        # chunk: then the chunks are the count.
        return usage_from_openai(self.stats) or Usage(completion_tokens=self.chunks)


async def _stream(
    request: web.Request, kind: str, exchange: Exchange, body: DecodedBody
) -> web.StreamResponse:
    progress = _Progress(openai=kind != "ollama")
    response = web.StreamResponse(
        headers={**exchange.headers, "Content-Type": "application/x-ndjson"}
    )
    exchange.status = 200
    exchange.streamed = True
    exchange.phase = "streaming"
    exchange.response = response
    await response.prepare(request)
    exchange.first_byte_at = time.monotonic()
    try:
        async for frame in iter_frames(body, sse=progress.openai):
            text = progress.digest(frame)
            if progress.error is not None:
                return await _fail(response, exchange, f"the upstream failed: {progress.error}")
            if text:
                if exchange.first_chunk_at is None:
                    exchange.first_chunk_at = time.monotonic()
                await _write(response, exchange, {"response": text, "done": False})
            if progress.finished:
                break
    except Interrupted as exc:
        return await _fail(response, exchange, str(exc))
    except (TimeoutError, UpstreamError) as exc:
        return await _fail(response, exchange, f"the upstream stream failed: {exc}")
    if not progress.finished:
        return await _fail(response, exchange, "the upstream ended the stream without finishing it")
    final = {
        "response": "",
        "done": True,
        "model": progress.model,
        "done_reason": progress.done_reason,
        **_stats(exchange, progress.usage(), progress.stats),
    }
    await _write(response, exchange, final)
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
