"""The benchmark runs end to end at tiny sizes, and its pure parts compute what they claim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.bench import results, shared_results
from loadtest.bench.services import cpu_seconds, nginx_conf
from loadtest.bench.wrk import lua_script, parse_wrk
from tests.conftest import run_module

WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:39713/api/tags
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.51ms    2.10ms  19.88ms   92.59%
    Req/Sec     7.64k     2.68k   11.11k    70.00%
  Latency Distribution
     50%  890.00us
     75%    1.19ms
     90%    2.50ms
     99%   12.29ms
  7619 requests in 1.00s, 8.46MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   7600.17
Transfer/sec:      8.44MB
"""


@pytest.mark.timeout(5)
def test_wrk_output_is_parsed_with_units() -> None:
    """Requests/s, p50/p99 in seconds whatever wrk's unit, and errors from both error lines."""
    parsed = parse_wrk(WRK_OUTPUT)
    assert parsed.requests_per_s == 7600.17
    assert parsed.latency_p50_s == pytest.approx(890e-6)
    assert parsed.latency_p99_s == pytest.approx(12.29e-3)
    assert parsed.requests == 7619
    assert parsed.errors == 7
    with pytest.raises(ValueError, match="unexpected wrk output"):
        parse_wrk("wrk: connection refused")


# A child that burns 0.3 s of CPU, says so, then waits; and a parent that waits with it.
BUSY = """
import sys, time
while time.process_time() < 0.3:
    pass
print(flush=True)
sys.stdin.read()
"""
PARENT = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {BUSY!r}], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
print(child.stdout.readline().decode(), end="", flush=True)
sys.stdin.read()
child.communicate()
"""


@pytest.mark.timeout(20)
def test_cpu_seconds_counts_the_work_of_children() -> None:
    """nginx works in a child of the process the bench starts: its CPU counts too."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        parent.stdout.readline()  # the child has used 0.3 s of CPU and waits
        assert cpu_seconds(parent.pid) >= 0.29
    finally:
        parent.communicate(timeout=10)


@pytest.mark.timeout(5)
def test_lua_script_posts_the_body_as_json() -> None:
    """The wrk script's body literal decodes (as JSON, which Lua reads alike) to the body."""
    body = {"model": "m", "messages": [{"role": "user", "content": 'say "hi"\n'}]}
    script = lua_script(body)
    literal = script.split("wrk.body = ", 1)[1].split("\n", 1)[0]
    assert json.loads(json.loads(literal)) == body
    assert 'wrk.method = "POST"' in script


@pytest.mark.timeout(5)
def test_nginx_config_is_a_fair_baseline(tmp_path: Path) -> None:
    """One worker, no buffering, HTTP/1.1 keep-alive upstream, foreground, files in the temp dir."""
    conf = nginx_conf(8080, "http://127.0.0.1:9000", tmp_path)
    for directive in (
        "worker_processes 1;",
        "daemon off;",
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "server 127.0.0.1:9000; keepalive",
        "listen 127.0.0.1:8080;",
    ):
        assert directive in conf
    assert f"pid {tmp_path}/nginx.pid;" in conf


@pytest.mark.timeout(5)
def test_ratios_and_added_latency_are_paired_within_rounds() -> None:
    """A ratio is taken within each round, then the median over rounds is reported."""
    runs = {
        "direct": [{"rate": 100.0, "p50": 1.0}, {"rate": 50.0, "p50": 2.0}, {"rate": 80, "p50": 1}],
        "nginx": [{"rate": 90.0, "p50": 1.5}, {"rate": 45.0, "p50": 2.5}, {"rate": 72, "p50": 1.5}],
        "gateway": [{"rate": 50.0, "p50": 3.0}, {"rate": 40.0, "p50": 3.0}, {"rate": 40, "p50": 2}],
    }
    out = results.summarise(runs, "rate", ("p50",))
    assert out["direct"]["rate"] == 80
    assert out["ratios"]["nginx_vs_direct"] == pytest.approx(0.9)
    assert out["ratios"]["gateway_vs_direct"] == pytest.approx(0.5)  # 0.5, 0.8, 0.5
    assert out["ratio_ranges"]["gateway_vs_direct"] == pytest.approx([0.5, 0.8])
    assert out["ratio_ranges"]["gateway_vs_nginx"] == pytest.approx([50 / 90, 40 / 45])
    assert out["ratio_ranges"]["gateway_vs_naive"] is None  # no naive relay in this run
    assert out["added_ms"]["gateway"]["p50"] == pytest.approx(1.0)  # 2, 1, 1
    alone = results.summarise({"direct": runs["direct"], "gateway": runs["gateway"]}, "rate", ())
    assert alone["ratios"]["gateway_vs_nginx"] is None


def _result(**memory: object) -> dict[str, object]:
    added = {"gateway": {"ttft_p50_ms": 0.4}}
    return {
        "streaming": {
            "ratios": {"gateway_vs_nginx": 0.9, "gateway_vs_naive": 1.2},
            "added_ms": added,
        },
        "small": {
            "/api/tags": {"ratios": {"gateway_vs_nginx": 0.6, "gateway_vs_naive": 1.1}},
            "/v1/chat/completions": {"ratios": {"gateway_vs_nginx": 0.4, "gateway_vs_naive": 0.9}},
        },
        "memory": {
            "idle_mb": 40.0,
            "streams": 500,
            "streams_mb": 90.0,
            "streaming": 500,
            "queued": 0,
            "parallel": 512,
        }
        | memory,
        "startup": {"median_s": 0.4},
    }


@pytest.mark.timeout(5)
def test_targets_pass_miss_or_not_measured() -> None:
    """Each target compares its measured value; the worst small-request ratio is the one judged."""
    targets = results.evaluate_targets(_result())
    assert [t["passed"] for t in targets] == [True, False, False, True, False, True, True, True]
    assert targets[1]["measured"] == 0.9  # the worst small-request ratio against naive
    assert targets[4]["measured"] == 0.4
    assert all(t["note"] == "" for t in targets)
    few = results.evaluate_targets(_result(streams=20))
    assert few[6]["passed"] is None  # 500 streams were not measured
    capped = results.evaluate_targets(_result(streaming=256, queued=244, parallel=256))
    assert "256 streaming + 244 queued" in capped[6]["note"]


@pytest.mark.timeout(120)
async def test_smoke_run_writes_every_field(tmp_path: Path) -> None:
    """`python -m loadtest.bench --smoke` finishes in seconds and its JSON has every field."""
    out = tmp_path / "bench.json"
    code, stdout, stderr = await run_module(
        "loadtest.bench", "--smoke", "--json", str(out),
        "--no-engine",  # (the real-engine tier runs its own: tests/engine)
        timeout_s=100,
    )  # fmt: skip
    assert code == 0, stderr[-3000:]
    assert "targets" in stdout
    doc = json.loads(out.read_text())
    assert set(doc) >= {"machine", "baselines", "tools", "settings", "streaming", "small"}
    assert set(doc) >= {"memory", "startup", "targets"}
    assert doc["baselines"][0] == "direct"
    names = ["direct", *doc["baselines"][1:], "gateway"]
    for name in names:
        assert set(doc["streaming"][name]) >= {"chunks_per_s", "ttft_p50_ms", "ttft_p99_ms"}
        assert doc["streaming"][name]["errors"] == 0
    ratio_keys = {
        "nginx_vs_direct",
        "naive_vs_direct",
        "gateway_vs_direct",
        "gateway_vs_nginx",
        "gateway_vs_naive",
    }
    assert set(doc["streaming"]["ratios"]) == ratio_keys
    assert doc["streaming"]["ratios"]["gateway_vs_naive"] is not None
    low, high = doc["streaming"]["ratio_ranges"]["gateway_vs_naive"]
    assert low <= doc["streaming"]["ratios"]["gateway_vs_naive"] <= high
    assert set(doc["streaming"]["added_ms"]["gateway"]) == {"ttft_p50_ms", "ttft_p99_ms"}
    assert doc["streaming_light"]["gateway"]["ttft_p50_ms"] > 0
    # CPU time comes from /proc in clock ticks (10 ms): a tiny run may not use one, so a
    # measured 0 is a true answer here; what must hold is a number that is not negative.
    for name in ("gateway", "naive"):
        assert is_cpu_time(doc["streaming"][name]["cpu_us_per_stream"])
    for path in ("/api/tags", "/v1/chat/completions"):
        block = doc["small"][path]
        for name in names:
            assert set(block[name]) >= {"requests_per_s", "latency_p50_ms", "latency_p99_ms"}
            assert block[name]["errors"] == 0
        assert set(block["ratios"]) == ratio_keys
        for name in ("gateway", "naive", *(["nginx"] if "nginx" in doc["baselines"] else [])):
            assert is_cpu_time(block[name]["cpu_us_per_request"])
    memory = doc["memory"]
    assert set(memory) >= {"idle_mb", "streams", "streams_mb", "streaming", "queued"}
    assert memory["scrape_idle_ms"] > 0
    assert memory["scrape_streams_ms"] > 0
    assert memory["streaming"] + memory["queued"] == memory["streams"]
    assert {"after_load_mb", "parallel"} <= set(memory)
    assert len(doc["startup"]["runs_s"]) == 1
    assert doc["startup"]["median_s"] > 0
    shared_ran = "skipped" not in doc["shared"]
    expected = [*results.TARGETS, *(shared_results.TARGETS if shared_ran else ())]
    assert [t["target"] for t in doc["targets"]] == [name for name, _ in expected]
    assert all(set(t) == {"target", "unit", "measured", "passed", "note"} for t in doc["targets"])
    assert_scaling_shape(doc["scaling"], largest=doc["settings"]["scaling_backends"])
    if shared_ran:
        assert_shared_shape(doc["shared"], long_streams=doc["settings"]["long_streams"])
    else:  # no redis-server here: the section says so
        assert "redis-server" in doc["shared"]["skipped"]
        assert "shared state (issue 16): skipped" in stdout.decode()


def assert_scaling_shape(scaling: dict[str, Any], *, largest: int) -> None:
    """What a tiny scaling run always gives: every N, numbers present and not negative, no
    request failed, and requests only on the backends each gateway has. Never a speed."""
    ns = [str(n) for n in range(1, largest + 1)]
    assert list(scaling["backends"]) == ns
    assert list(scaling["one_upstream"]) == ns
    assert {"generation_ms", "clients_per_slot", "generations_per_slot"} <= set(scaling)
    for n in ns:
        several, one = scaling["backends"][n], scaling["one_upstream"][n]
        for entry in (several, one):
            assert is_non_negative(entry["generations_per_s"])
            assert is_cpu_time(entry["cpu_us_per_request"])
            assert entry["errors"] == 0
        assert set(several["served"]) <= {f"b{i}" for i in range(1, int(n) + 1)}
        assert sum(several["served"].values()) > 0
        assert set(one["served"]) == {"default"}
        low, high = several["ratio_range"]
        assert 0 <= low <= several["ratio"] <= high
        assert isinstance(several["cpu_added_us"], int | float)
    assert scaling["worst_ratio"] == min(scaling["backends"][n]["ratio"] for n in ns)


def assert_shared_shape(shared: dict[str, Any], *, long_streams: int) -> None:
    """What a tiny shared-state run always gives: every workload on every gateway, requests
    admitted and none failed, Redis's figures for the Redis gateways only, numbers present
    and not negative (what Redis adds may be either sign), and the long streams' renewals
    counted. Never a speed, and no count that background calls could move."""
    assert list(shared["workloads"]) == list(shared_results.WORKLOADS)
    redis_keys = (
        "round_trips_per_request",
        "evalsha_per_request",
        "commands_per_request",
        "redis_cpu_us_per_request",
    )
    for block in shared["workloads"].values():
        for key, _title, shares, _tokens in shared_results.CONFIGS:
            entry = block[key]
            assert entry["admitted"] > 0
            assert entry["errors"] == 0
            for name in ("latency_p50_ms", "latency_p99_ms", "cpu_us_per_request"):
                assert is_non_negative(entry[name]), (key, name, entry[name])
            for name in redis_keys:
                assert is_non_negative(entry[name]) if shares else entry[name] is None
        assert set(block["added"]) == {"redis", "redis_tokens"}
        for added in block["added"].values():
            assert isinstance(added["latency_p50_ms"], int | float)
            assert isinstance(added["cpu_us"], int | float)
            low, high = added["latency_p50_range_ms"]
            assert low <= added["latency_p50_ms"] <= high
    long = shared["long_streams"]
    assert long["streams"] == long_streams
    assert long["held_at_end"] == long_streams
    assert long["window_s"] > 0
    assert is_non_negative(long["renewals"])
    assert is_non_negative(long["renewals_per_s"])
    assert long["most_renewals"] >= 1
    assert isinstance(shared["redis_version"], str)


def is_non_negative(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def is_cpu_time(value: object) -> bool:
    return is_non_negative(value)
