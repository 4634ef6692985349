"""What the gateway reads, checks and changes in a request body before it goes upstream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.admission.body import Policy, parse_object, with_tag
from proxy.config import parse_config
from proxy.errors import ForbiddenError, InvalidRequestError


def policy(**sections: Any) -> Policy:
    return Policy(parse_config(sections))


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "missing request body"),
        (b"  \n", "missing request body"),
        (b"{nope", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
    ],
)
def test_a_body_must_be_a_json_object(raw: bytes, message: str) -> None:
    """400 saying what is wrong with the body."""
    with pytest.raises(InvalidRequestError, match=message):
        parse_object(raw)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"model": 3}, "'model' must be a string"),
        ({"model": "m", "stream": "yes"}, "'stream' must be true or false"),
        ({"model": "m", "options": []}, "'options' must be an object"),
        ({"model": "m", "options": {"num_ctx": "big"}}, "'num_ctx' must be an integer"),
        ({"model": "m", "options": {"num_ctx": True}}, "'num_ctx' must be an integer"),
        ({"model": "m", "options": {"num_predict": 1.5}}, "'num_predict' must be an integer"),
    ],
)
def test_a_wrongly_typed_field_the_gateway_reads_is_named(
    fields: dict[str, Any], named: str
) -> None:
    """The 400's message names the field; JSON true is not accepted as a number."""
    with pytest.raises(InvalidRequestError, match=named):
        policy().prepare(body(**fields), openai=False, generates=True)


def test_an_unchanged_body_goes_up_byte_for_byte() -> None:
    """Nothing to change: the client's bytes, whitespace and key order included."""
    raw = b'{ "options": {"num_ctx": 2048},  "model": "m", "messages": [] }'
    prepared = policy().prepare(raw, openai=False, generates=True)
    assert prepared.body is raw
    assert (prepared.model, prepared.stream, prepared.strip_usage) == ("m", True, False)


def test_num_ctx_above_the_maximum_is_lowered_and_said() -> None:
    """Lowered to max_context_length, with the value asked for reported; 0 turns it off."""
    prepared = policy().prepare(body(model="m", options={"num_ctx": 32768}), openai=False,
                                generates=True)  # fmt: skip
    assert prepared.clamped_num_ctx == 32768
    assert json.loads(prepared.body)["options"]["num_ctx"] == 8192
    unlimited = policy(limits={"max_context_length": 0})
    raw = body(model="m", options={"num_ctx": 32768})
    assert unlimited.prepare(raw, openai=False, generates=True).clamped_num_ctx is None


def test_native_streams_by_default_and_openai_only_when_asked() -> None:
    """Ollama streams unless told not to; the OpenAI API does not unless asked."""
    p = policy()
    assert p.prepare(body(model="m"), openai=False, generates=True).stream
    assert not p.prepare(body(model="m", stream=False), openai=False, generates=True).stream
    assert not p.prepare(body(model="m"), openai=True, generates=True).stream
    assert p.prepare(body(model="m", stream=True), openai=True, generates=True).stream


def test_a_streamed_openai_generation_asks_for_usage_on_the_clients_behalf() -> None:
    """include_usage is added (and stripped later) unless the client asked for it itself."""
    p = policy()
    prepared = p.prepare(body(model="m", stream=True, stream_options={"x": 1}), openai=True,
                         generates=True)  # fmt: skip
    assert prepared.strip_usage
    assert json.loads(prepared.body)["stream_options"] == {"x": 1, "include_usage": True}
    asked = body(model="m", stream=True, stream_options={"include_usage": True})
    assert not p.prepare(asked, openai=True, generates=True).strip_usage
    embedding = body(model="m", stream=True)
    assert not p.prepare(embedding, openai=True, generates=False).strip_usage


def test_the_token_estimate_is_the_body_over_four_plus_the_completion_asked() -> None:
    """max_tokens, max_completion_tokens or num_predict, else default_max_tokens; an
    embedding asks for no completion."""
    p = policy(limits={"default_max_tokens": 100})
    raw = body(model="m", max_tokens=30)
    assert p.prepare(raw, openai=True, generates=True).token_estimate == len(raw) // 4 + 30
    raw = body(model="m", max_completion_tokens=7)
    assert p.prepare(raw, openai=True, generates=True).token_estimate == len(raw) // 4 + 7
    raw = body(model="m", options={"num_predict": 12})
    assert p.prepare(raw, openai=False, generates=True).token_estimate == len(raw) // 4 + 12
    raw = body(model="m")
    assert p.prepare(raw, openai=False, generates=True).token_estimate == len(raw) // 4 + 100
    assert p.prepare(raw, openai=False, generates=False).token_estimate == len(raw) // 4


def test_the_allowlist_accepts_a_model_with_or_without_its_latest_tag() -> None:
    """``llama3.2`` is ``llama3.2:latest``; anything not listed is refused with 403."""
    p = policy(models={"allowlist": ["llama3.2:latest", "qwen2.5:0.5b"]})
    p.check_model("llama3.2")
    p.check_model("qwen2.5:0.5b")
    p.check_model(None)
    with pytest.raises(ForbiddenError, match=r"'qwen2\.5' is not allowed"):
        p.check_model("qwen2.5")
    assert with_tag("library/llama3.2") == "library/llama3.2:latest"
    assert with_tag("host:5000/llama3.2") == "host:5000/llama3.2:latest"


def test_an_openai_kind_upstream_gets_the_default_model_when_none_is_named() -> None:
    """A one-model OpenAI-compatible server would answer with its own name for the model."""
    p = policy(upstream={"kind": "openai", "default_model": "smollm2:135m"})
    prepared = p.prepare(body(messages=[]), openai=True, generates=True)
    assert prepared.model == "smollm2:135m"
    assert json.loads(prepared.body)["model"] == "smollm2:135m"
    assert policy().prepare(body(messages=[]), openai=True, generates=True).model is None


def test_a_lone_surrogate_escape_is_accepted_and_kept() -> None:
    """JSON may escape half an emoji (RFC 8259 section 8.2); Ollama's decoder takes it, so
    the gateway does, and writes it back as it came when it changes the body."""
    raw = b'{"model": "m", "prompt": "\\ud83d", "options": {"num_ctx": 99999}}'
    prepared = policy().prepare(raw, openai=False, generates=True)
    assert prepared.clamped_num_ctx == 99999
    assert b'"prompt":"\\ud83d"' in prepared.body
    assert json.loads(prepared.body)["options"]["num_ctx"] == 8192


def test_json_nested_past_any_parser_is_a_400() -> None:
    """Nested deeper than orjson and Python's json go: refused, never a crash."""
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        parse_object(b"[" * 100_000 + b"]" * 100_000)
