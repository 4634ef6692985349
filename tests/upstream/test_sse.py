"""The event-stream scanner reads usage, errors and [DONE] out of relayed SSE, strips the
usage the gateway asked for, and counts content events, without changing anything else."""

from __future__ import annotations

import json

import pytest

from proxy.upstream.sse import MAX_UNREAD_BYTES, SseScanner
from tests.upstream.test_scanners import feed_all


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
    out = feed_all(scanner, [body[i : i + size] for i in range(0, len(body), size)])
    assert out == _sse(CHUNK) * 2 + _sse(FINISH) + b"data: [DONE]\n\n"
    assert scanner.complete
    assert scanner.usage is not None
    assert scanner.usage.prompt_tokens == 26
    assert scanner.content_chunks == 2


def test_sse_keeps_usage_the_client_asked_for() -> None:
    """Without strip_usage the body passes through byte for byte."""
    body = _sse(CHUNK) + _sse(FINISH) + _sse(USAGE) + b"data: [DONE]\n\n"
    scanner = SseScanner(strip_usage=False)
    assert feed_all(scanner, [body]) == body
    assert scanner.usage is not None


def test_sse_removes_zeroed_per_chunk_usage_of_completions() -> None:
    """/v1/completions puts a zeroed usage on each chunk when usage was asked for: removed."""
    chunk = {
        "id": "cmpl-1",
        "choices": [{"text": "Hi", "index": 0, "finish_reason": None}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    scanner = SseScanner(strip_usage=True)
    out = feed_all(scanner, [_sse(chunk) + b"data: [DONE]\n\n"])
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
    out = feed_all(scanner, [body[i : i + size] for i in range(0, len(body), size)])
    assert out == b'data: {"choices":[{"text":"a","index":0}]}\r\n\ndata: [DONE]\n\n'
    assert scanner.complete


def test_sse_without_done_is_incomplete_and_crlf_frames_are_understood() -> None:
    """sse-starlette's CRLF frames parse; a stream cut before [DONE] is not complete."""
    crlf = b"data: " + json.dumps(CHUNK).encode() + b"\r\n\r\n"
    scanner = SseScanner(strip_usage=True)
    assert feed_all(scanner, [crlf, crlf]) == crlf * 2
    assert not scanner.complete
    assert scanner.content_chunks == 2
    scanner = SseScanner(strip_usage=True)
    feed_all(scanner, [crlf, b"data: [DONE]\r\n\r\n"])
    assert scanner.complete


def test_sse_chunks_are_not_counted_when_usage_is_certain() -> None:
    """For Ollama, which always sends usage when asked, content chunks are not counted."""
    scanner = SseScanner(strip_usage=True, count_chunks=False)
    feed_all(scanner, [_sse(CHUNK) * 3 + _sse(USAGE) + b"data: [DONE]\n\n"])
    assert scanner.content_chunks == 0
    assert scanner.usage is not None


def test_sse_error_event_is_recorded() -> None:
    """An OpenAI-style error event from an upstream is forwarded and noted."""
    scanner = SseScanner(strip_usage=False)
    body = _sse({"error": {"message": "boom", "type": "api_error"}})
    assert feed_all(scanner, [body]) == body
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
    assert feed_all(scanner, [data]) == data
    assert scanner.content_chunks == 3


def _token(text: str) -> bytes:
    return _sse({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def test_token_events_are_not_parsed_on_their_way_when_usage_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counting is for streams that end without usage: until then, a token event costs a
    byte search, not a JSON parse (the parse would compete with the engine's threads)."""
    from proxy.upstream import sse

    parsed: list[bytes] = []

    def spy(data: bytes) -> object:
        parsed.append(data)
        return json.loads(data)

    monkeypatch.setattr(sse, "json_object", spy)
    scanner = SseScanner(strip_usage=True, count_chunks=True)
    tokens = [_token(f"w{i}") for i in range(50)]
    usage = _sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 50}})
    out = feed_all(scanner, [*tokens, usage, b"data: [DONE]\n\n"])
    assert out == b"".join(tokens) + b"data: [DONE]\n\n"
    assert len(parsed) == 1  # the usage event only
    assert scanner.usage is not None
    assert scanner.usage.completion_tokens == 50


def test_deferred_counting_matches_counting_as_they_pass() -> None:
    """Past the deferral's bound, in events split across reads, and after [DONE] (which
    ends the counting), the count is what a client's parser counts."""
    tokens = [_token("x" * (i % 7)) for i in range(4000)]  # an empty content every 7th
    body = b"".join(tokens) + b"data: [DONE]\n\n" + _token("after the end")
    assert len(body) > 4 * MAX_UNREAD_BYTES  # several rounds of deferral
    for size in (len(tokens[0]), 1000, 65536 + 3):
        scanner = SseScanner(strip_usage=False, count_chunks=True)
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        assert feed_all(scanner, chunks) == body
        assert scanner.content_chunks == 4000 - len(range(0, 4000, 7))
