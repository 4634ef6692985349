"""The load test against the real gateway and the fake Ollama: counts, timings and outputs."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.fake_ollama import FakeOllama
from loadtest.report import summarize
from loadtest.runner import RunConfig, run_load
from loadtest.scrape import parse_text, server_view
from tests.conftest import MODEL, GatewayFactory, RunningGateway, run_module

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def unused_url() -> Iterator[str]:
    """A port bound but not listening: connecting to it is refused, and nobody else gets it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def config(gateway: RunningGateway, **kw: object) -> RunConfig:
    base: dict[str, object] = {
        "url": gateway.url,
        "dialect": "openai",
        "model": MODEL,
        "requests": 12,
        "concurrency": 3,
    }
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("dialect", ["chat", "ollama", "openai"])
@pytest.mark.parametrize("stream", [True, False])
async def test_every_dialect_counts_tokens_from_the_final_statistics(
    gateway: RunningGateway, fake: FakeOllama, dialect: str, stream: bool
) -> None:
    """Each route, streamed or not, succeeds and reports the tokens the fake sent."""
    fake.config.tokens = 6
    result = await run_load(config(gateway, dialect=dialect, stream=stream, requests=6))
    summary = summarize(result.samples, result.wall_s)
    assert summary.outcomes["success"] == 6
    assert summary.completion_tokens == fake.totals["eval_count"] == 36
    assert summary.prompt_tokens == fake.totals["prompt_eval_count"]
    assert summary.ttft_s.count == (6 if stream else 0)
    assert all(s.streamed == stream for s in result.samples)
    assert [s.index for s in result.samples] == list(range(6))


async def test_closed_loop_keeps_the_concurrency_and_the_gateway_agrees(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """At concurrency 4 the upstream sees 4 at once, and /metrics counts what the client did."""
    fake.config.num_parallel = 8
    fake.config.tokens = 5
    fake.config.token_interval_s = 0.01
    gateway = await gateway_factory(limits={"parallel": 8})
    before = await gateway.metrics_text()
    result = await run_load(config(gateway, requests=16, concurrency=4))
    after = await gateway.metrics_text()
    assert fake.max_active == 4
    view = server_view(parse_text(before), parse_text(after), "/v1/chat/completions")
    summary = summarize(result.samples, result.wall_s)
    assert view.requests == {"success": summary.outcomes["success"]} == {"success": 16}
    assert view.completion_tokens == summary.completion_tokens == 80
    assert view.ttft_mean_s is not None
    assert summary.ttft_s.mean is not None
    assert view.ttft_mean_s <= summary.ttft_s.mean  # the client's includes the network hop


async def test_open_loop_starts_requests_on_schedule_even_when_earlier_ones_are_slow(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """At 20/s, request 10 starts before request 1 ends, and latency counts from the schedule."""
    fake.config.num_parallel = 16
    fake.config.tokens = 8
    fake.config.token_interval_s = 0.1  # each answer takes about 0.8 s
    gateway = await gateway_factory(limits={"parallel": 16})
    result = await run_load(config(gateway, requests=10, rate=20.0))
    assert [s.start_s for s in result.samples] == pytest.approx([i / 20 for i in range(10)])
    assert all(s.outcome == "success" for s in result.samples)
    first_done = fake.seen[0].finished
    assert first_done is not None
    assert fake.seen[-1].started < first_done
    assert fake.max_active >= 8


async def test_duration_bounds_when_requests_start(gateway: RunningGateway) -> None:
    """With a duration, no request starts after it; those in flight are still counted."""
    result = await run_load(config(gateway, requests=None, duration_s=0.3, concurrency=2))
    assert result.samples
    assert all(s.start_s < 0.3 for s in result.samples)
    assert all(s.outcome == "success" for s in result.samples)


async def test_rate_limited_requests_are_counted_as_429_with_retry_after(
    gateway_factory: GatewayFactory,
) -> None:
    """A client limit of a burst of 3 lets 3 through; the rest are 429 with a Retry-After."""
    gateway = await gateway_factory(limits={"client_requests_per_minute": 1, "client_burst": 3})
    before = await gateway.metrics_text()
    result = await run_load(config(gateway, requests=10, concurrency=2))
    after = await gateway.metrics_text()
    summary = summarize(result.samples, result.wall_s)
    assert summary.outcomes["success"] == 3
    assert summary.outcomes["429"] == 7
    refused = [s for s in result.samples if s.outcome == "429"]
    assert all(s.retry_after_s is not None and s.retry_after_s >= 1 for s in refused)
    assert all(s.error is not None and s.error.startswith("HTTP 429") for s in refused)
    view = server_view(parse_text(before), parse_text(after), "/v1/chat/completions")
    assert view.requests == {"success": 3, "rate_limited": 7}


async def test_a_full_queue_is_counted_as_503(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """One slot and no queue: while one answer streams, the other requests get 503."""
    fake.config.tokens = 5
    fake.config.token_interval_s = 0.05
    gateway = await gateway_factory(limits={"parallel": 1, "max_queue": 0})
    result = await run_load(config(gateway, requests=6, concurrency=3))
    summary = summarize(result.samples, result.wall_s)
    assert summary.outcomes["503"] >= 2
    assert summary.outcomes["success"] + summary.outcomes["503"] == 6
    assert all(s.retry_after_s is not None for s in result.samples if s.outcome == "503")


async def test_a_midstream_failure_and_an_unreachable_server_are_errors(
    gateway: RunningGateway, fake: FakeOllama, unused_url: str
) -> None:
    """A stream cut by an error frame and a refused connection both count as error."""
    fake.config.mode = "midstream_error"
    result = await run_load(config(gateway, requests=2, concurrency=1))
    assert [s.outcome for s in result.samples] == ["error", "error"]
    assert all(s.status == 200 for s in result.samples)
    refused = await run_load(RunConfig(url=unused_url, dialect="chat", requests=2, concurrency=1))
    assert [s.outcome for s in refused.samples] == ["error", "error"]
    assert all(s.status == 0 and s.error for s in refused.samples)


async def test_unknown_model_is_other(gateway: RunningGateway) -> None:
    """The upstream's 404 for a model it does not have is counted as other, with its message."""
    result = await run_load(config(gateway, model="nope:1b", requests=2, concurrency=1))
    assert [s.outcome for s in result.samples] == ["other", "other"]
    assert "not found" in (result.samples[0].error or "")


async def test_plot_is_written(gateway: RunningGateway, tmp_path: Path) -> None:
    """--plot draws a PNG of the run."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot/test extras)")
    from loadtest.plot import write_plot

    result = await run_load(config(gateway, requests=8))
    path = tmp_path / "run.png"
    write_plot(result.samples, summarize(result.samples, result.wall_s), path, "test run")
    assert path.read_bytes().startswith(b"\x89PNG")


async def test_command_line_prints_the_table_and_writes_json(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """`python -m loadtest` prints progress to stderr, the tables to stdout, and writes JSON."""
    gateway = await gateway_factory(limits={"client_requests_per_minute": 1, "client_burst": 4})
    out = tmp_path / "run.json"
    argv = ["--url", gateway.url, "--dialect", "chat", "--requests", "6", "--concurrency", "2"]
    argv += ["--prompts", "short", "--metrics", "--json", str(out)]
    code, text, stderr = await run_module("loadtest", *argv, timeout_s=20)
    assert code == 0, stderr
    assert "p50" in text
    assert "Client vs gateway" in text
    assert "6/6" in stderr
    document = json.loads(out.read_text())
    assert len(document["samples"]) == 6
    assert document["summary"]["outcomes"] == {
        "success": 4,
        "error": 0,
        "429": 2,
        "503": 0,
        "other": 0,
    }
    assert document["server"]["requests"] == {"success": 4, "rate_limited": 2}
    assert "api_key" not in document["config"]


def test_impossible_settings_are_refused_before_any_request() -> None:
    """Zero concurrency, a non-positive rate or no size at all is a ValueError naming it."""
    with pytest.raises(ValueError, match="concurrency"):
        RunConfig(concurrency=0)
    with pytest.raises(ValueError, match="rate"):
        RunConfig(rate=0)
    with pytest.raises(ValueError, match="requests or duration"):
        RunConfig(requests=None)
    with pytest.raises(ValueError, match="dialect"):
        RunConfig(dialect="grpc")
