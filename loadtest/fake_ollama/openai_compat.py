"""Ollama's OpenAI-compatible /v1 routes, in the SSE layout of Ollama >= 0.32.6.

Ollama implements these as a middleware that rewrites the request to the native API and
re-encodes the native answer, so counts and failures here mirror native.py exactly; only the
framing differs (and a mid-stream error is swallowed, as Ollama's writer does).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import engine, native, wire
from .recorder import Exchange

if TYPE_CHECKING:
    from .server import FakeOllama

_FIRST_DELTAS = tuple(
    b'"role":"assistant","content":' + w + b'},"finish_reason":null}]}\n\n' for w in wire.WORDS_JSON
)
_DELTAS = tuple(b'"content":' + w + b'},"finish_reason":null}]}\n\n' for w in wire.WORDS_JSON)
_ZERO_USAGE = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'
_DONE = b"data: [DONE]\n\n"
_FINGERPRINT = "fp_ollama"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def wants_usage(fake: FakeOllama, body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return (
        fake.config.honor_stream_usage
        and isinstance(options, dict)
        and options.get("include_usage") is True
    )


def message_texts(messages: list[Any]) -> list[str]:
    """One text per native message: Ollama turns each content part into its own message."""
    texts: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            texts.extend(
                str(part.get("text") or "")
                if isinstance(part, dict) and part.get("type") == "text"
                else ""
                for part in content
            )
        else:
            texts.append(content if isinstance(content, str) else "")
    return texts


def sse(obj: Any) -> bytes:
    return b"data: " + wire.dumps(obj) + b"\n\n"


async def chat_completions(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    body, error = engine.request_object(ex, "openai.ChatCompletionRequest")
    messages = body.get("messages")
    if not error and (not isinstance(messages, list) or not messages):
        error = "[] is too short - 'messages'"
    if error:
        return wire.openai_error(400, error, from_middleware=True)
    adm = await engine.admit(
        fake, ex, "api.ChatRequest", "model '{name}' not found", model_required=True, native=False
    )
    if isinstance(adm, tuple):
        return wire.openai_error(*adm)
    if adm.model.is_embedding_only:
        return wire.openai_error(400, f'"{adm.name}" does not support chat')
    prompt_tokens = wire.chat_prompt_tokens(message_texts(body["messages"]))
    n_tokens, reason = engine.token_budget(fake.config.tokens, body.get("max_tokens"))
    cid = f"chatcmpl-{fake.next_id()}"
    async with engine.Generation(
        fake, ex, adm, prompt_tokens, n_tokens=n_tokens, reason=reason
    ) as gen:
        if body.get("stream") is True:
            return await _chat_stream(gen, cid)
        return await _chat_once(gen, cid)


async def _chat_once(gen: engine.Generation, cid: str) -> web.StreamResponse:
    if gen.failing:
        failed = await gen.fail_silently()
        return failed if failed is not None else wire.openai_error(500, wire.MIDSTREAM)
    await gen.generate_silently(gen.n_tokens)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": native.text_of(gen.n_tokens)},
        "finish_reason": gen.reason,
    }
    obj = {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": gen.adm.name,
        "system_fingerprint": _FINGERPRINT,
        "choices": [choice],
        "usage": usage(gen.prompt_tokens, gen.n_tokens),
    }
    gen.count()
    return wire.json_response(obj, wire.JSON, newline=True)


async def _chat_stream(gen: engine.Generation, cid: str) -> web.StreamResponse:
    if gen.fails_first:
        return wire.openai_error(500, wire.MIDSTREAM)
    created = int(time.time())  # pinned to the first chunk, as Ollama's ChatWriter does

    def head(model: str) -> bytes:
        return (
            b'data: {"id":"' + cid.encode() + b'","object":"chat.completion.chunk","created":'
            + str(created).encode() + b',"model":' + wire.dumps(model)
            + b',"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{'
        )  # fmt: skip

    prefix = head(gen.adm.name)
    resp = await gen.ex.stream(wire.SSE)
    for i in range(gen.limit):
        await gen.pace(i)
        deltas = _DELTAS if i else _FIRST_DELTAS
        await gen.ex.send(prefix + deltas[i % len(deltas)])
    if gen.failing:
        # Ollama's writer decodes the native error line as an empty chunk with model "".
        return await gen.fail_stream(head("") + b'"content":""},"finish_reason":null}]}\n\n')
    frames = prefix + b'},"finish_reason":"' + gen.reason.encode() + b'"}]}\n\n'
    with_usage = wants_usage(gen.fake, gen.adm.body)
    if with_usage:
        frames += sse(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": gen.adm.name,
                "system_fingerprint": _FINGERPRINT,
                "choices": [],
                "usage": usage(gen.prompt_tokens, gen.n_tokens),
            }
        )
    await gen.ex.send(frames + _DONE)
    if with_usage:
        gen.count()
    return resp


class _CompletionFrames:
    """SSE frames of /v1/completions: `created` is per chunk there, and with include_usage
    every chunk carries a zeroed usage object."""

    def __init__(self, cid: str, model: str, with_usage: bool) -> None:
        self.cid = cid
        self.model = model
        self.with_usage = with_usage
        self._head = b'data: {"id":"' + cid.encode() + b'","object":"text_completion","created":'
        self._tail = b',"system_fingerprint":"fp_ollama"' + (_ZERO_USAGE if with_usage else b"")
        self._tail += b"}\n\n"
        self._model_json = wire.dumps(model)

    def chunk(self, text_json: bytes, finish: bytes, model_json: bytes | None = None) -> bytes:
        return (
            self._head + str(int(time.time())).encode() + b',"choices":[{"text":' + text_json
            + b',"index":0,"finish_reason":' + finish + b'}],"model":'
            + (self._model_json if model_json is None else model_json) + self._tail
        )  # fmt: skip

    def finish(self, reason: str, used: dict[str, int]) -> bytes:
        frames = self.chunk(b'""', b'"' + reason.encode() + b'"')
        if self.with_usage:
            usage_chunk = {
                "id": self.cid,
                "object": "text_completion",
                "created": int(time.time()),
                "choices": [],
                "model": self.model,
                "system_fingerprint": _FINGERPRINT,
                "usage": used,
            }
            frames += sse(usage_chunk)
        return frames + _DONE


def completion(cid: str, model: str, text: str, reason: str, used: dict[str, int]) -> Any:
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": _FINGERPRINT,
        "choices": [{"text": text, "index": 0, "finish_reason": reason}],
        "usage": used,
    }


async def completions(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    body, error = engine.request_object(ex, "openai.CompletionRequest")
    prompt = body.get("prompt", "")
    if not error and not isinstance(prompt, str):
        kind = "array" if isinstance(prompt, list) else "value"
        error = f"json: cannot unmarshal {kind} into Go struct field CompletionRequest.prompt"
        error += " of type string"
    if error:
        return wire.openai_error(400, error, from_middleware=True)
    adm = await engine.admit(
        fake,
        ex,
        "api.GenerateRequest",
        "model '{name}' not found",
        model_required=False,
        native=False,
    )
    if isinstance(adm, tuple):
        return wire.openai_error(*adm)
    if adm.model.is_embedding_only:
        return wire.openai_error(400, f'"{adm.name}" does not support generate')
    stream = body.get("stream") is True
    cid = f"cmpl-{fake.next_id()}"
    frames = _CompletionFrames(cid, adm.name, stream and wants_usage(fake, body))
    if not prompt:
        return await _completion_load(fake, ex, adm, frames, stream=stream)
    suffix = body.get("suffix")
    prompt_tokens = wire.generate_prompt_tokens(
        prompt, "", suffix if isinstance(suffix, str) else ""
    )
    n_tokens, reason = engine.token_budget(fake.config.tokens, body.get("max_tokens"))
    async with engine.Generation(
        fake, ex, adm, prompt_tokens, n_tokens=n_tokens, reason=reason
    ) as gen:
        if stream:
            return await _completion_stream(gen, frames)
        return await _completion_once(gen, cid)


async def _completion_once(gen: engine.Generation, cid: str) -> web.StreamResponse:
    if gen.failing:
        failed = await gen.fail_silently()
        return failed if failed is not None else wire.openai_error(500, wire.MIDSTREAM)
    await gen.generate_silently(gen.n_tokens)
    used = usage(gen.prompt_tokens, gen.n_tokens)
    gen.count()
    obj = completion(cid, gen.adm.name, native.text_of(gen.n_tokens), gen.reason, used)
    return wire.json_response(obj, wire.JSON, newline=True)


async def _completion_load(
    fake: FakeOllama,
    ex: Exchange,
    adm: engine.Admission,
    frames: _CompletionFrames,
    *,
    stream: bool,
) -> web.StreamResponse:
    """The native load shortcut, re-encoded: no text, finish_reason "load", zero usage."""
    await fake.ensure_loaded(adm.model)
    fake.touch(adm.model, None)
    if not stream:
        obj = completion(frames.cid, adm.name, "", "load", usage(0, 0))
        return wire.json_response(obj, wire.JSON, newline=True)
    resp = await ex.stream(wire.SSE)
    await ex.send(frames.finish("load", usage(0, 0)))
    return resp


async def _completion_stream(
    gen: engine.Generation, frames: _CompletionFrames
) -> web.StreamResponse:
    if gen.fails_first:
        return wire.openai_error(500, wire.MIDSTREAM)
    resp = await gen.ex.stream(wire.SSE)
    words = wire.WORDS_JSON
    for i in range(gen.limit):
        await gen.pace(i)
        await gen.ex.send(frames.chunk(words[i % len(words)], b"null"))
    if gen.failing:
        return await gen.fail_stream(frames.chunk(b'""', b"null", b'""'))
    await gen.ex.send(frames.finish(gen.reason, usage(gen.prompt_tokens, gen.n_tokens)))
    if frames.with_usage:
        gen.count()
    return resp


def _embeddings_request_error(body: dict[str, Any]) -> str:
    """What Ollama's middleware rejects before the native handler sees the request."""
    encoding = body.get("encoding_format") or "float"
    if encoding not in {"float", "base64"}:
        return f"invalid encoding_format: {encoding!s}; must be 'float' or 'base64'"
    if body.get("input") is None:
        return "invalid input"
    return ""


async def embeddings(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    body, error = engine.request_object(ex, "openai.EmbedRequest")
    error = error or _embeddings_request_error(body)
    if error:
        return wire.openai_error(400, error, from_middleware=True)
    adm = await engine.admit(
        fake, ex, "api.EmbedRequest", native.EMBED_NOT_FOUND, model_required=True, native=False
    )
    if isinstance(adm, tuple):
        return wire.openai_error(*adm)
    inputs = native.embed_inputs(body.get("input"))
    if inputs is None:
        return wire.openai_error(400, "invalid input type")
    result = await native.vectors(fake, ex, adm, inputs)
    if not isinstance(result, tuple):
        return result if result is not None else wire.openai_error(500, wire.MIDSTREAM)
    base64 = body.get("encoding_format") == "base64"
    data = [
        {
            "object": "embedding",
            "embedding": wire.float32_base64(vec) if base64 else vec,
            "index": i,
        }
        for i, vec in enumerate(result[0])
    ]
    prompt_tokens = result[1].get("prompt_eval_count", 0)
    obj = {
        "object": "list",
        "data": data,
        "model": adm.name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return wire.json_response(obj, wire.JSON, newline=True)


def owner(name: str) -> str:
    parts = wire.short_name(name).split("/")
    return parts[-2] if len(parts) > 1 else "library"


async def models(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    ordered = sorted(fake.config.models, key=fake.modified_ns, reverse=True)
    data = [
        {
            "id": m.name,
            "object": "model",
            "created": fake.modified_ns(m) // 1_000_000_000,
            "owned_by": owner(m.name),
        }
        for m in ordered
    ]
    # Ollama never initialises the slice, so an empty list is JSON null.
    return wire.json_response({"object": "list", "data": data or None}, wire.JSON, newline=True)


async def model(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    name = ex.request.match_info["model"]
    found = fake.find_model(name)
    if found is None:
        return wire.openai_error(404, f"model '{wire.short_name(name)}' not found")
    obj = {
        "id": name,
        "object": "model",
        "created": fake.modified_ns(found) // 1_000_000_000,
        "owned_by": owner(found.name),
    }
    return wire.json_response(obj, wire.JSON, newline=True)
