"""``components``: what the paths refer to by name. The gateway's own answers, the two error
shapes, the headers it sets and the security schemes, as this gateway is configured.
"""

from __future__ import annotations

from proxy.config import Config, backends_of
from proxy.openapi.schemas import Schema, ref

_STRING: Schema = {"type": "string"}
_NULLABLE_INT: Schema = {"type": ["integer", "null"]}
_NULLABLE_NUMBER: Schema = {"type": ["number", "null"]}
_STATISTICS: Schema = {
    "prompt_tokens": _NULLABLE_INT,
    "completion_tokens": _NULLABLE_INT,
    "total_duration_s": _NULLABLE_NUMBER,
    "load_duration_s": _NULLABLE_NUMBER,
    "prompt_eval_duration_s": _NULLABLE_NUMBER,
    "eval_duration_s": _NULLABLE_NUMBER,
    "tokens_per_second": _NULLABLE_NUMBER,
}
_ANSWER: Schema = {
    "model": {"type": ["string", "null"]},
    "response": _STRING,
    "done_reason": {"type": ["string", "null"]},
    **_STATISTICS,
}


def components(config: Config) -> Schema:
    """The named schemas, headers, parameters and security schemes."""
    error_object: Schema = {
        "type": "object",
        "required": ["message"],
        "properties": {
            "message": _STRING,
            "type": _STRING,
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }
    chunk: Schema = {
        "type": "object",
        "required": ["response", "done"],
        "properties": {"response": _STRING, "done": {"const": False}},
    }
    last = {
        "type": "object",
        "required": ["done", *_ANSWER],
        "properties": {**_ANSWER, "done": {"const": True}},
    }
    return {
        "schemas": {
            "OllamaError": {
                "type": "object",
                "description": "Ollama's error shape: /api/* and /.",
                "required": ["error"],
                "properties": {"error": _STRING},
            },
            "OpenAIError": {
                "type": "object",
                "description": "The OpenAI API's error shape: /v1/* and /chat.",
                "required": ["error"],
                "properties": {"error": error_object},
            },
            "ChatAnswer": {"type": "object", "required": list(_ANSWER), "properties": _ANSWER},
            "ChatLine": {
                "description": "One NDJSON line of a streamed /chat: text, the last line with "
                "the statistics, or an error line if the upstream failed mid-stream.",
                "oneOf": [chunk, last, ref("schemas", "OpenAIError")],
            },
            "Health": {
                "type": "object",
                "required": ["status", "version", "upstream_up", "default_model"],
                "properties": {
                    "status": {"const": "ok"},
                    "version": _STRING,
                    "upstream_up": {"type": "boolean"},
                    "default_model": _STRING,
                    "active": {"type": "integer", "description": "requests holding a slot"},
                    "queued": {"type": "integer", "description": "requests waiting for one"},
                    "slots": {"type": "integer"},
                },
            },
            "Readiness": {
                "type": "object",
                "required": ["status", "upstream", "kind", "reachable", "model"],
                "properties": {
                    "status": {"enum": ["ok", "unavailable"]},
                    "upstream": _STRING,
                    "kind": {"enum": ["ollama", "openai"]},
                    "reachable": {"type": "boolean"},
                    "version": {"type": ["string", "null"]},
                    "model": _STRING,
                    "installed": {"type": "boolean"},
                    "loaded": {"type": "boolean"},
                    "reason": {"type": "string", "description": "why it is not ready"},
                },
            },
        },
        "headers": HEADERS,
        "parameters": {
            "RequestId": {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": "An id to find this request by in the gateway's log: up to 128 "
                "letters, digits and ._:@/+=- are echoed back and forwarded upstream; any "
                "other value is replaced by a new id (never refused).",
                "schema": {"type": "string"},
            },
        },
        "securitySchemes": _security_schemes(config),
    }


_RATE_HEADER: Schema = {"type": "integer", "minimum": 0}
HEADERS: Schema = {
    "X-Request-ID": {
        "description": "The request's id: the client's own if it sent a sane one.",
        "schema": {"type": "string", "pattern": r"^[\w.:@/+=-]{1,128}$"},
    },
    "Retry-After": {
        "description": "Whole seconds until a retry can succeed (the real wait).",
        "schema": {"type": "integer", "minimum": 1},
    },
    "X-RateLimit-Limit": {"description": "Requests per minute.", "schema": _RATE_HEADER},
    "X-RateLimit-Remaining": {
        "description": "Whole requests left right now.",
        "schema": _RATE_HEADER,
    },
    "X-RateLimit-Reset": {
        "description": "Seconds until the bucket is full again.",
        "schema": _RATE_HEADER,
    },
    "X-Context-Length-Clamped": {
        "description": "The options.num_ctx asked for, when it was lowered.",
        "schema": {"type": "integer"},
    },
    "Allow": {"description": "The methods the route takes.", "schema": _STRING},
}


def _security_schemes(config: Config) -> Schema:
    keys = "Required on this gateway." if config.auth.api_keys else "None are configured."
    admin = (
        "Set on this gateway."
        if config.auth.admin_key
        else "None is set: model management is closed to everyone."
    )
    return {
        "apiKeyBearer": {
            "type": "http",
            "scheme": "bearer",
            "description": f"A gateway API key (auth.api_keys). {keys}",
        },
        "apiKeyHeader": {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": f"The same key in X-API-Key. {keys}",
        },
        "adminBearer": {
            "type": "http",
            "scheme": "bearer",
            "description": f"The admin key (auth.admin_key, PROXY_ADMIN_KEY). {admin}",
        },
        "adminKeyHeader": {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": f"The admin key in X-API-Key. {admin}",
        },
    }


def backend_parameter(config: Config, *, required: bool) -> Schema:
    """``X-Backend``: which of the gateway's Ollama hosts the request is for. A management
    request must name one when there are several (a pull acts on one box); an inference
    request may (it then runs there, or fails: no other box takes it)."""
    names = [b.name for b in backends_of(config)]
    must = required and len(names) > 1
    what = (
        "The backend to act on: required when the gateway has several."
        if required
        else "Run on this backend only (no failover); by default the gateway places it."
    )
    return {
        "name": "X-Backend",
        "in": "header",
        "required": must,
        "description": f"{what} An unknown name is a 400.",
        "schema": {"type": "string", "enum": names},
    }
