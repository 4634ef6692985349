"""The real-engine tier: one llama.cpp engine per module, the real gateway in front of it.

The tier is skipped, with the reason, only when the engine is not installed (``just engine``
builds it); an engine that is installed but fails to start is an error, never a skip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import pytest
import pytest_asyncio

from proxy.app import create_app
from proxy.cli.engine import ALIAS, Engine, EngineUnavailableError, find_model, running_engine
from proxy.config import parse_config
from tests.conftest import GatewayTestServer, RunningGateway, gateway_config

PROMPT = [{"role": "user", "content": "Tell me about the sea."}]


def engine_missing() -> str | None:
    """Why the engine cannot run here, or None when it is installed."""
    try:
        find_model()
    except EngineUnavailableError as exc:
        return str(exc)
    return None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[Engine]:
    reason = engine_missing()
    if reason is not None:
        pytest.skip(f"real-engine tier: {reason}")
    async with running_engine() as running:
        yield running


EngineGateway = Callable[..., Awaitable[RunningGateway]]


@pytest_asyncio.fixture(loop_scope="module")
async def engine_gateway(engine: Engine) -> AsyncIterator[EngineGateway]:
    """Start gateways (fresh metrics each) in front of the module's engine."""
    servers: list[GatewayTestServer] = []

    async def start(**sections: Any) -> RunningGateway:
        upstream = {"kind": "openai", "url": engine.url, "default_model": ALIAS}
        config = gateway_config(engine.url, **{"upstream": upstream, **sections})
        app = create_app(parse_config(config))
        server = GatewayTestServer(app, port=0)
        await server.start_server()
        servers.append(server)
        return RunningGateway(server, app)

    yield start
    for server in servers:
        await server.close()


@pytest_asyncio.fixture(loop_scope="module")
async def gateway(engine_gateway: EngineGateway) -> RunningGateway:
    return await engine_gateway()


@pytest_asyncio.fixture(loop_scope="module")
async def client(gateway: RunningGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK, through the gateway."""
    sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    yield sdk
    await sdk.close()
