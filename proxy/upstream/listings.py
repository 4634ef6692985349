"""Listings merged across backends: with several, ``/api/tags``, ``/api/ps`` and
``/v1/models`` ask every answering backend and list each model once (the preferred
backend's entry), so a client sees one Ollama that holds everything the boxes hold."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.errors import UpstreamConnectError
from proxy.exchange import Exchange

if TYPE_CHECKING:
    from proxy.gateway import Gateway
    from proxy.upstream.backends import Backend

# path -> (the list's key, the field that names a model)
MERGED = {
    "/api/tags": ("models", "name"),
    "/api/ps": ("models", "name"),
    "/v1/models": ("data", "id"),
}


async def merged(request: web.Request, gateway: Gateway, exchange: Exchange) -> web.Response:
    path = request.path
    key, field = MERGED[path]
    native = path != "/v1/models"
    backends = [b for b in gateway.backends.all if b.up and b.speaks(native=native)]
    answers = await asyncio.gather(*(_listing(b, path) for b in backends), return_exceptions=True)
    items: list[Any] = []
    seen: set[str] = set()
    answered = False
    for backend, answer in zip(backends, answers, strict=True):
        if not isinstance(answer, dict):
            continue
        answered = True
        for item in answer.get(key) or ():
            name = item.get(field) if isinstance(item, dict) else None
            if not isinstance(name, str) or backend.canonical(name) in seen:
                continue
            seen.add(backend.canonical(name))
            items.append(item)
    if not answered:
        raise UpstreamConnectError("no backend answered the listing")
    body: dict[str, Any] = {"object": "list", "data": items} if key == "data" else {key: items}
    return web.json_response(body, headers=exchange.headers)


async def _listing(backend: Backend, path: str) -> Any:
    key = backend.upstream.api_key
    response = await backend.upstream.get(path, [("Authorization", f"Bearer {key}")] if key else [])
    with response:
        raw = await response.read()
        return json.loads(raw) if response.status == 200 else None
