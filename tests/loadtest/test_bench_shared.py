"""The shared-state section's pure parts: Redis's counters less the bench's own reading, the
requests admitted, the pairing within rounds, the renewal bound, the targets and the table."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.bench import results, shared_results
from loadtest.bench.__main__ import parse_args, settings_from


def _reading(calls: dict[str, int], reads: int, cpu_s: float, info_usec: int = 0) -> dict[str, Any]:
    return {
        "calls": calls,
        "reads": reads,
        "connections": 3,
        "cpu_s": cpu_s,
        "info_usec": info_usec,
    }


@pytest.mark.timeout(5)
def test_the_benchs_own_info_is_taken_out_of_redis_counters() -> None:
    """Each INFO the bench sent is one call, one read event and its commandstats time."""
    before = _reading({"info": 10, "evalsha": 100, "hello": 2}, reads=500, cpu_s=1.0, info_usec=900)
    after = _reading(
        {"info": 13, "evalsha": 120, "zrem": 10, "publish": 10, "hello": 2},
        reads=533,
        cpu_s=1.0042,
        info_usec=1100,
    )
    delta = shared_results.redis_delta(before, after)
    assert delta["calls"] == {"evalsha": 20, "publish": 10, "zrem": 10}  # no INFO, no zeros
    assert delta["reads"] == 30  # 33 read events, 3 of them the bench's INFO
    assert delta["cpu_s"] == pytest.approx(0.004)  # 4.2 ms, 0.2 ms of it in INFO
    assert delta["connections"] == 0


@pytest.mark.timeout(5)
def test_admitted_requests_are_those_that_had_a_backend() -> None:
    """A request counted with backend="none" never took a slot: refused or given up."""
    text = "\n".join(
        [
            "# TYPE ollama_requests_total counter",
            'ollama_requests_total{backend="default",endpoint="/v1/chat/completions",'
            'status="success"} 120',
            'ollama_requests_total{backend="default",endpoint="/api/chat",status="error"} 3.0',
            'ollama_requests_total{backend="none",endpoint="/api/chat",status="rejected"} 7',
            'ollama_rate_limited_total{client="x"} 7',
        ]
    )
    assert shared_results.requests_counted(text) == (123, 7)


def _run(p50: float, cpu: float, admitted: int, delta: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "latency_p50_ms": p50,
        "latency_p99_ms": p50 * 2,
        "cpu_us_per_request": cpu,
        "requests_per_s": 100.0,
        "errors": 0,
        "admitted": admitted,
        "not_admitted": 0,
        "redis": delta,
    }


def _delta(evalsha: int, zrem: int, reads: int, cpu_s: float) -> dict[str, Any]:
    return {
        "calls": {"evalsha": evalsha, "zrem": zrem, "publish": zrem},
        "reads": reads,
        "connections": 0,
        "cpu_s": cpu_s,
    }


# Two rounds; in the second the machine was slower for both gateways.
RUNS = {
    "small": {
        "local": [_run(1.0, 300, 100, None), _run(2.0, 400, 50, None)],
        "redis": [
            _run(1.5, 500, 100, _delta(200, 100, 300, 0.01)),
            _run(2.7, 700, 50, _delta(101, 50, 152, 0.01)),
        ],
    }
}


def summary() -> dict[str, Any]:
    return shared_results.summarise_shared(RUNS, redis_version="7.0", rounds=2)


@pytest.mark.timeout(5)
def test_redis_counts_are_per_admitted_request_over_every_round() -> None:
    """Calls and round trips are totals over the rounds divided by the requests admitted."""
    redis = summary()["workloads"]["small"]["redis"]
    assert redis["admitted"] == 150
    assert redis["round_trips_per_request"] == pytest.approx(452 / 150)
    assert redis["evalsha_per_request"] == pytest.approx(301 / 150)
    assert redis["commands_per_request"] == pytest.approx((301 + 150 + 150) / 150)
    assert redis["calls_per_request"]["zrem"] == pytest.approx(1.0)
    assert redis["redis_cpu_us_per_request"] == pytest.approx(150)  # median of 100 and 200
    local = summary()["workloads"]["small"]["local"]
    assert local["round_trips_per_request"] is None
    assert local["redis_cpu_us_per_request"] is None


@pytest.mark.timeout(5)
def test_what_redis_adds_is_paired_within_each_round() -> None:
    """Latency and CPU added are Redis's minus in-process's of the same round."""
    added = summary()["workloads"]["small"]["added"]["redis"]
    assert added["latency_p50_range_ms"] == pytest.approx([0.5, 0.7])
    assert added["latency_p50_ms"] == pytest.approx(0.6)
    assert added["latency_p99_ms"] == pytest.approx(1.2)
    assert added["cpu_range_us"] == pytest.approx([200, 300])
    assert added["cpu_us"] == pytest.approx(250)
    assert "redis_tokens" not in summary()["workloads"]["small"]["added"]


@pytest.mark.timeout(5)
def test_renewals_are_bounded_by_the_lease_whatever_the_streams() -> None:
    """At one renewal per lease/3, a window holds at most its length in periods, plus one."""
    delta = {"calls": {"evalsha": 6, "zadd": 48}, "reads": 6, "connections": 0, "cpu_s": 0.0}
    long = shared_results.long_streams(delta, streams=8, window_s=3.0, lease_s=1.5)
    assert long["renewals"] == 6
    assert long["most_renewals"] == 7
    assert long["renewals_per_s"] == pytest.approx(2.0)
    assert long["renewals_per_stream_per_s"] == pytest.approx(0.25)
    assert long["bound_per_s"] == pytest.approx(2.0)
    assert long["commands"] == 54


def _shared(trips: float, trips_tokens: float, renewals: int) -> dict[str, Any]:
    def entry(value: float) -> dict[str, Any]:
        return {"round_trips_per_request": value, "evalsha_per_request": value - 1}

    long = shared_results.long_streams(
        {"calls": {"evalsha": renewals}, "reads": renewals, "connections": 0, "cpu_s": 0.0},
        streams=8,
        window_s=3.0,
        lease_s=1.5,
    )
    workloads = {"small": {"redis": entry(trips), "redis_tokens": entry(trips_tokens)}}
    return {"shared": {"workloads": workloads, "long_streams": long}}


@pytest.mark.timeout(5)
def test_shared_targets_count_one_round_trip_per_decision() -> None:
    """3 round trips (5 with a token limit) to 2 decimals, and renewals within the bound."""
    targets = shared_results.evaluate_targets(_shared(3.004, 5.0, 6))
    assert [t["target"] for t in targets] == [name for name, _ in shared_results.TARGETS]
    assert [t["passed"] for t in targets] == [True, True, True]
    assert "rate, slot claim, slot release" in targets[0]["note"]
    over = shared_results.evaluate_targets(_shared(3.01, 5.2, 8))
    assert [t["passed"] for t in over] == [False, False, False]
    assert shared_results.evaluate_targets({"shared": {"skipped": "no redis-server"}}) == []
    assert shared_results.evaluate_targets({}) == []


@pytest.mark.timeout(5)
def test_a_shared_only_result_renders_or_says_why_not() -> None:
    """`--only shared` prints its table and targets; without redis-server, the reason."""
    shared = summary() | {
        "slots": 64,
        "duration_s": 0.6,
        "connections": 8,
        "chunks": 50,
        "concurrency": 8,
        "streams": 100,
        "long_streams": shared_results.long_streams(
            {"calls": {"evalsha": 6}, "reads": 6, "connections": 0, "cpu_s": 0.0},
            streams=8,
            window_s=3.0,
            lease_s=1.5,
        ),
    }
    result: dict[str, Any] = {
        "machine": {"nproc": 2, "cpu": "test CPU", "python": "3.11"},
        "settings": {"rounds": 2},
        "shared": shared,
    }
    result["targets"] = shared_results.evaluate_targets(result)
    text = results.render(result, shared_results.render_lines(result))
    assert "Redis round trips per request" in text
    assert "Redis adds: latency p50 +0.600 ms (rounds +0.500..+0.700)" in text
    assert "lease renewals (EVALSHA): 6 = 2.00 per s" in text
    assert "scaling" not in text
    skipped = {**result, "shared": {"skipped": "no redis-server"}, "targets": []}
    text = results.render(skipped, shared_results.render_lines(skipped))
    assert "shared state (issue 16): skipped: no redis-server" in text


@pytest.mark.timeout(5)
def test_the_cli_runs_the_shared_section_alone() -> None:
    """`--only shared` picks the section; its sizes come from their flags."""
    args = parse_args(["--only", "shared", "--shared-duration", "0.5", "--shared-streams", "40"])
    assert args.only == "shared"
    s = settings_from(args)
    assert (s.shared_duration_s, s.shared_streams) == (0.5, 40)
