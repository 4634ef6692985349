"""/openapi.json and /docs through the running gateway, and /docs in a real browser."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import async_playwright

from tests.conftest import GatewayFactory, RunningGateway, metric

pytestmark = pytest.mark.timeout(60)

KEYED = {"api_keys": [{"name": "alice", "key": "alice-key-123"}]}
ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def test_the_description_needs_no_key_and_is_not_counted(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """With keys required, /openapi.json answers without one, names its server, and is unmetered."""
    gw = await gateway_factory(auth=KEYED)
    async with http.get(gw.url + "/openapi.json") as response:
        assert response.status == 200
        assert response.headers["X-Request-ID"]
        document = await response.json()
    assert document["openapi"] == "3.1.0"
    assert document["servers"][0]["url"] == gw.url
    assert document["paths"]["/api/chat"]["post"]["security"]
    assert metric(await gw.metrics_text(), "ollama_requests_total", endpoint="/openapi.json") == 0


async def test_the_page_loads_only_from_the_gateway(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """/docs and every file it names come from the gateway, under a CSP that allows nothing else."""
    async with http.get(gateway.url + "/docs") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        page = await response.text()
    assert "http" not in page  # relative URLs only: no CDN
    for name, kind in (
        ("swagger-ui-bundle.js", "text/javascript"),
        ("swagger-ui.css", "text/css"),
        ("init.js", "text/javascript"),
        ("favicon-32x32.png", "image/png"),
    ):
        assert f"docs/{name}" in page
        async with http.get(f"{gateway.url}/docs/{name}") as response:
            assert response.status == 200, name
            assert response.content_type == kind
            assert len(await response.read()) > 100
    async with http.get(gateway.url + "/docs/nope.js") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"


async def test_docs_can_be_turned_off(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """server.enable_docs: false leaves /docs and /openapi.json to the 404 of any unknown path."""
    gw = await gateway_factory(server={"enable_docs": False})
    for path in ("/docs", "/openapi.json", "/docs/init.js"):
        async with http.get(gw.url + path) as response:
            assert response.status == 404, path
            assert (await response.json())["error"]["code"] == "not_found"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
async def test_a_browser_renders_the_operations(gateway_factory: GatewayFactory) -> None:
    """Headless chromium renders /docs with the gateway's routes, loading nothing from elsewhere."""
    gw = await gateway_factory(auth=KEYED)
    requested: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            # Root in a container needs --no-sandbox; the rest keep it off the network.
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
            ],
        )  # fmt: skip
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1600})
            page.on("request", lambda request: requested.append(request.url))
            await page.goto(gw.url + "/docs")
            await page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            paths = set(await page.locator(".opblock-summary-path").all_inner_texts())
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "docs.png"))
            assert await page.locator(".errors-wrapper").count() == 0
        finally:
            await browser.close()
    assert {"/api/chat", "/v1/chat/completions", "/chat", "/health", "/metrics"} <= paths
    assert requested
    assert all(url.startswith(gw.url + "/") for url in requested), requested
