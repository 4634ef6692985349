"""``python -m loadtest.bench.naive_relay``: the naive aiohttp relay, a benchmark baseline.

What a reverse proxy in aiohttp looks like with nothing else: read the request, send it
upstream, copy the response back chunk by chunk. The gateway must beat it with every
feature on (issue 6), so the bench measures both in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    url = request.app[UPSTREAM] + request.path_qs
    async with request.app[SESSION].request(
        request.method, url, data=body, headers=headers
    ) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            headers={"Content-Type": upstream.headers.get("Content-Type", "")},
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def app(upstream: str) -> web.Application:
    async def session(application: web.Application) -> AsyncIterator[None]:
        application[SESSION] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await application[SESSION].close()

    application = web.Application()
    application[UPSTREAM] = upstream.rstrip("/")
    application.router.add_route("*", "/{path:.*}", relay)
    application.cleanup_ctx.append(session)
    return application


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.naive_relay")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args(argv)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        loop = asyncio.new_event_loop()
    web.run_app(
        app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
        loop=loop,
    )


if __name__ == "__main__":
    main()
