"""What differs between the dialects on the wire: error bodies and frames, the one reader of
either error shape, and either dialect's token statistics."""

from __future__ import annotations

import json

from proxy.dialects import (
    CHAT,
    OLLAMA,
    OPENAI,
    Usage,
    dialect_for,
    error_message,
    error_text,
    usage_from_native,
    usage_from_openai,
)


def test_error_bodies_per_dialect() -> None:
    """Ollama errors are a string; OpenAI's and /chat's are objects typed by status."""
    assert json.loads(OLLAMA.error_body(404, "nope", "not_found")) == {"error": "nope"}
    assert json.loads(OPENAI.error_body(429, "slow down", "rate_limit_exceeded")) == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert json.loads(CHAT.error_body(401, "key", "invalid_api_key"))["error"]["type"] == (
        "authentication_error"
    )


def test_error_frames_per_dialect() -> None:
    """After headers: an NDJSON error line, an SSE error event, or an NDJSON OpenAI object."""
    assert OLLAMA.error_frame("cut", "stream_interrupted") == b'{"error": "cut"}\n'
    sse = OPENAI.error_frame("cut", "stream_interrupted")
    assert sse.startswith(b"data: {")
    assert sse.endswith(b"\n\n")
    assert json.loads(sse[6:])["error"]["message"] == "cut"
    line = CHAT.error_frame("cut", "stream_interrupted")
    assert json.loads(line)["error"]["code"] == "stream_interrupted"


def test_dialect_follows_the_path_prefix() -> None:
    """/api/* and / speak Ollama; /chat has its own; everything else speaks OpenAI."""
    assert dialect_for("/api/nope") is OLLAMA
    assert dialect_for("/") is OLLAMA
    assert dialect_for("/chat") is CHAT
    assert dialect_for("/v1/nope") is OPENAI
    assert dialect_for("/elsewhere") is OPENAI


def test_error_messages_are_read_from_either_dialect() -> None:
    """Ollama's flat error, OpenAI's nested one, and a non-JSON body all yield a message."""
    assert error_message('{"error": "model \'x\' not found"}', "Not Found") == "model 'x' not found"
    nested = '{"error": {"message": "queue full", "type": "queue_full", "code": null}}'
    assert error_message(nested, "Service Unavailable") == "queue full"
    assert error_message("<html>Bad Gateway</html>\n", "Bad Gateway") == "<html>Bad Gateway</html>"
    assert error_message("", "Bad Gateway") == "Bad Gateway"
    assert error_message("[1, 2]", "Teapot") == "[1, 2]"


def test_error_text_reads_either_shape_and_says_none_without_an_error() -> None:
    """Ollama's string, OpenAI's object, an object without a message (its JSON), no error."""
    assert error_text({"error": "model 'x' not found"}) == "model 'x' not found"
    assert error_text({"error": {"message": "slow down", "code": 429}}) == "slow down"
    assert error_text({"error": {"code": 500}}) == '{"code": 500}'
    assert error_text({"error": None}) is None
    assert error_text({"error": ""}) is None
    assert error_text({"done": True}) is None


def test_native_statistics_treat_a_missing_field_as_zero() -> None:
    """Ollama omits zero fields; durations are nanoseconds; decode speed is derived."""
    usage = usage_from_native(
        {"done": True, "eval_count": 10, "eval_duration": 2_000_000_000, "load_duration": 5e8}
    )
    assert usage == Usage(
        prompt_tokens=0, completion_tokens=10, eval_duration_s=2.0, load_duration_s=0.5
    )
    assert usage.tokens_per_second == 5.0
    assert usage_from_native({"done": True}).tokens_per_second is None


def test_openai_statistics_come_only_from_a_usage_object() -> None:
    """No ``usage`` object: unknown (None), not zero; a partial one counts what it says."""
    assert usage_from_openai({"choices": []}) is None
    assert usage_from_openai({"usage": None}) is None
    assert usage_from_openai({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == Usage(
        prompt_tokens=3, completion_tokens=4
    )
    assert usage_from_openai({"usage": {"completion_tokens": 4}}) == Usage(
        prompt_tokens=0, completion_tokens=4
    )
