"""Scanners read statistics out of relayed bodies without changing what the client gets
(event streams: test_sse.py)."""

from __future__ import annotations

import json

import pytest

from proxy.upstream.scanners import JsonScanner, NdjsonScanner, Scanner

FINAL = (
    b'{"model":"llama3.2","created_at":"2026-08-21T17:05:40.132518Z","message":{"role":'
    b'"assistant","content":""},"done":true,"done_reason":"stop","total_duration":4883583458,'
    b'"load_duration":1334875,"prompt_eval_count":26,"prompt_eval_duration":342546000,'
    b'"eval_count":282,"eval_duration":4535599000}\n'
)
TOKEN = b'{"model":"llama3.2","created_at":"x","message":{"role":"assistant","content":"The"},"done":false}\n'  # noqa: E501


def feed_all(scanner: Scanner, chunks: list[bytes]) -> bytes:
    out = b"".join(scanner.feed(chunk) for chunk in chunks)
    return out + scanner.finish()


@pytest.mark.parametrize("size", [1, 7, 64, 4096])
def test_ndjson_finds_final_statistics_however_the_body_is_cut(size: int) -> None:
    """Split at any byte boundary, the relayed bytes are unchanged and the statistics found."""
    body = TOKEN * 3 + FINAL
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    scanner = NdjsonScanner()
    assert feed_all(scanner, chunks) == body
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
    feed_all(scanner, [body[i : i + 65536] for i in range(0, len(body), 65536)])
    assert scanner.usage is not None
    assert scanner.usage.completion_tokens == 5


def test_ndjson_missing_metrics_count_as_zero() -> None:
    """Ollama omits zero-valued metrics; a missing field reads as 0, not as an error."""
    scanner = NdjsonScanner()
    feed_all(scanner, [b'{"model":"m","response":"","done":true,"done_reason":"load"}\n'])
    assert scanner.complete
    assert scanner.usage is not None
    assert (scanner.usage.prompt_tokens, scanner.usage.completion_tokens) == (0, 0)


def test_ndjson_error_line_is_recorded_and_the_stream_is_incomplete() -> None:
    """An in-stream error line marks the stream failed; no done line means not complete."""
    scanner = NdjsonScanner()
    feed_all(scanner, [TOKEN, b'{"error":"an error was encountered while running the model"}\n'])
    assert scanner.error == "an error was encountered while running the model"
    assert not scanner.complete


def test_ndjson_content_mentioning_done_is_not_mistaken_for_the_final_line() -> None:
    """Model output containing the text "done":true is escaped and never matches."""
    line = json.dumps({"response": '{"done":true}', "done": False}, separators=(",", ":"))
    scanner = NdjsonScanner()
    feed_all(scanner, [line.encode() + b"\n"])
    assert not scanner.complete


def test_json_scanner_reads_native_and_openai_bodies() -> None:
    """Non-streamed answers give usage at EOF, in either dialect."""
    native = JsonScanner(openai=False)
    feed_all(native, [FINAL[:50], FINAL[50:]])
    assert native.usage is not None
    assert native.usage.completion_tokens == 282
    openai = JsonScanner(openai=True)
    usage = {"prompt_tokens": 26, "completion_tokens": 2}
    feed_all(openai, [json.dumps({"choices": [], "usage": usage}).encode()])
    assert openai.usage is not None
    assert openai.usage.prompt_tokens == 26
    error = JsonScanner(openai=False)
    feed_all(error, [b'{"error":"model \'x\' not found"}'])
    assert error.error == "model 'x' not found"
    assert error.usage is None
