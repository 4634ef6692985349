"""The fake Ollama speaks Ollama's wire protocol: driven over real sockets by the official clients.

Raw-byte checks use aiohttp so framing (content types, newlines, key order, SSE frames) is
seen exactly as a proxy would see it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from loadtest.fake_ollama import FakeModel, FakeOllama, FakeOllamaConfig
from loadtest.fake_ollama.__main__ import config_from, parse_args

pytestmark = pytest.mark.timeout(30)

BUSY = "server busy, please try again.  maximum pending requests exceeded"
MIDSTREAM = "an error was encountered while running the model"
GENERATE_FINAL_KEYS = [
    "model",
    "created_at",
    "response",
    "done",
    "done_reason",
    "context",
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
]


@pytest.fixture
async def native(fake: FakeOllama) -> AsyncIterator[ollama.AsyncClient]:
    client = ollama.AsyncClient(host=fake.url)
    yield client
    await client.close()


@pytest.fixture
async def oai(fake: FakeOllama) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=fake.url + "/v1", api_key="x", max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def lines_of(body: bytes) -> list[dict[str, Any]]:
    """Split an NDJSON body, asserting Ollama's framing: `\\n`-terminated, no blank lines."""
    assert body.endswith(b"\n")
    assert b"\r" not in body
    raw = body.split(b"\n")[:-1]
    assert all(raw), "no blank lines"
    return [json.loads(line) for line in raw]


def frames_of(body: bytes) -> list[str]:
    """Split an SSE body into `data:` payloads, asserting `data: ...\\n\\n` framing."""
    assert body.endswith(b"\n\n")
    frames = body.decode().split("\n\n")[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames)
    return [f.removeprefix("data: ") for f in frames]


# ---- native API through the official ollama client -----------------------------------------


async def test_generate_stream_reports_final_statistics(
    fake: FakeOllama, native: ollama.AsyncClient
) -> None:
    """A streamed generate yields one token per chunk and integer-ns statistics at the end."""
    parts = [
        p async for p in await native.generate("llama3.2", "Why is the sky blue?", stream=True)
    ]
    assert [p.done for p in parts] == [False] * 8 + [True]
    final = parts[-1]
    assert (
        "".join(p.response or "" for p in parts) == "The sky is blue because air molecules scatter"
    )
    assert final.done_reason == "stop"
    assert final.eval_count == 8
    assert final.prompt_eval_count == 12  # 5 words + template overhead
    assert final.context
    assert len(final.context) == 12 + 8
    assert isinstance(final.total_duration, int)
    assert final.total_duration > 0
    assert final.total_duration >= (final.load_duration or 0) + (final.eval_duration or 0)
    assert fake.totals == {"prompt_eval_count": 12, "eval_count": 8}


async def test_generate_non_stream_capped_by_num_predict(native: ollama.AsyncClient) -> None:
    """stream:false returns one object; num_predict below `tokens` ends with done_reason length."""
    reply = await native.generate("llama3.2", "hello", options={"num_predict": 3})
    assert reply.done
    assert reply.done_reason == "length"
    assert reply.response == "The sky is"
    assert reply.eval_count == 3


async def test_chat_stream_and_non_stream(fake: FakeOllama, native: ollama.AsyncClient) -> None:
    """Chat streams assistant messages and the non-stream reply carries the same counts."""
    messages = [{"role": "user", "content": "hi there"}]
    parts = [p async for p in await native.chat("llama3.2", messages=messages, stream=True)]
    assert all(p.message.role == "assistant" for p in parts)
    assert parts[-1].done
    assert parts[-1].eval_count == 8
    reply = await native.chat("llama3.2", messages=messages)
    assert reply.message.content == "".join(p.message.content or "" for p in parts)
    assert reply.prompt_eval_count == parts[-1].prompt_eval_count == 2 + 4 + 3
    assert fake.totals == {"prompt_eval_count": 18, "eval_count": 16}


async def test_list_show_and_ps(native: ollama.AsyncClient) -> None:
    """Listing, show (with model_info) and ps describe the configured and loaded models."""
    listed = await native.list()
    assert [m.model for m in listed.models] == [
        "llama3.2:latest",
        "qwen2.5:0.5b",
        "all-minilm:latest",
    ]
    shown = await native.show("llama3.2")
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.capabilities == ["completion"]
    assert (await native.ps()).models == []
    await native.generate("qwen2.5:0.5b", "hi")
    running = (await native.ps()).models
    assert [m.model for m in running] == ["qwen2.5:0.5b"]
    assert running[0].expires_at is not None


async def test_embed_and_legacy_embeddings(fake: FakeOllama, native: ollama.AsyncClient) -> None:
    """/api/embed returns normalised vectors with usage; the legacy route returns one vector."""
    reply = await native.embed("all-minilm", ["one two", "three"])
    assert len(reply.embeddings) == 2
    assert all(len(v) == 8 for v in reply.embeddings)
    assert abs(sum(x * x for x in reply.embeddings[0]) - 1.0) < 1e-4
    assert reply.prompt_eval_count == 3
    legacy = await native.embeddings("all-minilm", "one two")
    assert list(legacy.embedding) == reply.embeddings[0]
    assert fake.totals == {"prompt_eval_count": 3, "eval_count": 0}


async def test_pull_streams_progress_then_installs(native: ollama.AsyncClient) -> None:
    """A pull streams Ollama's status sequence and the model is then listed."""
    statuses = [p.status or "" async for p in await native.pull("tinyllama", stream=True)]
    assert statuses[0] == "pulling manifest"
    assert statuses[1].startswith("pulling ")
    assert len(statuses[1]) == len("pulling ") + 12
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    assert "tinyllama:latest" in [m.model for m in (await native.list()).models]
    assert (await native.pull("other")).status == "success"


async def test_copy_and_delete(native: ollama.AsyncClient) -> None:
    """Copy and delete answer 200 with an empty body; deleting twice is a 404."""
    assert (await native.copy("llama3.2", "mine")).status == "success"
    assert "mine:latest" in [m.model for m in (await native.list()).models]
    assert (await native.delete("mine")).status == "success"
    with pytest.raises(ollama.ResponseError) as info:
        await native.delete("mine")
    assert info.value.status_code == 404
    assert info.value.error == "model 'mine' not found"


async def test_blob_upload_and_head(
    fake: FakeOllama, native: ollama.AsyncClient, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An uploaded blob is then present to HEAD; an unknown one is 404."""
    path = tmp_path / "blob.bin"
    path.write_bytes(b"weights")
    digest = await native.create_blob(path)
    async with http.head(f"{fake.url}/api/blobs/{digest}") as resp:
        assert resp.status == 200
    async with http.head(f"{fake.url}/api/blobs/sha256:{'0' * 64}") as resp:
        assert resp.status == 404


async def test_unknown_model_is_404(native: ollama.AsyncClient) -> None:
    """An unknown model is Ollama's 404 with the endpoint's own wording."""
    with pytest.raises(ollama.ResponseError) as info:
        await native.generate("nope", "hi")
    assert (info.value.status_code, info.value.error) == (404, "model 'nope' not found")
    with pytest.raises(ollama.ResponseError) as info:
        await native.embed("nope", "hi")
    assert info.value.error == 'model "nope" not found, try pulling it first'


async def test_midstream_error_raises_in_stream(
    fake: FakeOllama, native: ollama.AsyncClient
) -> None:
    """After fail_after_chunks chunks an error line arrives, which the client raises."""
    fake.config.mode = "midstream_error"
    received: list[str] = []

    async def consume() -> None:
        async for part in await native.generate("llama3.2", "hi", stream=True):
            received.append(part.response or "")

    with pytest.raises(ollama.ResponseError) as info:
        await consume()
    assert received == ["The", " sky"]
    assert info.value.error == MIDSTREAM
    assert fake.totals["eval_count"] == 0


async def test_load_and_unload_shortcuts(native: ollama.AsyncClient, fake: FakeOllama) -> None:
    """An empty prompt loads (paying load_s once), keep_alive 0 unloads; neither has metrics."""
    fake.config.load_s = 0.05
    loaded = await native.generate("llama3.2", "")
    assert loaded.done_reason == "load"
    assert loaded.total_duration is None
    warm = await native.generate("llama3.2", "hi")
    assert warm.load_duration is not None
    assert warm.load_duration < 50_000_000
    unloaded = await native.generate("llama3.2", "", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert (await native.ps()).models == []
    cold = await native.chat("llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert cold.load_duration is not None
    assert cold.load_duration >= 50_000_000


# ---- OpenAI-compatible API through the official openai client ------------------------------


async def test_openai_chat_stream_without_usage(oai: openai.AsyncOpenAI, fake: FakeOllama) -> None:
    """Role only on the first chunk, a separate empty finish chunk, and no usage chunk."""
    stream = await oai.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi there"}], stream=True
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].delta.content is None
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith("The sky")
    assert fake.totals["eval_count"] == 0  # no usage was sent, so none is counted


async def test_openai_chat_stream_with_usage(
    oai: openai.AsyncOpenAI, native: ollama.AsyncClient, fake: FakeOllama
) -> None:
    """include_usage adds a choices-less usage chunk whose counts match the native API."""
    messages: Any = [{"role": "user", "content": "hi there"}]
    stream = await oai.chat.completions.create(
        model="llama3.2",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=5,
    )
    chunks = [c async for c in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert chunks[-2].choices[0].finish_reason == "length"
    native_reply = await native.chat("llama3.2", messages=messages, options={"num_predict": 5})
    assert last.usage.prompt_tokens == native_reply.prompt_eval_count
    assert last.usage.completion_tokens == native_reply.eval_count == 5
    assert fake.totals == {"prompt_eval_count": 2 * last.usage.prompt_tokens, "eval_count": 10}


async def test_openai_chat_non_stream_has_usage(oai: openai.AsyncOpenAI) -> None:
    """A non-streamed chat completion always carries usage."""
    reply = await oai.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content == "The sky is blue because air molecules scatter"
    assert reply.usage is not None
    assert (reply.usage.completion_tokens, reply.usage.total_tokens) == (8, 8 + 8)


async def test_openai_completions(oai: openai.AsyncOpenAI) -> None:
    """Legacy completions stream text chunks and end with a usage chunk when asked."""
    reply = await oai.completions.create(model="llama3.2", prompt="hello", max_tokens=2)
    assert reply.choices[0].text == "The sky"
    assert reply.choices[0].finish_reason == "length"
    stream = await oai.completions.create(
        model="llama3.2", prompt="hello", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_openai_embeddings(oai: openai.AsyncOpenAI, native: ollama.AsyncClient) -> None:
    """Embeddings decode from base64 (the SDK default) and float to the native vectors."""
    native_vec = (await native.embed("all-minilm", "hello world")).embeddings[0]
    b64 = await oai.embeddings.create(model="all-minilm", input="hello world")
    floats = await oai.embeddings.create(
        model="all-minilm", input=["hello world"], encoding_format="float"
    )
    assert floats.data[0].embedding == native_vec
    assert b64.data[0].embedding == pytest.approx(native_vec, abs=1e-6)
    assert b64.usage.prompt_tokens == b64.usage.total_tokens == 2


async def test_openai_models(oai: openai.AsyncOpenAI) -> None:
    """The model list and retrieve mirror /api/tags."""
    ids = [m.id async for m in oai.models.list()]
    assert ids == ["llama3.2:latest", "qwen2.5:0.5b", "all-minilm:latest"]
    model = await oai.models.retrieve("llama3.2")
    assert (model.id, model.owned_by) == ("llama3.2", "library")


async def test_openai_not_found(oai: openai.AsyncOpenAI) -> None:
    """An unknown model raises NotFoundError with Ollama's OpenAI-shaped body."""
    with pytest.raises(openai.NotFoundError) as info:
        await oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.body == {
        "message": "model 'nope' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }


async def test_openai_busy_via_header(oai: openai.AsyncOpenAI) -> None:
    """X-Fake-Mode: busy gives a 503 api_error with Ollama's exact message."""
    with pytest.raises(openai.InternalServerError) as info:
        await oai.chat.completions.create(
            model="llama3.2",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Fake-Mode": "busy"},
        )
    assert info.value.status_code == 503
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"] == BUSY
    assert info.value.body["type"] == "api_error"


# ---- concurrency, disconnects, failure modes -----------------------------------------------


async def test_num_parallel_one_makes_the_second_generation_wait(
    fake: FakeOllama, native: ollama.AsyncClient
) -> None:
    """With one slot, a second concurrent generation waits and runs after the first."""
    # The first is slow enough to still be generating when the second arrives on a busy
    # machine; once the second waits, the first speeds up (the interval is read per token).
    fake.config.tokens, fake.config.token_interval_s = 40, 0.05
    first = asyncio.create_task(native.generate("llama3.2", "one"))
    await fake.wait_for(lambda: fake.active == 1)
    second = asyncio.create_task(native.generate("llama3.2", "two"))
    await fake.wait_for(lambda: fake.waiting == 1)
    fake.config.token_interval_s = 0.01
    results = await asyncio.gather(first, second)
    assert all(r.done_reason == "stop" for r in results)
    assert (fake.max_active, fake.active, fake.waiting) == (1, 0, 0)
    # The waiter's slot wait shows up in total_duration, beside load, prompt and eval time.
    waited = results[1]
    assert waited.total_duration is not None
    accounted = sum(
        d or 0 for d in (waited.load_duration, waited.prompt_eval_duration, waited.eval_duration)
    )
    assert waited.total_duration - accounted > 20_000_000


async def test_client_disconnect_is_recorded(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    """A client that goes away mid-stream cancels the handler and frees the slot."""
    fake.config.tokens, fake.config.token_interval_s = 1000, 0.05
    resp = await http.post(f"{fake.url}/api/chat", json={"model": "llama3.2", "messages": [{}]})
    assert json.loads(await resp.content.readline())["done"] is False
    resp.close()
    seen = fake.seen[-1]
    await fake.wait_for(seen.closed.is_set, timeout=0.5)
    assert seen.disconnected
    assert seen.finished is not None
    assert fake.active == 0
    assert seen.chunks_sent < 5


async def test_disconnects_while_queued_or_in_prompt_eval_free_everything(
    fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Clients leaving during prompt evaluation or in the slot queue leave no slot or waiter."""
    fake.config.ttft_s = 30.0
    body = {"model": "llama3.2", "prompt": "x"}
    holder = asyncio.create_task(http.post(f"{fake.url}/api/generate", json=body))
    await fake.wait_for(lambda: fake.active == 1)
    queued = asyncio.create_task(http.post(f"{fake.url}/api/generate", json=body))
    await fake.wait_for(lambda: fake.waiting == 1)
    queued.cancel()
    await fake.wait_for(lambda: fake.waiting == 0 and fake.seen[1].closed.is_set())
    holder.cancel()
    await fake.wait_for(lambda: fake.active == 0 and fake.seen[0].closed.is_set())
    assert [s.disconnected for s in fake.seen] == [True, True]
    assert fake.max_active == 1


async def test_failures_without_streaming(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    """With stream:false a mid-stream error is a plain 500 and drop closes without a reply."""
    body = {"model": "llama3.2", "prompt": "x", "stream": False}
    headers = {"X-Fake-Mode": "midstream_error"}
    async with http.post(f"{fake.url}/api/generate", json=body, headers=headers) as resp:
        assert resp.status == 500
        assert await resp.json() == {"error": MIDSTREAM}
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await http.post(f"{fake.url}/api/generate", json=body, headers={"X-Fake-Mode": "drop"})
    async with http.post(
        f"{fake.url}/api/generate", json=body, headers={"X-Fake-Mode": "bogus"}
    ) as resp:
        assert resp.status == 400


async def test_keep_alive_zero_unloads_after_the_request(
    fake: FakeOllama, native: ollama.AsyncClient
) -> None:
    """keep_alive 0 on a generation unloads the model once it is done."""
    await native.generate("llama3.2", "hi", keep_alive=0)
    assert fake.loaded == {}
    await native.generate("llama3.2", "hi", keep_alive="1h")
    assert list(fake.loaded) == ["llama3.2:latest"]


async def test_hang_sends_nothing_until_the_client_leaves(
    fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """hang never sends headers; the cancelled request is recorded as a disconnect."""
    request = asyncio.create_task(
        http.post(f"{fake.url}/api/generate", json={"model": "llama3.2", "prompt": "x"},
                  headers={"X-Fake-Mode": "hang"})
    )  # fmt: skip
    await fake.wait_for(lambda: len(fake.seen) == 1)
    assert not request.done()
    request.cancel()
    await fake.wait_for(fake.seen[0].closed.is_set)
    assert fake.seen[0].disconnected
    assert fake.seen[0].chunks_sent == 0


async def test_stall_sends_some_chunks_then_nothing(
    fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """stall sends fail_after_chunks lines and then keeps the stream open, silent."""
    fake.config.mode = "stall"
    body = {"model": "llama3.2", "prompt": "x"}
    async with http.post(f"{fake.url}/api/generate", json=body) as resp:
        first = [await resp.content.readline() for _ in range(2)]
        assert all(line.endswith(b"\n") for line in first)
        await fake.wait_for(lambda: fake.seen[0].chunks_sent == 2)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.content.readline(), 0.2)
        assert fake.active == 1  # a stalled runner keeps its slot
    await fake.wait_for(fake.seen[0].closed.is_set)
    assert fake.seen[0].disconnected
    assert fake.active == 0


async def test_stream_headers_leave_with_the_first_chunk(
    fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """As Go's net/http at Ollama's first flush: a runner stalled before its first token
    has sent no status line yet, so the client is still waiting for headers."""
    fake.config.mode = "stall"
    fake.config.fail_after_chunks = 0
    body = {"model": "llama3.2", "prompt": "x"}
    request = asyncio.create_task(http.post(f"{fake.url}/api/generate", json=body))
    await fake.wait_for(lambda: len(fake.seen) == 1 and fake.active == 1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(request), 0.3)
    request.cancel()
    await fake.wait_for(fake.seen[0].closed.is_set)
    assert fake.seen[0].chunks_sent == 0


async def test_drop_aborts_the_connection(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    """drop cuts the TCP connection inside the chunked body."""
    fake.config.mode = "drop"
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(
            f"{fake.url}/v1/chat/completions",
            json={"model": "llama3.2", "stream": True, "messages": [{"role": "user"}]},
        ) as resp:
            await resp.read()
    await fake.wait_for(fake.seen[0].closed.is_set)
    assert fake.seen[0].chunks_sent == 2
    assert not fake.seen[0].disconnected


async def test_error500_and_busy_native_shapes(
    fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Server-wide modes answer before any chunk with Ollama's native error bodies."""
    body = {"model": "llama3.2", "prompt": "x"}
    for mode, status, message in [
        ("busy", 503, BUSY),
        ("error500", 500, "model runner has unexpectedly stopped"),
        ("not_found", 404, "model 'llama3.2' not found"),
    ]:
        fake.config.mode = mode
        async with http.post(f"{fake.url}/api/generate", json=body) as resp:
            assert resp.status == status
            assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
            assert (await resp.json())["error"].startswith(message)
    fake.config.mode = "ok"
    async with http.post(f"{fake.url}/api/generate", json=body) as resp:
        assert resp.status == 200


async def test_host_check(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    """A foreign Host gets 403 with an empty body; local names and private IPs pass."""
    async with http.get(fake.url, headers={"Host": "evil.example"}) as resp:
        assert resp.status == 403
        assert await resp.read() == b""
    for host in ["localhost:11434", "10.1.2.3", "ollama.internal", "box.local", "[::1]:80"]:
        async with http.get(fake.url, headers={"Host": host}) as resp:
            assert resp.status == 200, host
    fake.config.check_host = False
    async with http.get(fake.url, headers={"Host": "evil.example"}) as resp:
        assert resp.status == 200


async def test_requests_are_recorded_with_headers(
    fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """seen keeps method, path, headers (case-insensitive lookup), body and parsed JSON."""
    await http.post(
        f"{fake.url}/api/show", json={"model": "llama3.2"}, headers={"Authorization": "Bearer t"}
    )
    seen = fake.seen[0]
    assert (seen.method, seen.path, seen.json) == ("POST", "/api/show", {"model": "llama3.2"})
    assert seen.headers["authorization"] == seen.headers.get("Authorization") == "Bearer t"
    assert "HOST" in seen.headers
    fake.reset()
    assert fake.seen == []
    assert fake.totals == {"prompt_eval_count": 0, "eval_count": 0}


async def test_wait_for_times_out(fake: FakeOllama) -> None:
    """wait_for raises TimeoutError when the condition never holds."""
    with pytest.raises(TimeoutError):
        await fake.wait_for(lambda: False, timeout=0.05)


# ---- raw bytes ----------------------------------------------------------------------------


async def test_raw_ndjson_framing_and_key_order(
    fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """NDJSON: x-ndjson, one object per `\\n` line, Go key order on the final line."""
    async with http.post(
        f"{fake.url}/api/generate", json={"model": "llama3.2", "prompt": "a <b> c"}
    ) as resp:
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        assert resp.headers["Transfer-Encoding"] == "chunked"
        body = await resp.read()
    lines = lines_of(body)
    assert list(lines[0]) == ["model", "created_at", "response", "done"]
    assert list(lines[-1]) == GENERATE_FINAL_KEYS
    assert lines[0]["created_at"].endswith("Z")
    assert all(isinstance(lines[-1][k], int) for k in GENERATE_FINAL_KEYS[6:])


async def test_raw_zero_statistics_are_omitted(
    fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Zero-valued statistics are left out, not sent as 0 (Go's omitempty)."""
    body = {"model": "llama3.2", "prompt": " ", "raw": True, "options": {"num_predict": 0}}
    async with http.post(f"{fake.url}/api/generate", json=body) as resp:
        (final,) = lines_of(await resp.read())
    assert final["done_reason"] == "length"
    assert "context" not in final  # raw mode has no context
    for key in ("prompt_eval_count", "eval_count", "eval_duration"):
        assert key not in final


async def test_raw_sse_framing(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    """SSE: text/event-stream, `data: {...}\\n\\n` frames, a finish frame, then [DONE]."""
    body = {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with http.post(f"{fake.url}/v1/chat/completions", json=body) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        frames = frames_of(await resp.read())
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert list(chunks[0]) == [
        "id", "object", "created", "model", "system_fingerprint", "choices"
    ]  # fmt: skip
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "The"}
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert len({c["id"] for c in chunks}) == 1


async def test_raw_completions_zeroed_usage_per_chunk(
    fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """/v1/completions with include_usage puts zeroed usage on every chunk, real usage last."""
    body = {
        "model": "llama3.2",
        "prompt": "x",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(f"{fake.url}/v1/completions", json=body) as resp:
        chunks = [json.loads(f) for f in frames_of(await resp.read())[:-1]]
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert all(c["usage"] == zero for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    fake.config.honor_stream_usage = False
    async with http.post(f"{fake.url}/v1/completions", json=body) as resp:
        chunks = [json.loads(f) for f in frames_of(await resp.read())[:-1]]
    assert all("usage" not in c for c in chunks)


async def test_raw_openai_midstream_error_drops_done(
    fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """A mid-stream failure on /v1 adds an empty chunk with model "" and never sends [DONE]."""
    body = {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    headers = {"X-Fake-Mode": "midstream_error"}
    async with http.post(f"{fake.url}/v1/chat/completions", json=body, headers=headers) as resp:
        frames = frames_of(await resp.read())
    assert "[DONE]" not in frames
    last = json.loads(frames[-1])
    assert last["model"] == ""
    assert last["choices"] == [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]
    assert len(frames) == 3


async def test_raw_small_endpoints(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    """GET/HEAD / say Ollama is running; unknown paths and methods get gin's text replies."""
    async with http.get(fake.url + "/") as resp:
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert await resp.read() == b"Ollama is running"
    async with http.head(fake.url + "/") as resp:
        assert resp.status == 200
    async with http.get(fake.url + "/api/version") as resp:
        assert await resp.read() == b'{"version":"0.33.0"}'
    async with http.get(fake.url + "/nope") as resp:
        assert (resp.status, await resp.read()) == (404, b"404 page not found")
    async with http.get(fake.url + "/api/generate") as resp:
        assert resp.status == 405
    async with http.post(fake.url + "/api/generate", data=b"") as resp:
        assert await resp.json() == {"error": "missing request body"}
    async with http.post(
        fake.url + "/api/chat", json={"model": "all-minilm", "messages": [{}]}
    ) as r:
        assert (r.status, await r.json()) == (400, {"error": '"all-minilm" does not support chat'})


async def test_openai_request_errors(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    """Bodies the OpenAI layer rejects get a 400 invalid_request_error before any model work."""
    url = f"{fake.url}/v1/chat/completions"
    async with http.post(url, json={"model": "llama3.2", "messages": []}) as resp:
        assert resp.status == 400
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        error = (await resp.json())["error"]
    assert error["message"] == "[] is too short - 'messages'"
    assert error["type"] == "invalid_request_error"
    async with http.post(url, data=b"{oops") as resp:
        assert resp.status == 400
    async with http.post(f"{fake.url}/v1/completions", json={"model": "llama3.2"}) as resp:
        reply = await resp.json()
    assert reply["choices"] == [{"text": "", "index": 0, "finish_reason": "load"}]
    assert fake.seen[0].json == {"model": "llama3.2", "messages": []}


async def test_concurrent_cold_requests_share_one_load(
    fake: FakeOllama, native: ollama.AsyncClient
) -> None:
    """Requests arriving while a model loads wait for that load and report it."""
    fake.config.load_s, fake.config.num_parallel = 0.1, 2
    cold = await asyncio.gather(*(native.generate("qwen2.5:0.5b", "hi") for _ in range(2)))
    assert all((r.load_duration or 0) >= 100_000_000 for r in cold)
    warm = await native.generate("qwen2.5:0.5b", "hi")
    assert (warm.load_duration or 0) < 100_000_000


async def test_cli_serves_until_terminated() -> None:
    """`python -m loadtest.fake_ollama` prints its URL when ready and exits on SIGTERM."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.fake_ollama", "--port", "0", "--tokens", "2",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        async with aiohttp.ClientSession() as http, http.get(url + "/api/version") as resp:
            assert await resp.json() == {"version": "0.33.0"}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_builds_the_config() -> None:
    """The CLI flags map onto FakeOllamaConfig fields."""
    args = parse_args(
        ["--port", "0", "--tokens", "3", "--models", "a,all-minilm:latest", "--no-host-check"]
    )
    config = config_from(args)
    assert config.tokens == 3
    assert not config.check_host
    assert config.honor_stream_usage
    assert config.models[0] == FakeModel("a")
    assert config.models[1].family == "bert"
    assert FakeOllamaConfig().models[2] == FakeModel("all-minilm:latest", family="bert")
