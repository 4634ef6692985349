"""The transparency corpus (issue #13): legal-but-unusual upstreams, each driven through
every route family (native stream and non-streamed, /v1 streams with and without
include_usage, /v1/completions, /v1 non-streamed, /chat streamed and not, /api/tags and its
HEAD). The body a client reads through the gateway must equal the body read directly,
except only the usage the gateway asked for; the usage and outcome the gateway records must
equal what the reference readers (h11, ``json.loads`` per line, the openai SDK's SSE
decoder) read from the same bytes. Only an answer the upstream cut short gets something of
the gateway's: one error frame at the end of a plain stream, or a cut connection.

The scripted upstream and the checks are in ``corpus.py``. nginx (buffering off, in front of
the fake Ollama) and uvicorn (an sse-starlette app) are read through a recording tap, so
the reference reads the very bytes the gateway was sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loadtest.bench.services import Service, find_nginx, nginx_conf, stop
from loadtest.fake_ollama import FakeOllama
from proxy import middleware
from tests.conftest import MODEL, GatewayFactory, metric
from tests.functional.corpus import (
    ALL,
    BODIES,
    CHAT_ONCE,
    NATIVE_STREAM,
    SSE,
    STREAMS,
    TAGS,
    TAGS_HEAD,
    V1_ONCE,
    V1_STREAM,
    V1_USAGE,
    Case,
    Family,
    Finished,
    Request,
    ScriptedUpstream,
    Seen,
    Tap,
    check_family,
    document,
    each_family,
    every,
    families,
    media_type,
    message,
    mid_line,
    mid_utf8,
    per_line,
    read_direct,
    read_gateway,
    sse_chunks,
    whole,
)
from tests.reference import Message, check_stripped, raw_events, sse_events

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def finished(monkeypatch: pytest.MonkeyPatch) -> Finished:
    found = Finished()
    monkeypatch.setattr(middleware, "request_finished", found.record)
    return found


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # Raw bytes (no decompression), and room for the large-headers case.
    async with aiohttp.ClientSession(
        auto_decompress=False, max_field_size=1 << 15, max_line_size=1 << 15
    ) as http:
        yield http


# ---- the corpus: complete answers ---------------------------------------------------------

CHUNKED = Case("chunked", framing="chunked", cut=per_line)  # as Ollama's Go server
PAD = tuple((f"X-Pad-{i}", "p" * 1000) for i in range(16))  # 16 KB of header fields
CASES = [
    Case("go-compact-content-length"),
    CHUNKED,
    replace(CHUNKED, name="transfer-encoding-Chunked", te="Chunked"),
    replace(CHUNKED, name="transfer-encoding-CHUNKED", te="CHUNKED"),
    replace(CHUNKED, name="chunk-extensions", extensions=True),
    replace(CHUNKED, name="chunk-sizes-uppercase-zero-padded", chunk_size=b"%06X"),
    Case("close-delimited-http11", framing="close", cut=per_line),
    Case("close-delimited-http10", framing="close", version="HTTP/1.0", cut=per_line),
    Case("http10-keep-alive", version="HTTP/1.0", headers=(("Connection", "keep-alive"),)),
    replace(CHUNKED, name="transfer-encoding-with-content-length", te_and_length=True),
    replace(CHUNKED, name="chunked-trailers-in-one-write", trailers=True, cut=whole),
    Case("interim-100-continue", interim=b"HTTP/1.1 100 Continue\r\n\r\n"),
    replace(CHUNKED, name="interim-100-and-103-early-hints",
            interim=b"HTTP/1.1 100 Continue\r\n\r\n"
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"),
    Case("large-headers-16k", headers=PAD),
    Case("empty-reason-phrase-lowercase-tight-fields", reason="",
         field_format="{name}:{value} \t"),
    Case("keep-alive-timeout-header",
         headers=(("Connection", "keep-alive"), ("Keep-Alive", "timeout=1, max=100"))),
    Case("close-right-after-response", close_after=True),
    replace(CHUNKED, name="chunks-of-3-bytes", cut=every(3)),
    replace(CHUNKED, name="chunks-of-1-byte", cut=every(1), families=STREAMS),
    Case("writes-of-7-bytes", cut=every(7)),
    replace(CHUNKED, name="chunk-size-lines-split", wire_every=2, families=STREAMS),
    replace(CHUNKED, name="unicode-split-mid-character", cut=mid_utf8),
    Case("lines-split-mid-line", cut=mid_line),
    replace(CHUNKED, name="python-json-separators", separators=(", ", ": ")),
    Case("json-indent", separators=(", ", ": "), indent=2),
    replace(CHUNKED, name="escaped-keys-ensure-ascii", ensure_ascii=True, escape_keys=True),
    # Half an emoji, as a Python server writes it (Go writes U+FFFD): orjson refuses it.
    replace(CHUNKED, name="lone-surrogate-escapes", ensure_ascii=True,
            texts=("Hé", 'llo, "w\ud83d" ', "end\n")),
    replace(CHUNKED, name="crlf-line-ends", eol="\r\n", sse_eol="\r\n"),
    Case("no-final-newline-no-blank-after-done", final_newline=False, done_blank=False),
    Case("sse-cr-only", sse_eol="\r", cut=mid_line),
    replace(CHUNKED, name="sse-mixed-line-ends", sse_eol="mixed", cut=every(5)),
    replace(CHUNKED, name="sse-id-event-retry-comments", sse_fields=True, done_blank=False),
    replace(CHUNKED, name="sse-multi-line-data", indent=1, cut=mid_line),
    Case("sse-data-without-space", sse_space=False, sse_fields=True),
    Case("media-type-parameters", media_type_params="; charset=utf-8"),
    Case("gzip-content-length", coding="gzip"),
    replace(CHUNKED, name="gzip-chunked-small", coding="gzip", cut=every(16)),
    Case("deflate", coding="deflate", separators=(", ", ": ")),
    replace(CHUNKED, name="gzip-one-member-per-line", coding="gzip-members"),
    replace(CHUNKED, name="unknown-coding-br-opaque", coding="br"),
    replace(CHUNKED, name="huge-line-3mb", huge=True, cut=every(16384)),
    replace(CHUNKED, name="upstream-error-in-body", error=True),
    replace(CHUNKED, name="stream-ends-without-done", end=False),
    Case("metadata-204", status=204, families=(TAGS, TAGS_HEAD)),
    Case("metadata-304-with-content-length", status=304, families=(TAGS, TAGS_HEAD)),
]  # fmt: skip


@pytest.mark.parametrize("kind", ["ollama", "openai"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_a_legal_upstream_reads_the_same_through_the_gateway(
    case: Case, kind: str, gateway_factory: GatewayFactory, session: aiohttp.ClientSession,
    finished: Finished,
) -> None:  # fmt: skip
    """Every route family's answer, read through the gateway, equals the direct read, and the
    recorded usage and outcome equal the reference parse (with ``upstream.kind: openai``,
    /chat reads the SSE variants and the relay counts content chunks)."""
    upstream = await ScriptedUpstream.start(case)
    try:
        running = await gateway_factory(upstream_url=upstream.url, upstream={"kind": kind})
        relayed_on = []

        async def check(family: Family) -> None:
            direct = await read_direct(upstream.url, family)
            seen = await read_gateway(session, running.url, family)
            await check_family(family, direct, seen, finished, count_chunks=kind == "openai")
            if not family.chat:
                relayed_on.append(upstream.connection_of(seen.request_id))

        known = families(kind)
        await each_family(tuple(f for f in case.families if f in known), check, kind)
        # Keep-alive as the framing allows: one connection for all, or one for each.
        if case.check_reuse:
            assert len(set(relayed_on)) == (1 if case.reusable else len(relayed_on))
    finally:
        await upstream.close()


@pytest.mark.parametrize(("status", "name"), [(204, TAGS), (304, TAGS), (200, TAGS_HEAD)])
async def test_a_bodiless_answer_without_length_keeps_its_connection(
    status: int, name: str, gateway_factory: GatewayFactory, session: aiohttp.ClientSession,
    finished: Finished,
) -> None:  # fmt: skip
    """A 204, a 304 or an answer to HEAD without Content-Length is complete at its head: the
    gateway reuses the connection for its next request."""
    head = f"HTTP/1.1 {status} {'OK' if status == 200 else 'No Content'}\r\n"
    head += "Content-Type: application/json\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\n"
    upstream = await ScriptedUpstream(lambda _request, _nth: ([head.encode()], False)).run()
    try:
        running = await gateway_factory(upstream_url=upstream.url)
        used = []
        for _ in range(2):
            seen = await read_gateway(session, running.url, families()[name])
            await finished.get(seen.request_id)
            assert (seen.status, seen.body) == (status, b"")
            used.append(upstream.connection_of(seen.request_id))
        assert used[0] == used[1]
    finally:
        await upstream.close()


# ---- truncation: the only time the gateway adds anything ---------------------------------

TRUNCATED = [
    replace(CHUNKED, name="cut-mid-chunk", truncate=True),
    replace(CHUNKED, name="cut-mid-chunk-Transfer-Encoding-Chunked", truncate=True, te="Chunked"),
    Case("cut-before-content-length", truncate=True, cut=per_line),
    Case("cut-gzip-body", truncate=True, coding="gzip"),
    replace(CHUNKED, name="cut-gzip-chunked", truncate=True, coding="gzip"),
]
_TWO_LINE_ENDS = re.compile(rb"(\r\n|\r|\n)(\r\n|\r|\n)$")


def whole_frames(body: bytes, *, sse: bool) -> bytes:
    """The part of a cut body that ends with a whole line (or event)."""
    if not sse:
        return body[: body.rfind(b"\n") + 1]
    events = raw_events(body)
    if events and not _TWO_LINE_ENDS.search(events[-1]):
        events.pop()  # the event in progress
    return b"".join(events)


def check_truncated(direct: Message, seen: Seen, record: dict[str, Any], family: Family) -> None:
    """A plain stream gets its whole frames and exactly one in-dialect error frame; anything
    else (a document, a compressed body) ends with the connection cut; /chat answers 502, or
    ends its own stream with one error line. The outcome is error."""
    assert not direct.complete, "the direct read was not cut"
    assert record["outcome"] == "error"
    if family.name == CHAT_ONCE:  # nothing was sent yet
        assert seen.status == 502
        return
    if family.chat:
        lines = [json.loads(line) for line in seen.body.splitlines()]
        assert [line for line in lines if "error" in line] == lines[-1:]
        return
    if family.name in STREAMS and direct.coding == "identity":
        assert not seen.cut
        if media_type(direct) == SSE:
            *events, frame = raw_events(seen.body)
            whole = whole_frames(direct.body, sse=True)
            if family.strips:  # the whole events, as the gateway strips them
                check_stripped(whole, b"".join(events))
            else:
                assert b"".join(events) == whole
            (event,) = sse_events(frame)  # exactly one event: an OpenAI error object
            assert set(json.loads(event[1])["error"]) == {"message", "type", "param", "code"}
        else:
            whole = whole_frames(direct.body, sse=False)
            assert seen.body.startswith(whole)
            frame = seen.body[len(whole) :]
            assert frame.count(b"\n") == 1
            assert isinstance(json.loads(frame)["error"], str)
        return
    assert seen.cut, "a cut document or compressed body must end with a cut connection"
    assert direct.body.startswith(seen.body)


@pytest.mark.parametrize("case", TRUNCATED, ids=[case.name for case in TRUNCATED])
async def test_a_cut_answer_ends_with_one_error_frame_or_a_cut_connection(
    case: Case, gateway_factory: GatewayFactory, session: aiohttp.ClientSession,
    finished: Finished,
) -> None:  # fmt: skip
    """An answer the upstream cut short is the only one the gateway adds to: one error frame
    at the end of a plain stream, a cut connection for anything else; outcome error."""
    upstream = await ScriptedUpstream.start(case)
    try:
        running = await gateway_factory(upstream_url=upstream.url)

        async def check(family: Family) -> None:
            direct = await read_direct(upstream.url, family)
            seen = await read_gateway(session, running.url, family)
            check_truncated(direct, seen, await finished.get(seen.request_id), family)

        await each_family(BODIES, check)
    finally:
        await upstream.close()


# ---- a kept-alive connection the upstream closes as the gateway reuses it -----------------


def closes_second_request(case: Case) -> ScriptedUpstream:
    """The first corpus request on a connection is answered; the second is read in full and
    the connection closed without a byte of answer (an idle-close race, or an upstream
    killed just as it read the request)."""

    def reply(request: Request, nth: int) -> tuple[list[bytes], bool]:
        if nth >= 1:
            return [], True
        kind = "tags" if request.path == "/api/tags" else "ndjson"
        return message(case, kind, request.method)

    return ScriptedUpstream(reply)


async def test_a_reused_connection_closed_unanswered_resends_only_idempotent_requests(
    gateway_factory: GatewayFactory, session: aiohttp.ClientSession, finished: Finished
) -> None:
    """On a kept-alive connection closed without an answer, GET /api/tags is sent again on a
    new connection (and counted); POST /api/chat is not: the upstream read it once and the
    client gets an in-dialect 502."""
    case = Case("keep-alive")
    upstream = await closes_second_request(case).run()
    try:
        running = await gateway_factory(upstream_url=upstream.url)
        tags, chat = families()[TAGS], families()[NATIVE_STREAM]
        first = await read_gateway(session, running.url, tags)  # leaves a pooled connection
        await finished.get(first.request_id)
        again = await read_gateway(session, running.url, tags)
        record = await finished.get(again.request_id)
        assert (again.status, again.body) == (first.status, first.body)
        assert record["retries"] == 1
        assert [r.path for r in upstream.requests] == ["/api/tags"] * 3

        upstream.requests.clear()  # the pool holds the new connection: it closes the next
        seen = await read_gateway(session, running.url, chat)
        record = await finished.get(seen.request_id)
        assert [r.path for r in upstream.requests] == ["/api/chat"]
        assert seen.status == 502
        assert isinstance(json.loads(seen.body)["error"], str)
        assert (record["outcome"], record["retries"]) == ("error", 0)
        assert metric(await running.metrics_text(), "ollama_upstream_retries_total") == 1
    finally:
        await upstream.close()


# ---- real upstreams, read through a recording tap -----------------------------------------


async def through_tap(
    tap: Tap, session: aiohttp.ClientSession, gateway_url: str, finished: Finished,
    family: Family, *, count_chunks: bool,
) -> None:  # fmt: skip
    seen = await read_gateway(session, gateway_url, family)
    direct = await tap.answer(seen.request_id)
    await check_family(family, direct, seen, finished, count_chunks=count_chunks)


@pytest.fixture
async def nginx_url(fake: FakeOllama, tmp_path: Path) -> AsyncIterator[str]:
    """nginx with buffering off in front of the fake Ollama (the bench's configuration), on
    a socket bound here that nginx inherits: no port race, no waiting for it to listen."""
    binary = find_nginx()
    if binary is None:
        pytest.skip("nginx is not installed (/usr/sbin/nginx)")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.set_inheritable(True)
    port = listener.getsockname()[1]
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(port, fake.url, tmp_path))
    proc = await asyncio.create_subprocess_exec(
        binary, "-e", str(tmp_path / "nginx-error.log"), "-c", str(conf),
        pass_fds=[listener.fileno()], env={**os.environ, "NGINX": f"{listener.fileno()};"},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    listener.close()  # nginx holds it now
    service = Service("nginx", proc, f"http://127.0.0.1:{port}")
    try:
        yield service.url
    finally:
        await stop(service)


@pytest.mark.timeout(60)
async def test_nginx_in_front_of_the_fake_reads_the_same_through_the_gateway(
    nginx_url: str, gateway_factory: GatewayFactory, session: aiohttp.ClientSession,
    finished: Finished,
) -> None:  # fmt: skip
    """Through nginx (chunked, buffering off), every family's answer reads the same through
    the gateway as the bytes nginx sent it, and the counts are the reference parse's."""
    tap = await Tap(nginx_url).start()
    try:
        running = await gateway_factory(upstream_url=tap.url, upstream={"keepalive_s": 0})

        async def check(family: Family) -> None:
            await through_tap(tap, session, running.url, finished, family, count_chunks=False)

        await each_family(ALL, check)
    finally:
        await tap.close()


def sse_app() -> Any:
    """An OpenAI-compatible server as Python writes one: sse-starlette's CRLF events, a
    comment, ids, the usage chunk over several data lines; JSON with Python's separators."""
    from sse_starlette import EventSourceResponse, ServerSentEvent
    from starlette.applications import Starlette
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import Response
    from starlette.routing import Route

    case = Case("uvicorn", separators=(", ", ": "))

    async def completions(request: StarletteRequest) -> Response:
        body = await request.json()
        if not body.get("stream"):
            return Response(case.dumps(document(case, "openai")), media_type="application/json")
        include = (body.get("stream_options") or {}).get("include_usage")

        async def events() -> AsyncIterator[ServerSentEvent]:
            yield ServerSentEvent(comment="keep-alive")
            *chunks, usage = sse_chunks(case)
            for i, chunk in enumerate(chunks):
                yield ServerSentEvent(data=case.dumps(chunk), id=str(i))
            if include:
                yield ServerSentEvent(data=case.dumps(usage, indent=2), event="message")
            yield ServerSentEvent(data="[DONE]")

        return EventSourceResponse(events(), sep="\r\n")

    async def models(_request: StarletteRequest) -> Response:
        listed = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1,
                                              "owned_by": "library"}]}  # fmt: skip
        return Response(case.dumps(listed), media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", models),
        ]
    )


@pytest.fixture
async def uvicorn_url() -> AsyncIterator[str]:
    """uvicorn (its h11 protocol) serving ``sse_app`` on a socket bound here."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    config = uvicorn.Config(
        sse_app(), http="h11", ws="none", lifespan="off", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        listener.close()


@pytest.mark.timeout(60)
async def test_uvicorn_sse_app_reads_the_same_through_the_gateway(
    uvicorn_url: str, gateway_factory: GatewayFactory, session: aiohttp.ClientSession,
    finished: Finished,
) -> None:  # fmt: skip
    """An OpenAI-compatible uvicorn app (CRLF events, comments, ids, usage over several data
    lines) reads the same through the gateway, with the reference parse's counts."""
    tap = await Tap(uvicorn_url).start()
    try:
        running = await gateway_factory(
            upstream_url=tap.url, upstream={"kind": "openai", "keepalive_s": 0}
        )

        async def check(family: Family) -> None:
            await through_tap(tap, session, running.url, finished, family, count_chunks=True)

        await each_family((V1_USAGE, V1_STREAM, V1_ONCE, "chat_stream", CHAT_ONCE, TAGS), check,
                          "openai")  # fmt: skip
    finally:
        await tap.close()
