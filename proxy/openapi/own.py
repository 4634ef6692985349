"""The gateway's own routes in the description: ``/chat``, the probes and this documentation.

Each GET route has a HEAD twin (aiohttp answers HEAD on the GET routes it is given): the
same statuses and headers, without bodies.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.config import Config
from proxy.dialects import CHAT, JSON_CONTENT_TYPE, NDJSON_CONTENT_TYPE, OLLAMA, OPENAI
from proxy.openapi.components import backend_parameter
from proxy.openapi.responses import FORBIDDEN_MODEL, error_response, error_responses, success
from proxy.openapi.schemas import Schema, chat_request, ref

# The files /docs serves: Swagger UI's from the swagger-ui-py package, and the gateway's own
# init.js (a file, not an inline script, so the page's CSP can forbid inline scripts).
DOCS_ASSETS = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "init.js": "text/javascript",
}
_ID = ref("parameters", "RequestId")
_NO_KEY = "No API key needed; not rate limited, not counted in the request metrics."


def operations(config: Config) -> list[tuple[str, str, Schema]]:
    """``(method, path, operation)`` of each of the gateway's own routes."""
    found = [("POST", "/chat", _chat(config))]
    for path, build in _GETS.items():
        found.append(("GET", path, build(config, True)))
        head = build(config, False)
        head["operationId"] = head["operationId"].replace("get_", "head_", 1)
        head["summary"] += " (headers only)"
        found.append(("HEAD", path, head))
    return found


def router_responses(config: Config) -> dict[str, Schema]:
    """The router's 404 and 405, in each dialect: any path not described here, and any
    method a described path does not take."""
    return {
        f"{name}{status}": error_response(status, dialect, config)
        for name, dialect in (("Ollama", OLLAMA), ("OpenAI", OPENAI))
        for status in (404, 405)
    }


def overview(config: Config) -> str:
    """The description's introduction: what the gateway is, as configured."""
    limits, auth = config.limits, config.auth
    keys = (
        "API keys are required: `Authorization: Bearer <key>` or `X-API-Key: <key>`."
        if auth.api_keys
        else "No API keys are configured: clients are told apart by address."
    )
    admin = "open to the admin key" if auth.admin_key else "closed (no admin key is set)"
    return (
        "A reverse proxy in front of Ollama: it relays Ollama's native API (`/api/*`, NDJSON "
        "streams) and its OpenAI-compatible API (`/v1/*`, SSE streams) chunk by chunk, and "
        "adds API keys, rate limits, a concurrency gate with a fair queue, and metrics.\n\n"
        f"{keys} Model management is {admin}.\n\n"
        f"Inference routes take a request from the client's bucket "
        f"({limits.client_requests_per_minute:g}/min, burst {limits.client_burst}) and the "
        f"global one ({limits.requests_per_minute:g}/min, burst {limits.burst}), then one of "
        f"{limits.parallel} gate slot(s), waiting in a queue of at most {limits.max_queue}.\n\n"
        'Errors come in the dialect of the route: Ollama\'s `{"error": "..."}` on `/api/*` '
        'and `/`, the OpenAI object `{"error": {"message", "type", "param", "code"}}` on '
        "`/v1/*` and `/chat`. Every response carries `X-Request-ID`. Any other path is a "
        "404 and an undocumented method a 405 (with `Allow`), in the same dialects. "
        "Statuses the upstream answers itself pass through unchanged."
    )


def _operation(
    tag: str, operation_id: str, summary: str, description: str, responses: dict[str, Schema]
) -> Schema:
    return {
        "tags": [tag],
        "summary": summary,
        "description": description,
        "operationId": operation_id,
        "security": [],
        "parameters": [_ID],
        "responses": responses,
    }


def _chat(config: Config) -> Schema:
    media: dict[str, Schema] = {JSON_CONTENT_TYPE: {"schema": ref("schemas", "ChatAnswer")}}
    if config.limits.enable_streaming:
        # With stream: true, one ChatLine per line.
        media[NDJSON_CONTENT_TYPE] = {"schema": ref("schemas", "ChatLine")}
    statuses = [
        *([401] if config.auth.api_keys else []),
        400,
        *([403] if config.models.allowlist else []),
        413,
        429,
        502,
        503,
        504,
    ]
    notes = {403: FORBIDDEN_MODEL}
    # chat._upstream_error: the upstream's status, its message in the OpenAI shape.
    refused = ("The upstream refused the chat: its status, its message.", "model 'x' not found")
    default = error_response(404, CHAT, config, note=refused, code="upstream_error")
    return {
        "tags": ["gateway"],
        "summary": "One-shot chat, the gateway's own",
        "description": "Speaks /api/chat to Ollama (or /v1/chat/completions to an "
        "OpenAI-compatible upstream) and answers in one shape whatever the backend: the "
        "text, token counts and timings from the upstream's final statistics.",
        "operationId": "post_chat",
        "security": [{"apiKeyBearer": []}, {"apiKeyHeader": []}] if config.auth.api_keys else [],
        "parameters": [_ID, backend_parameter(config, required=False)],
        "requestBody": {
            "required": True,
            "content": {
                JSON_CONTENT_TYPE: {
                    "schema": chat_request(config),
                    "examples": {
                        "answer": {"value": {"prompt": "Why is the sky blue?"}},
                        "stream": {"value": {"prompt": "Why is the sky blue?", "stream": True}},
                    },
                }
            },
        },
        "responses": {
            "200": success("The answer.", media, rate_headers=True, clamp_header=True),
            **error_responses(statuses, CHAT, config, notes=notes, rate_headers=True),
            "default": default,
        },
    }


def _health(config: Config, body: bool) -> Schema:
    media = {JSON_CONTENT_TYPE: {"schema": ref("schemas", "Health")}}
    return _operation(
        "gateway",
        "get_health",
        "Liveness",
        f"The process answers; also the gate's state and the default model. {_NO_KEY}",
        {"200": success("Alive.", media, body=body)},
    )


def _readiness(config: Config, body: bool) -> Schema:
    media = {JSON_CONTENT_TYPE: {"schema": ref("schemas", "Readiness")}}
    return _operation(
        "gateway",
        "get_health_ollama",
        "Readiness",
        "Asks the upstream afresh: reachable, its version, whether the default model "
        f"({config.upstream.default_model}) is installed and loaded. {_NO_KEY}",
        {
            "200": success("Ready.", media, body=body),
            "503": success("Not ready: the reason says why.", media, body=body),
        },
    )


def _metrics(config: Config, body: bool) -> Schema:
    media: dict[str, Schema] = {
        "text/plain": {"schema": {"type": "string"}},
        "application/vnd.google.protobuf": {
            "schema": {
                "type": "string",
                "description": "When the Accept header asks for Prometheus's protobuf format.",
            }
        },
    }
    return _operation(
        "gateway",
        "get_metrics",
        "Prometheus metrics",
        "Labels come from bounded sets only; the README lists every metric. It shows key "
        f"names and traffic: keep it off a public port. {_NO_KEY}",
        {"200": success("The exposition.", media, body=body)},
    )


def _openapi(config: Config, body: bool) -> Schema:
    media = {JSON_CONTENT_TYPE: {"schema": {"type": "object"}}}
    return _operation(
        "documentation",
        "get_openapi_json",
        "This description",
        "OpenAPI 3.1, generated from the gateway's route table and its running "
        f"configuration (server.enable_docs, ENABLE_DOCS). {_NO_KEY}",
        {"200": success("The description.", media, body=body)},
    )


def _docs(config: Config, body: bool) -> Schema:
    media = {"text/html": {"schema": {"type": "string"}}}
    return _operation(
        "documentation",
        "get_docs",
        "Interactive documentation",
        "Swagger UI, served by the gateway itself (no CDN: it works offline) from the "
        f"swagger-ui-py package. {_NO_KEY}",
        {"200": success("The page.", media, body=body)},
    )


def _docs_asset(config: Config, body: bool) -> Schema:
    media = {kind: {"schema": {"type": "string"}} for kind in sorted(set(DOCS_ASSETS.values()))}
    operation = _operation(
        "documentation",
        "get_docs_asset",
        "A file of the documentation page",
        f"Swagger UI's script, style sheet and icon, and the page's own script. {_NO_KEY}",
        {
            "200": success("The file.", media, body=body),
            "304": success("Unchanged since If-None-Match or If-Modified-Since.", {}, body=False),
            "404": error_response(404, OPENAI, config, body=body),
        },
    )
    operation["parameters"] = [
        _ID,
        {"name": "asset", "in": "path", "required": True, "schema": {"enum": list(DOCS_ASSETS)}},
    ]
    return operation


_GETS: dict[str, Callable[[Config, bool], Schema]] = {
    "/health": _health,
    "/health/ollama": _readiness,
    "/metrics": _metrics,
    "/openapi.json": _openapi,
    "/docs": _docs,
    "/docs/{asset}": _docs_asset,
}
