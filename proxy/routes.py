"""The route table and the relaying handlers.

An inference request's story, in order (cheap checks first, and a gate slot held only
while the upstream works, never during a slow upload):

    identify -> rate limit -> read + validate body -> take a gate slot -> open upstream -> relay
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

from aiohttp import web

from proxy.admission.body import read_body
from proxy.admission.keys import Principal
from proxy.errors import RateLimitedError, UnsupportedByBackendError, UpstreamTimeoutError
from proxy.exchange import EXCHANGE, Exchange
from proxy.gateway import GATEWAY, Gateway
from proxy.upstream.client import Body, UpstreamResponse
from proxy.upstream.forward import Attempts, forward_request_headers
from proxy.upstream.relay import relay

INFERENCE = "inference"  # rate limited, gated, body read and checked
METADATA = "metadata"  # authenticated, relayed as is
ADMIN = "admin"  # model management: admin key only


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
    ("GET", "/api/ps"): RouteSpec(METADATA),
    ("GET", "/api/version"): RouteSpec(METADATA),
    ("GET", "/"): RouteSpec(METADATA),
    ("POST", "/api/pull"): RouteSpec(ADMIN),
    ("POST", "/api/push"): RouteSpec(ADMIN),
    ("POST", "/api/create"): RouteSpec(ADMIN),
    ("POST", "/api/copy"): RouteSpec(ADMIN),
    ("DELETE", "/api/delete"): RouteSpec(ADMIN),
    ("HEAD", "/api/blobs/{digest}"): RouteSpec(ADMIN),
    ("POST", "/api/blobs/{digest}"): RouteSpec(ADMIN, streams_body=True),
    ("POST", "/v1/chat/completions"): RouteSpec(INFERENCE, generates=True, openai=True),
    ("POST", "/v1/completions"): RouteSpec(INFERENCE, generates=True, openai=True),
    ("POST", "/v1/embeddings"): RouteSpec(INFERENCE, openai=True),
    ("GET", "/v1/models"): RouteSpec(METADATA, openai=True),
    ("GET", "/v1/models/{model:.+}"): RouteSpec(METADATA, openai=True),
}
# By aiohttp's canonical form of each path (``{model:.+}`` becomes ``{model}``).
_BY_CANONICAL = {(m, re.sub(r"\{(\w+):[^}]+\}", r"{\1}", p)): s for (m, p), s in ROUTES.items()}


def spec_for(method: str, endpoint: str) -> RouteSpec:
    spec = _BY_CANONICAL.get((method, endpoint))
    if spec is None and method == "HEAD":  # aiohttp answers HEAD on GET routes
        spec = _BY_CANONICAL.get(("GET", endpoint))
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
    if spec.kind == ADMIN:
        gateway.access.require_admin(principal)
    if spec.kind == INFERENCE:
        return await infer(request, gateway, exchange, principal, spec)
    body: Body = None
    if spec.streams_body:
        body = request.content.iter_any()
    elif request.can_read_body:
        body = await read_body(request, gateway.config.server.max_body_bytes)
    return await forward(request, gateway, exchange, body)


def admit(gateway: Gateway, exchange: Exchange, principal: Principal) -> None:
    """Take a request from the client's and the global bucket, or refuse with 429."""
    decision = gateway.limiter.admit(principal.bucket, principal.limit)
    exchange.headers.update(decision.headers())
    if not decision.admitted:
        exchange.headers["Retry-After"] = str(decision.retry_after_s)
        raise RateLimitedError(
            f"rate limit exceeded ({decision.why}); retry in {decision.retry_after_s} s",
            retry_after_s=decision.retry_after_s,
        )


def reserve_tokens(
    gateway: Gateway, exchange: Exchange, principal: Principal, estimate: int
) -> None:
    if principal.limit.tokens_per_minute <= 0:
        return
    decision = gateway.limiter.reserve_tokens(principal.bucket, principal.limit, estimate)
    if not decision.admitted:
        exchange.headers["Retry-After"] = str(decision.retry_after_s)
        raise RateLimitedError(
            f"token rate limit exceeded ({int(principal.limit.tokens_per_minute)} tokens per "
            f"minute); retry in {decision.retry_after_s} s",
            retry_after_s=decision.retry_after_s,
        )


class Gated:
    """``async with Gated(...)``: reserve the client's LLM tokens, hold a gate slot for the
    body, settle the tokens. (A class: generator-based context managers cost more, and
    this one is entered on every inference request.)"""

    __slots__ = ("_exchange", "_gateway", "_principal", "_slot", "_token_estimate")

    def __init__(
        self, gateway: Gateway, exchange: Exchange, principal: Principal, token_estimate: int
    ) -> None:
        self._gateway = gateway
        self._exchange = exchange
        self._principal = principal
        self._token_estimate = token_estimate
        self._slot = gateway.gate.slot(principal.bucket)

    async def __aenter__(self) -> None:
        exchange = self._exchange
        reserve_tokens(self._gateway, exchange, self._principal, self._token_estimate)
        exchange.phase = "queued"
        try:
            exchange.queue_wait_s = await self._slot.__aenter__()
        except BaseException:
            self._settle()
            raise
        exchange.phase = "upstream"

    async def __aexit__(self, *exc_info: object) -> None:
        await self._slot.__aexit__(*exc_info)
        self._settle()

    def _settle(self) -> None:
        # Settled only with real statistics: a request that ended without them (aborted,
        # cut, refused upstream) keeps its reservation, so aborting a stream earns no refund.
        principal, exchange = self._principal, self._exchange
        if principal.limit.tokens_per_minute > 0 and exchange.completion_tokens is not None:
            actual = (exchange.prompt_tokens or 0) + exchange.completion_tokens
            self._gateway.limiter.settle_tokens(
                principal.bucket, principal.limit, self._token_estimate, actual
            )


async def infer(
    request: web.Request,
    gateway: Gateway,
    exchange: Exchange,
    principal: Principal,
    spec: RouteSpec,
) -> web.StreamResponse:
    admit(gateway, exchange, principal)
    raw = await read_body(request, gateway.config.server.max_body_bytes)
    prepared = gateway.policy.prepare(raw, openai=spec.openai, generates=spec.generates)
    exchange.model = prepared.model
    if prepared.clamped_num_ctx is not None:
        exchange.headers["X-Context-Length-Clamped"] = str(prepared.clamped_num_ctx)
    async with Gated(gateway, exchange, principal, prepared.token_estimate):
        return await forward(
            request,
            gateway,
            exchange,
            prepared.body,
            strip_usage=prepared.strip_usage,
            inference=True,
            generates=spec.generates,
        )


async def forward(
    request: web.Request,
    gateway: Gateway,
    exchange: Exchange,
    body: Body,
    *,
    strip_usage: bool = False,
    inference: bool = False,
    generates: bool = False,
) -> web.StreamResponse:
    """Open the upstream request and relay its response."""
    cfg = gateway.config.upstream
    deadline = time.monotonic() + cfg.total_timeout_s if cfg.total_timeout_s else None
    with await open_upstream(
        request,
        gateway,
        exchange,
        method=request.method,
        path=request.path_qs,
        body=body,
        is_json=inference,
        deadline=deadline,
    ) as upstream:
        if upstream.status >= 400:
            exchange.fail("UpstreamStatus", f"the upstream answered {upstream.status}")
        return await relay(
            request,
            upstream,
            exchange,
            strip_usage=strip_usage,
            counts_usage=inference,
            count_chunks=cfg.kind != "ollama",
            require_end=generates,
            deadline=deadline,
        )


async def open_upstream(
    request: web.Request,
    gateway: Gateway,
    exchange: Exchange,
    *,
    method: str,
    path: str,
    body: Body,
    is_json: bool = False,
    deadline: float | None = None,
) -> UpstreamResponse:
    """The upstream's response (headers received); use it as ``with`` to release it.

    The client's headers go along, filtered; a finished body keeps its connection for the
    next request, while an unfinished one (the client left, the stream broke) closes it
    at once so that Ollama stops generating.
    """
    cfg = gateway.config.upstream
    headers = forward_request_headers(
        request.headers,
        peer=request.remote,
        request_id=exchange.request_id,
        api_key=cfg.api_key,
        # Validated JSON: say so, whatever the client sent (curl -d says form-urlencoded,
        # which Ollama ignores but OpenAI-compatible servers may not).
        content_type="application/json" if is_json else None,
    )
    attempts = Attempts()
    opening = gateway.upstream.open(method, path, headers, body, attempts)
    try:
        if deadline is None:
            return await opening
        async with asyncio.timeout_at(_loop_deadline(deadline)):
            return await opening
    except TimeoutError:
        raise UpstreamTimeoutError(
            f"the upstream did not answer within the total timeout of {cfg.total_timeout_s:g} s"
        ) from None
    finally:
        exchange.retries = attempts.retries


def _loop_deadline(deadline: float) -> float:
    """``time.monotonic()`` and the loop clock agree on Linux; convert for other loops."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())
