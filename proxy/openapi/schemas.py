"""The request bodies of the description, as far as the gateway reads them.

A relayed body is described only by the fields the gateway checks or rewrites
(``admission/body.py``); everything else is Ollama's or the OpenAI API's business and is
left open (``additionalProperties: true``).
"""

from __future__ import annotations

from typing import Any

from proxy.config import Config

Schema = dict[str, Any]

# orjson reads integers from -2**63 to 2**64 - 1 as integers and any others as floats, which
# the gateway then refuses as "must be an integer". (Ollama's own bound, a Go int, is
# lower: its 400 passes through.)
_INT_RANGE: Schema = {"minimum": -(2**63), "maximum": 2**64 - 1}
_OPEN = "The gateway checks the fields listed (null is the same as leaving one out) and relays "


def ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def field(kind: str, description: str, **extra: Any) -> Schema:
    """A field the gateway reads: of ``kind``, or null (``admission/body.field``)."""
    return {"type": [kind, "null"], "description": description, **extra}


def _model(config: Config) -> Schema:
    allowlist = config.models.allowlist
    text = "The model."
    if allowlist:
        text += f" This gateway allows only: {', '.join(allowlist)} (else 403)."
    return field("string", text)


def _options(config: Config, *, native: bool) -> Schema:
    limit = config.limits.max_context_length
    clamp = (
        f"Larger than {limit} (limits.max_context_length) is lowered to {limit}; the "
        "response then carries X-Context-Length-Clamped with the value asked for."
        if limit
        else "Not clamped on this gateway (limits.max_context_length: 0)."
    )
    properties: Schema = {"num_ctx": field("integer", f"Context size. {clamp}", **_INT_RANGE)}
    if native:
        properties["num_predict"] = field(
            "integer", "Completion tokens at most: the token bucket's estimate.", **_INT_RANGE
        )
    return field(
        "object",
        "Model options, relayed.",
        properties=properties,
        additionalProperties=True,
    )


def native_request(config: Config, *, generates: bool) -> Schema:
    """An Ollama-native inference body: ``/api/generate``, ``/api/chat``, ``/api/embed``..."""
    streams = "Ollama streams NDJSON unless this is false." if generates else "Relayed."
    return {
        "type": "object",
        "description": _OPEN + "the rest unchanged to Ollama.",
        "properties": {
            "model": _model(config),
            "stream": field("boolean", streams),
            "options": _options(config, native=True),
        },
        "additionalProperties": True,
    }


def openai_request(config: Config, *, generates: bool) -> Schema:
    """An OpenAI-compatible inference body: ``/v1/chat/completions``, ``/v1/embeddings``..."""
    estimate = "Completion tokens at most: the token bucket's estimate."
    schema: Schema = {
        "type": "object",
        "description": _OPEN + "the rest unchanged to the OpenAI-compatible API.",
        "properties": {
            "model": _model(config),
            "stream": field("boolean", "SSE when true."),
            "max_tokens": field("integer", estimate, **_INT_RANGE),
            "max_completion_tokens": field("integer", estimate, **_INT_RANGE),
            "options": _options(config, native=False),
        },
        "additionalProperties": True,
    }
    if generates:
        # Read only when the request streams: then an object (or null).
        schema["properties"]["stream_options"] = {
            "description": "When a stream does not ask for include_usage, the gateway asks "
            "upstream on its behalf (to count tokens) and strips the extra usage chunk.",
            "properties": {"include_usage": {"description": "true: send the usage chunk"}},
        }
        schema["if"] = {"required": ["stream"], "properties": {"stream": {"const": True}}}
        schema["then"] = {"properties": {"stream_options": {"type": ["object", "null"]}}}
    return schema


def chat_request(config: Config) -> Schema:
    """``POST /chat``: the gateway's own request."""
    streaming = (
        "true: NDJSON lines, then a last line with the statistics."
        if config.limits.enable_streaming
        else "Ignored on this gateway (limits.enable_streaming: false): never streams."
    )
    return {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "prompt": {"type": "string", "minLength": 1},
            "model": {**_model(config), "default": config.upstream.default_model},
            "system": field("string", "A system message."),
            "stream": field("boolean", streaming, default=False),
            "options": _options(config, native=True),
        },
        "additionalProperties": True,
    }
