"""Scanners read statistics out of relayed bodies without changing what the client gets."""

from __future__ import annotations

import json

import pytest

from proxy.upstream.scanners import (
    JsonScanner,
    NdjsonScanner,
    SseScanner,
)

FINAL = (
    b'{"model":"llama3.2","created_at":"2026-08-21T17:05:40.132518Z","message":{"role":'
    b'"assistant","content":""},"done":true,"done_reason":"stop","total_duration":4883583458,'
    b'"load_duration":1334875,"prompt_eval_count":26,"prompt_eval_duration":342546000,'
    b'"eval_count":282,"eval_duration":4535599000}\n'
)
TOKEN = b'{"model":"llama3.2","created_at":"x","message":{"role":"assistant","content":"The"},"done":false}\n'  # noqa: E501


def _feed_all(scanner: NdjsonScanner | SseScanner | JsonScanner, chunks: list[bytes]) -> bytes:
    out = b"".join(scanner.feed(chunk) for chunk in chunks)
    return out + scanner.finish()


@pytest.mark.parametrize("size", [1, 7, 64, 4096])
def test_ndjson_finds_final_statistics_however_the_body_is_cut(size: int) -> None:
    """Split at any byte boundary, the relayed bytes are unchanged and the statistics found."""
    body = TOKEN * 3 + FINAL
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    scanner = NdjsonScanner()
    assert _feed_all(scanner, chunks) == body
    assert scanner.complete
    assert scanner.usage is not None
    assert scanner.usage.prompt_tokens == 26
    assert scanner.usage.completion_tokens == 282
    assert scanner.usage.tokens_per_second == pytest.approx(282 / 4.535599)
    assert scanner.usage.load_duration_s == pytest.approx(0.001334875)
    assert scanner.content_chunks == 3


def test_ndjson_final_line_with_a_huge_context_array() -> None:
    """A final generate line of several hundred KB (its context array) is still parsed."""
    context = list(range(120_000))
    final = json.dumps(
        {"model": "m", "response": "", "done": True, "context": context, "eval_count": 5},
        separators=(",", ":"),
    ).encode()
    body = final + b"\n"
    assert len(body) > 500_000
    scanner = NdjsonScanner()
    _feed_all(scanner, [body[i : i + 65536] for i in range(0, len(body), 65536)])
    assert scanner.usage is not None
    assert scanner.usage.completion_tokens == 5


def test_ndjson_missing_metrics_count_as_zero() -> None:
    """Ollama omits zero-valued metrics; a missing field reads as 0, not as an error."""
    scanner = NdjsonScanner()
    _feed_all(scanner, [b'{"model":"m","response":"","done":true,"done_reason":"load"}\n'])
    assert scanner.complete
    assert scanner.usage is not None
    assert (scanner.usage.prompt_tokens, scanner.usage.completion_tokens) == (0, 0)


def test_ndjson_error_line_is_recorded_and_the_stream_is_incomplete() -> None:
    """An in-stream error line marks the stream failed; no done line means not complete."""
    scanner = NdjsonScanner()
    _feed_all(scanner, [TOKEN, b'{"error":"an error was encountered while running the model"}\n'])
    assert scanner.error == "an error was encountered while running the model"
    assert not scanner.complete


def test_ndjson_content_mentioning_done_is_not_mistaken_for_the_final_line() -> None:
    """Model output containing the text "done":true is escaped and never matches."""
    line = json.dumps({"response": '{"done":true}', "done": False}, separators=(",", ":"))
    scanner = NdjsonScanner()
    _feed_all(scanner, [line.encode() + b"\n"])
    assert not scanner.complete


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


CHUNK = {"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
FINISH = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
USAGE = {"id": "c", "choices": [], "usage": {"prompt_tokens": 26, "completion_tokens": 2}}


@pytest.mark.parametrize("size", [10, 97, 100_000])
def test_sse_strips_the_usage_chunk_the_gateway_asked_for(size: int) -> None:
    """With strip_usage the client sees exactly the stream it asked for, and usage is counted."""
    body = _sse(CHUNK) * 2 + _sse(FINISH) + _sse(USAGE) + b"data: [DONE]\n\n"
    scanner = SseScanner(strip_usage=True)
    out = _feed_all(scanner, [body[i : i + size] for i in range(0, len(body), size)])
    assert out == _sse(CHUNK) * 2 + _sse(FINISH) + b"data: [DONE]\n\n"
    assert scanner.complete
    assert scanner.usage is not None
    assert scanner.usage.prompt_tokens == 26
    assert scanner.content_chunks == 2


def test_sse_keeps_usage_the_client_asked_for() -> None:
    """Without strip_usage the body passes through byte for byte."""
    body = _sse(CHUNK) + _sse(FINISH) + _sse(USAGE) + b"data: [DONE]\n\n"
    scanner = SseScanner(strip_usage=False)
    assert _feed_all(scanner, [body]) == body
    assert scanner.usage is not None


def test_sse_removes_zeroed_per_chunk_usage_of_completions() -> None:
    """/v1/completions puts a zeroed usage on each chunk when usage was asked for: removed."""
    chunk = {
        "id": "cmpl-1",
        "choices": [{"text": "Hi", "index": 0, "finish_reason": None}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    scanner = SseScanner(strip_usage=True)
    out = _feed_all(scanner, [_sse(chunk) + b"data: [DONE]\n\n"])
    first = json.loads(out.split(b"\n\n")[0][6:])
    assert "usage" not in first
    assert first["choices"][0]["text"] == "Hi"


@pytest.mark.parametrize("size", [1, 1000])
def test_sse_stripping_a_per_chunk_usage_keeps_the_event_end_with_mixed_line_ends(
    size: int,
) -> None:
    """Found by the SSE property (test_scanner_properties.py): the rewritten data line must
    not join a lone CR with the empty line's LF into one CRLF, which would run the event
    into the next one (the client would read data "{...}\n[DONE]")."""
    body = (
        b'data: {"choices":[{"text":"a","index":0}],\r'
        b'data: "usage":{"prompt_tokens":0,"completion_tokens":0}}\r\n'
        b"\n"
        b"data: [DONE]\n\n"
    )
    scanner = SseScanner(strip_usage=True)
    out = _feed_all(scanner, [body[i : i + size] for i in range(0, len(body), size)])
    assert out == b'data: {"choices":[{"text":"a","index":0}]}\r\n\ndata: [DONE]\n\n'
    assert scanner.complete


def test_sse_without_done_is_incomplete_and_crlf_frames_are_understood() -> None:
    """sse-starlette's CRLF frames parse; a stream cut before [DONE] is not complete."""
    crlf = b"data: " + json.dumps(CHUNK).encode() + b"\r\n\r\n"
    scanner = SseScanner(strip_usage=True)
    assert _feed_all(scanner, [crlf, crlf]) == crlf * 2
    assert not scanner.complete
    assert scanner.content_chunks == 2
    scanner = SseScanner(strip_usage=True)
    _feed_all(scanner, [crlf, b"data: [DONE]\r\n\r\n"])
    assert scanner.complete


def test_sse_chunks_are_not_counted_when_usage_is_certain() -> None:
    """For Ollama, which always sends usage when asked, content chunks are not counted."""
    scanner = SseScanner(strip_usage=True, count_chunks=False)
    _feed_all(scanner, [_sse(CHUNK) * 3 + _sse(USAGE) + b"data: [DONE]\n\n"])
    assert scanner.content_chunks == 0
    assert scanner.usage is not None


def test_sse_error_event_is_recorded() -> None:
    """An OpenAI-style error event from an upstream is forwarded and noted."""
    scanner = SseScanner(strip_usage=False)
    body = _sse({"error": {"message": "boom", "type": "api_error"}})
    assert _feed_all(scanner, [body]) == body
    assert scanner.error == "boom"


def test_content_events_are_counted_with_and_without_spaces() -> None:
    """Go writes "content":"x", Python writes "content": "x"; empty and null do not count."""
    data = (
        b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":""}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":null}}]}\n\n'
        b'data: {"choices":[{"text":"c"}]}\n\n'
    )
    scanner = SseScanner(strip_usage=False, count_chunks=True)
    assert _feed_all(scanner, [data]) == data
    assert scanner.content_chunks == 3


def _token(text: str) -> bytes:
    return _sse({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def test_token_events_are_not_parsed_on_their_way_when_usage_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counting is for streams that end without usage: until then, a token event costs a
    byte search, not a JSON parse (the parse would compete with the engine's threads)."""
    from proxy.upstream import scanners

    parsed: list[bytes] = []

    def spy(data: bytes) -> object:
        parsed.append(data)
        return json.loads(data)

    monkeypatch.setattr(scanners, "json_object", spy)
    scanner = SseScanner(strip_usage=True, count_chunks=True)
    tokens = [_token(f"w{i}") for i in range(50)]
    usage = _sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 50}})
    out = _feed_all(scanner, [*tokens, usage, b"data: [DONE]\n\n"])
    assert out == b"".join(tokens) + b"data: [DONE]\n\n"
    assert len(parsed) == 1  # the usage event only
    assert scanner.usage is not None
    assert scanner.usage.completion_tokens == 50


def test_deferred_counting_matches_counting_as_they_pass() -> None:
    """Past the deferral's bound, in events split across reads, and after [DONE] (which
    ends the counting), the count is what a client's parser counts."""
    tokens = [_token("x" * (i % 7)) for i in range(4000)]  # an empty content every 7th
    body = b"".join(tokens) + b"data: [DONE]\n\n" + _token("after the end")
    assert len(body) > 4 * scanners_unread_bytes()  # several rounds of deferral
    for size in (len(tokens[0]), 1000, 65536 + 3):
        scanner = SseScanner(strip_usage=False, count_chunks=True)
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        assert _feed_all(scanner, chunks) == body
        assert scanner.content_chunks == 4000 - len(range(0, 4000, 7))


def scanners_unread_bytes() -> int:
    from proxy.upstream import scanners

    return scanners._UNREAD_BYTES


def test_json_scanner_reads_native_and_openai_bodies() -> None:
    """Non-streamed answers give usage at EOF, in either dialect."""
    native = JsonScanner(openai=False)
    _feed_all(native, [FINAL[:50], FINAL[50:]])
    assert native.usage is not None
    assert native.usage.completion_tokens == 282
    openai = JsonScanner(openai=True)
    _feed_all(openai, [json.dumps({"choices": [], "usage": USAGE["usage"]}).encode()])
    assert openai.usage is not None
    assert openai.usage.prompt_tokens == 26
    error = JsonScanner(openai=False)
    _feed_all(error, [b'{"error":"model \'x\' not found"}'])
    assert error.error == "model 'x' not found"
    assert error.usage is None
