"""``build_document(config, server_url)``: the gateway as a client sees it, in OpenAPI 3.1.

Generated, not written by hand: the relayed operations come from ``routes.ROUTES``, the
statuses and their bodies from the error types and the dialects, the texts from the
running configuration (keys required or not, model management open or closed, the limits).
The gateway's own routes are described in ``own``. A test holds the result to the app's
router, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Any

from proxy import __version__
from proxy.config import Config
from proxy.dialects import JSON_CONTENT_TYPE, NDJSON_CONTENT_TYPE, OLLAMA, OPENAI, SSE_CONTENT_TYPE
from proxy.openapi import own
from proxy.openapi.components import backend_parameter, components
from proxy.openapi.responses import (
    FORBIDDEN_ADMIN,
    FORBIDDEN_CLOSED,
    FORBIDDEN_MODEL,
    Note,
    error_responses,
    relayed_default,
    success,
)
from proxy.openapi.schemas import Schema, native_request, openai_request, ref
from proxy.routes import INFERENCE, MANAGEMENT, METADATA, ROUTES, RouteSpec

_PARAM = re.compile(r"\{(\w+)(?::[^}]+)?\}")

_SUMMARIES = {
    ("POST", "/api/generate"): "Generate a completion",
    ("POST", "/api/chat"): "Chat",
    ("POST", "/api/embed"): "Embeddings",
    ("POST", "/api/embeddings"): "Embeddings (the older endpoint)",
    ("POST", "/api/show"): "A model's details",
    ("GET", "/api/tags"): "Installed models",
    ("GET", "/api/ps"): "Models in memory",
    ("GET", "/api/version"): "Ollama's version",
    ("GET", "/"): "Ollama's liveness text",
    ("POST", "/api/pull"): "Pull a model",
    ("POST", "/api/push"): "Push a model",
    ("POST", "/api/create"): "Create a model",
    ("POST", "/api/copy"): "Copy a model",
    ("DELETE", "/api/delete"): "Delete a model",
    ("HEAD", "/api/blobs/{digest}"): "Whether a blob exists",
    ("POST", "/api/blobs/{digest}"): "Upload a blob (streamed, not size-limited)",
    ("POST", "/v1/chat/completions"): "Chat completions",
    ("POST", "/v1/completions"): "Completions",
    ("POST", "/v1/embeddings"): "Embeddings",
    ("GET", "/v1/models"): "Models",
    ("GET", "/v1/models/{model:.+}"): "One model",
}
_TAGS = [
    {"name": "gateway", "description": "The gateway's own routes."},
    {"name": "ollama", "description": "Ollama's native API, relayed (NDJSON streams)."},
    {"name": "openai", "description": "The OpenAI-compatible API, relayed (SSE streams)."},
    {"name": "management", "description": "Model management: the admin key only."},
    {"name": "documentation", "description": "This description and its page."},
]
KEYS: list[dict[str, list[str]]] = [{"apiKeyBearer": []}, {"apiKeyHeader": []}]
ADMIN: list[dict[str, list[str]]] = [{"adminBearer": []}, {"adminKeyHeader": []}]


def openapi_path(path: str) -> str:
    """aiohttp's ``{model:.+}`` as OpenAPI's ``{model}``."""
    return _PARAM.sub(r"{\1}", path)


def build_document(config: Config, server_url: str) -> dict[str, Any]:
    """The OpenAPI 3.1 description of this gateway, as configured, served at ``server_url``."""
    paths: dict[str, dict[str, Any]] = {}
    operations = [
        *((m, p, relayed_operation(config, m, p, s)) for (m, p), s in ROUTES.items()),
        *own.operations(config),
    ]
    for method, path, operation in operations:
        paths.setdefault(openapi_path(path), {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ollama-gateway",
            "version": __version__,
            "summary": "API keys, rate limits, a fair queue and metrics in front of Ollama.",
            "description": own.overview(config),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": server_url, "description": "this gateway"}],
        "tags": _TAGS,
        "paths": dict(sorted(paths.items())),
        "components": {**components(config), "responses": own.router_responses(config)},
    }


def _security(config: Config) -> list[dict[str, list[str]]]:
    return KEYS if config.auth.api_keys else []


def relayed_operation(config: Config, method: str, path: str, spec: RouteSpec) -> Schema:
    """One relayed route: what the gateway checks on its way, and what can come back."""
    dialect = OPENAI if spec.openai else OLLAMA
    body = method != "HEAD"  # a HEAD answer has the headers of a GET, and no body
    summary = _SUMMARIES.get((method, path)) or _SUMMARIES.get(("GET", path), "Relayed")
    tag = "openai" if spec.openai else "management" if spec.kind == MANAGEMENT else "ollama"
    parameters: list[Schema] = [ref("parameters", "RequestId")]
    for name in _PARAM.findall(path):
        parameters.append({"name": name, "in": "path", "required": True, "schema": _param(name)})
    if spec.kind in (INFERENCE, MANAGEMENT):
        parameters.append(backend_parameter(config, required=spec.kind == MANAGEMENT))
    if method == "HEAD" and ("GET", path) in ROUTES:
        summary += " (headers only)"
    operation: Schema = {
        "tags": [tag],
        "summary": summary,
        "operationId": operation_id(method, path),
        "parameters": parameters,
    }
    if not spec.openai and config.upstream.kind != "ollama":
        note = "Not on this gateway: its upstream speaks only the OpenAI-compatible API."
        operation.update(deprecated=True, description=note, security=[])
        operation["responses"] = error_responses([501], dialect, config, body=body)
        return operation

    statuses: list[int] = [401] if config.auth.api_keys else []
    notes: dict[int, Note] = {}
    security = _security(config)
    reads_body = method in ("POST", "DELETE") and not spec.streams_body
    if spec.kind == MANAGEMENT:
        statuses.append(403)
        if not config.auth.admin_key:
            notes[403] = FORBIDDEN_CLOSED
            operation.update(deprecated=True, description=FORBIDDEN_CLOSED[0], security=security)
            operation["responses"] = error_responses(
                statuses, dialect, config, notes=notes, body=body
            )
            return operation
        notes[403] = FORBIDDEN_ADMIN
        security = ADMIN
        statuses += [413] if reads_body else []
    elif spec.kind == INFERENCE:
        statuses += [400, *([403] if config.models.allowlist else []), 413, 429, 503]
        notes[403] = FORBIDDEN_MODEL
    elif reads_body:
        statuses.append(413)
    statuses += [502, 504] + ([404] if "{" in path else [])
    operation["security"] = security
    if method in ("POST", "DELETE"):
        operation["requestBody"] = _request_body(config, method, path, spec)
    inference = spec.kind == INFERENCE
    responses = {
        ("2XX" if spec.kind == MANAGEMENT else "200"): success(
            "The upstream's answer, relayed as it streams.",
            _media(path, spec),
            rate_headers=inference,
            clamp_header=inference,
            body=body,
        ),
        **error_responses(
            sorted(statuses), dialect, config, notes=notes, rate_headers=inference, body=body
        ),
        "default": relayed_default(body=body),
    }
    operation["responses"] = responses
    return operation


def operation_id(method: str, path: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", openapi_path(path)).strip("_") or "root"
    return f"{method.lower()}_{slug}"


def _param(name: str) -> Schema:
    if name == "digest":
        return {"type": "string", "pattern": "^sha256[:-][0-9a-f]{64}$"}
    # A model name: ``hf.co/owner/repo:tag`` has slashes; aiohttp's ``.+`` takes them.
    return {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:/-]*$"}


def _request_body(config: Config, method: str, path: str, spec: RouteSpec) -> Schema:
    if spec.streams_body:
        schema: Schema = {"type": "string", "contentMediaType": "application/octet-stream"}
        return {"required": True, "content": {"application/octet-stream": {"schema": schema}}}
    if spec.kind == INFERENCE:
        build = openai_request if spec.openai else native_request
        schema = build(config, generates=spec.generates)
    else:
        schema = {
            "type": "object",
            "description": "Ollama's request, relayed unchanged.",
            "properties": {"model": {"type": "string"}},
            "additionalProperties": True,
        }
    media: Schema = {"schema": schema}
    example = _EXAMPLES.get(path)
    if example is not None:
        example = {"model": config.upstream.default_model, **example}
        media["examples"] = {"answer": {"value": example}}
        if spec.generates:
            media["examples"]["stream"] = {"value": {**example, "stream": True}}
    return {"required": True, "content": {JSON_CONTENT_TYPE: media}}


# A request each route answers, for "Try it out" (and Schemathesis's first cases).
_HI = [{"role": "user", "content": "Why is the sky blue?"}]
_EXAMPLES: dict[str, Schema] = {
    "/api/generate": {"prompt": "Why is the sky blue?", "stream": False},
    "/api/chat": {"messages": _HI, "stream": False},
    "/api/embed": {"input": "Why is the sky blue?"},
    "/api/embeddings": {"prompt": "Why is the sky blue?"},
    "/api/show": {},
    "/v1/chat/completions": {"messages": _HI},
    "/v1/completions": {"prompt": "Why is the sky blue?"},
    "/v1/embeddings": {"input": "Why is the sky blue?"},
}


def _media(path: str, spec: RouteSpec) -> dict[str, Schema]:
    if spec.kind == MANAGEMENT:
        return {"*/*": {"schema": {}}}
    if spec.kind == METADATA:
        if path == "/":
            return {"text/plain": {"schema": {"type": "string"}, "example": "Ollama is running"}}
        return {JSON_CONTENT_TYPE: {"schema": {"type": "object"}}}
    media: dict[str, Schema] = {JSON_CONTENT_TYPE: {"schema": {"type": "object"}}}
    if spec.generates:
        media[SSE_CONTENT_TYPE if spec.openai else NDJSON_CONTENT_TYPE] = _STREAMS[spec.openai]
    return media


# Streams are the upstream's, relayed chunk by chunk: described, not constrained.
_STREAMS = {
    False: {
        "schema": {"description": "NDJSON: one JSON object per line, the last with done: true."},
        "example": '{"response":"Hi","done":false}\n{"response":"","done":true}\n',
    },
    True: {
        "schema": {"description": "Server-sent events: data: <a JSON chunk>, then data: [DONE]."},
        "example": 'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: [DONE]\n\n',
    },
}
