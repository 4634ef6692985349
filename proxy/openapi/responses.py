"""Response objects: each status the gateway itself produces, with its body in the route's
dialect and the headers it carries.

The codes come from the ``ProxyError`` types (``errors.py``) and the example bodies from
the dialect that renders them (``dialects.py``), so neither can say something the gateway
does not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from proxy.config import Config
from proxy.dialects import Dialect
from proxy.errors import ProxyError
from proxy.openapi.components import HEADERS
from proxy.openapi.schemas import Schema, ref

Note = tuple[str, str]  # what a status means on a route, and an example message
# Which 403 a route gives depends on the route (admission/keys.py, admission/body.py).
FORBIDDEN_MODEL: Note = (
    "The model is not in this gateway's allowlist (models.allowlist).",
    "model 'llama2' is not allowed on this gateway",
)
FORBIDDEN_ADMIN: Note = (
    "This route requires the gateway's admin key.",
    "this route requires the gateway's admin key",
)
FORBIDDEN_CLOSED: Note = (
    "Disabled on this gateway: no admin key is set (auth.admin_key, PROXY_ADMIN_KEY), so "
    "model management is refused for everyone.",
    "model-management routes are disabled on this gateway; set PROXY_ADMIN_KEY "
    "(auth.admin_key) to enable them for holders of that key",
)
# 405 is the router's, rendered by the middleware with this code (``middleware._from_http``).
_ROUTER_CODES = {405: ["method_not_allowed"]}


def codes_by_status() -> dict[int, list[str]]:
    """Every ``ProxyError`` type's code, by status."""
    codes: dict[int, list[str]] = {status: list(c) for status, c in _ROUTER_CODES.items()}
    pending = list(ProxyError.__subclasses__())
    while pending:
        kind = pending.pop(0)
        pending.extend(kind.__subclasses__())
        if kind.code not in codes.setdefault(kind.status, []):
            codes[kind.status].append(kind.code)
    return codes


def _describe(status: int, config: Config) -> tuple[str, str]:
    """What a status means on this gateway, and an example message."""
    limits, upstream = config.limits, config.upstream
    table = {
        400: (
            "The body is not a JSON object, or a field the gateway reads has the wrong type "
            "(the message names it); or the upstream's own 400, relayed.",
            "field 'stream' must be true or false",
        ),
        401: (
            "No API key, or a wrong one: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
            "missing API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        ),
        403: ("Forbidden.", "this route requires the gateway's admin key"),
        404: (
            "No such route: a path parameter that leaves this route's pattern; or the "
            "upstream's own 404 (an unknown model), relayed.",
            "no such route",
        ),
        405: (
            "The route does not take this method; Allow lists the ones it takes.",
            "method not allowed: see the README for the routes",
        ),
        413: (
            f"The body is over {config.server.max_body_bytes} bytes (server.max_body_bytes).",
            f"request body over the {config.server.max_body_bytes}-byte limit",
        ),
        429: (
            "Over the client's or the global request rate, or the client's token rate "
            f"(limits.*; {limits.client_requests_per_minute:g} requests per minute per client "
            "unless its key says otherwise). Retry-After is the real wait.",
            "rate limit exceeded (60 requests per minute per client); retry in 2 s",
        ),
        501: (
            "This gateway's upstream speaks only the OpenAI-compatible API "
            "(upstream.kind: openai): use /v1/* or /chat.",
            "this gateway's upstream speaks only the OpenAI-compatible API "
            "(upstream.kind: openai); use /v1/* or /chat",
        ),
        502: (
            "The upstream could not be reached (after upstream.max_retries retries), or "
            "closed the connection before answering.",
            f"cannot connect to the upstream at {upstream.url}: connection refused",
        ),
        503: (
            f"The wait queue is full ({limits.max_queue} requests, {limits.max_queue_per_client} "
            f"per client), or no gate slot became free within {limits.queue_timeout_s:g} s "
            "(limits.queue_timeout_s); Retry-After comes from recent service times, at most "
            "60. Or the upstream's own 503 (busy) once retries are spent.",
            "the gateway's wait queue is full; retry later",
        ),
        504: (
            f"The upstream sent no response headers within {upstream.headers_timeout_s:g} s "
            "(upstream.headers_timeout_s), or did not finish within the total timeout.",
            f"the upstream sent no response headers within {upstream.headers_timeout_s:g} s",
        ),
    }
    return table[status]


def header(name: str, *, required: bool) -> Schema:
    return {**HEADERS[name], "required": required}


def error_response(
    status: int,
    dialect: Dialect,
    config: Config,
    *,
    note: Note | None = None,
    code: str | None = None,
    rate_headers: bool = False,
    body: bool = True,
) -> Schema:
    """The response object of one gateway error: its meaning, headers and dialect's body.

    ``rate_headers``: the request was admitted first, so the client's bucket state rides
    along (required on a 429, which also carries Retry-After).
    """
    description, message = note or _describe(status, config)
    codes = [code] if code else codes_by_status()[status]
    text = f"{description} Codes: {', '.join(codes)}."
    headers = {"X-Request-ID": header("X-Request-ID", required=True)}
    if status in (429, 503):
        headers["Retry-After"] = header("Retry-After", required=status == 429)
    if rate_headers:
        for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
            headers[name] = header(name, required=status == 429)
    if status == 405:
        headers["Allow"] = header("Allow", required=True)
    response: Schema = {"description": text, "headers": headers}
    if body:
        shape = "OpenAIError" if dialect.openai_errors else "OllamaError"
        example = json.loads(dialect.error_body(status, message, codes[0]))
        response["content"] = {
            "application/json": {"schema": ref("schemas", shape), "example": example}
        }
    return response


def error_responses(
    statuses: Iterable[int],
    dialect: Dialect,
    config: Config,
    *,
    notes: dict[int, Note] | None = None,
    rate_headers: bool = False,
    body: bool = True,
) -> dict[str, Schema]:
    return {
        str(status): error_response(
            status,
            dialect,
            config,
            note=(notes or {}).get(status),
            # Refusals before admission (a key, a route) carry no bucket state.
            rate_headers=rate_headers and status not in (401, 404, 405, 501),
            body=body,
        )
        for status in statuses
    }


def relayed_default(*, body: bool) -> Schema:
    """Whatever else the upstream answers, relayed unchanged."""
    response: Schema = {
        "description": "Any other status is the upstream's own answer, relayed unchanged "
        "(Ollama's or the OpenAI-compatible server's status, headers and body).",
        "headers": {"X-Request-ID": header("X-Request-ID", required=True)},
    }
    if body:
        response["content"] = {"*/*": {"schema": {}}}
    return response


def success(
    description: str,
    media: dict[str, Schema],
    *,
    rate_headers: bool = False,
    clamp_header: bool = False,
    body: bool = True,
) -> Schema:
    headers = {"X-Request-ID": header("X-Request-ID", required=True)}
    if rate_headers:
        for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
            headers[name] = header(name, required=True)
    if clamp_header:
        headers["X-Context-Length-Clamped"] = header("X-Context-Length-Clamped", required=False)
    response: Schema = {"description": description, "headers": headers}
    if body:
        response["content"] = media
    return response


def method_not_allowed(dialect: Dialect, config: Config) -> Schema:
    """The router's 405, for ``components.responses`` (an undocumented method gets it)."""
    return error_response(405, dialect, config)
