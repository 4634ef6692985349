"""Ollama's native /api routes: NDJSON generation, embeddings, model listing and management."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import engine, wire
from .config import FakeModel
from .recorder import Exchange

if TYPE_CHECKING:
    from .server import FakeOllama

# Per-token chunk = head(model) + created_at + tail[token]: no JSON encoding on the hot path.
_GENERATE_TAILS = tuple(b'","response":' + w + b',"done":false}\n' for w in wire.WORDS_JSON)
_CHAT_TAILS = tuple(
    b'","message":{"role":"assistant","content":' + w + b'},"done":false}\n'
    for w in wire.WORDS_JSON
)
_ERROR_LINE = wire.dumps({"error": wire.MIDSTREAM}) + b"\n"
_EMPTY_MESSAGE = {"role": "assistant", "content": ""}


def text_of(n_tokens: int) -> str:
    words = wire.WORDS
    return "".join(words[i % len(words)] for i in range(n_tokens))


async def root(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    return web.Response(text="Ollama is running", headers={"Content-Type": wire.TEXT})


async def version(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    return wire.json_response({"version": fake.config.version})


async def status(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    return wire.json_response({"cloud": {"disabled": False, "source": "none"}})


async def _shortcut(
    fake: FakeOllama, adm: engine.Admission, content: dict[str, Any]
) -> web.StreamResponse:
    """An empty prompt (or no messages) loads the model, or unloads it with keep_alive 0."""
    if wire.keep_alive_s(adm.keep_alive) == 0:
        fake.touch(adm.model, 0)
        reason = "unload"
    else:
        await fake.ensure_loaded(adm.model)
        fake.touch(adm.model, adm.keep_alive)
        reason = "load"
    obj = {"model": adm.name, "created_at": wire.created_at(), **content}
    return wire.json_response({**obj, "done": True, "done_reason": reason})


async def _generate(
    fake: FakeOllama,
    ex: Exchange,
    adm: engine.Admission,
    prompt_tokens: int,
    *,
    chat: bool,
    context: bool,
) -> web.StreamResponse:
    """The shared body of /api/generate and /api/chat once the request is admitted."""
    cap, error = engine.num_predict(adm.body)
    if error:
        return wire.native_error(400, error)
    n_tokens, reason = engine.token_budget(fake.config.tokens, cap)

    def final(text: str, gen: engine.Generation) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": adm.name, "created_at": wire.created_at()}
        if chat:
            obj["message"] = {"role": "assistant", "content": text}
        else:
            obj["response"] = text
        obj["done"] = True
        obj["done_reason"] = reason
        if context:
            obj["context"] = wire.context_ids(prompt_tokens, n_tokens)
        obj.update(gen.stats())
        return obj

    async with engine.Generation(
        fake, ex, adm, prompt_tokens, n_tokens=n_tokens, reason=reason
    ) as gen:
        if adm.body.get("stream") is False:
            if gen.failing:
                failed = await gen.fail_silently()
                return failed if failed is not None else wire.native_error(500, wire.MIDSTREAM)
            await gen.generate_silently(n_tokens)
            gen.count()
            return wire.json_response(final(text_of(n_tokens), gen))
        if gen.fails_first:
            # An error as the stream's first item becomes a plain status-500 JSON reply.
            return wire.native_error(500, wire.MIDSTREAM, wire.JSON)
        resp = await ex.stream(wire.NDJSON)
        head = b'{"model":' + wire.dumps(adm.name) + b',"created_at":"'
        tails = _CHAT_TAILS if chat else _GENERATE_TAILS
        for i in range(gen.limit):
            await gen.pace(i)
            await ex.send(head + wire.created_at().encode() + tails[i % len(tails)])
        if gen.failing:
            return await gen.fail_stream(_ERROR_LINE)
        await ex.send(wire.dumps(final("", gen)) + b"\n")
        gen.count()
        return resp


async def generate(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    adm = await engine.admit(
        fake, ex, "api.GenerateRequest", "model '{name}' not found", model_required=False
    )
    if isinstance(adm, tuple):
        return wire.native_error(*adm)
    if adm.model.is_embedding_only:
        return wire.native_error(400, f'"{adm.name}" does not support generate')
    body = adm.body
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return await _shortcut(fake, adm, {"response": ""})
    raw = body.get("raw") is True
    prompt_tokens = wire.generate_prompt_tokens(
        prompt, str(body.get("system") or ""), str(body.get("suffix") or ""), raw=raw
    )
    return await _generate(fake, ex, adm, prompt_tokens, chat=False, context=not raw)


async def chat(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    adm = await engine.admit(
        fake, ex, "api.ChatRequest", "model '{name}' not found", model_required=True
    )
    if isinstance(adm, tuple):
        return wire.native_error(*adm)
    if adm.model.is_embedding_only:
        return wire.native_error(400, f'"{adm.name}" does not support chat')
    messages = adm.body.get("messages")
    if not isinstance(messages, list) or not messages:
        return await _shortcut(fake, adm, {"message": _EMPTY_MESSAGE})
    contents = [str(m.get("content") or "") if isinstance(m, dict) else "" for m in messages]
    prompt_tokens = wire.chat_prompt_tokens(contents)
    return await _generate(fake, ex, adm, prompt_tokens, chat=True, context=False)


EMBED_NOT_FOUND = 'model "{name}" not found, try pulling it first'


def embed_inputs(value: object) -> list[str] | None:
    """`input` as a list of strings (empty strings dropped, as Ollama does), or None if invalid."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v for v in value if v]
    return None


async def vectors(
    fake: FakeOllama, ex: Exchange, adm: engine.Admission, inputs: list[str]
) -> tuple[list[list[float]], dict[str, int]] | web.StreamResponse | None:
    """Embed `inputs` under a slot: (vectors, stats), or the injected failure's reply
    (None: render the status-500 error in the caller's dialect)."""
    prompt_tokens = sum(wire.count_words(text) for text in inputs)
    if not inputs:
        await fake.ensure_loaded(adm.model)
        return [], {}
    async with engine.Generation(fake, ex, adm, prompt_tokens) as gen:
        if gen.failing:
            return await gen.fail_silently()
        dims = adm.body.get("dimensions")
        length = adm.model.embedding_length
        out = [wire.truncate_embedding(wire.embedding(t, length), dims) for t in inputs]
        gen.count()
        return out, gen.stats()


async def embed(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    adm = await engine.admit(fake, ex, "api.EmbedRequest", EMBED_NOT_FOUND, model_required=True)
    if isinstance(adm, tuple):
        return wire.native_error(*adm)
    inputs = embed_inputs(adm.body.get("input"))
    if inputs is None:
        return wire.native_error(400, "invalid input type")
    result = await vectors(fake, ex, adm, inputs)
    if not isinstance(result, tuple):
        return result if result is not None else wire.native_error(500, wire.MIDSTREAM)
    obj: dict[str, Any] = {"model": adm.name, "embeddings": result[0]}
    obj.update((k, v) for k, v in result[1].items() if k in _EMBED_STATS)
    return wire.json_response(obj)


_EMBED_STATS = frozenset({"total_duration", "load_duration", "prompt_eval_count"})


async def embeddings(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    """The legacy endpoint: one vector, no usage (so nothing is added to the totals)."""
    adm = await engine.admit(fake, ex, "api.EmbeddingRequest", EMBED_NOT_FOUND, model_required=True)
    if isinstance(adm, tuple):
        return wire.native_error(*adm)
    prompt = adm.body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return wire.json_response({"embedding": []})
    async with engine.Generation(fake, ex, adm, 0) as gen:
        if gen.failing:
            failed = await gen.fail_silently()
            return failed if failed is not None else wire.native_error(500, wire.MIDSTREAM)
        vector = wire.embedding(prompt, adm.model.embedding_length)
    return wire.json_response({"embedding": vector})


def details(model: FakeModel) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": model.family,
        "families": [model.family],
        "parameter_size": model.parameter_size,
        "quantization_level": model.quantization_level,
    }


async def tags(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    models = sorted(fake.config.models, key=fake.modified_ns, reverse=True)
    entries = [
        {
            "name": m.name,
            "model": m.name,
            "modified_at": wire.rfc3339(fake.modified_ns(m)),
            "size": m.size,
            "digest": wire.digest_of(m.name),
            "details": details(m),
        }
        for m in models
    ]
    return wire.json_response({"models": entries})


async def ps(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    loaded = fake.loaded
    running = [
        (m, loaded[key])
        for m in fake.config.models
        if (key := wire.canonical_name(m.name)) in loaded
    ]
    entries = [
        {
            "name": m.name,
            "model": m.name,
            "size": m.size,
            "digest": wire.digest_of(m.name),
            "details": details(m),
            "expires_at": wire.rfc3339(int(expires * 1e9)),
            "size_vram": m.size,
            "context_length": 4096,
        }
        for m, expires in sorted(running, key=lambda pair: pair[1], reverse=True)
    ]
    return wire.json_response({"models": entries})


def _model_field(body: dict[str, Any]) -> str:
    name = body.get("model") or body.get("name")  # `name` is the deprecated spelling
    return name if isinstance(name, str) else ""


async def show(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    body, error = engine.request_object(ex, "api.ShowRequest")
    if error:
        return wire.native_error(400, error)
    name = _model_field(body)
    if not name:
        return wire.native_error(400, "model is required")
    model = fake.find_model(name)
    if model is None:
        return wire.native_error(404, f"model '{wire.short_name(name)}' not found")
    arch = model.family
    # model_info is a Go map: encoding/json writes its keys sorted.
    info = {
        "general.architecture": arch,
        "general.parameter_count": wire.parameter_count(model.parameter_size),
        "general.quantization_version": 2,
        f"{arch}.context_length": 131072,
        f"{arch}.embedding_length": model.embedding_length,
    }
    digest = wire.digest_of(model.name)
    obj: dict[str, Any] = {
        "modelfile": f'# Modelfile generated by "ollama show"\nFROM sha256-{digest}\n',
        "template": "{{ .Prompt }}",
        "details": details(model),
        "model_info": dict(sorted(info.items())),
        "capabilities": ["embedding"] if model.is_embedding_only else ["completion"],
        "modified_at": wire.rfc3339(fake.modified_ns(model)),
    }
    return wire.json_response(obj)


async def pull(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    """Any name "downloads" and is then installed; progress follows Ollama's sequence."""
    body, error = engine.request_object(ex, "api.PullRequest")
    if error:
        return wire.native_error(400, error)
    name = _model_field(body)
    if not name:
        return wire.native_error(400, "model is required")
    model = fake.find_model(name) or FakeModel(wire.short_name(name))
    digest = "sha256:" + wire.digest_of(model.name)
    layer = {"status": f"pulling {digest[7:19]}", "digest": digest, "total": model.size}
    steps: list[dict[str, Any]] = [
        {"status": "pulling manifest"},
        layer,
        {**layer, "completed": model.size // 2},
        {**layer, "completed": model.size},
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]
    if body.get("stream") is False:
        fake.install(model)
        return wire.json_response(steps[-1], content_type=wire.JSON)
    resp = await ex.stream(wire.NDJSON)
    for step in steps:
        if step["status"] == "success":
            fake.install(model)
        await ex.send(wire.dumps(step) + b"\n")
    return resp


async def copy(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    body, error = engine.request_object(ex, "api.CopyRequest")
    if error:
        return wire.native_error(400, error)
    source, destination = body.get("source"), body.get("destination")
    model = fake.find_model(source)
    if model is None:
        return wire.native_error(404, f'model "{source or ""}" not found')
    if not isinstance(destination, str) or not destination.strip():
        return wire.native_error(400, f'destination "{destination or ""}" is invalid')
    fake.install(dataclasses.replace(model, name=wire.short_name(destination)))
    return web.Response()


async def delete(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    body, error = engine.request_object(ex, "api.DeleteRequest")
    if error:
        return wire.native_error(400, error)
    name = _model_field(body)
    model = fake.find_model(name)
    if model is None:
        return wire.native_error(404, f"model '{name}' not found")
    fake.remove(model.name)
    return web.Response()


_DIGEST_RE = re.compile(r"sha256[:-][0-9a-f]{64}")


async def blob_head(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    digest = ex.request.match_info["digest"]
    if fake.has_blob(digest):
        return web.Response()
    return wire.native_error(404, f'blob "{digest}" not found')


async def blob_post(fake: FakeOllama, ex: Exchange) -> web.StreamResponse:
    digest = ex.request.match_info["digest"]
    if _DIGEST_RE.fullmatch(digest) is None:
        return wire.native_error(400, "invalid digest format")
    if fake.has_blob(digest):
        return web.Response()
    actual = "sha256:" + hashlib.sha256(ex.seen.body).hexdigest()
    if actual != digest.replace("-", ":", 1):
        return wire.native_error(400, f'digest mismatch, expected "{digest}", got "{actual}"')
    fake.add_blob(digest)
    return web.Response(status=201)
