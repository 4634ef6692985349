"""The route table and the relaying handlers.

An inference request's story, in order (cheap checks first, and a gate slot held only
while the upstream works, never during a slow upload):

    identify -> rate limit -> read + validate body -> take a gate slot -> open upstream -> relay
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

from proxy.admission.admit import Gated, admit
from proxy.admission.body import body_chunks, read_body
from proxy.admission.keys import Principal
from proxy.errors import InvalidRequestError, UnsupportedByBackendError
from proxy.exchange import EXCHANGE, Exchange
from proxy.gateway import GATEWAY, Gateway
from proxy.upstream.client import Body
from proxy.upstream.forward import forward

INFERENCE = "inference"  # rate limited, gated, body read and checked
METADATA = "metadata"  # authenticated, relayed as is
MANAGEMENT = "management"  # model management: the admin key only


@dataclass(frozen=True, slots=True)
class RouteSpec:
    kind: str
    generates: bool = False  # produces completion tokens (not an embedding)
    openai: bool = False
    streams_body: bool = False  # request body relayed as a stream (model blobs: gigabytes)


ROUTES: dict[tuple[str, str], RouteSpec] = {
    ("POST", "/api/generate"): RouteSpec(INFERENCE, generates=True),
    ("POST", "/api/chat"): RouteSpec(INFERENCE, generates=True),
    ("POST", "/api/embed"): RouteSpec(INFERENCE),
    ("POST", "/api/embeddings"): RouteSpec(INFERENCE),
    ("POST", "/api/show"): RouteSpec(METADATA),
    ("GET", "/api/tags"): RouteSpec(METADATA),
    ("HEAD", "/api/tags"): RouteSpec(METADATA),
    ("GET", "/api/ps"): RouteSpec(METADATA),
    ("GET", "/api/version"): RouteSpec(METADATA),
    ("HEAD", "/api/version"): RouteSpec(METADATA),
    ("GET", "/"): RouteSpec(METADATA),
    ("HEAD", "/"): RouteSpec(METADATA),
    ("POST", "/api/pull"): RouteSpec(MANAGEMENT),
    ("POST", "/api/push"): RouteSpec(MANAGEMENT),
    ("POST", "/api/create"): RouteSpec(MANAGEMENT),
    ("POST", "/api/copy"): RouteSpec(MANAGEMENT),
    ("DELETE", "/api/delete"): RouteSpec(MANAGEMENT),
    ("HEAD", "/api/blobs/{digest}"): RouteSpec(MANAGEMENT),
    ("POST", "/api/blobs/{digest}"): RouteSpec(MANAGEMENT, streams_body=True),
    ("POST", "/v1/chat/completions"): RouteSpec(INFERENCE, generates=True, openai=True),
    ("POST", "/v1/completions"): RouteSpec(INFERENCE, generates=True, openai=True),
    ("POST", "/v1/embeddings"): RouteSpec(INFERENCE, openai=True),
    ("GET", "/v1/models"): RouteSpec(METADATA, openai=True),
    ("GET", "/v1/models/{model:.+}"): RouteSpec(METADATA, openai=True),
}
# A blob's name, as Ollama checks it: nothing that could walk out of its blobs folder.
_DIGEST = re.compile(r"sha256[:-][0-9a-fA-F]{64}")
# By aiohttp's canonical form of each path (``{model:.+}`` becomes ``{model}``).
_BY_CANONICAL = {(m, re.sub(r"\{(\w+):[^}]+\}", r"{\1}", p)): s for (m, p), s in ROUTES.items()}


def spec_for(method: str, endpoint: str) -> RouteSpec:
    spec = _BY_CANONICAL.get((method, endpoint))
    if spec is None:  # pragma: no cover - every registered route has a spec
        raise web.HTTPMethodNotAllowed(method, [])
    return spec


async def relay_route(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    exchange = request[EXCHANGE]
    spec = spec_for(request.method, exchange.endpoint)
    if not spec.openai and gateway.config.upstream.kind != "ollama":
        raise UnsupportedByBackendError(
            "this gateway's upstream speaks only the OpenAI-compatible API "
            "(upstream.kind: openai); use /v1/* or /chat"
        )
    principal = gateway.access.identify(request)
    exchange.client = principal.name
    if spec.kind == MANAGEMENT:
        gateway.access.require_admin(principal)
        digest = request.match_info.get("digest")
        if digest is not None and not _DIGEST.fullmatch(digest):
            raise InvalidRequestError("invalid blob digest: expected sha256:<64 hex digits>")
    if spec.kind == INFERENCE:
        return await infer(request, gateway, exchange, principal, spec)
    server = gateway.config.server
    body: Body = None
    if spec.streams_body:
        body = body_chunks(request, server.body_timeout_s)
    elif request.can_read_body:
        body = await read_body(request, server.max_body_bytes, server.body_timeout_s)
    return await forward(request, gateway.upstream, exchange, body)


async def infer(
    request: web.Request,
    gateway: Gateway,
    exchange: Exchange,
    principal: Principal,
    spec: RouteSpec,
) -> web.StreamResponse:
    admit(gateway, exchange, principal)
    server = gateway.config.server
    raw = await read_body(request, server.max_body_bytes, server.body_timeout_s)
    prepared = gateway.policy.prepare(raw, openai=spec.openai, generates=spec.generates)
    exchange.model = prepared.model
    if prepared.clamped_num_ctx is not None:
        exchange.headers["X-Context-Length-Clamped"] = str(prepared.clamped_num_ctx)
    async with Gated(gateway, exchange, principal, prepared.token_estimate):
        return await forward(
            request,
            gateway.upstream,
            exchange,
            prepared.body,
            strip_usage=prepared.strip_usage,
            inference=True,
            generates=spec.generates,
        )
