"""The route table and the relaying handlers.

An inference request's story, in order (cheap checks first, and a gate slot held only
while the upstream works, never during a slow upload):

    identify -> rate limit -> read + validate body -> route -> take a slot on a backend
    -> open upstream (moving to another backend while nothing reached one) -> relay
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

from proxy.admission.admit import BACKEND_HEADER, Gated, admit, named_backend, session_of
from proxy.admission.body import body_chunks, read_body
from proxy.admission.keys import Principal
from proxy.errors import InvalidRequestError, UnsupportedByBackendError
from proxy.exchange import EXCHANGE, Exchange
from proxy.frames import json_object
from proxy.gateway import GATEWAY, Gateway
from proxy.upstream.backends import Backend
from proxy.upstream.client import Body
from proxy.upstream.forward import Fixed, forward
from proxy.upstream.listings import MERGED, merged

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
    native = not spec.openai
    backends = gateway.backends
    if native and not any(backend.speaks(native=True) for backend in backends.all):
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
    if backends.several and request.path in MERGED:
        return await merged(request, gateway, exchange)
    server = gateway.config.server
    body: Body = None
    if spec.streams_body:
        body = body_chunks(request, server.body_timeout_s)
    elif request.can_read_body:
        body = await read_body(request, server.max_body_bytes, server.body_timeout_s)
    if spec.kind == MANAGEMENT:
        backend = _named_backend(request, gateway)
    else:
        backend = backends.holder(_model_named(request, body), native=native)
    exchange.backend = backend.name
    return await forward(request, Fixed(backend), exchange, body)


async def infer(
    request: web.Request,
    gateway: Gateway,
    exchange: Exchange,
    principal: Principal,
    spec: RouteSpec,
) -> web.StreamResponse:
    await admit(gateway, exchange, principal)
    server = gateway.config.server
    raw = await read_body(request, server.max_body_bytes, server.body_timeout_s)
    prepared = gateway.policy.prepare(raw, openai=spec.openai, generates=spec.generates)
    exchange.model = prepared.model
    if prepared.clamped_num_ctx is not None:
        exchange.headers["X-Context-Length-Clamped"] = str(prepared.clamped_num_ctx)
    native = not spec.openai
    only = named_backend(request, gateway.backends.by_name)
    await gateway.probe.learn(prepared.model)
    gateway.backends.check_route(
        prepared.model, native=native, retry_after_s=gateway.gate.retry_after_s(), only=only
    )
    place = Gated(
        gateway,
        exchange,
        principal,
        prepared.token_estimate,
        model=prepared.model,
        native=native,
        session=session_of(request, principal),
        only=only,
    )
    async with place:
        return await forward(
            request,
            place,
            exchange,
            prepared.body,
            strip_usage=prepared.strip_usage,
            inference=True,
            generates=spec.generates,
        )


def _named_backend(request: web.Request, gateway: Gateway) -> Backend:
    """A model-management request's backend: the one ``X-Backend`` names (needed when there
    are several: a pull or delete acts on one box)."""
    backends = gateway.backends
    name = named_backend(request, backends.by_name)
    if name is not None:
        return backends.by_name[name]
    if backends.several:
        raise InvalidRequestError(
            f"this gateway has several backends: name the one to act on with the "
            f"{BACKEND_HEADER} header (one of {', '.join(backends.by_name)})"
        )
    return backends.all[0]


def _model_named(request: web.Request, body: Body) -> str | None:
    """The model a listing or info request is about (``/api/show``, ``/v1/models/{model}``)."""
    model = request.match_info.get("model")
    if model is None and isinstance(body, bytes) and body:
        obj = json_object(body)
        value = (obj.get("model") or obj.get("name")) if obj is not None else None
        model = value if isinstance(value, str) else None
    return model
