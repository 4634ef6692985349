"""A real Prometheus scrapes the gateway; the PromQL the dashboard and README use works."""

from __future__ import annotations

import math
import shutil

import aiohttp
import pytest

from loadtest.fake_ollama import FakeOllama
from tests.conftest import MODEL, FakeClock, GatewayFactory
from tests.deploy.prometheus import PrometheusServer

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.prometheus,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus missing"),
]


def _value(result: list[dict[str, object]]) -> float:
    assert result, "empty result"
    return float(result[0]["value"][1])  # type: ignore[index]


async def test_prometheus_queries_over_real_traffic(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """rate, increase and histogram_quantile give non-empty, plausible answers after traffic."""
    gw = await gateway_factory(
        clock=FakeClock(), limits={"client_requests_per_minute": 60, "client_burst": 14}
    )
    fake.config.token_interval_s = 0.01
    async with PrometheusServer(f"127.0.0.1:{gw.server.port}") as prom:
        await prom.wait_until_up()
        messages = [{"role": "user", "content": "tell me about the sky"}]
        for i in range(12):
            path, body = (
                ("/api/chat", {"model": MODEL, "messages": messages})
                if i % 2
                else (
                    "/v1/chat/completions",
                    {"model": MODEL, "messages": messages, "stream": True},
                )
            )
            async with http.post(gw.url + path, json=body) as response:
                assert response.status == 200
                await response.read()
        async with http.post(
            gw.url + "/api/chat", json={"model": "missing", "messages": messages}
        ) as r:
            assert r.status == 404
        async with http.post(gw.url + "/api/chat", data=b"{") as r:
            assert r.status == 400
        async with http.post(
            gw.url + "/api/chat", json={"model": MODEL, "messages": messages}
        ) as r:
            assert r.status == 429
        await prom.wait_for_scrapes(2)

        by_status = {
            s["metric"]["status"]: float(s["value"][1])
            for s in await prom.query("sum by (status) (increase(ollama_requests_total[5m]))")
        }
        assert by_status.keys() >= {"success", "error", "rejected", "rate_limited"}
        assert by_status["success"] > by_status["error"] > 0
        assert _value(await prom.query("sum(rate(ollama_requests_total[5m]))")) > 0

        quantiles = []
        for q in (0.5, 0.95, 0.99):
            expr = (
                f"histogram_quantile({q}, sum by (le) "
                "(rate(ollama_request_duration_seconds_bucket[5m])))"
            )
            quantiles.append(_value(await prom.query(expr)))
        assert all(math.isfinite(v) for v in quantiles)
        assert 0.02 < quantiles[0] <= quantiles[1] <= quantiles[2] < 5  # 8 tokens x 10 ms

        ttft_p95 = _value(
            await prom.query(
                "histogram_quantile(0.95, sum by (le) "
                "(rate(ollama_time_to_first_token_seconds_bucket[5m])))"
            )
        )
        assert 0 < ttft_p95 < quantiles[1]

        tokens = _value(await prom.query("sum(increase(ollama_completion_tokens_total[5m]))"))
        assert tokens > 0
        errors = {
            s["metric"]["error_type"]: float(s["value"][1])
            for s in await prom.query("sum by (error_type) (increase(ollama_errors_total[5m]))")
        }
        assert errors["UpstreamStatus"] > 0
        assert errors["ConnectError"] == 0  # pre-initialised series evaluate to zero, not absent
